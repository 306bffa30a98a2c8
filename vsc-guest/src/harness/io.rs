//! I/O through the harness: asynchronous submit / poll (what a QD32 benchmark uses), blocking
//! read / write / flush / unmap, and raw SCSI commands. Requests larger than the disk's
//! per-command limit are split and complete as one.

use super::HarnessError;
use super::memory::DmaBuffer;
use super::vm::StorHarness;
use crate::storvsc::{
    Cdb, Completion, Direction, DiscardData, IoError, PageRange, ScsiAddress, ScsiRequest,
    StorvscError,
};
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// An asynchronous request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IoOp {
    /// Read `buf.len()` bytes at `lba` into `buf` (a whole number of blocks).
    Read { lba: u64, buf: DmaBuffer },
    /// Write `buf` at `lba`.
    Write { lba: u64, buf: DmaBuffer, fua: bool },
    /// Make completed writes durable (nothing is sent when the write cache is off).
    Flush,
    /// Discard `blocks` at `lba` (UNMAP or WRITE SAME as the disk dictates).
    Unmap { lba: u64, blocks: u64 },
}

/// A finished asynchronous request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IoDone {
    pub tag: u64,
    /// Bytes moved (reads: may be short on DATA_OVERRUN), or the first error of its commands.
    pub result: Result<u64, IoError>,
}

struct Op {
    user: bool,
    parts: u32,
    done: u32,
    bytes: u64,
    error: Option<IoError>,
    last: Option<Completion>,
    /// Buffers the harness allocated for this op (discard data), freed when it ends.
    temp: Vec<DmaBuffer>,
}

#[derive(Default)]
pub(super) struct Ops {
    ops: HashMap<u64, Op>,
    next: u64,
    done: VecDeque<IoDone>,
    sync_done: HashMap<u64, (Result<u64, IoError>, Option<Completion>)>,
}

impl Ops {
    fn open(&mut self, user: bool) -> u64 {
        self.next += 1;
        self.ops.insert(
            self.next,
            Op {
                user,
                parts: 0,
                done: 0,
                bytes: 0,
                error: None,
                last: None,
                temp: Vec::new(),
            },
        );
        self.next
    }
}

impl StorHarness {
    fn deadline(&self) -> Instant {
        Instant::now() + self.cfg.timeout
    }

