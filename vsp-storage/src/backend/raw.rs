//! Raw image files (or block devices) as disks.
//!
//! The synchronous [`BlockDevice`] path submits each request to a small io_uring owned by the
//! calling thread (worker threads each get their own) and waits for it; when io_uring cannot be set
//! up (old kernel, seccomp, `io_uring_disabled`) it falls back to `pread`/`pwrite`. Flush is
//! `fdatasync`, FUA writes carry `RWF_DSYNC` (or are followed by `fdatasync` on the fallback path),
//! UNMAP punches a hole (`fallocate(PUNCH_HOLE | KEEP_SIZE)`), so unmapped blocks read back as zeros.
//!
//! With [`RawOptions::direct`] the file is opened `O_DIRECT`; buffers are then bounced through
//! page-aligned memory, and offsets must suit the file system's block size (use 4 KiB sectors when
//! in doubt).

use super::{AsyncDisk, AsyncQueue, RawQueue};
use crate::block::{BlockDevice, BlockError, check_range};
use io_uring::{IoUring, opcode, types};
use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Alignment of bounce buffers for `O_DIRECT`.
pub(crate) const DIRECT_ALIGN: usize = 4096;

/// How to open a raw image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawOptions {
    pub read_only: bool,
    /// Open with `O_DIRECT` (bypass the host page cache).
    pub direct: bool,
    /// Logical sector size reported to the guest (512 or 4096).
    pub sector_size: u32,
    /// Use io_uring when the kernel allows it (off: always `pread`/`pwrite`).
    pub io_uring: bool,
}

impl Default for RawOptions {
    fn default() -> Self {
        RawOptions {
            read_only: false,
            direct: false,
            sector_size: 512,
            io_uring: true,
        }
    }
}

/// A raw disk image.
#[derive(Debug)]
pub struct RawDisk {
    file: File,
    size: u64,
    sector: u32,
    read_only: bool,
    direct: bool,
    uring: bool,
    punch: bool,
}

impl RawDisk {
    /// Opens an existing image; its size is rounded down to whole sectors.
    pub fn open(path: &Path, opts: &RawOptions) -> io::Result<Self> {
        let mut o = OpenOptions::new();
        o.read(true).write(!opts.read_only);
        if opts.direct {
            o.custom_flags(libc::O_DIRECT);
        }
        let file = o.open(path)?;
        Self::from_file(file, opts)
    }

    /// Creates (or truncates) an image of `size` bytes.
    pub fn create(path: &Path, size: u64, opts: &RawOptions) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        file.set_len(size)?;
        drop(file);
        Self::open(path, opts)
    }

    /// Wraps an open file (a regular file or a block device).
    pub fn from_file(file: File, opts: &RawOptions) -> io::Result<Self> {
        let sector = opts.sector_size;
        if !(512..=4096).contains(&sector) || !sector.is_power_of_two() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "sector size must be 512, 1024, 2048 or 4096",
            ));
        }
        let meta = file.metadata()?;
        let size = if meta.file_type().is_block_device() {
            let mut f = &file;
            io::Seek::seek(&mut f, io::SeekFrom::End(0))?
        } else {
            meta.len()
        };
        let uring = opts.io_uring && ring_available();
        Ok(RawDisk {
            size: size - size % u64::from(sector),
            sector,
            read_only: opts.read_only,
            direct: opts.direct,
            uring,
            punch: meta.file_type().is_file() && !opts.read_only,
            file,
        })
    }

    /// Whether requests go through io_uring (false: pread/pwrite fallback).
    pub fn uses_io_uring(&self) -> bool {
        self.uring
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    fn check(&self, offset: u64, len: usize) -> Result<(), BlockError> {
        check_range(offset, len as u64, self.size, self.sector)
    }

    fn read_plain(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let (ptr, len) = (buf.as_mut_ptr(), buf.len());
        if self.uring
            && let Some(r) =
                with_thread_ring(|ring| ring_rw(ring, &self.file, ptr, len, offset, Rw::Read))
        {
            return r;
        }
        self.file.read_exact_at(buf, offset)
    }

    fn write_plain(&self, offset: u64, buf: &[u8], fua: bool) -> io::Result<()> {
        if self.uring {
            let kind = if fua { Rw::WriteDsync } else { Rw::Write };
            let ptr = buf.as_ptr().cast_mut();
            if let Some(r) =
                with_thread_ring(|ring| ring_rw(ring, &self.file, ptr, buf.len(), offset, kind))
            {
                return r;
            }
        }
        self.file.write_all_at(buf, offset)?;
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }
}

