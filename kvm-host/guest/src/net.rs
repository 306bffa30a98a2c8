//! netvsc from vsc-guest on a real channel: its bring-up (NVSP, buffers as GPADLs, RNDIS, OIDs,
//! packet filter), then Ethernet frames both ways.

use alloc::format;
use alloc::vec::Vec;

use vsc_guest::netvsc::{
    BufferKind, DmaRegion, Netvsc, NetvscConfig, NetvscEvent, RxFrame, TxMeta, ring::NetChannel,
};

use crate::bus::Bus;
use crate::chan::{self, Error, GuestMem, GuestRing, Opened, Serviced};
use crate::mem;

/// Receive and send buffers in pages (Linux uses 16 MiB and 1 MiB; the test needs little).
pub const RECV_PAGES: usize = 16;
pub const SEND_PAGES: usize = 16;
/// Pages for RNDIS control requests in flight.
const CONTROL_PAGES: usize = 2;

pub struct Net {
    pub drv: Netvsc<GuestMem>,
    ch: NetChannel<GuestRing>,
    pub relid: u32,
    connection_id: u32,
    /// Events the caller has not looked at (link, speed, ...), and GPADLs the driver asked for.
    pub link_up: Option<bool>,
    gpadl_requests: Vec<(BufferKind, Vec<u64>)>,
    ready: Option<Result<(), Error>>,
    pub refused: u32,
}

fn region(pages: usize) -> Result<DmaRegion, Error> {
    let gpa = mem::pages(pages).ok_or("out of guest memory for netvsc buffers")?;
    Ok(DmaRegion::new(gpa, pages as u64 * 4096))
}

fn service(n: &mut Net) -> Result<Serviced, Error> {
    let rx =
        n.ch.receive(&mut n.drv, 64)
            .map_err(|e| format!("ring: {e}"))?;
    n.refused += rx.refused.len() as u32;
    if rx.signal {
        chan::signal(n.connection_id);
    }
    let tx =
        n.ch.transmit(&mut n.drv)
            .map_err(|e| format!("ring: {e}"))?;
    if tx.signal {
        chan::signal(n.connection_id);
    }
    while let Some(e) = n.drv.poll_event() {
        match e {
            NetvscEvent::CreateGpadl { buffer, pfns } => n.gpadl_requests.push((buffer, pfns)),
            NetvscEvent::Ready => n.ready = Some(Ok(())),
            NetvscEvent::Failed(e) => n.ready = Some(Err(format!("netvsc bring-up: {e}"))),
            NetvscEvent::Link { up } => n.link_up = Some(up),
            _ => {}
        }
    }
    let pending = n.ch.arm().map_err(|e| format!("ring: {e}"))?;
    Ok(Serviced {
        moved: rx.packets > 0 || tx.written > 0,
        pending,
    })
}

impl Net {
    pub fn new(o: Opened) -> Result<Net, Error> {
        let cfg = NetvscConfig::linux(
            region(RECV_PAGES)?,
            region(SEND_PAGES)?,
            region(CONTROL_PAGES)?,
            None,
        );
        let drv = Netvsc::new(cfg, GuestMem).map_err(|e| format!("netvsc: {e}"))?;
        let ch = NetChannel::new(0, o.up, o.down).map_err(|e| format!("ring: {e}"))?;
        Ok(Net {
            drv,
            ch,
            relid: o.relid,
            connection_id: o.connection_id,
            link_up: None,
            gpadl_requests: Vec::new(),
            ready: None,
            refused: 0,
        })
    }

    /// The whole bring-up, answering the driver's GPADL requests on the way.
    pub fn bring_up(&mut self, bus: &mut Bus) -> Result<(), Error> {
        self.drv.start().map_err(|e| format!("netvsc: {e}"))?;
        let relid = self.relid;
        loop {
            let wanted = chan::drive(self, relid, service, |n| {
                if let Some(r) = n.ready.take() {
                    return Some(Err(r));
                }
                n.gpadl_requests.pop().map(Ok)
            })?;
            match wanted {
                Ok((kind, pfns)) => {
                    let handle = chan::create_gpadl(bus, relid, &pfns)?;
                    self.drv
                        .gpadl_created(kind, handle)
                        .map_err(|e| format!("netvsc: {e}"))?;
                }
                Err(result) => return result,
            }
        }
    }

    /// Sends one frame (waits until the driver queued it).
    pub fn send(&mut self, frame: &[u8]) -> Result<(), Error> {
        self.drv
            .send(0, frame, &TxMeta::default(), false)
            .map_err(|e| format!("send: {e}"))?;
        let relid = self.relid;
        // Push it into the ring now; completions come back with later traffic.
        chan::drive(self, relid, service, |n| {
            (n.drv.queued_packets() == 0).then_some(())
        })
    }

    /// Waits for a received frame `want` accepts; others are dropped (at most `limit`).
    pub fn recv(
        &mut self,
        limit: u32,
        mut want: impl FnMut(&[u8]) -> bool,
    ) -> Result<RxFrame, Error> {
        let relid = self.relid;
        let mut skipped = 0u32;
        chan::drive(self, relid, service, |n| {
            while let Some(f) = n.drv.poll_receive() {
                if want(&f.data) {
                    return Some(Ok(f));
                }
                skipped += 1;
                if skipped > limit {
                    return Some(Err(format!("{skipped} frames, none the one expected")));
                }
            }
            None
        })?
    }
}