    /// Queues one command of op `tag` on the least busy channel, servicing the rings while all
    /// channels are full.
    fn send(
        &mut self,
        tag: u64,
        addr: ScsiAddress,
        cdb: Cdb,
        data: Option<(Direction, PageRange<'_>)>,
        tagged: bool,
    ) -> Result<(), HarnessError> {
        let req = ScsiRequest {
            addr,
            cdb,
            data,
            tagged,
            tag,
        };
        let deadline = self.deadline();
        loop {
            match self.driver.submit(&req) {
                Ok(_) => break,
                Err(StorvscError::Busy(_)) => {
                    if Instant::now() > deadline {
                        return Err(HarnessError::Timeout("room for another request"));
                    }
                    if !self.service()? {
                        self.wait(Duration::from_millis(1))?;
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        if let Some(op) = self.ops.ops.get_mut(&tag) {
            op.parts += 1;
        }
        Ok(())
    }

    /// Sends `len` bytes of `buf` from `offset` as data of a command.
    #[allow(clippy::too_many_arguments)]
    fn send_buf(
        &mut self,
        tag: u64,
        addr: ScsiAddress,
        cdb: Cdb,
        dir: Direction,
        buf: &DmaBuffer,
        offset: u64,
        len: u32,
        tagged: bool,
    ) -> Result<(), HarnessError> {
        let (byte_offset, pfns) = buf
            .pages_of(offset, len)
            .ok_or(HarnessError::BufferBounds {
                offset,
                len: u64::from(len),
                size: buf.len(),
            })?;
        let range = PageRange::new(byte_offset, len, &pfns).map_err(StorvscError::Range)?;
        self.send(tag, addr, cdb, Some((dir, range)), tagged)
    }

    /// Writes queued packets to the rings and signals the VSP.
    fn flush_rings(&mut self) -> Result<(), HarnessError> {
        for c in &mut self.channels {
            let tx = c.chan.transmit(&mut self.driver)?;
            if tx.signal {
                c.kick.ring()?;
            }
        }
        Ok(())
    }

    /// A driver completion: account it to its op.
    pub(super) fn complete(&mut self, c: Completion) {
        if let Some(n) = self.per_channel.get_mut(usize::from(c.channel)) {
            *n += 1;
        }
        let Some(op) = self.ops.ops.get_mut(&c.tag) else {
            return;
        };
        op.done += 1;
        match c.result() {
            Ok(n) => op.bytes += u64::from(n),
            Err(e) => {
                op.error.get_or_insert(e);
            }
        }
        op.last = Some(c);
        if op.done < op.parts {
            return;
        }
        let Some(op) = self.ops.ops.remove(&c.tag) else {
            return;
        };
        for b in op.temp {
            self.ram.free(b);
        }
        let result = op.error.map_or(Ok(op.bytes), Err);
        if op.user {
            self.ops.done.push_back(IoDone { tag: c.tag, result });
        } else {
            self.ops.sync_done.insert(c.tag, (result, op.last));
        }
    }

    /// Abandons an op whose submission failed half way (its sent parts still complete into it).
    fn seal(&mut self, tag: u64, e: HarnessError) -> HarnessError {
        if let Some(op) = self.ops.ops.get(&tag)
            && op.parts == 0
            && let Some(op) = self.ops.ops.remove(&tag)
        {
            for b in op.temp {
                self.ram.free(b);
            }
        }
        e
    }

    /// Submits an asynchronous request; its completion comes from [`Self::poll`] with the
    /// returned tag.
    pub fn submit(&mut self, op: IoOp) -> Result<u64, HarnessError> {
        let tag = self.ops.open(true);
        match self.submit_parts(tag, op) {
            Ok(()) => {
                if self.ops.ops.get(&tag).is_some_and(|o| o.parts == 0) {
                    // Nothing to send (flush with the write cache off).
                    self.ops.ops.remove(&tag);
                    self.ops.done.push_back(IoDone { tag, result: Ok(0) });
                }
                self.flush_rings()?;
                Ok(tag)
            }
            Err(e) => Err(self.seal(tag, e)),
        }
    }

    fn submit_parts(&mut self, tag: u64, op: IoOp) -> Result<(), HarnessError> {
        let disk = self.disk()?.clone();
        match op {
            IoOp::Read { ref buf, .. } | IoOp::Write { ref buf, .. } if buf.is_empty() => {
                Err(HarnessError::Disk(crate::storvsc::DiskError::Empty))
            }
            IoOp::Read { lba, ref buf } | IoOp::Write { lba, ref buf, .. } => {
                let (write, fua) = match op {
                    IoOp::Write { fua, .. } => (true, fua),
                    _ => (false, false),
                };
                let blocks = disk.blocks_in(buf.len())?;
                // Check the whole range before sending any part.
                if lba.checked_add(blocks).is_none_or(|end| end > disk.blocks) {
                    return Err(crate::storvsc::DiskError::OutOfRange {
                        lba,
                        blocks,
                        capacity: disk.blocks,
                    }
                    .into());
                }
                let dir = if write { Direction::Out } else { Direction::In };
                let mut done = 0u64;
                while done < blocks {
                    let n = (blocks - done).min(u64::from(disk.max_blocks));
                    let cdb = if write {
                        disk.write(lba + done, n, fua)?
                    } else {
                        disk.read(lba + done, n)?
                    };
                    let off = done * u64::from(disk.block_size);
                    let len = u32::try_from(n * u64::from(disk.block_size))
                        .map_err(|_| HarnessError::Disk(crate::storvsc::DiskError::Empty))?;
                    self.send_buf(tag, disk.addr, cdb, dir, buf, off, len, disk.tagged)?;
                    done += n;
                }
                Ok(())
            }
            IoOp::Flush => match disk.flush() {
                Some(cdb) => self.send(tag, disk.addr, cdb, None, disk.tagged),
                None => Ok(()),
            },
            IoOp::Unmap { lba, blocks } => {
                for cmd in disk.discard(lba, blocks)? {
                    let bytes = match &cmd.data {
                        DiscardData::UnmapList(v) => v.clone(),
                        DiscardData::ZeroBlock(n) => vec![0; *n as usize],
                    };
                    let b = self.ram.alloc(bytes.len() as u64)?;
                    self.ram.write(&b, 0, &bytes)?;
                    if let Some(op) = self.ops.ops.get_mut(&tag) {
                        op.temp.push(b.clone());
                    }
                    let len = bytes.len() as u32;
                    self.send_buf(
                        tag,
                        disk.addr,
                        cmd.cdb,
                        Direction::Out,
                        &b,
                        0,
                        len,
                        disk.tagged,
                    )?;
                }
                Ok(())
            }
        }
    }

    /// Finished requests, waiting up to `timeout` for at least one when any is in flight.
    pub fn poll(&mut self, timeout: Duration) -> Result<Vec<IoDone>, HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.service()?;
            if !self.ops.done.is_empty() {
                return Ok(self.ops.done.drain(..).collect());
            }
            if self.ops.ops.values().all(|o| !o.user) || Instant::now() > deadline {
                return Ok(Vec::new());
            }
            self.wait(Duration::from_millis(1).min(timeout))?;
        }
    }

    /// Waits for request `tag` (other completions stay queued for [`Self::poll`]).
    pub fn wait_for(&mut self, tag: u64) -> Result<Result<u64, IoError>, HarnessError> {
        let deadline = self.deadline();
        loop {
            if let Some(i) = self.ops.done.iter().position(|d| d.tag == tag)
                && let Some(d) = self.ops.done.remove(i)
            {
                return Ok(d.result);
            }
            if !self.ops.ops.contains_key(&tag) {
                return Err(HarnessError::UnknownTag(tag));
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Timeout("an I/O completion"));
            }
            if !self.service()? {
                self.wait(Duration::from_millis(1))?;
            }
        }
    }

    /// Asynchronous requests in flight.
    pub fn in_flight(&self) -> usize {
        self.ops.ops.values().filter(|o| o.user).count()
    }

    fn run(&mut self, op: IoOp) -> Result<u64, HarnessError> {
        let tag = self.submit(op)?;
        Ok(self.wait_for(tag)??)
    }

    /// Reads `buf.len()` bytes (whole blocks) at `lba`.
    pub fn read(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), HarnessError> {
        let b = self.ram.alloc(buf.len() as u64)?;
        let r = self.run(IoOp::Read {
            lba,
            buf: b.clone(),
        });
        let r = r.and_then(|got| {
            if got != buf.len() as u64 {
                return Err(HarnessError::ShortTransfer {
                    expected: buf.len() as u64,
                    got,
                });
            }
            self.ram.read(&b, 0, buf)
        });
        self.ram.free(b);
        r
    }

    /// Writes `data` (whole blocks) at `lba`.
    pub fn write(&mut self, lba: u64, data: &[u8]) -> Result<(), HarnessError> {
        self.write_with(lba, data, false)
    }

    /// Writes with FUA (honoured when the disk reports DPOFUA).
    pub fn write_with(&mut self, lba: u64, data: &[u8], fua: bool) -> Result<(), HarnessError> {
        let b = self.ram.alloc(data.len() as u64)?;
        let r = self.ram.write(&b, 0, data).and_then(|()| {
            self.run(IoOp::Write {
                lba,
                buf: b.clone(),
                fua,
            })
        });
        self.ram.free(b);
        let got = r?;
        if got != data.len() as u64 {
            return Err(HarnessError::ShortTransfer {
                expected: data.len() as u64,
                got,
            });
        }
        Ok(())
    }

    /// SYNCHRONIZE CACHE (when the write cache is on).
    pub fn flush(&mut self) -> Result<(), HarnessError> {
        self.run(IoOp::Flush).map(|_| ())
    }

    /// Discards `blocks` at `lba`.
    pub fn unmap(&mut self, lba: u64, blocks: u64) -> Result<(), HarnessError> {
        self.run(IoOp::Unmap { lba, blocks }).map(|_| ())
    }

    /// Runs one raw SCSI command and returns its completion (any status).
    pub fn scsi(
        &mut self,
        addr: ScsiAddress,
        cdb: Cdb,
        data: Option<(Direction, &DmaBuffer)>,
    ) -> Result<Completion, HarnessError> {
        let data = data.map(|(d, b)| (d, b, b.len() as u32));
        self.run_scsi(addr, cdb, data, false)
    }

    /// Runs one command with `len` bytes of `buf` as data and waits for it.
    pub(super) fn run_scsi(
        &mut self,
        addr: ScsiAddress,
        cdb: Cdb,
        data: Option<(Direction, &DmaBuffer, u32)>,
        tagged: bool,
    ) -> Result<Completion, HarnessError> {
        let tag = self.ops.open(false);
        let sent = match data {
            Some((dir, buf, len)) => self.send_buf(tag, addr, cdb, dir, buf, 0, len, tagged),
            None => self.send(tag, addr, cdb, None, tagged),
        };
        if let Err(e) = sent {
            return Err(self.seal(tag, e));
        }
        self.flush_rings()?;
        let deadline = self.deadline();
        loop {
            if let Some((_, c)) = self.ops.sync_done.remove(&tag) {
                return c.ok_or(HarnessError::UnknownTag(tag));
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Timeout("a SCSI command"));
            }
            if !self.service()? {
                self.wait(Duration::from_millis(1))?;
            }
        }
    }
}