/// A page-aligned window of `len` bytes inside a slightly larger vector (no `unsafe` needed).
pub(crate) fn aligned_vec(len: usize) -> (Vec<u8>, usize) {
    let v = vec![0u8; len + DIRECT_ALIGN];
    let start = (DIRECT_ALIGN - v.as_ptr() as usize % DIRECT_ALIGN) % DIRECT_ALIGN;
    (v, start)
}

impl BlockDevice for RawDisk {
    fn sector_size(&self) -> u32 {
        self.sector
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn supports_unmap(&self) -> bool {
        self.punch
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.check(offset, buf.len())?;
        if self.direct && !(buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN) {
            let (mut v, at) = aligned_vec(buf.len());
            let win = &mut v[at..at + buf.len()];
            self.read_plain(offset, win)?;
            buf.copy_from_slice(win);
            return Ok(());
        }
        Ok(self.read_plain(offset, buf)?)
    }

    fn write_at(&self, offset: u64, buf: &[u8], fua: bool) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        self.check(offset, buf.len())?;
        if self.direct && !(buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN) {
            let (mut v, at) = aligned_vec(buf.len());
            v[at..at + buf.len()].copy_from_slice(buf);
            return Ok(self.write_plain(offset, &v[at..at + buf.len()], fua)?);
        }
        Ok(self.write_plain(offset, buf, fua)?)
    }

    fn flush(&self) -> Result<(), BlockError> {
        if self.read_only {
            return Ok(());
        }
        if self.uring
            && let Some(r) = with_thread_ring(|ring| ring_fsync(ring, &self.file))
        {
            return Ok(r?);
        }
        Ok(self.file.sync_data()?)
    }

    fn unmap(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        if !self.punch {
            return Err(BlockError::Unsupported);
        }
        check_range(offset, len, self.size, self.sector)?;
        if len == 0 {
            return Ok(());
        }
        let (off, n) = match (libc::off_t::try_from(offset), libc::off_t::try_from(len)) {
            (Ok(o), Ok(n)) => (o, n),
            _ => {
                return Err(BlockError::OutOfRange {
                    offset,
                    len,
                    size: self.size,
                });
            }
        };
        // SAFETY: fallocate takes no pointers; the descriptor is owned by `self.file`.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                n,
            )
        };
        if r != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                return Err(BlockError::Unsupported);
            }
            return Err(e.into());
        }
        Ok(())
    }
}

impl AsyncDisk for RawDisk {
    fn open_queue(
        &self,
        depth: u32,
        notify: BorrowedFd<'_>,
    ) -> Result<Box<dyn AsyncQueue>, BlockError> {
        if !self.uring {
            return Err(BlockError::Unsupported);
        }
        let q = RawQueue::new(
            self.file.try_clone()?,
            self.size,
            self.sector,
            self.read_only,
            self.direct,
            depth,
            notify,
        )?;
        Ok(Box::new(q))
    }
}

// ---- the per-thread ring of the synchronous path ----

thread_local! {
    /// `None` inside: not created yet. `Some(None)`: creation failed or the ring was abandoned.
    static RING: RefCell<Option<Option<IoUring>>> = const { RefCell::new(None) };
}

/// Whether this process may use io_uring at all.
fn ring_available() -> bool {
    IoUring::new(2).is_ok()
}

/// Runs `f` on this thread's ring; `None` when the thread has none (use the fallback).
fn with_thread_ring<R>(f: impl FnOnce(&mut IoUring) -> Result<R, RingBroken>) -> Option<R> {
    RING.with(|cell| {
        let mut slot = cell.try_borrow_mut().ok()?;
        let ring = slot.get_or_insert_with(|| IoUring::new(8).ok()).as_mut()?;
        match f(ring) {
            Ok(r) => Some(r),
            Err(RingBroken) => {
                // The request may still sit in the submission queue: never reuse or drop this
                // ring (dropping it could let the kernel run the request into a freed buffer).
                if let Some(Some(r)) = slot.take() {
                    std::mem::forget(r);
                }
                *slot = Some(None);
                None
            }
        }
    })
}

/// Marker error: the ring is in an unknown state.
struct RingBroken;

#[derive(Copy, Clone, PartialEq, Eq)]
enum Rw {
    Read,
    Write,
    WriteDsync,
}

