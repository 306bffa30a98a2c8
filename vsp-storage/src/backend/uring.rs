//! The asynchronous queue of a raw image: one io_uring per storvsp channel, operations submitted
//! by tag and reaped as they complete (in any order). The ring signals an eventfd (registered with
//! `IORING_REGISTER_EVENTFD`) on every completion, so the channel thread can sleep on one fd.
//!
//! Buffers belong to the queue while the kernel uses them; dropping the queue waits for everything
//! in flight first.

use super::raw::{DIRECT_ALIGN, aligned_vec};
use super::{AsyncQueue, QueueCompletion, QueueOp};
use crate::block::{BlockError, check_range};
use io_uring::{IoUring, opcode, types};
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Kind {
    Read,
    Write {
        fua: bool,
    },
    Flush,
    /// Vectored transfers on caller memory (`iov`), no bounce buffer.
    ReadV,
    WriteV,
}

/// One operation in flight: its buffer window `buf[start..start + len]` and progress.
struct Op {
    kind: Kind,
    buf: Vec<u8>,
    start: usize,
    len: usize,
    offset: u64,
    done: usize,
    /// What is left of the caller's buffers (vectored kinds).
    iov: Vec<libc::iovec>,
}

// SAFETY: the iovecs point at memory the submitter of a vectored operation promised to keep valid
// and unaliased until completion (`AsyncQueue::submit_vectored`); nothing here is thread-bound.
unsafe impl Send for Op {}

/// Drops the first `n` bytes of `iov` (after a short vectored transfer).
fn advance(iov: &mut Vec<libc::iovec>, mut n: usize) {
    let mut drop = 0;
    for v in iov.iter_mut() {
        if n >= v.iov_len {
            n -= v.iov_len;
            drop += 1;
        } else {
            v.iov_base = v.iov_base.cast::<u8>().wrapping_add(n).cast();
            v.iov_len -= n;
            break;
        }
    }
    iov.drain(..drop);
}

/// An io_uring queue on a raw image file.
pub struct RawQueue {
    file: File,
    size: u64,
    sector: u32,
    read_only: bool,
    direct: bool,
    ring: IoUring,
    depth: usize,
    ops: HashMap<u64, Op>,
    ready: Vec<QueueCompletion>,
    /// Submissions wait for `flush` (see [`AsyncQueue::set_batching`]).
    batching: bool,
    /// The file takes `RWF_NOWAIT` reads (cleared on the first EOPNOTSUPP, e.g. tmpfs).
    nowait: bool,
}

fn busy() -> BlockError {
    BlockError::Io(io::Error::new(io::ErrorKind::WouldBlock, "queue full"))
}

impl RawQueue {
    pub(crate) fn new(
        file: File,
        size: u64,
        sector: u32,
        read_only: bool,
        direct: bool,
        depth: u32,
        notify: BorrowedFd<'_>,
    ) -> Result<Self, BlockError> {
        let depth = depth.clamp(1, 4096);
        let ring = IoUring::new(depth.next_power_of_two().max(8))?;
        ring.submitter().register_eventfd(notify.as_raw_fd())?;
        Ok(RawQueue {
            file,
            size,
            sector,
            read_only,
            direct,
            ring,
            depth: depth as usize,
            ops: HashMap::with_capacity(depth as usize),
            ready: Vec::new(),
            batching: false,
            nowait: true,
        })
    }

    /// The submission entry for the next piece of `op`.
    fn entry(&self, tag: u64, op: &Op) -> io_uring::squeue::Entry {
        let fd = types::Fd(self.file.as_raw_fd());
        let left = op.len - op.done;
        let chunk = u32::try_from(left).unwrap_or(!4095u32);
        // `start + done < buf.len()`: the pointer stays inside the buffer.
        let at = op.buf.as_ptr().wrapping_add(op.start + op.done).cast_mut();
        let off = op.offset + op.done as u64;
        match op.kind {
            Kind::Read => opcode::Read::new(fd, at, chunk).offset(off).build(),
            Kind::Write { fua } => opcode::Write::new(fd, at, chunk)
                .offset(off)
                .rw_flags(if fua { libc::RWF_DSYNC } else { 0 })
                .build(),
            Kind::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            // One buffer: the plain opcodes skip the kernel's iovec import.
            Kind::ReadV if op.iov.len() == 1 => {
                opcode::Read::new(fd, op.iov[0].iov_base.cast(), op.iov[0].iov_len as u32)
                    .offset(off)
                    .build()
            }
            Kind::WriteV if op.iov.len() == 1 => {
                opcode::Write::new(fd, op.iov[0].iov_base.cast(), op.iov[0].iov_len as u32)
                    .offset(off)
                    .build()
            }
            Kind::ReadV => opcode::Readv::new(fd, op.iov.as_ptr(), op.iov.len() as u32)
                .offset(off)
                .build(),
            Kind::WriteV => opcode::Writev::new(fd, op.iov.as_ptr(), op.iov.len() as u32)
                .offset(off)
                .build(),
        }
        .user_data(tag)
    }

