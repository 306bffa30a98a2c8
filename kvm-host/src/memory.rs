//! Guest RAM: memfd-backed regions with the PC hole below 4 GiB.
//!
//! RAM up to [`LOW_RAM_MAX`] starts at GPA 0; anything beyond continues at 4 GiB, leaving
//! `[LOW_RAM_MAX, 4 GiB)` for MMIO (LAPIC, IOAPIC, VMBus MMIO windows later). Each region is its own
//! memfd so it can be handed to a VSP process by fd ([`GuestRam::regions`]). Every access is checked
//! against the regions; a range that is not entirely RAM is refused.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::AtomicU32;

use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MmapRegion,
};

/// Page size used for SynIC overlay pages, page tables and region alignment.
pub const PAGE_SIZE: u64 = 4096;
/// End of RAM below 4 GiB; the rest of `[LOW_RAM_MAX, 4 GiB)` is the MMIO hole.
pub const LOW_RAM_MAX: u64 = 0xC000_0000;
/// First GPA above the hole.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;

/// Guest memory errors.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest RAM size {0:#x} is zero or not a multiple of 4 KiB")]
    BadSize(u64),
    #[error("memfd for guest RAM: {0}")]
    Memfd(std::io::Error),
    #[error("mapping guest RAM: {0}")]
    Map(String),
    #[error("guest range {gpa:#x}+{len:#x} is not RAM")]
    OutOfRange { gpa: u64, len: u64 },
    #[error("guest address {0:#x} is not 4-byte aligned for an atomic access")]
    Misaligned(u64),
}

/// One RAM region as another process would map it.
#[derive(Debug)]
pub struct RegionInfo<'a> {
    /// First guest physical address of the region.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// The memfd backing the region.
    pub fd: BorrowedFd<'a>,
    /// Offset of the region's first byte in `fd`.
    pub fd_offset: u64,
    /// Where the region is mapped in this process (for KVM_SET_USER_MEMORY_REGION).
    pub host_addr: u64,
}

/// Guest RAM shared by the VMM, the vCPUs and (later) VSP processes.
#[derive(Debug)]
pub struct GuestRam {
    mem: GuestMemoryMmap<()>,
    size: u64,
}

