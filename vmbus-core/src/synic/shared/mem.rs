//! Layout of the shared memfd, its mapping, and the connection table encoding.

use core::ptr::NonNull;
use core::sync::atomic::AtomicU32;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::{io, ptr};

use ringbuf::signal::Doorbell;

use super::super::latch::LatchRef;
use super::super::page::{PAGE_SIZE, PAGE_WORDS, PageMem};
use super::super::{CONNECTION_ID_MASK, PortKind};

pub(super) const MAGIC: u32 = 0x5359_4E43; // "SYNC"
pub(super) const VERSION: u32 = 1;
/// Most VPs one shared port serves.
pub const MAX_VPS: u32 = 64;
/// Most data pages of the guest → host ring.
pub const MAX_RING_PAGES: u32 = 1024;

pub(super) const H_MAGIC: usize = 0x00;
pub(super) const H_VERSION: usize = 0x04;
pub(super) const H_VPS: usize = 0x08;
pub(super) const H_RING_PAGES: usize = 0x0C;
pub(super) const H_HOST_PENDING: usize = 0x40;
pub(super) const H_HOST_ARMED: usize = 0x44;
pub(super) const H_VP_BASE: usize = 0x100;
pub(super) const H_VP_STRIDE: usize = 0x10;
pub(super) const VP_PENDING: usize = 0x0;
pub(super) const VP_ARMED: usize = 0x4;
pub(super) const VP_EOM: usize = 0x8;

pub(super) const TABLE_PAGE: usize = 1;
pub(super) const TABLE_SLOTS: usize = 2 * PAGE_WORDS;
/// Live ports allowed (75 % load keeps probe sequences short).
pub const MAX_PORTS: usize = TABLE_SLOTS * 3 / 4;
pub(super) const EVENTS_PAGE: usize = 3;
pub(super) const FIRST_VP_PAGE: usize = 4;

pub(super) const EMPTY: u32 = 0;
pub(super) const REMOVED: u32 = 0xFF00_0000;
pub(super) const KIND_MESSAGE: u32 = 1 << 24;
pub(super) const KIND_EVENT: u32 = 2 << 24;

/// Geometry both processes agree on.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct SharedLayout {
    /// VPs (each with a message page, an event-flag page and a doorbell), 1..=64.
    pub vps: u32,
    /// Data pages of the guest → host message ring, 1..=1024 (4 pages hold ~60 full-size or ~500
    /// minimal messages; a full ring is `HV_STATUS_INSUFFICIENT_BUFFERS`).
    pub ring_pages: u32,
}

impl Default for SharedLayout {
    fn default() -> Self {
        SharedLayout {
            vps: 1,
            ring_pages: 4,
        }
    }
}

impl SharedLayout {
    pub(super) fn check(&self) -> io::Result<()> {
        if !(1..=MAX_VPS).contains(&self.vps) || !(1..=MAX_RING_PAGES).contains(&self.ring_pages) {
            return Err(invalid("SynIC layout: 1..=64 VPs and 1..=1024 ring pages"));
        }
        Ok(())
    }
    pub(super) fn simp_page(&self, vp: u32) -> usize {
        FIRST_VP_PAGE + 2 * vp as usize
    }
    pub(super) fn sief_page(&self, vp: u32) -> usize {
        FIRST_VP_PAGE + 2 * vp as usize + 1
    }
    /// Byte offset of VP `vp`'s message page in the memfd.
    pub fn simp_offset(&self, vp: u32) -> usize {
        self.simp_page(vp) * PAGE_SIZE
    }
    /// Byte offset of VP `vp`'s event-flag page in the memfd.
    pub fn sief_offset(&self, vp: u32) -> usize {
        self.sief_page(vp) * PAGE_SIZE
    }
    /// Byte offset of the guest → host event bitmap.
    pub fn events_offset(&self) -> usize {
        EVENTS_PAGE * PAGE_SIZE
    }
    /// Byte offset of the connection table.
    pub fn table_offset(&self) -> usize {
        TABLE_PAGE * PAGE_SIZE
    }
    /// Byte offset of the guest → host ring (its control page).
    pub fn ring_offset(&self) -> usize {
        (FIRST_VP_PAGE + 2 * self.vps as usize) * PAGE_SIZE
    }
    /// Bytes of the ring: control page + data pages.
    pub fn ring_len(&self) -> usize {
        (1 + self.ring_pages as usize) * PAGE_SIZE
    }
    /// Bytes of the memfd.
    pub fn total_len(&self) -> usize {
        self.ring_offset() + self.ring_len()
    }
}