    /// Queues the entry for `tag` (already in `ops`) and tells the kernel.
    fn push(&mut self, tag: u64) -> Result<(), BlockError> {
        let Some(op) = self.ops.get(&tag) else {
            return Err(busy());
        };
        let sqe = self.entry(tag, op);
        for _ in 0..2 {
            // SAFETY: the entry's buffer is owned by `self.ops[tag]` (a heap allocation that does
            // not move when the map rehashes) and stays there until its completion is reaped;
            // `Drop` waits for every operation in flight before freeing anything.
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                // Queued: the operation is in flight from here on, even if this submit fails
                // (the next submit or wait hands it to the kernel).
                if self.batching {
                    return Ok(());
                }
                if let Err(e) = self.ring.submit() {
                    tracing::warn!(error = %e, "io_uring submit failed; retrying later");
                }
                return Ok(());
            }
            // Submission queue full: hand what is queued to the kernel and retry once.
            self.ring.submit()?;
        }
        Err(busy())
    }

    fn finish(&mut self, tag: u64, result: Result<Option<Vec<u8>>, BlockError>) {
        self.ready.push(QueueCompletion { tag, result });
    }
}

impl AsyncQueue for RawQueue {
    fn submit(&mut self, tag: u64, op: QueueOp) -> Result<(), BlockError> {
        if self.ops.len() >= self.depth || self.ops.contains_key(&tag) {
            return Err(busy());
        }
        let op = match op {
            QueueOp::Read { offset, len } => {
                check_range(offset, len as u64, self.size, self.sector)?;
                let (buf, start) = if self.direct {
                    aligned_vec(len)
                } else {
                    (vec![0u8; len], 0)
                };
                Op {
                    kind: Kind::Read,
                    buf,
                    start,
                    len,
                    offset,
                    done: 0,
                    iov: Vec::new(),
                }
            }
            QueueOp::Write { offset, data, fua } => {
                if self.read_only {
                    return Err(BlockError::ReadOnly);
                }
                check_range(offset, data.len() as u64, self.size, self.sector)?;
                let len = data.len();
                let (buf, start) = if self.direct && !(data.as_ptr() as usize).is_multiple_of(4096)
                {
                    let (mut v, at) = aligned_vec(len);
                    v[at..at + len].copy_from_slice(&data);
                    (v, at)
                } else {
                    (data, 0)
                };
                Op {
                    kind: Kind::Write { fua },
                    buf,
                    start,
                    len,
                    offset,
                    done: 0,
                    iov: Vec::new(),
                }
            }
            QueueOp::Flush => Op {
                kind: Kind::Flush,
                buf: Vec::new(),
                start: 0,
                len: 0,
                offset: 0,
                done: 0,
                iov: Vec::new(),
            },
        };
        if op.len == 0 && op.kind != Kind::Flush {
            let data = (op.kind == Kind::Read).then(Vec::new);
            self.finish(tag, Ok(data));
            return Ok(());
        }
        self.ops.insert(tag, op);
        if let Err(e) = self.push(tag) {
            // Not queued (push failed before the kernel saw it): nothing is in flight.
            self.ops.remove(&tag);
            return Err(e);
        }
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<QueueCompletion>) {
        let cqes: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (tag, res) in cqes {
            let Some(mut op) = self.ops.remove(&tag) else {
                continue;
            };
            if res < 0 {
                self.finish(tag, Err(io::Error::from_raw_os_error(-res).into()));
                continue;
            }
            if op.kind == Kind::Flush {
                self.finish(tag, Ok(None));
                continue;
            }
            if res == 0 {
                let kind = if matches!(op.kind, Kind::Read | Kind::ReadV) {
                    io::ErrorKind::UnexpectedEof
                } else {
                    io::ErrorKind::WriteZero
                };
                self.finish(tag, Err(io::Error::new(kind, "short transfer").into()));
                continue;
            }
            if matches!(op.kind, Kind::ReadV | Kind::WriteV) {
                advance(&mut op.iov, res as usize);
            }
            op.done = op.done.saturating_add(res as usize).min(op.len);
            if op.done < op.len {
                // Short transfer: submit the rest.
                self.ops.insert(tag, op);
                if let Err(e) = self.push(tag) {
                    self.ops.remove(&tag);
                    self.finish(tag, Err(e));
                }
                continue;
            }
            let data = match op.kind {
                Kind::Read if op.start == 0 && op.buf.len() == op.len => Some(op.buf),
                Kind::Read => Some(op.buf[op.start..op.start + op.len].to_vec()),
                _ => None,
            };
            self.finish(tag, Ok(data));
        }
        out.append(&mut self.ready);
    }