/// One synchronous read or write through `ring`, resubmitting after short transfers.
fn ring_rw(
    ring: &mut IoUring,
    file: &File,
    ptr: *mut u8,
    len: usize,
    offset: u64,
    kind: Rw,
) -> Result<io::Result<()>, RingBroken> {
    let mut done = 0usize;
    while done < len {
        let chunk = u32::try_from(len - done).unwrap_or(!4095u32);
        // `done < len` and the caller's buffer is `len` bytes long.
        let at = ptr.wrapping_add(done);
        let fd = types::Fd(file.as_raw_fd());
        let off = offset + done as u64;
        let sqe = match kind {
            Rw::Read => opcode::Read::new(fd, at, chunk).offset(off).build(),
            Rw::Write => opcode::Write::new(fd, at, chunk).offset(off).build(),
            Rw::WriteDsync => opcode::Write::new(fd, at, chunk)
                .offset(off)
                .rw_flags(libc::RWF_DSYNC)
                .build(),
        };
        let res = run_one(ring, &sqe)?;
        match res {
            n if n > 0 => done += n as usize,
            0 if kind == Rw::Read => {
                return Ok(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "short read",
                )));
            }
            0 => return Ok(Err(io::Error::new(io::ErrorKind::WriteZero, "short write"))),
            e => return Ok(Err(io::Error::from_raw_os_error(-e))),
        }
    }
    Ok(Ok(()))
}

fn ring_fsync(ring: &mut IoUring, file: &File) -> Result<io::Result<()>, RingBroken> {
    let sqe = opcode::Fsync::new(types::Fd(file.as_raw_fd()))
        .flags(types::FsyncFlags::DATASYNC)
        .build();
    match run_one(ring, &sqe)? {
        r if r < 0 => Ok(Err(io::Error::from_raw_os_error(-r))),
        _ => Ok(Ok(())),
    }
}