pub(super) fn invalid(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// A shared read-write mapping of the pages before the ring.
pub(super) struct Mapping {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is owned by this object and unmapped only on drop; all access to it goes
// through atomic words.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    pub(super) fn new(fd: BorrowedFd<'_>, len: usize) -> io::Result<Arc<Self>> {
        // SAFETY: a new shared mapping of `len` bytes of the file at an address the kernel picks;
        // nothing else refers to that range.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(p.cast()).ok_or_else(|| invalid("mmap returned null"))?;
        Ok(Arc::new(Mapping { base, len }))
    }

    fn page_ptr(&self, index: usize) -> io::Result<NonNull<[AtomicU32; PAGE_WORDS]>> {
        let end = index
            .checked_add(1)
            .and_then(|n| n.checked_mul(PAGE_SIZE))
            .filter(|&e| e <= self.len)
            .ok_or_else(|| invalid("page outside the SynIC mapping"))?;
        // SAFETY: `end <= len`, so the page lies inside the mapping.
        let p = unsafe { self.base.as_ptr().add(end - PAGE_SIZE) };
        NonNull::new(p.cast::<[AtomicU32; PAGE_WORDS]>()).ok_or_else(|| invalid("null page"))
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; every MappedPage holds an Arc to self,
        // so no reference into it outlives this.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

/// One page of the shared mapping as [`PageMem`].
#[derive(Clone)]
pub struct MappedPage {
    map: Arc<Mapping>,
    words: NonNull<[AtomicU32; PAGE_WORDS]>,
}

// SAFETY: the page is shared memory accessed only through atomics; the Arc keeps it mapped.
unsafe impl Send for MappedPage {}
// SAFETY: as above.
unsafe impl Sync for MappedPage {}

impl MappedPage {
    pub(super) fn new(map: &Arc<Mapping>, index: usize) -> io::Result<Self> {
        Ok(MappedPage {
            words: map.page_ptr(index)?,
            map: map.clone(),
        })
    }

    pub(super) fn word(&self, byte_offset: usize) -> &AtomicU32 {
        &self.words()[byte_offset / 4]
    }
}

impl PageMem for MappedPage {
    fn words(&self) -> &[AtomicU32; PAGE_WORDS] {
        let _alive = &self.map;
        // SAFETY: `words` points at a page-aligned page inside the mapping (checked in `new`), which
        // stays mapped while `self.map` lives; AtomicU32 has the size and alignment of u32.
        unsafe { self.words.as_ref() }
    }
}

pub(super) fn table_hash(id: u32) -> usize {
    (id.wrapping_mul(0x9E37_79B1) >> 21) as usize % TABLE_SLOTS
}

pub(super) fn entry_kind(e: u32) -> Option<PortKind> {
    match e & !CONNECTION_ID_MASK {
        KIND_MESSAGE => Some(PortKind::Message),
        KIND_EVENT => Some(PortKind::Event),
        _ => None,
    }
}

/// Finds `id` by linear probing over `entry(i)`; bounded even over a garbage table.
pub(super) fn table_lookup(id: u32, entry: impl Fn(usize) -> u32) -> Option<(usize, PortKind)> {
    let mut i = table_hash(id);
    for _ in 0..TABLE_SLOTS {
        let e = entry(i);
        if e == EMPTY {
            return None;
        }
        if e != REMOVED && e & CONNECTION_ID_MASK == id {
            return entry_kind(e).map(|k| (i, k));
        }
        i = (i + 1) % TABLE_SLOTS;
    }
    None
}

pub(super) fn table_word(pages: &[MappedPage; 2], i: usize) -> &AtomicU32 {
    &pages[(i / PAGE_WORDS) % 2].words()[i % PAGE_WORDS]
}

pub(super) fn host_latch<'a>(header: &'a MappedPage, bell: &'a Doorbell) -> LatchRef<'a> {
    LatchRef {
        pending: header.word(H_HOST_PENDING),
        armed: header.word(H_HOST_ARMED),
        bell,
    }
}

pub(super) fn vp_word(header: &MappedPage, vp: u32, which: usize) -> &AtomicU32 {
    header.word(H_VP_BASE + H_VP_STRIDE * vp as usize + which)
}

pub(super) fn vp_latch<'a>(header: &'a MappedPage, vp: u32, bell: &'a Doorbell) -> LatchRef<'a> {
    LatchRef {
        pending: vp_word(header, vp, VP_PENDING),
        armed: vp_word(header, vp, VP_ARMED),
        bell,
    }
}