    fn in_flight(&self) -> usize {
        self.ops.len() + self.ready.len()
    }

    fn depth(&self) -> usize {
        self.depth
    }

    fn set_batching(&mut self, on: bool) {
        self.batching = on;
    }

    unsafe fn submit_vectored(
        &mut self,
        tag: u64,
        offset: u64,
        iov: Vec<libc::iovec>,
        write: bool,
    ) -> Result<(), BlockError> {
        if self.ops.len() >= self.depth || self.ops.contains_key(&tag) {
            return Err(busy());
        }
        if write && self.read_only {
            return Err(BlockError::ReadOnly);
        }
        let len = iov.iter().map(|v| v.iov_len).sum::<usize>();
        check_range(offset, len as u64, self.size, self.sector)?;
        let aligned = |v: &libc::iovec| {
            (v.iov_base as usize).is_multiple_of(DIRECT_ALIGN)
                && v.iov_len.is_multiple_of(DIRECT_ALIGN)
        };
        if len == 0 || iov.len() > 1024 || (self.direct && !iov.iter().all(aligned)) {
            // O_DIRECT needs aligned memory: the caller bounces through `submit` instead.
            return Err(BlockError::Unsupported);
        }
        if !write && !self.direct && self.nowait {
            // Page-cache hit: copy inline with one system call instead of a ring round trip (on
            // some file systems, tmpfs among them, buffered ring reads are punted to io-wq
            // threads). Anything short of complete goes through the ring as usual.
            // SAFETY: the iovecs are valid for writes per this function's contract; the kernel
            // writes at most `len` bytes into them.
            let n = unsafe {
                libc::preadv2(
                    self.file.as_raw_fd(),
                    iov.as_ptr(),
                    iov.len() as i32,
                    offset as i64,
                    libc::RWF_NOWAIT,
                )
            };
            if usize::try_from(n).is_ok_and(|n| n == len) {
                self.finish(tag, Ok(None));
                return Ok(());
            }
            if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP) {
                self.nowait = false;
            }
        }
        let op = Op {
            kind: if write { Kind::WriteV } else { Kind::ReadV },
            buf: Vec::new(),
            start: 0,
            len,
            offset,
            done: 0,
            iov,
        };
        self.ops.insert(tag, op);
        if let Err(e) = self.push(tag) {
            self.ops.remove(&tag);
            return Err(e);
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), BlockError> {
        if !self.ring.submission().is_empty() {
            self.ring.submit()?;
        }
        Ok(())
    }
}

impl Drop for RawQueue {
    fn drop(&mut self) {
        // The kernel may still write into buffers in `ops`: wait for every one of them.
        while !self.ops.is_empty() {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    tracing::error!(error = %e, "io_uring wait failed; leaking in-flight buffers");
                    std::mem::forget(std::mem::take(&mut self.ops));
                    return;
                }
            }
            let tags: Vec<u64> = self.ring.completion().map(|c| c.user_data()).collect();
            for tag in tags {
                self.ops.remove(&tag);
            }
        }
    }
}
