//! A small split-virtqueue driver for tests and benchmarks that play the frontend of a vhost-user
//! device: guest RAM in a memfd, descriptor tables and rings laid out in it by hand, requests
//! published through the avail ring, kicks and calls through eventfds, completions read back from
//! the used ring.
//!
//! It depends only on vm-memory, vmm-sys-util, vhost (frontend), libc and anyhow, so a device
//! crate's integration test can also include it with `#[path = ".../virtio_driver.rs"] mod`.
//!
//! ```text
//! let mut ram = GuestRam::new(64 << 20)?;
//! let mut fe = connect(&socket, 1, Duration::from_secs(5))?;
//! let features = negotiate(&mut fe, wanted_features)?;          // owner, features, protocol
//! fe.set_mem_table(&[ram.region()])?;
//! let mut q = SplitQueue::new(&mut ram, 0, 128)?;
//! q.setup(&mut fe, &ram, true)?;                                  // num, addr, base, call, kick, enable
//! let head = q.add(&ram, &[(hdr, 16, false), (buf, 4096, true), (status, 1, true)])?;
//! q.kick()?;
//! let done = q.wait_used(&ram, 1, Duration::from_secs(5))?;     // [(head, len)]
//! ```
#![allow(dead_code)]

use anyhow::{Context, anyhow, bail};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// `VIRTQ_DESC_F_*`.
pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;
/// `VHOST_USER_F_PROTOCOL_FEATURES`.
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;
pub const F_EVENT_IDX: u64 = 1 << 29;
pub const F_VERSION_1: u64 = 1 << 32;

/// Guest RAM: one memfd mapped at GPA 0, with a bump allocator.
pub struct GuestRam {
    mem: GuestMemoryMmap,
    file: File,
    size: u64,
    next: u64,
}

impl GuestRam {
    /// `size` bytes of shared guest memory; the first page stays unallocated (GPA 0 is not a
    /// valid ring address for virtio-queue).
    pub fn new(size: usize) -> anyhow::Result<Self> {
        // SAFETY: a valid NUL-terminated name; the fd is checked and then owned by `file`.
        let fd = unsafe { libc::memfd_create(c"guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("memfd_create");
        }
        // SAFETY: `fd` is a new descriptor owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size as u64)?;
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files([(
            GuestAddress(0),
            size,
            Some(FileOffset::new(file.try_clone()?, 0)),
        )])
        .map_err(|e| anyhow!("mapping guest RAM: {e}"))?;
        Ok(GuestRam {
            mem,
            file,
            size: size as u64,
            next: 4096,
        })
    }

    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// `len` bytes aligned to `align` (a power of two).
    pub fn alloc(&mut self, len: u64, align: u64) -> anyhow::Result<GuestAddress> {
        let at = self.next.next_multiple_of(align.max(1));
        if at + len > self.size {
            bail!("guest RAM exhausted ({len} bytes wanted)");
        }
        self.next = at + len;
        Ok(GuestAddress(at))
    }

    /// The frontend's virtual address of `gpa`.
    pub fn hva(&self, gpa: GuestAddress) -> anyhow::Result<u64> {
        Ok(self
            .mem
            .get_host_address(gpa)
            .map_err(|e| anyhow!("gpa {gpa:?}: {e}"))? as u64)
    }

    /// The memory table entry to send with SET_MEM_TABLE.
    pub fn region(&self) -> anyhow::Result<VhostUserMemoryRegionInfo> {
        Ok(VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: self.size,
            userspace_addr: self.hva(GuestAddress(0))?,
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        })
    }

    pub fn write(&self, gpa: GuestAddress, data: &[u8]) -> anyhow::Result<()> {
        self.mem
            .write_slice(data, gpa)
            .map_err(|e| anyhow!("write {gpa:?}: {e}"))
    }

    pub fn read(&self, gpa: GuestAddress, len: usize) -> anyhow::Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.mem
            .read_slice(&mut v, gpa)
            .map_err(|e| anyhow!("read {gpa:?}: {e}"))?;
        Ok(v)
    }
}