/// Submits one entry on an idle ring and waits for its completion.
fn run_one(ring: &mut IoUring, sqe: &io_uring::squeue::Entry) -> Result<i32, RingBroken> {
    let sqe = sqe.clone().user_data(1);
    // SAFETY: the buffer the entry names belongs to our caller, who keeps it alive and untouched
    // until this function returns; we only return once its completion was reaped (or we abandon
    // the ring forever, so the entry can never run later).
    if unsafe { ring.submission().push(&sqe) }.is_err() {
        return Err(RingBroken);
    }
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                ) =>
            {
                std::thread::yield_now();
            }
            Err(_) => return Err(RingBroken),
        }
        if let Some(cqe) = ring.completion().next() {
            return Ok(cqe.result());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{QueueCompletion, QueueOp};
    use ringbuf::signal::Doorbell;
    use std::os::fd::AsFd;
    use std::time::Duration;

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn round_trip(opts: &RawOptions) {
        let s = opts.sector_size as usize;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let disk = RawDisk::create(&path, 1 << 20, opts).unwrap();
        assert_eq!(disk.size(), 1 << 20);
        let data = pattern(7, 8192);
        disk.write_at(8192, &data, false).unwrap();
        disk.write_at(0, &data[..s], true).unwrap();
        disk.flush().unwrap();
        let mut back = vec![0u8; 8192];
        disk.read_at(8192, &mut back).unwrap();
        assert_eq!(back, data);
        // Unaligned buffer (exercises the O_DIRECT bounce).
        let mut odd = vec![0u8; s + 1];
        disk.read_at(0, &mut odd[1..]).unwrap();
        assert_eq!(&odd[1..], &data[..s]);
        // Range and alignment checks.
        assert!(matches!(
            disk.read_at(1 << 20, &mut back[..s]),
            Err(BlockError::OutOfRange { .. })
        ));
        assert!(matches!(
            disk.read_at(1, &mut back[..s]),
            Err(BlockError::Unaligned { .. })
        ));
        let top = u64::MAX - (s as u64 - 1);
        assert!(matches!(
            disk.write_at(top, &data[..s], false),
            Err(BlockError::OutOfRange { .. })
        ));
        // Punch a hole: reads back zeros, size unchanged.
        assert!(disk.supports_unmap());
        disk.unmap(8192, 4096).unwrap();
        disk.read_at(8192, &mut back).unwrap();
        assert!(back[..4096].iter().all(|&b| b == 0));
        assert_eq!(&back[4096..], &data[4096..]);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);
    }

    #[test]
    fn io_uring_round_trip() {
        round_trip(&RawOptions::default());
    }

    #[test]
    fn pread_fallback_round_trip() {
        let opts = RawOptions {
            io_uring: false,
            ..RawOptions::default()
        };
        round_trip(&opts);
        let dir = tempfile::tempdir().unwrap();
        let disk = RawDisk::create(&dir.path().join("d"), 4096, &opts).unwrap();
        assert!(!disk.uses_io_uring());
        let d = Doorbell::new().unwrap();
        assert!(matches!(
            disk.open_queue(8, d.as_fd()),
            Err(BlockError::Unsupported)
        ));
    }

    #[test]
    fn direct_io_when_the_file_system_allows_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("direct.raw");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let opts = RawOptions {
            direct: true,
            sector_size: 4096,
            ..RawOptions::default()
        };
        match RawDisk::open(&path, &opts) {
            Ok(_) => round_trip(&opts),
            Err(e) => eprintln!("skipping: O_DIRECT not supported here ({e})"),
        }
    }

    #[test]
    fn read_only_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ro.raw");
        RawDisk::create(&path, 8192, &RawOptions::default()).unwrap();
        let ro = RawDisk::open(
            &path,
            &RawOptions {
                read_only: true,
                ..RawOptions::default()
            },
        )
        .unwrap();
        assert!(matches!(
            ro.write_at(0, &[0; 512], false),
            Err(BlockError::ReadOnly)
        ));
        assert!(matches!(ro.unmap(0, 512), Err(BlockError::ReadOnly)));
        assert!(!ro.supports_unmap());
        ro.read_at(0, &mut [0; 512]).unwrap();
        ro.flush().unwrap();
    }

    #[test]
    fn queue_completes_many_out_of_order() {
        let dir = tempfile::tempdir().unwrap();
        let disk =
            RawDisk::create(&dir.path().join("q.raw"), 4 << 20, &RawOptions::default()).unwrap();
        if !disk.uses_io_uring() {
            eprintln!("skipping: io_uring unavailable");
            return;
        }
        let bell = Doorbell::new().unwrap();
        let mut q = disk.open_queue(256, bell.as_fd()).unwrap();
        assert_eq!(q.depth(), 256);
        // 200 writes of 16 KiB each, then a flush, then 200 reads.
        for i in 0..200u64 {
            let data = pattern(i as u8, 16384);
            q.submit(
                i,
                QueueOp::Write {
                    offset: i * 16384,
                    data,
                    fua: i % 50 == 0,
                },
            )
            .unwrap();
        }
        let mut done: Vec<QueueCompletion> = Vec::new();
        while done.len() < 200 {
            bell.wait(Some(Duration::from_secs(10))).unwrap();
            q.reap(&mut done);
        }
        assert!(done.iter().all(|c| matches!(c.result, Ok(None))));
        q.submit(1000, QueueOp::Flush).unwrap();
        for i in 0..200u64 {
            q.submit(
                2000 + i,
                QueueOp::Read {
                    offset: i * 16384,
                    len: 16384,
                },
            )
            .unwrap();
        }
        // Errors are immediate and leave nothing in flight.
        assert!(
            q.submit(
                5000,
                QueueOp::Read {
                    offset: 4 << 20,
                    len: 512
                }
            )
            .is_err()
        );
        assert!(
            q.submit(
                2000,
                QueueOp::Read {
                    offset: 0,
                    len: 512
                }
            )
            .is_err(),
            "duplicate tag"
        );
        let mut reads = Vec::new();
        while reads.len() < 201 {
            bell.wait(Some(Duration::from_secs(10))).unwrap();
            q.reap(&mut reads);
        }
        let mut order = Vec::new();
        for c in reads {
            if c.tag == 1000 {
                assert!(matches!(c.result, Ok(None)));
                continue;
            }
            let i = c.tag - 2000;
            order.push(i);
            assert_eq!(
                c.result.unwrap().unwrap(),
                pattern(i as u8, 16384),
                "block {i}"
            );
        }
        order.sort_unstable();
        assert_eq!(order, (0..200).collect::<Vec<_>>());
        assert_eq!(q.in_flight(), 0);
        // Dropping with operations in flight waits for them.
        for i in 0..64u64 {
            q.submit(
                9000 + i,
                QueueOp::Read {
                    offset: i * 4096,
                    len: 4096,
                },
            )
            .unwrap();
        }
        drop(q);
    }
}
