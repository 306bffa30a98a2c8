//! Runs the netvsc driver in a host process against a network VSP over shared rings: a "VM" is a
//! memfd of guest RAM, the VMBus control plane (`vmbus_core::guest::Client` ↔
//! `vmbus_core::host::Server`, pumped in-process), the driver with its channel rings mapped from
//! that RAM, and the device behind a [`DeviceHost`]:
//!
//! - [`InProcessHost`]: any [`VmbusDevice`] (netvsp in the tests) built from [`DeviceResources`]
//!   (guest RAM, the GPADL table, ring mapping, doorbells, sub-channel requests);
//! - [`ProcessHost`]: the device in a child process behind `vmbus_core::oop::Supervisor` and
//!   `serve`; GPADLs reach the child through the protocol (`Gpadl` messages) and, for devices
//!   that look them up themselves, a table in reserved guest pages ([`GpadlSideTable`]).
//!
//! [`NetVm`] does the bring-up (connect, offers, ring GPADLs, open, the driver's GPADLs and
//! sub-channels) and services the rings; [`smol`] puts a smoltcp interface on top so tests speak
//! real ARP / ICMP / TCP.
//!
//! The crate graph keeps VSP crates out of `vsc-guest`: the harness names devices only through
//! `vmbus_core` traits; tests (and the `tests` crate) plug netvsp in.

mod host;
pub mod smol;
mod vm;

pub use host::{
    DeviceHost, DeviceResources, GpadlSideTable, InProcessHost, MappedChannel, ProcessHost,
    SubchannelRequests,
};
pub use vm::{GPADL_TABLE_ENV, NetVm, VmConfig};

use crate::netvsc::{DmaRegion, NetvscError, PAGE_SIZE};
use ringbuf::mmap::{MappedRing, ring_memfd};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use vmbus_core::memory::{GuestMemory, MappedMemory, MemoryError};

pub use vmbus_core::device::VmbusDevice;

/// Why the harness could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("guest RAM exhausted: {0} pages wanted")]
    OutOfRam(u64),
    #[error("VMBus: {0}")]
    Bus(String),
    #[error("netvsc: {0}")]
    Driver(#[from] NetvscError),
    #[error("ring: {0}")]
    Ring(#[from] crate::netvsc::ring::ChannelError),
    #[error("device host: {0}")]
    Device(String),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
}

/// Guest memory shared by `Arc` (what the driver holds).
#[derive(Clone, Debug)]
pub struct SharedMem(pub Arc<MappedMemory>);

impl GuestMemory for SharedMem {
    fn read_at(&self, gpa: u64, dst: &mut [u8]) -> Result<(), MemoryError> {
        self.0.read_at(gpa, dst)
    }
    fn write_at(&self, gpa: u64, src: &[u8]) -> Result<(), MemoryError> {
        self.0.write_at(gpa, src)
    }
}

/// Guest RAM: a memfd starting at GPA 0, mapped once for the guest side, with a bump page
/// allocator. The last [`GpadlSideTable::PAGES`] pages are reserved for the GPADL side table.
pub struct GuestRam {
    file: Arc<File>,
    mem: Arc<MappedMemory>,
    pages: u64,
    next_pfn: u64,
}

impl GuestRam {
    pub fn new(pages: u64) -> Result<Self, HarnessError> {
        let file = Arc::new(ring_memfd("netvsc-guest-ram", pages * PAGE_SIZE)?);
        let mem = Arc::new(MappedMemory::map(
            file.as_fd(),
            (pages * PAGE_SIZE) as usize,
        )?);
        Ok(GuestRam {
            file,
            mem,
            pages,
            next_pfn: 16,
        })
    }

    /// Pages of RAM.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    pub fn file(&self) -> Arc<File> {
        self.file.clone()
    }

    pub fn memory(&self) -> Arc<MappedMemory> {
        self.mem.clone()
    }

    /// `n` fresh contiguous pages; returns the first PFN.
    pub fn alloc(&mut self, n: u64) -> Result<u64, HarnessError> {
        let first = self.next_pfn;
        let end = first.saturating_add(n);
        if end > self.pages.saturating_sub(GpadlSideTable::PAGES) {
            return Err(HarnessError::OutOfRam(n));
        }
        self.next_pfn = end;
        Ok(first)
    }

    /// A fresh region of at least `bytes` (whole pages).
    pub fn region(&mut self, bytes: u64) -> Result<DmaRegion, HarnessError> {
        let n = bytes.div_ceil(PAGE_SIZE);
        let pfn = self.alloc(n)?;
        Ok(DmaRegion::new(pfn * PAGE_SIZE, n * PAGE_SIZE))
    }

    /// Maps a ring (control page first) from RAM pages.
    pub fn map_ring(&self, pfns: &[u64]) -> Result<MappedRing, HarnessError> {
        map_ring(&self.file, pfns)
    }

    /// GPA of the GPADL side table.
    pub fn side_table_gpa(&self) -> u64 {
        (self.pages - GpadlSideTable::PAGES) * PAGE_SIZE
    }
}

/// Maps the ring pages `pfns` of the RAM file.
pub fn map_ring(file: &File, pfns: &[u64]) -> Result<MappedRing, HarnessError> {
    let offsets: Vec<u64> = pfns.iter().map(|p| p * PAGE_SIZE).collect();
    Ok(MappedRing::map_pages(file.as_fd(), &offsets)?)
}