/// Connects to a vhost-user socket, retrying until `timeout` (the daemon may still be starting).
pub fn connect(path: &Path, queues: u64, timeout: Duration) -> anyhow::Result<Frontend> {
    let end = Instant::now() + timeout;
    loop {
        match Frontend::connect(path, queues) {
            Ok(f) => return Ok(f),
            Err(e) if Instant::now() >= end => {
                return Err(anyhow!("connecting {}: {e}", path.display()));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// SET_OWNER, feature negotiation (`wanted` ∩ offered, plus PROTOCOL_FEATURES) and protocol
/// feature negotiation (`protocol` ∩ offered). Returns (acked features, acked protocol features).
pub fn negotiate(
    fe: &mut Frontend,
    wanted: u64,
    protocol: VhostUserProtocolFeatures,
) -> anyhow::Result<(u64, VhostUserProtocolFeatures)> {
    fe.set_owner()?;
    let offered = fe.get_features()?;
    let acked = offered & (wanted | F_PROTOCOL_FEATURES);
    fe.set_features(acked)?;
    let mut proto = VhostUserProtocolFeatures::empty();
    if acked & F_PROTOCOL_FEATURES != 0 {
        proto = fe.get_protocol_features()? & protocol;
        fe.set_protocol_features(proto)?;
    }
    Ok((acked, proto))
}

/// One split virtqueue laid out in guest RAM.
pub struct SplitQueue {
    pub index: usize,
    pub size: u16,
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
    free: Vec<u16>,
    /// Descriptor indices of each chain in flight, by head (allocations reused).
    chains: Vec<Vec<u16>>,
    avail_idx: u16,
    last_used: u16,
    notified_idx: u16,
    pub kick: EventFd,
    pub call: EventFd,
}

impl SplitQueue {
    pub fn new(ram: &mut GuestRam, index: usize, size: u16) -> anyhow::Result<Self> {
        let n = u64::from(size);
        let desc = ram.alloc(16 * n, 4096)?;
        let avail = ram.alloc(6 + 2 * n, 4096)?;
        let used = ram.alloc(6 + 8 * n, 4096)?;
        Ok(SplitQueue {
            index,
            size,
            desc,
            avail,
            used,
            free: (0..size).rev().collect(),
            chains: vec![Vec::new(); usize::from(size)],
            avail_idx: 0,
            last_used: 0,
            notified_idx: 0,
            kick: EventFd::new(EFD_NONBLOCK)?,
            call: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// The vring configuration (addresses are frontend virtual addresses).
    pub fn config(&self, ram: &GuestRam) -> anyhow::Result<VringConfigData> {
        Ok(VringConfigData {
            queue_max_size: self.size,
            queue_size: self.size,
            flags: 0,
            desc_table_addr: ram.hva(self.desc)?,
            used_ring_addr: ram.hva(self.used)?,
            avail_ring_addr: ram.hva(self.avail)?,
            log_addr: None,
        })
    }

    /// SET_VRING_NUM/ADDR/BASE/CALL/KICK and, with protocol features, SET_VRING_ENABLE.
    pub fn setup(&self, fe: &mut Frontend, ram: &GuestRam, enable: bool) -> anyhow::Result<()> {
        self.setup_at(fe, ram, enable, self.avail_idx)
    }

    /// Like [`Self::setup`] with an explicit base (a reconnect after a crash passes the used index).
    pub fn setup_at(
        &self,
        fe: &mut Frontend,
        ram: &GuestRam,
        enable: bool,
        base: u16,
    ) -> anyhow::Result<()> {
        fe.set_vring_num(self.index, self.size)?;
        fe.set_vring_addr(self.index, &self.config(ram)?)?;
        fe.set_vring_base(self.index, base)?;
        fe.set_vring_call(self.index, &self.call)?;
        fe.set_vring_kick(self.index, &self.kick)?;
        if enable {
            fe.set_vring_enable(self.index, true)?;
        }
        Ok(())
    }

    /// Descriptors free for new chains.
    pub fn free_descs(&self) -> usize {
        self.free.len()
    }

    /// Writes descriptor `index` as given (no checks: hostile tests use this).
    pub fn write_desc(
        &self,
        ram: &GuestRam,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> anyhow::Result<()> {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        ram.write(self.desc.plus(u64::from(index) * 16), &d)
    }

    /// Publishes `head` in the avail ring (no checks).
    pub fn push_avail(&mut self, ram: &GuestRam, head: u16) -> anyhow::Result<()> {
        let slot = u64::from(self.avail_idx % self.size);
        ram.write(self.avail.plus(4 + 2 * slot), &head.to_le_bytes())?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        fence(Ordering::Release);
        ram.mem
            .store(self.avail_idx, self.avail.plus(2), Ordering::Release)
            .map_err(|e| anyhow!("avail idx: {e}"))
    }

    /// Adds one chain of `(gpa, len, device_writable)` buffers and publishes it; returns its head.
    pub fn add(
        &mut self,
        ram: &GuestRam,
        bufs: &[(GuestAddress, u32, bool)],
    ) -> anyhow::Result<u16> {
        if bufs.is_empty() || bufs.len() > self.free.len() {
            bail!(
                "{} descriptors wanted, {} free",
                bufs.len(),
                self.free.len()
            );
        }
        let Some(head) = self.free.pop() else {
            bail!("no free descriptor");
        };
        let mut ids = std::mem::take(&mut self.chains[usize::from(head)]);
        ids.clear();
        ids.push(head);
        ids.extend((1..bufs.len()).filter_map(|_| self.free.pop()));
        for (i, (addr, len, write)) in bufs.iter().enumerate() {
            let mut flags = if *write { DESC_F_WRITE } else { 0 };
            let next = ids.get(i + 1).copied().unwrap_or(0);
            if i + 1 < bufs.len() {
                flags |= DESC_F_NEXT;
            }
            self.write_desc(ram, ids[i], addr.0, *len, flags, next)?;
        }
        self.chains[usize::from(head)] = ids;
        self.push_avail(ram, head)?;
        Ok(head)
    }

    /// Reserves `n` descriptor indices for a hand-built (hostile) chain; they come back when
    /// the device returns the head.
    pub fn reserve(&mut self, n: usize) -> anyhow::Result<Vec<u16>> {
        if n == 0 || n > self.free.len() {
            bail!("{n} descriptors wanted, {} free", self.free.len());
        }
        let ids: Vec<u16> = (0..n).filter_map(|_| self.free.pop()).collect();
        self.chains[usize::from(ids[0])] = ids.clone();
        Ok(ids)
    }

    pub fn kick(&self) -> anyhow::Result<()> {
        self.kick.write(1).context("kick")
    }

    /// Kicks only if the device asked for it (EVENT_IDX `avail_event`, as Linux's
    /// `vring_need_event`) since the last notification; use it when EVENT_IDX was negotiated.
    pub fn notify(&mut self, ram: &GuestRam) -> anyhow::Result<bool> {
        fence(Ordering::SeqCst);
        let at = self.used.plus(4 + 8 * u64::from(self.size));
        let event: u16 = ram
            .mem
            .load(at, Ordering::Acquire)
            .map_err(|e| anyhow!("avail_event: {e}"))?;
        let (new, old) = (self.avail_idx, self.notified_idx);
        self.notified_idx = new;
        let need = new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old);
        if need {
            self.kick()?;
        }
        Ok(need)
    }

    /// The used ring's index as the device last published it.
    pub fn used_idx(&self, ram: &GuestRam) -> anyhow::Result<u16> {
        ram.mem
            .load(self.used.plus(2), Ordering::Acquire)
            .map_err(|e| anyhow!("used idx: {e}"))
    }

    /// The avail index the driver published last.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Completions published since the last call: `(head, len)`; their descriptors are freed.
    pub fn poll_used(&mut self, ram: &GuestRam) -> anyhow::Result<Vec<(u16, u32)>> {
        let mut out = Vec::new();
        self.poll_used_into(ram, &mut out)?;
        Ok(out)
    }

    /// [`Self::poll_used`] appending to `out` (no allocation in the steady state).
    pub fn poll_used_into(
        &mut self,
        ram: &GuestRam,
        out: &mut Vec<(u16, u32)>,
    ) -> anyhow::Result<()> {
        let idx = self.used_idx(ram)?;
        if idx == self.last_used {
            return Ok(());
        }
        while self.last_used != idx {
            let slot = u64::from(self.last_used % self.size);
            let e: u64 = ram
                .mem
                .read_obj(self.used.plus(4 + 8 * slot))
                .map_err(|e| anyhow!("used ring: {e}"))?;
            let (id, len) = (e as u32, (e >> 32) as u32);
            let head = u16::try_from(id)
                .ok()
                .filter(|h| *h < self.size)
                .ok_or_else(|| anyhow!("used id {id} out of range"))?;
            let ids = &mut self.chains[usize::from(head)];
            self.free.extend_from_slice(ids);
            ids.clear();
            out.push((head, len));
            self.last_used = self.last_used.wrapping_add(1);
        }
        // EVENT_IDX: ask for an interrupt on the next completion.
        let used_event = self.avail.plus(4 + 2 * u64::from(self.size));
        ram.mem
            .store(self.last_used, used_event, Ordering::Release)
            .map_err(|e| anyhow!("used_event: {e}"))?;
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// Waits until at least `n` completions arrived (or `timeout`), sleeping on the call eventfd.
    pub fn wait_used(
        &mut self,
        ram: &GuestRam,
        n: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<(u16, u32)>> {
        let end = Instant::now() + timeout;
        let mut out = self.poll_used(ram)?;
        while out.len() < n {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("{} of {n} completions after {timeout:?}", out.len());
            }
            wait_fd(&self.call, left.min(Duration::from_millis(50)));
            let _ = self.call.read();
            out.extend(self.poll_used(ram)?);
        }
        Ok(out)
    }
}

/// Sleeps until `fd` is readable or `timeout` passes.
pub fn wait_fd(fd: &EventFd, timeout: Duration) {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut p, 1, ms) };
}

trait AddExt {
    fn plus(self, n: u64) -> GuestAddress;
}

impl AddExt for GuestAddress {
    fn plus(self, n: u64) -> GuestAddress {
        GuestAddress(self.0 + n)
    }
}

/// virtio-blk request helpers on top of [`SplitQueue`].
pub mod blk {
    use super::{GuestAddress, GuestRam};

    pub const T_IN: u32 = 0;
    pub const T_OUT: u32 = 1;
    pub const T_FLUSH: u32 = 4;
    pub const T_GET_ID: u32 = 8;
    pub const T_DISCARD: u32 = 11;
    pub const T_WRITE_ZEROES: u32 = 13;
    pub const S_OK: u8 = 0;
    pub const S_IOERR: u8 = 1;
    pub const S_UNSUPP: u8 = 2;

    /// Writes a `virtio_blk_outhdr` at `at`.
    pub fn header(ram: &GuestRam, at: GuestAddress, ty: u32, sector: u64) -> anyhow::Result<()> {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        ram.write(at, &h)
    }

    /// One `virtio_blk_discard_write_zeroes` entry.
    pub fn dwz(sector: u64, num_sectors: u32, flags: u32) -> [u8; 16] {
        let mut e = [0u8; 16];
        e[0..8].copy_from_slice(&sector.to_le_bytes());
        e[8..12].copy_from_slice(&num_sectors.to_le_bytes());
        e[12..16].copy_from_slice(&flags.to_le_bytes());
        e
    }
}
