//! A VMBus channel in the guest: ring GPADL in guest pages, OPENCHANNEL, and the two rings
//! (ringbuf's reader/writer over the identity-mapped pages) with HvSignalEvent / SINT 2 signalling.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, Ordering};

use ringbuf::{
    ControlWord, HeaderInfo, OutgoingPacket, PacketType, RingMem, RingReader, RingWriter,
};
use vmbus_core::guest::{ClientEvent, OfferInfo, OpenParams};

use crate::arch::{self, SINT_COUNT};
use crate::bus::Bus;
use crate::{hv, mem};

/// One ring in guest memory: a control page and `data_len` bytes of data pages after it.
pub struct GuestRing {
    base: u64,
    data_len: u32,
}

impl GuestRing {
    fn data(&self) -> *mut u8 {
        (self.base + 4096) as *mut u8
    }

    fn copy(&self, offset: u32, buf: *mut u8, len: usize, to_ring: bool) {
        let d = self.data_len as usize;
        let off = offset as usize % d;
        let first = len.min(d - off);
        // SAFETY: the ring's pages were allocated for it and stay alive; `off + first <= d`, the
        // rest (`len - first <= d`) wraps to the start of the data area; `buf` holds `len` bytes.
        unsafe {
            if to_ring {
                core::ptr::copy_nonoverlapping(buf, self.data().add(off), first);
                core::ptr::copy_nonoverlapping(buf.add(first), self.data(), len - first);
            } else {
                core::ptr::copy_nonoverlapping(self.data().add(off), buf, first);
                core::ptr::copy_nonoverlapping(self.data(), buf.add(first), len - first);
            }
        }
    }
}

impl RingMem for GuestRing {
    fn control(&self, word: ControlWord) -> &AtomicU32 {
        // SAFETY: the control page is ours for the life of the ring; offsets are 4-aligned.
        unsafe { &*((self.base as usize + word.offset()) as *const AtomicU32) }
    }

    fn data_len(&self) -> u32 {
        self.data_len
    }

    fn read_data(&self, offset: u32, dst: &mut [u8]) {
        self.copy(offset, dst.as_mut_ptr(), dst.len(), false);
    }

    fn write_data(&self, offset: u32, src: &[u8]) {
        self.copy(offset, src.as_ptr().cast_mut(), src.len(), true);
    }
}

/// A packet copied out of the host→guest ring.
pub struct Packet {
    pub ty: PacketType,
    pub trans_id: u64,
    pub payload: Vec<u8>,
    /// Transfer-page packets: set id and `(byte_offset, byte_count)` ranges.
    pub set_id: u16,
    pub ranges: Vec<(u32, u32)>,
}

/// Why a channel operation failed.
#[derive(Debug)]
pub enum ChanError {
    NoMemory,
    Client(vmbus_core::guest::ClientError),
    Status(&'static str, u32),
    Ring(ringbuf::RingError),
    Write(ringbuf::WriteError),
}

impl core::fmt::Display for ChanError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ChanError::NoMemory => write!(f, "out of guest memory"),
            ChanError::Client(e) => write!(f, "vmbus client: {e}"),
            ChanError::Status(what, s) => write!(f, "{what}: host status 0x{s:x}"),
            ChanError::Ring(e) => write!(f, "ring: {e}"),
            ChanError::Write(e) => write!(f, "ring write: {e}"),
        }
    }
}

impl From<vmbus_core::guest::ClientError> for ChanError {
    fn from(e: vmbus_core::guest::ClientError) -> Self {
        ChanError::Client(e)
    }
}

impl From<ringbuf::RingError> for ChanError {
    fn from(e: ringbuf::RingError) -> Self {
        ChanError::Ring(e)
    }
}

/// Creates a GPADL over `pages` pages at `gpa` on channel `relid` and waits for GPADL_CREATED.
pub fn create_gpadl(bus: &mut Bus, relid: u32, gpa: u64, pages: usize) -> Result<u32, ChanError> {
    let pfns: Vec<u64> = (0..pages as u64).map(|i| gpa / 4096 + i).collect();
    let handle = bus.client.create_gpadl(relid, &pfns)?;
    match bus.wait(|e| matches!(e, ClientEvent::GpadlCreated { handle: h, .. } if *h == handle)) {
        ClientEvent::GpadlCreated { status: 0, .. } => Ok(handle),
        ClientEvent::GpadlCreated { status, .. } => Err(ChanError::Status("GPADL_CREATED", status)),
        _ => Err(ChanError::Status("GPADL_CREATED", u32::MAX)),
    }
}

pub struct Channel {
    pub relid: u32,
    pub connection_id: u32,
    pub ring_gpadl: u32,
    tx: RingWriter<GuestRing>,
    rx: RingReader<GuestRing>,
    /// HvSignalEvents made, and packets received.
    pub signals: u32,
    pub received: u32,
}

