//! The baseline: the workload straight on the backing file with a minimal io_uring loop (one
//! thread, `depth` requests in flight, each completion immediately replaced).

use super::{Meter, Offsets, Sample, Workload};
use anyhow::{Context, bail};
use io_uring::{IoUring, opcode, types};
use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

/// A page-aligned heap buffer (O_DIRECT needs aligned memory).
pub struct AlignedBuf {
    ptr: *mut u8,
    layout: Layout,
}

// SAFETY: the buffer is exclusively owned heap memory; nothing in it is tied to a thread.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    pub fn new(len: usize) -> anyhow::Result<Self> {
        let layout = Layout::from_size_align(len.max(4096), 4096)?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            bail!("cannot allocate {len} aligned bytes");
        }
        Ok(AlignedBuf { ptr, layout })
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` points to `layout.size()` initialised (zeroed) bytes owned by `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout and freed only here.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

/// Opens the backing file for the baseline (`O_DIRECT` when `direct`).
pub fn open(path: &Path, direct: bool, write: bool) -> anyhow::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(write);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path)
        .with_context(|| format!("opening {} (direct={direct})", path.display()))
}

/// Runs `w` on `file` for `interval` and returns what completed inside it.
pub fn run(file: &File, w: Workload, interval: Duration, seed: u64) -> anyhow::Result<Sample> {
    let size = file.metadata()?.len();
    let depth = w.depth();
    let block = w.block() as usize;
    let len = u32::try_from(block)?;
    let mut bufs = (0..depth)
        .map(|i| {
            let mut b = AlignedBuf::new(block)?;
            b.as_mut_slice().fill(0x5a ^ i as u8);
            Ok(b)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut ring = IoUring::new(u32::try_from(depth.next_power_of_two())?.max(8))?;
    let mut offsets = Offsets::new(w, size, seed);
    let fd = types::Fd(file.as_raw_fd());
    let entry = |buf: &mut AlignedBuf, slot: usize, off: u64| {
        if w.write() {
            opcode::Write::new(fd, buf.as_mut_ptr(), len)
                .offset(off)
                .build()
                .user_data(slot as u64)
        } else {
            opcode::Read::new(fd, buf.as_mut_ptr(), len)
                .offset(off)
                .build()
                .user_data(slot as u64)
        }
    };
    for (slot, b) in bufs.iter_mut().enumerate() {
        let e = entry(b, slot, offsets.next_offset());
        // SAFETY: the buffer outlives the request: every request is reaped below before `bufs`
        // is dropped (the drain loop waits for all of them).
        unsafe { ring.submission().push(&e) }.map_err(|_| anyhow::anyhow!("SQ full"))?;
    }
    let mut meter = Meter::start(interval);
    let mut in_flight = depth;
    let mut sample = Sample::default();
    let mut failure = None;
    loop {
        let measuring = meter.measuring();
        if in_flight == 0 {
            break;
        }
        ring.submit_and_wait(1)?;
        let done: Vec<(usize, i32)> = ring
            .completion()
            .map(|c| (c.user_data() as usize, c.result()))
            .collect();
        for (slot, res) in done {
            in_flight -= 1;
            if res != len as i32 {
                failure.get_or_insert(format!("request returned {res} (wanted {len})"));
                meter.close();
                continue;
            }
            if !measuring {
                continue;
            }
            sample.ops += 1;
            sample.bytes += u64::from(len);
            let Some(b) = bufs.get_mut(slot) else {
                continue;
            };
            let e = entry(b, slot, offsets.next_offset());
            // SAFETY: as above; the slot's previous request has completed.
            if unsafe { ring.submission().push(&e) }.is_ok() {
                in_flight += 1;
            }
        }
        meter.tick(&mut sample);
    }
    if let Some(f) = failure {
        bail!("direct {}: {f}", w.name());
    }
    Ok(sample)
}
