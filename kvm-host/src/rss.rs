//! Host memory accounting: how much of a process's resident memory is the guest's RAM and how much
//! is the VMM's own overhead.
//!
//! - `VmRSS` from `/proc/<pid>/status`;
//! - the resident part of each guest RAM mapping from `/proc/self/smaps` (the `Rss:` of the VMA
//!   that starts at the region's host address): what the guest touched, as mapped in the VMM;
//! - the pages of each guest RAM memfd that exist at all (`mincore` on the mapping), which also
//!   counts pages only a VSP touched through its own mapping.

use crate::memory::GuestRam;

/// Memory accounting errors.
#[derive(Debug, thiserror::Error)]
pub enum RssError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0} lacks the expected line")]
    NoVmRss(String),
    #[error("mincore: {0}")]
    Mincore(std::io::Error),
}

fn read(path: &str) -> Result<String, RssError> {
    std::fs::read_to_string(path).map_err(|source| RssError::Read {
        path: path.to_string(),
        source,
    })
}

/// `VmRSS` of process `pid` (`None` = this process) in KiB.
pub fn vm_rss_kib(pid: Option<u32>) -> Result<u64, RssError> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".to_string(),
    };
    parse_kib_line(&read(&path)?, "VmRSS:").ok_or(RssError::NoVmRss(path))
}

fn parse_kib_line(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Private memory of process `pid` in KiB: `Private_Clean + Private_Dirty` from
/// `/proc/<pid>/smaps_rollup` (pages only it maps: its heap, stacks and private buffers; not the
/// program text or guest RAM it shares with the VMM).
pub fn private_kib(pid: u32) -> Result<u64, RssError> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let s = read(&path)?;
    match (
        parse_kib_line(&s, "Private_Clean:"),
        parse_kib_line(&s, "Private_Dirty:"),
    ) {
        (Some(c), Some(d)) => Ok(c.saturating_add(d)),
        _ => Err(RssError::NoVmRss(path)),
    }
}

/// The parent process id of `pid` (`PPid:` of `/proc/<pid>/status`).
pub fn parent_pid(pid: u32) -> Result<u32, RssError> {
    let path = format!("/proc/{pid}/status");
    let s = read(&path)?;
    s.lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|r| r.trim().parse().ok())
        .ok_or(RssError::NoVmRss(path))
}

/// `(RssAnon, RssFile)` of this process in KiB: private memory, and file pages (the executable's
/// and the shared libraries' text, shared with every process that maps them).
pub fn anon_file_kib() -> Result<(u64, u64), RssError> {
    let s = read("/proc/self/status")?;
    let get = |k: &str| parse_kib_line(&s, k).unwrap_or(0);
    Ok((get("RssAnon:"), get("RssFile:")))
}

/// Resident KiB of the VMAs of this process that start at one of `starts`, from `smaps`.
pub fn mapping_rss_kib(starts: &[u64]) -> Result<u64, RssError> {
    Ok(smaps_rss(&read("/proc/self/smaps")?, starts))
}

fn smaps_rss(smaps: &str, starts: &[u64]) -> u64 {
    let mut total = 0;
    let mut inside = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((lo, _hi)) = first.split_once('-')
            && let Ok(lo) = u64::from_str_radix(lo, 16)
            && !first.ends_with(':')
        {
            inside = starts.contains(&lo);
            continue;
        }
        if inside && let Some(kib) = parse_kib_line(line, "Rss:") {
            total += kib;
        }
    }
    total
}

/// Pages of `ram` that exist in its memfds (touched by anyone), in KiB.
pub fn guest_resident_kib(ram: &GuestRam) -> Result<u64, RssError> {
    let page = 4096usize;
    let mut pages = 0u64;
    for r in ram.regions() {
        let len = usize::try_from(r.len).unwrap_or(0);
        let mut vec = vec![0u8; len.div_ceil(page)];
        // SAFETY: `host_addr..+len` is a live, page-aligned mapping owned by `ram` (borrowed for
        // the call); `vec` has one byte per page of it, as mincore requires.
        let rc = unsafe { libc::mincore(r.host_addr as *mut libc::c_void, len, vec.as_mut_ptr()) };
        if rc != 0 {
            return Err(RssError::Mincore(std::io::Error::last_os_error()));
        }
        pages += vec.iter().filter(|b| **b & 1 != 0).count() as u64;
    }
    Ok(pages * 4)
}

/// A memory report for one partition.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryReport {
    /// VmRSS before the partition was created.
    pub baseline_kib: u64,
    /// VmRSS with the partition (and its in-process VSPs) alive, after the guest ran.
    pub rss_kib: u64,
    /// Resident pages of the guest RAM mappings in this process.
    pub guest_mapped_kib: u64,
    /// Guest RAM pages that exist at all (touched by the guest, the VMM or a VSP).
    pub guest_touched_kib: u64,
    /// Of `rss_kib`: private anonymous memory, and file-backed pages (program and library text).
    pub anon_kib: u64,
    pub file_kib: u64,
}

impl MemoryReport {
    /// Process RSS minus guest memory: what the VMM itself holds.
    pub fn overhead_kib(&self) -> u64 {
        self.rss_kib.saturating_sub(self.guest_mapped_kib)
    }

    /// Growth of the process for this partition, guest memory excluded.
    pub fn partition_overhead_kib(&self) -> u64 {
        self.rss_kib
            .saturating_sub(self.baseline_kib)
            .saturating_sub(self.guest_mapped_kib)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_and_smaps() {
        assert_eq!(
            parse_kib_line("Name:\tx\nVmRSS:\t   1234 kB\n", "VmRSS:"),
            Some(1234)
        );
        let smaps = "7f0000000000-7f0000400000 rw-s 00000000 00:01 5 /memfd:guest-ram-0 (deleted)\n\
                     Size:               4096 kB\n\
                     Rss:                 120 kB\n\
                     7f0000400000-7f0000401000 rw-p 00000000 00:00 0\n\
                     Rss:                   4 kB\n";
        assert_eq!(smaps_rss(smaps, &[0x7f00_0000_0000]), 120);
        assert_eq!(smaps_rss(smaps, &[0x7f00_0040_0000]), 4);
        assert_eq!(smaps_rss(smaps, &[1]), 0);
    }

    #[test]
    fn counts_touched_guest_pages() {
        let ram = GuestRam::new(4 << 20).unwrap();
        let before = guest_resident_kib(&ram).unwrap();
        ram.write(0x10_0000, &[1; 8192]).unwrap();
        assert_eq!(guest_resident_kib(&ram).unwrap() - before, 8);
        let start = ram.regions()[0].host_addr;
        assert!(mapping_rss_kib(&[start]).unwrap() >= 8);
        assert!(vm_rss_kib(None).unwrap() > 0);
    }
}