impl GuestRam {
    /// Allocates `size` bytes of zeroed guest RAM (memfd-backed, shared mappings).
    pub fn new(size: u64) -> Result<GuestRam, MemoryError> {
        if size == 0 || !size.is_multiple_of(PAGE_SIZE) {
            return Err(MemoryError::BadSize(size));
        }
        let low = size.min(LOW_RAM_MAX);
        let mut layout = vec![(0u64, low)];
        if size > low {
            layout.push((HIGH_RAM_START, size - low));
        }
        let mut regions = Vec::new();
        for (i, (gpa, len)) in layout.into_iter().enumerate() {
            let file = memfd::MemfdOptions::default()
                .allow_sealing(true)
                .close_on_exec(true)
                .create(format!("guest-ram-{i}"))
                .map_err(|e| MemoryError::Memfd(std::io::Error::other(e)))?;
            file.as_file().set_len(len).map_err(MemoryError::Memfd)?;
            file.add_seals(&[memfd::FileSeal::SealShrink, memfd::FileSeal::SealGrow])
                .map_err(|e| MemoryError::Memfd(std::io::Error::other(e)))?;
            let len_usize = usize::try_from(len).map_err(|_| MemoryError::BadSize(size))?;
            let mapping =
                MmapRegion::<()>::from_file(FileOffset::new(file.into_file(), 0), len_usize)
                    .map_err(|e| MemoryError::Map(e.to_string()))?;
            let region = GuestRegionMmap::new(mapping, GuestAddress(gpa)).ok_or_else(|| {
                MemoryError::Map(format!("region at {gpa:#x}+{len:#x} overflows"))
            })?;
            regions.push(region);
        }
        let mem =
            GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Map(e.to_string()))?;
        Ok(GuestRam { mem, size })
    }

    /// Total RAM in bytes (not counting the hole).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The vm-memory view (for linux-loader and other rust-vmm crates).
    pub fn vm_memory(&self) -> &GuestMemoryMmap<()> {
        &self.mem
    }

    /// The RAM regions: GPA, length, fd and host mapping.
    pub fn regions(&self) -> Vec<RegionInfo<'_>> {
        self.mem
            .iter()
            .filter_map(|r| {
                let fo = r.file_offset()?;
                Some(RegionInfo {
                    gpa: r.start_addr().0,
                    len: r.len(),
                    fd: fo.file().as_fd(),
                    fd_offset: fo.start(),
                    host_addr: r.as_ptr() as u64,
                })
            })
            .collect()
    }

    /// `(gpa, len)` of every RAM range, for E820 and ACPI.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        self.mem
            .iter()
            .map(|r| (r.start_addr().0, r.len()))
            .collect()
    }

    /// Whether `[gpa, gpa + len)` lies entirely inside one RAM region.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        self.locate(gpa, len).is_ok()
    }

    /// Host pointer for `[gpa, gpa + len)` (must be inside one region).
    pub fn host_ptr(&self, gpa: u64, len: u64) -> Result<*mut u8, MemoryError> {
        let (region, offset) = self.locate(gpa, len)?;
        // offset < region length, which is a mapped usize.
        Ok(region.as_ptr().wrapping_add(offset as usize))
    }

    /// The memfd and file offset holding `gpa` (for handing a range to another process).
    pub fn fd_offset(&self, gpa: u64, len: u64) -> Result<(BorrowedFd<'_>, u64), MemoryError> {
        let (region, offset) = self.locate(gpa, len)?;
        let fo = region
            .file_offset()
            .ok_or(MemoryError::OutOfRange { gpa, len })?;
        Ok((fo.file().as_fd(), fo.start() + offset))
    }

    fn locate(&self, gpa: u64, len: u64) -> Result<(&GuestRegionMmap<()>, u64), MemoryError> {
        let err = MemoryError::OutOfRange { gpa, len };
        let region = self.mem.find_region(GuestAddress(gpa)).ok_or(err)?;
        let offset = gpa - region.start_addr().0;
        let end = offset
            .checked_add(len)
            .ok_or(MemoryError::OutOfRange { gpa, len })?;
        if end > region.len() {
            return Err(MemoryError::OutOfRange { gpa, len });
        }
        Ok((region, offset))
    }

    /// Copies guest bytes at `gpa` into `dst`.
    pub fn read(&self, gpa: u64, dst: &mut [u8]) -> Result<(), MemoryError> {
        let len = dst.len() as u64;
        self.locate(gpa, len)?;
        self.mem
            .read_slice(dst, GuestAddress(gpa))
            .map_err(|_| MemoryError::OutOfRange { gpa, len })
    }

    /// Copies `src` into guest memory at `gpa`.
    pub fn write(&self, gpa: u64, src: &[u8]) -> Result<(), MemoryError> {
        let len = src.len() as u64;
        self.locate(gpa, len)?;
        self.mem
            .write_slice(src, GuestAddress(gpa))
            .map_err(|_| MemoryError::OutOfRange { gpa, len })
    }

    /// Reads a little-endian u64.
    pub fn read_u64(&self, gpa: u64) -> Result<u64, MemoryError> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Writes a little-endian u64.
    pub fn write_u64(&self, gpa: u64, v: u64) -> Result<(), MemoryError> {
        self.write(gpa, &v.to_le_bytes())
    }

    /// Fills `[gpa, gpa + len)` with zeroes.
    pub fn zero(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        let ptr = self.host_ptr(gpa, len)?;
        let n = usize::try_from(len).map_err(|_| MemoryError::OutOfRange { gpa, len })?;
        // SAFETY: `host_ptr` checked that the n bytes lie inside one live shared mapping owned by
        // `self`; plain byte stores race only with the guest, as device DMA does.
        unsafe { std::ptr::write_bytes(ptr, 0, n) };
        Ok(())
    }

    /// The 4 KiB guest page at `gpa` (page-aligned) as 1024 atomic words: how the SynIC shares
    /// message and event-flag pages with a running guest.
    pub fn page_words(&self, gpa: u64) -> Result<&[AtomicU32; 1024], MemoryError> {
        if !gpa.is_multiple_of(PAGE_SIZE) {
            return Err(MemoryError::Misaligned(gpa));
        }
        let ptr = self.host_ptr(gpa, PAGE_SIZE)?;
        if !(ptr as usize).is_multiple_of(std::mem::align_of::<AtomicU32>()) {
            return Err(MemoryError::Misaligned(gpa));
        }
        // The 4096 bytes are inside one shared mapping that lives as long as `self` (the returned
        // borrow is tied to it) and all host access through the reference is atomic, so the guest
        // changing the page concurrently is not a data race on our side.
        // SAFETY: in bounds and alive as above; 4-byte aligned (checked); AtomicU32 is u32-sized.
        let words = unsafe { &*(ptr as *const [AtomicU32; 1024]) };
        Ok(words)
    }
}

