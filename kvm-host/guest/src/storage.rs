//! storvsc from vsc-guest on a real channel: the driver's packets through the guest's rings, its
//! init handshake, the Linux SCSI probe (one path/target), and block I/O through its `Disk`.

use alloc::collections::VecDeque;
use alloc::format;
use alloc::vec::Vec;

use vsc_guest::storvsc::{
    Completion, Direction, Disk, LunInfo, Negotiated, PageRange, ProbeConfig, ProbeStep, Prober,
    RingChannel, ScsiAddress, ScsiRequest, Storvsc, StorvscConfig, StorvscEvent,
    probe::PROBE_BUFFER_LEN,
};

use crate::chan::{self, Error, GuestRing, Opened, Serviced};
use crate::mem;
use crate::phase2::now;

/// Time spent on each probe command, by opcode (first occurrence).
pub struct ProbeTimes {
    pub commands: u32,
    pub inquiry: u64,
    pub read_capacity: u64,
}

pub struct Storage {
    pub drv: Storvsc,
    ch: RingChannel<GuestRing>,
    pub relid: u32,
    connection_id: u32,
    completions: VecDeque<Completion>,
    events: VecDeque<StorvscEvent>,
    pub refused: u32,
}

fn service(s: &mut Storage) -> Result<Serviced, Error> {
    let rx =
        s.ch.receive(&mut s.drv, 64)
            .map_err(|e| format!("ring: {e}"))?;
    s.refused += rx.refused.len() as u32;
    if rx.signal {
        chan::signal(s.connection_id);
    }
    let tx =
        s.ch.transmit(&mut s.drv)
            .map_err(|e| format!("ring: {e}"))?;
    if tx.signal {
        chan::signal(s.connection_id);
    }
    while let Some(c) = s.drv.poll_completion() {
        s.completions.push_back(c);
    }
    while let Some(e) = s.drv.poll_event() {
        s.events.push_back(e);
    }
    let pending = s.ch.arm().map_err(|e| format!("ring: {e}"))?;
    Ok(Serviced {
        moved: rx.packets > 0 || tx.written > 0,
        pending,
    })
}

impl Storage {
    pub fn new(o: Opened) -> Result<Storage, Error> {
        let ch = RingChannel::new(0, o.up, o.down).map_err(|e| format!("ring: {e}"))?;
        Ok(Storage {
            drv: Storvsc::new(StorvscConfig::default()),
            ch,
            relid: o.relid,
            connection_id: o.connection_id,
            completions: VecDeque::new(),
            events: VecDeque::new(),
            refused: 0,
        })
    }

    /// The vstor handshake (BEGIN_INITIALIZATION … END_INITIALIZATION).
    pub fn init(&mut self) -> Result<Negotiated, Error> {
        self.drv.start().map_err(|e| format!("storvsc: {e}"))?;
        let relid = self.relid;
        let ev = chan::drive(self, relid, service, |s| {
            let i = s
                .events
                .iter()
                .position(|e| matches!(e, StorvscEvent::Ready(_) | StorvscEvent::InitFailed(_)))?;
            s.events.remove(i)
        })?;
        match ev {
            StorvscEvent::Ready(n) => Ok(n),
            e => Err(format!("storvsc init: {e:?}")),
        }
    }

    /// Runs one SCSI command and waits for its completion. `data` is `(direction, gpa, len)` of
    /// a page-aligned buffer.
    pub fn run(
        &mut self,
        addr: ScsiAddress,
        cdb: vsc_guest::storvsc::Cdb,
        data: Option<(Direction, u64, u32)>,
        tagged: bool,
        tag: u64,
    ) -> Result<Completion, Error> {
        let (off, pfns) = match data {
            Some((_, gpa, len)) => vsc_guest::storvsc::contiguous_pfns(gpa, len),
            None => (0, Vec::new()),
        };
        let range = match data {
            Some((dir, _, len)) => Some((
                dir,
                PageRange::new(off, len, &pfns).map_err(|e| format!("buffer: {e}"))?,
            )),
            None => None,
        };
        self.drv
            .submit(&ScsiRequest {
                addr,
                cdb,
                data: range,
                tagged,
                tag,
            })
            .map_err(|e| format!("submit: {e}"))?;
        let relid = self.relid;
        chan::drive(self, relid, service, |s| {
            let i = s.completions.iter().position(|c| c.tag == tag)?;
            s.completions.remove(i)
        })
    }

    /// The SCSI probe of path 0 / target 0, as Linux runs it. Returns the LUNs and the time of
    /// the commands the demo reports.
    pub fn probe(&mut self, n: &Negotiated) -> Result<(Vec<LunInfo>, ProbeTimes), Error> {
        let scratch = mem::pages((PROBE_BUFFER_LEN / 4096) as usize).ok_or("out of memory")?;
        let mut p = Prober::new(ProbeConfig::single(0, 0, n.version));
        let mut times = ProbeTimes {
            commands: 0,
            inquiry: 0,
            read_capacity: 0,
        };
        let mut data = Vec::new();
        loop {
            let cmd = match p.next_step() {
                ProbeStep::Done => break,
                ProbeStep::Run(cmd) => cmd,
            };
            let buf = (cmd.alloc > 0).then_some((Direction::In, scratch, cmd.alloc));
            let t = now();
            times.commands += 1;
            let c = self.run(
                cmd.addr,
                cmd.cdb,
                buf,
                cmd.tagged,
                0x1000 + u64::from(times.commands),
            )?;
            let dt = now() - t;
            let op = cmd.cdb.opcode();
            if op == 0x12 && cmd.cdb.byte(1) & 1 == 0 && times.inquiry == 0 {
                times.inquiry = dt;
            }
            if (op == 0x25 || op == 0x9E) && times.read_capacity == 0 {
                times.read_capacity = dt;
            }
            match c.result() {
                Ok(got) => {
                    data.resize(got as usize, 0);
                    mem::read(scratch, &mut data);
                    p.complete(Ok(&data));
                }
                Err(e) => p.complete(Err(e)),
            }
        }
        Ok((p.into_luns(), times))
    }

    /// Writes (`write`) or reads `len` bytes at `lba` from/into the buffer at `gpa`. Returns the
    /// bytes moved.
    pub fn io(
        &mut self,
        disk: &Disk,
        write: bool,
        lba: u64,
        gpa: u64,
        len: u32,
        tag: u64,
    ) -> Result<u32, Error> {
        let blocks = disk
            .blocks_in(u64::from(len))
            .map_err(|e| format!("disk: {e}"))?;
        let (cdb, dir) = if write {
            (disk.write(lba, blocks, false), Direction::Out)
        } else {
            (disk.read(lba, blocks), Direction::In)
        };
        let cdb = cdb.map_err(|e| format!("disk: {e}"))?;
        let c = self.run(disk.addr, cdb, Some((dir, gpa, len)), disk.tagged, tag)?;
        c.result().map_err(|e| format!("I/O: {e}"))
    }
}
