//! Rings in pages of a file descriptor (a memfd shared with another process, or guest RAM), mapped with
//! the data pages twice back-to-back so a wrapping packet is one contiguous copy (as Linux maps them).

use crate::layout::{CONTROL_PAGE_SIZE, ControlWord, PAGE_SIZE};
use crate::mem::{RingMem, copy_wrapping};
use crate::sync::AtomicU32;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

/// One ring mapped from a file: `[control][data 0..n][data 0..n]`.
pub struct MappedRing {
    base: NonNull<u8>,
    map_len: usize,
    data_len: u32,
}

// SAFETY: the mapping is owned by this object and unmapped only on drop; shared access goes through
// atomics (control) and byte copies ordered by the ring protocol (data).
unsafe impl Send for MappedRing {}
// SAFETY: see above.
unsafe impl Sync for MappedRing {}

impl MappedRing {
    /// Maps a ring stored contiguously: control page at byte `offset` of `fd`, then
    /// `ring_len - 4096` bytes of data.
    pub fn map(fd: BorrowedFd<'_>, offset: u64, ring_len: usize) -> io::Result<Self> {
        if !ring_len.is_multiple_of(PAGE_SIZE) || ring_len < 2 * PAGE_SIZE {
            return Err(invalid("ring length must be at least two whole pages"));
        }
        let pages: Vec<u64> = (0..(ring_len / PAGE_SIZE) as u64)
            .map(|i| offset + i * PAGE_SIZE as u64)
            .collect();
        Self::map_pages(fd, &pages)
    }