impl Channel {
    /// Opens `offer` with `ring_pages` pages per direction (control page included).
    pub fn open(bus: &mut Bus, offer: &OfferInfo, ring_pages: usize) -> Result<Channel, ChanError> {
        let base = mem::pages(2 * ring_pages).ok_or(ChanError::NoMemory)?;
        let data_len = ((ring_pages - 1) * 4096) as u32;
        let up = GuestRing { base, data_len };
        let down = GuestRing {
            base: base + ring_pages as u64 * 4096,
            data_len,
        };
        ringbuf::init_control(&up);
        ringbuf::init_control(&down);
        let relid = offer.relid;
        let ring_gpadl = create_gpadl(bus, relid, base, 2 * ring_pages)?;
        bus.client
            .open_channel(relid, OpenParams::new(ring_gpadl, ring_pages as u32, 0))?;
        match bus.wait(|e| matches!(e, ClientEvent::OpenResult { relid: r, .. } if *r == relid)) {
            ClientEvent::OpenResult { status: 0, .. } => {}
            ClientEvent::OpenResult { status, .. } => {
                return Err(ChanError::Status("OPENCHANNEL_RESULT", status));
            }
            _ => return Err(ChanError::Status("OPENCHANNEL_RESULT", u32::MAX)),
        }
        Ok(Channel {
            relid,
            connection_id: offer.connection_id,
            ring_gpadl,
            tx: RingWriter::new(up)?,
            rx: RingReader::new(down)?,
            signals: 0,
            received: 0,
        })
    }

    fn signal(&mut self) {
        self.signals += 1;
        hv::signal_event(self.connection_id, 0);
    }

    /// Writes one packet, waiting for ring space if needed, and signals the host when the ring
    /// rules say so.
    pub fn send(&mut self, pkt: &OutgoingPacket<'_>) -> Result<(), ChanError> {
        let mut requested = false;
        loop {
            let seen = SINT_COUNT.load(Ordering::SeqCst);
            match self.tx.try_write(pkt) {
                Ok(signal) => {
                    if requested {
                        self.tx.clear_space_request();
                    }
                    if signal {
                        self.signal();
                    }
                    return Ok(());
                }
                Err(ringbuf::WriteError::Full { .. }) => {
                    // The host signals when it frees space we asked for.
                    let need = pkt.footprint().map_err(ChanError::Write)?;
                    if self.tx.request_space(need)? {
                        continue;
                    }
                    requested = true;
                    arch::wait_sint(seen);
                    hv::take_event(self.relid);
                }
                Err(e) => return Err(ChanError::Write(e)),
            }
        }
    }

    /// Sends an in-band packet.
    pub fn send_inband(
        &mut self,
        trans_id: u64,
        payload: &[u8],
        completion: bool,
    ) -> Result<(), ChanError> {
        let parts: [&[u8]; 1] = [payload];
        self.send(&OutgoingPacket::in_band(trans_id, completion, &parts))
    }

    /// Sends a GPA-direct packet with one range over `len` bytes at page-aligned `gpa`.
    pub fn send_gpa(
        &mut self,
        trans_id: u64,
        payload: &[u8],
        gpa: u64,
        offset: u32,
        len: u32,
    ) -> Result<(), ChanError> {
        let pages = (u64::from(offset) + u64::from(len)).div_ceil(4096);
        let mut headers = Vec::with_capacity(16 + 8 * pages as usize);
        headers.extend_from_slice(&0u32.to_le_bytes()); // reserved
        headers.extend_from_slice(&1u32.to_le_bytes()); // range count
        headers.extend_from_slice(&len.to_le_bytes());
        headers.extend_from_slice(&offset.to_le_bytes());
        for i in 0..pages {
            headers.extend_from_slice(&(gpa / 4096 + i).to_le_bytes());
        }
        let parts: [&[u8]; 1] = [payload];
        self.send(&OutgoingPacket {
            packet_type: PacketType::GpaDirect,
            completion_requested: true,
            trans_id,
            headers: &headers,
            payload: &parts,
        })
    }

    /// The next packet from the host, if one is waiting.
    pub fn try_recv(&mut self) -> Result<Option<Packet>, ChanError> {
        let Some(p) = self.rx.peek()? else {
            return Ok(None);
        };
        let info = *p.info();
        let mut payload = alloc::vec![0u8; p.payload_len()];
        // The length came from the packet itself: the copy cannot be out of bounds.
        let _ = p.copy_payload(0, &mut payload);
        let (set_id, ranges) = match info.header {
            HeaderInfo::TransferPages { set_id, .. } => (
                set_id,
                p.transfer_ranges()
                    .unwrap_or(&[])
                    .iter()
                    .map(|r| (r.byte_offset.get(), r.byte_count.get()))
                    .collect(),
            ),
            _ => (0, Vec::new()),
        };
        p.consume();
        if self.rx.commit()? {
            self.signal();
        }
        self.received += 1;
        Ok(Some(Packet {
            ty: info.packet_type,
            trans_id: info.trans_id,
            payload,
            set_id,
            ranges,
        }))
    }

    /// Waits for the next packet (halting until the host's interrupt for this channel).
    pub fn recv(&mut self) -> Result<Packet, ChanError> {
        loop {
            let seen = SINT_COUNT.load(Ordering::SeqCst);
            hv::take_event(self.relid);
            if let Some(p) = self.try_recv()? {
                return Ok(p);
            }
            arch::wait_sint(seen);
        }
    }

    /// Closes the channel and tears its ring GPADL down (waits for GPADL_TORNDOWN).
    pub fn close(self, bus: &mut Bus) -> Result<(), ChanError> {
        bus.client.close_channel(self.relid)?;
        bus.client.teardown_gpadl(self.relid, self.ring_gpadl)?;
        let handle = self.ring_gpadl;
        bus.wait(|e| matches!(e, ClientEvent::GpadlTorndown { handle: h } if *h == handle));
        Ok(())
    }
}
