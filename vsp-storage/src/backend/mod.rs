//! Disk backends: an in-memory disk and raw image files (io_uring, with a pread/pwrite fallback),
//! plus the asynchronous queue contract storvsp uses for high queue depths.
//!
//! [`crate::block::BlockDevice`] is the synchronous contract every backend implements. A backend
//! that can also keep many requests in flight from one thread implements [`AsyncDisk`]: storvsp
//! opens one [`AsyncQueue`] per channel, submits reads, writes and flushes by tag and reaps them as
//! they complete (out of order), woken through an eventfd.

pub mod mem;
pub mod raw;
mod uring;

use crate::block::BlockError;
use std::os::fd::BorrowedFd;

pub use uring::RawQueue;

/// One asynchronous operation; buffers are owned by the queue while it runs.
#[derive(Debug)]
pub enum QueueOp {
    /// Read `len` bytes at byte `offset`.
    Read { offset: u64, len: usize },
    /// Write `data` at byte `offset`; with `fua` it is durable on completion.
    Write {
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    },
    /// Make completed writes durable.
    Flush,
}

/// A finished operation: the read data (for reads), or why it failed.
#[derive(Debug)]
pub struct QueueCompletion {
    pub tag: u64,
    pub result: Result<Option<Vec<u8>>, BlockError>,
}

/// A submission/completion queue owned by one thread.
pub trait AsyncQueue: Send {
    /// Starts `op`. Fails at once (nothing in flight) on a bad range or a full queue.
    fn submit(&mut self, tag: u64, op: QueueOp) -> Result<(), BlockError>;
    /// Moves finished operations to `out` without blocking.
    fn reap(&mut self, out: &mut Vec<QueueCompletion>);
    /// Operations submitted and not yet reaped.
    fn in_flight(&self) -> usize;
    /// Most operations the queue accepts at once.
    fn depth(&self) -> usize;
    /// With `on`, [`Self::submit`] only queues and [`Self::flush`] hands the batch to the kernel
    /// (one system call for many requests). Off by default.
    fn set_batching(&mut self, on: bool) {
        let _ = on;
    }
    /// Reads into (`write == false`) or writes from caller memory described by `iov`, without a
    /// bounce buffer; completes with `Ok(None)`. `Err(BlockError::Unsupported)` when this queue
    /// cannot (the caller then uses [`Self::submit`]).
    ///
    /// # Safety
    ///
    /// Every iovec must stay valid for the access (and not be freed or unmapped) until the
    /// operation's completion has been reaped or the queue has been dropped.
    unsafe fn submit_vectored(
        &mut self,
        tag: u64,
        offset: u64,
        iov: Vec<libc::iovec>,
        write: bool,
    ) -> Result<(), BlockError> {
        let _ = (tag, offset, iov, write);
        Err(BlockError::Unsupported)
    }
    /// Starts every operation queued since the last flush.
    fn flush(&mut self) -> Result<(), BlockError> {
        Ok(())
    }
}

/// A disk that can open asynchronous queues.
pub trait AsyncDisk: Send + Sync {
    /// A queue of `depth` entries that signals `notify` (an eventfd) whenever an operation
    /// completes. `Err(BlockError::Unsupported)` when the backend cannot (e.g. io_uring is
    /// unavailable): the caller then uses the synchronous path.
    fn open_queue(
        &self,
        depth: u32,
        notify: BorrowedFd<'_>,
    ) -> Result<Box<dyn AsyncQueue>, BlockError>;
}