    /// Maps a ring whose pages sit at the given byte offsets of `fd`: the first is the control page,
    /// the rest are the data pages in order (the shape of a GPADL over guest RAM).
    pub fn map_pages(fd: BorrowedFd<'_>, page_offsets: &[u64]) -> io::Result<Self> {
        let pages: Vec<(BorrowedFd<'_>, u64)> = page_offsets.iter().map(|&o| (fd, o)).collect();
        Self::map_page_list(&pages)
    }

    /// Maps a ring whose pages may sit in different files (guest RAM split into several memfd
    /// regions): each entry is `(fd, byte offset)` of one page, control page first.
    pub fn map_page_list(pages: &[(BorrowedFd<'_>, u64)]) -> io::Result<Self> {
        let data_pages = pages
            .len()
            .checked_sub(1)
            .filter(|&n| n > 0)
            .ok_or_else(|| invalid("a ring needs a control page and at least one data page"))?;
        if pages.iter().any(|(_, o)| o % PAGE_SIZE as u64 != 0) {
            return Err(invalid("ring page offsets must be page aligned"));
        }
        let data_len = data_pages
            .checked_mul(PAGE_SIZE)
            .and_then(|d| u32::try_from(d).ok())
            .filter(|&d| d <= 0x8000_0000)
            .ok_or_else(|| invalid("ring data area too large"))?;
        let map_len = CONTROL_PAGE_SIZE + 2 * data_len as usize;

        // Reserve the whole range first so the fixed mappings below cannot clobber anything else.
        // SAFETY: a fresh anonymous PROT_NONE mapping at an address of the kernel's choosing.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ring = MappedRing {
            // SAFETY: mmap succeeded, so base is not null.
            base: unsafe { NonNull::new_unchecked(base.cast()) },
            map_len,
            data_len,
        };
        // Slot i of the mapping shows page `page(i)`: control, data..., data again.
        let page = |slot: usize| -> (BorrowedFd<'_>, u64) {
            if slot == 0 {
                pages[0]
            } else {
                pages[1 + (slot - 1) % data_pages]
            }
        };
        let slots = 1 + 2 * data_pages;
        let mut run_start = 0;
        while run_start < slots {
            let (fd, start_offset) = page(run_start);
            let mut run_end = run_start + 1;
            while run_end < slots && run_end != 1 + data_pages {
                let (next_fd, next_offset) = page(run_end);
                let (_, prev_offset) = page(run_end - 1);
                if next_fd.as_raw_fd() != fd.as_raw_fd()
                    || next_offset != prev_offset + PAGE_SIZE as u64
                {
                    break;
                }
                run_end += 1;
            }
            let offset = libc::off_t::try_from(start_offset)
                .map_err(|_| invalid("file offset too large"))?;
            // SAFETY: the target range lies inside our reservation (run_end <= slots), MAP_FIXED
            // replaces only pages we own; the fd is borrowed for the call.
            let p = unsafe {
                libc::mmap(
                    ring.base.as_ptr().add(run_start * PAGE_SIZE).cast(),
                    (run_end - run_start) * PAGE_SIZE,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    fd.as_raw_fd(),
                    offset,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            run_start = run_end;
        }
        Ok(ring)
    }

    fn data_ptr(&self) -> *mut u8 {
        // SAFETY: the mapping is CONTROL_PAGE_SIZE + 2 * data_len bytes.
        unsafe { self.base.as_ptr().add(CONTROL_PAGE_SIZE) }
    }
}

impl Drop for MappedRing {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the reservation made in map_pages; nothing refers to it any more.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.map_len);
        }
    }
}

impl RingMem for MappedRing {
    #[inline]
    fn control(&self, word: ControlWord) -> &AtomicU32 {
        // SAFETY: the control page is mapped page-aligned for the life of self; word offsets are
        // 4-byte aligned inside it; AtomicU32 has the layout of u32.
        unsafe { &*(self.base.as_ptr().add(word.offset()) as *const AtomicU32) }
    }
    #[inline]
    fn data_len(&self) -> u32 {
        self.data_len
    }
    #[inline]
    fn read_data(&self, offset: u32, dst: &mut [u8]) {
        // SAFETY: the data area is mapped twice (2 * data_len bytes); ring halves keep offset < D and
        // len <= D; dst is private memory.
        unsafe {
            copy_wrapping(
                self.data_ptr(),
                self.data_len as usize,
                true,
                offset as usize,
                dst.as_mut_ptr(),
                dst.len(),
                false,
            )
        }
    }
    #[inline]
    fn write_data(&self, offset: u32, src: &[u8]) {
        // SAFETY: as in read_data; src is only read.
        unsafe {
            copy_wrapping(
                self.data_ptr(),
                self.data_len as usize,
                true,
                offset as usize,
                src.as_ptr().cast_mut(),
                src.len(),
                true,
            )
        }
    }
}

/// A sealed-size memfd of `len` bytes (zeroed) to hold rings shared with another process.
pub fn ring_memfd(name: &str, len: u64) -> io::Result<File> {
    let mfd = memfd::MemfdOptions::default()
        .allow_sealing(true)
        .close_on_exec(true)
        .create(name)
        .map_err(io::Error::other)?;
    mfd.as_file().set_len(len)?;
    mfd.add_seals(&[memfd::FileSeal::SealShrink, memfd::FileSeal::SealGrow])
        .map_err(io::Error::other)?;
    Ok(mfd.into_file())
}

/// Lets `fd` survive `exec` so a spawned child process inherits it (test and bench helpers).
pub fn set_inheritable(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFD/F_SETFD on a valid borrowed descriptor.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, flags & !libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn invalid(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::PacketType;
    use crate::{OutgoingPacket, RingReader, RingWriter, init_control};
    use std::os::fd::AsFd;

    #[test]
    fn double_mapping_aliases_the_data_pages() {
        let f = ring_memfd("t", 4 * PAGE_SIZE as u64).unwrap();
        let ring = MappedRing::map(f.as_fd(), 0, 4 * PAGE_SIZE).unwrap();
        assert_eq!(ring.data_len(), 3 * PAGE_SIZE as u32);
        // A write that wraps lands at the end and at the start of the one data area.
        let pattern: Vec<u8> = (0..64u8).collect();
        ring.write_data(ring.data_len() - 32, &pattern);
        let mut tail = [0u8; 32];
        ring.read_data(ring.data_len() - 32, &mut tail);
        assert_eq!(&tail[..], &pattern[..32]);
        let mut head = [0u8; 32];
        ring.read_data(0, &mut head);
        assert_eq!(&head[..], &pattern[32..]);
        // The file itself holds it at the wrapped places.
        let mut file_bytes = vec![0u8; 4 * PAGE_SIZE];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut file_bytes, 0).unwrap();
        assert_eq!(&file_bytes[4 * PAGE_SIZE - 32..], &pattern[..32]);
        assert_eq!(&file_bytes[PAGE_SIZE..PAGE_SIZE + 32], &pattern[32..]);
    }

    #[test]
    fn scattered_pages_like_a_gpadl() {
        // Ring pages scattered through the file in reverse order, as guest pages of a GPADL may be.
        let f = ring_memfd("t", 8 * PAGE_SIZE as u64).unwrap();
        let pages: Vec<u64> = [7u64, 2, 5, 3]
            .iter()
            .map(|p| p * PAGE_SIZE as u64)
            .collect();
        let a = MappedRing::map_pages(f.as_fd(), &pages).unwrap();
        let b = MappedRing::map_pages(f.as_fd(), &pages).unwrap();
        init_control(&a);
        let mut w = RingWriter::new(&a).unwrap();
        let mut r = RingReader::new(&b).unwrap();
        let payload = vec![0xA5u8; 5000];
        for i in 0..20u64 {
            let parts: [&[u8]; 1] = [&payload];
            let pkt = OutgoingPacket::in_band(i, false, &parts);
            w.try_write(&pkt).unwrap();
            let mut buf = Vec::new();
            let info = r.read_into(&mut buf).unwrap().unwrap();
            assert_eq!(info.trans_id, i);
            assert_eq!(info.packet_type, PacketType::InBand);
            assert_eq!(&buf[..5000], &payload[..]);
            r.commit().unwrap();
        }
        // The control page really is file page 7.
        let mut word = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut word, 7 * PAGE_SIZE as u64).unwrap();
        assert_eq!(u32::from_le_bytes(word), w.write_index());
    }

