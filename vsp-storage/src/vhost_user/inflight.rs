//! Inflight I/O tracking (vhost-user protocol feature `INFLIGHT_SHMFD`, split rings).
//!
//! The layout is QEMU's and libvhost-user's (`docs/interop/vhost-user.rst`, "Inflight I/O
//! tracking"): one region per queue, each `ALIGN_UP(16 * queue_size + 2, 64)` bytes, holding
//!
//! ```text
//! u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
//! struct { u8 inflight; u8 padding[5]; u16 next; u64 counter; } desc[desc_num];
//! ```
//!
//! The frontend keeps the memfd across a daemon restart and hands it back with SET_INFLIGHT_FD;
//! descriptors still marked `inflight` are then executed again, oldest `counter` first.

use std::fs::File;
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

const VERSION: u16 = 1;
const HDR: u64 = 16;
const DESC: u64 = 16;

/// Bytes of one queue's region for `queue_size` descriptors.
pub fn queue_region_size(queue_size: u16) -> u64 {
    (DESC * u64::from(queue_size) + 2).next_multiple_of(64)
}

/// The whole shared region.
pub struct InflightRegion {
    mem: GuestMemoryMmap,
    num_queues: u16,
    queue_size: u16,
}

fn invalid(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

impl InflightRegion {
    /// A fresh zeroed region in a new memfd (GET_INFLIGHT_FD); returns it and the fd to send.
    pub fn create(num_queues: u16, queue_size: u16) -> io::Result<(Arc<Self>, File, u64)> {
        if num_queues == 0 || queue_size == 0 {
            return Err(invalid(
                "inflight region for zero queues or zero-sized queues",
            ));
        }
        let size = queue_region_size(queue_size) * u64::from(num_queues);
        // SAFETY: a valid NUL-terminated name and flags; the returned fd is checked and owned below.
        let fd = unsafe { libc::memfd_create(c"vhost-blk-inflight".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created by memfd_create and nothing else owns it.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(size)?;
        let region = Self::map(file.try_clone()?, size, 0, num_queues, queue_size)?;
        Ok((region, file, size))
    }

    /// Maps a region the frontend passed back (SET_INFLIGHT_FD).
    pub fn map(
        file: File,
        mmap_size: u64,
        mmap_offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> io::Result<Arc<Self>> {
        let need = queue_region_size(queue_size) * u64::from(num_queues);
        if num_queues == 0 || queue_size == 0 || mmap_size < need || mmap_size > 64 << 20 {
            return Err(invalid("inflight region size does not match its queues"));
        }
        let len = file.metadata()?.len();
        if mmap_offset
            .checked_add(mmap_size)
            .is_none_or(|end| end > len)
        {
            return Err(invalid("inflight region beyond its file"));
        }
        let r = MmapRegion::<()>::from_file(FileOffset::new(file, mmap_offset), mmap_size as usize)
            .map_err(io::Error::other)?;
        let r = GuestRegionMmap::new(r, GuestAddress(0)).ok_or_else(|| invalid("region"))?;
        let mem = GuestMemoryMmap::from_regions(vec![r]).map_err(io::Error::other)?;
        Ok(Arc::new(InflightRegion {
            mem,
            num_queues,
            queue_size,
        }))
    }

    /// The tracking area of queue `index` for a ring of `size` entries.
    pub fn queue(self: &Arc<Self>, index: u16, size: u16) -> Option<InflightQueue> {
        if index >= self.num_queues || size == 0 || size > self.queue_size {
            return None;
        }
        Some(InflightQueue {
            region: Arc::clone(self),
            base: queue_region_size(self.queue_size) * u64::from(index),
            size,
            counter: 0,
        })
    }
}

/// One queue's tracking area; owned by that queue's worker.
pub struct InflightQueue {
    region: Arc<InflightRegion>,
    base: u64,
    size: u16,
    counter: u64,
}

impl InflightQueue {
    fn at(&self, off: u64) -> GuestAddress {
        GuestAddress(self.base + off)
    }

    fn desc(&self, head: u16) -> u64 {
        HDR + DESC * u64::from(head)
    }

    fn store_u16(&self, off: u64, v: u16) {
        // In bounds by construction (offsets below `queue_region_size`); an error would mean a
        // bug, and losing tracking must not take the I/O path down.
        if let Err(e) = self.region.mem.store(v, self.at(off), Ordering::Release) {
            tracing::error!(error = %e, "inflight region store failed");
        }
    }

    fn load_u16(&self, off: u64) -> u16 {
        self.region
            .mem
            .load(self.at(off), Ordering::Acquire)
            .unwrap_or(0)
    }

    /// At ring start: the heads to execute again (oldest first) and the ring's avail position,
    /// given the used index the guest memory shows now. A fresh region is initialised instead
    /// (`None`: keep the base the frontend set).
    pub fn recover(&mut self, used_idx: u16) -> (Vec<u16>, Option<u16>) {
        if self.load_u16(8) == 0 {
            // Version 0: new region (or a guest reset); nothing to replay.
            let _ = self.region.mem.write_slice(
                &vec![0u8; (HDR + DESC * u64::from(self.size)) as usize],
                self.at(0),
            );
            self.store_u16(10, self.size);
            self.store_u16(14, used_idx);
            self.store_u16(8, VERSION);
            self.counter = 0;
            return (Vec::new(), None);
        }
        if self.load_u16(14) != used_idx {
            // Died between publishing a used entry and clearing its inflight mark.
            let last = self.load_u16(12);
            if last < self.size {
                let _ = self.region.mem.write_obj(0u8, self.at(self.desc(last)));
            }
            self.store_u16(14, used_idx);
        }
        let mut found: Vec<(u64, u16)> = Vec::new();
        for head in 0..self.size {
            let flag: u8 = self
                .region
                .mem
                .read_obj(self.at(self.desc(head)))
                .unwrap_or(0);
            if flag == 1 {
                let counter: u64 = self
                    .region
                    .mem
                    .read_obj(self.at(self.desc(head) + 8))
                    .unwrap_or(0);
                found.push((counter, head));
            }
        }
        found.sort_unstable();
        self.counter = found.last().map_or(0, |(c, _)| c + 1);
        let avail = used_idx.wrapping_add(found.len() as u16);
        (found.into_iter().map(|(_, h)| h).collect(), Some(avail))
    }

    /// A head was taken from the avail ring.
    pub fn get(&mut self, head: u16) {
        if head >= self.size {
            return;
        }
        let d = self.desc(head);
        let _ = self.region.mem.write_obj(self.counter, self.at(d + 8));
        self.counter += 1;
        let _ = self.region.mem.store(1u8, self.at(d), Ordering::Release);
    }

    /// Before publishing `head` in the used ring.
    pub fn pre_put(&self, head: u16) {
        self.store_u16(12, head);
    }

    /// After publishing: the used index now is `used_idx`.
    pub fn post_put(&self, head: u16, used_idx: u16) {
        if head < self.size {
            let _ = self
                .region
                .mem
                .store(0u8, self.at(self.desc(head)), Ordering::Release);
        }
        self.store_u16(14, used_idx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn raw(file: &File, off: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        file.read_exact_at(&mut v, off).expect("read region");
        v
    }

    #[test]
    fn layout_matches_libvhost_user() {
        // ALIGN_UP(sizeof(VuDescStateSplit) * queue_size + sizeof(uint16_t), 64)
        assert_eq!(queue_region_size(128), 2112);
        assert_eq!(queue_region_size(256), 4160);
        let (region, file, size) = InflightRegion::create(2, 128).expect("create");
        assert_eq!(size, 2 * 2112);
        let mut q1 = region.queue(1, 128).expect("queue 1");
        assert_eq!(q1.recover(7), (Vec::new(), None));
        let base = 2112;
        // features u64 = 0, version u16 = 1, desc_num u16 = 128, last_batch_head, used_idx = 7.
        assert_eq!(
            raw(&file, base, 16),
            [0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 128, 0, 0, 0, 7, 0]
        );
        q1.get(5);
        q1.get(9);
        let d5 = base + 16 + 5 * 16;
        assert_eq!(raw(&file, d5, 1), [1]);
        assert_eq!(raw(&file, d5 + 8, 8), 0u64.to_le_bytes());
        assert_eq!(raw(&file, base + 16 + 9 * 16 + 8, 8), 1u64.to_le_bytes());
        q1.pre_put(5);
        q1.post_put(5, 8);
        assert_eq!(raw(&file, d5, 1), [0]);
        assert_eq!(raw(&file, base + 12, 4), [5, 0, 8, 0]);
        // Queue 0 is untouched.
        assert!(raw(&file, 0, 2112).iter().all(|&b| b == 0));
    }

    #[test]
    fn recovery_replays_in_order_and_repairs_a_torn_put() {
        let (region, file, size) = InflightRegion::create(1, 64).expect("create");
        let mut q = region.queue(0, 64).expect("queue");
        q.recover(0);
        for h in [3, 1, 2] {
            q.get(h);
        }
        // Head 2 was published in the used ring (used idx 1) but the process died before
        // clearing its mark.
        q.pre_put(2);
        drop(q);
        drop(region);
        let again = InflightRegion::map(file, size, 0, 1, 64).expect("map");
        let mut q = again.queue(0, 64).expect("queue");
        let (heads, avail) = q.recover(1);
        assert_eq!(heads, vec![3, 1]);
        assert_eq!(avail, Some(3));
    }
}