impl vmbus_core::memory::GuestMemory for GuestRam {
    fn read_at(&self, gpa: u64, dst: &mut [u8]) -> Result<(), vmbus_core::memory::MemoryError> {
        self.read(gpa, dst)
            .map_err(|_| vmbus_core::memory::MemoryError::OutOfRange {
                gpa,
                len: dst.len() as u64,
            })
    }

    fn write_at(&self, gpa: u64, src: &[u8]) -> Result<(), vmbus_core::memory::MemoryError> {
        self.write(gpa, src)
            .map_err(|_| vmbus_core::memory::MemoryError::OutOfRange {
                gpa,
                len: src.len() as u64,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn small_ram_is_one_region_and_bounds_are_checked() {
        let ram = GuestRam::new(2 << 20).unwrap();
        assert_eq!(ram.ranges(), vec![(0, 2 << 20)]);
        ram.write(0x1000, b"hello").unwrap();
        let mut b = [0u8; 5];
        ram.read(0x1000, &mut b).unwrap();
        assert_eq!(&b, b"hello");
        assert!(ram.read((2 << 20) - 2, &mut b).is_err());
        assert!(ram.write(u64::MAX - 1, b"xx").is_err());
        assert!(!ram.contains(2 << 20, 1));
        assert!(ram.page_words(0x1001).is_err());
        let w = ram.page_words(0x1000).unwrap();
        assert_eq!(w[0].load(Ordering::Relaxed), u32::from_le_bytes(*b"hell"));
        ram.zero(0x1000, 4096).unwrap();
        assert_eq!(w[0].load(Ordering::Relaxed), 0);
        assert!(GuestRam::new(0).is_err());
        assert!(GuestRam::new(100).is_err());
    }

    #[test]
    fn large_ram_leaves_the_hole_and_regions_share_by_fd() {
        // Sparse memfds: nothing is touched, so 3.25 GiB costs nothing.
        let ram = GuestRam::new(LOW_RAM_MAX + (256 << 20)).unwrap();
        assert_eq!(
            ram.ranges(),
            vec![(0, LOW_RAM_MAX), (HIGH_RAM_START, 256 << 20)]
        );
        assert!(!ram.contains(LOW_RAM_MAX, 1));
        assert!(
            !ram.contains(LOW_RAM_MAX - 1, 2),
            "ranges may not run into the hole"
        );
        ram.write_u64(HIGH_RAM_START + 8, 0x1122_3344_5566_7788)
            .unwrap();
        assert_eq!(
            ram.read_u64(HIGH_RAM_START + 8).unwrap(),
            0x1122_3344_5566_7788
        );
        let (fd, off) = ram.fd_offset(HIGH_RAM_START + 8, 8).unwrap();
        assert_eq!(off, 8);
        let other = vmbus_core::memory::MappedMemory::map(fd, 4096).unwrap();
        let mut b = [0u8; 8];
        vmbus_core::memory::GuestMemory::read_at(&other, 8, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), 0x1122_3344_5566_7788);
        assert_eq!(ram.regions().len(), 2);
    }
}