    #[test]
    fn pages_from_two_files() {
        // Guest RAM in two memfd regions; the ring's pages alternate between them.
        let a = ring_memfd("a", 4 * PAGE_SIZE as u64).unwrap();
        let b = ring_memfd("b", 4 * PAGE_SIZE as u64).unwrap();
        let pg = |i: u64| i * PAGE_SIZE as u64;
        let list = [
            (a.as_fd(), pg(0)),
            (b.as_fd(), pg(1)),
            (a.as_fd(), pg(2)),
            (a.as_fd(), pg(3)),
            (b.as_fd(), pg(0)),
        ];
        let ring = MappedRing::map_page_list(&list).unwrap();
        init_control(&ring);
        assert_eq!(ring.data_len(), 4 * PAGE_SIZE as u32);
        let pattern: Vec<u8> = (0..=255u8).cycle().take(3 * PAGE_SIZE).collect();
        ring.write_data(PAGE_SIZE as u32 * 4 - 100, &pattern);
        let mut back = vec![0u8; pattern.len()];
        ring.read_data(PAGE_SIZE as u32 * 4 - 100, &mut back);
        assert_eq!(back, pattern);
        // Data page 3 is file b page 0 (the write starts 100 bytes before its end); data page 0,
        // where the write wraps to, is file b page 1.
        let mut word = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&b, &mut word, pg(1) - 100).unwrap();
        assert_eq!(word, pattern[..4]);
        std::os::unix::fs::FileExt::read_exact_at(&b, &mut word, pg(1)).unwrap();
        assert_eq!(word, pattern[100..104]);
    }

    #[test]
    fn rejects_bad_shapes() {
        let f = ring_memfd("t", 4 * PAGE_SIZE as u64).unwrap();
        assert!(MappedRing::map(f.as_fd(), 0, PAGE_SIZE).is_err());
        assert!(MappedRing::map(f.as_fd(), 0, 3 * PAGE_SIZE + 1).is_err());
        assert!(MappedRing::map_pages(f.as_fd(), &[0, 100]).is_err());
        assert!(MappedRing::map_pages(f.as_fd(), &[0]).is_err());
    }
}
