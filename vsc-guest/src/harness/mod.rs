//! Runs storvsc in a host process against a storage VSP over shared rings — what the storage
//! benchmark and the soak test drive.
//!
//! A harness "VM" is guest RAM in a memfd (GPA = file offset; rings and data buffers live in it),
//! the VMBus control plane (`vmbus_core::guest::Client` ↔ `vmbus_core::host::Server`, pumped in
//! this process), the [`Storvsc`](crate::storvsc::Storvsc) driver with its channel rings, and the
//! VSP behind a [`Vsp`]: in this process (its own threads) or in a child process under
//! `vmbus_core::oop::Supervisor`. Bring-up mirrors Linux: connect, offers, ring GPADL + open of
//! the SCSI channel, the vstor handshake, sub-channels, the SCSI probe; then I/O on the first
//! disk found.
//!
//! VSP crates stay out of `vsc-guest`'s dependencies: devices are named only through the
//! `vmbus_core` traits ([`HostedDevice`](vmbus_core::oop::HostedDevice),
//! [`VmbusDevice`](vmbus_core::device::VmbusDevice)); tests and the `tests` crate plug storvsp in.
//!
//! Sub-channels: the harness (acting as the VMM) offers the sub-channels the guest's
//! CREATE_SUB_CHANNELS was granted. Neither `HostedDevice` nor `Supervisor` carries a device's
//! asynchronous sub-channel request to the bus (a VSP only gets a `ChannelControl` while a channel
//! opens), so waiting for the device would never end; its requests are counted instead.
//!
//! VSP restarts (child process, [`HarnessConfig::supervise`]): when the VSP dies the harness
//! reads what it answered, notes which requests it had taken from the rings without answering
//! ([`RingChannel::lost_requests`](crate::storvsc::RingChannel::lost_requests)), lets the
//! supervisor restart it (memory table and channels replayed, ring positions kept in guest
//! memory) and sends exactly those requests again. A completion arriving twice is ignored by
//! the driver. The restarted VSP must resume the vstor session (storvsp: its saved state).

mod host;
mod io;
mod memory;
mod vm;

pub use host::{DeviceResources, SubchannelRequests, VmbusFactory, Vsp};
pub use io::{IoDone, IoOp};
pub use memory::{DmaBuffer, GuestRam, PAGE};
pub use vm::{HarnessConfig, StorHarness};

use crate::storvsc::{ChannelError, DiskError, InitError, IoError, StorvscError};
use vmbus_core::memory::MemoryError;

/// Why the harness could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("guest RAM exhausted: {pages} pages wanted")]
    OutOfRam { pages: u64 },
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
    #[error("buffer access {offset:#x}+{len:#x} beyond its {size:#x} bytes")]
    BufferBounds { offset: u64, len: u64, size: u64 },
    #[error("VMBus: {0}")]
    Bus(String),
    #[error("VSP host: {0}")]
    Device(String),
    #[error("storvsc: {0}")]
    Driver(#[from] StorvscError),
    #[error("storvsc initialization: {0}")]
    Init(#[from] InitError),
    #[error("ring: {0}")]
    Ring(#[from] ChannelError),
    #[error("disk: {0}")]
    Disk(#[from] DiskError),
    #[error("SCSI: {0}")]
    Scsi(#[from] IoError),
    #[error("no disk found by the probe")]
    NoDisk,
    #[error("short transfer: {got} of {expected} bytes")]
    ShortTransfer { expected: u64, got: u64 },
    #[error("no request with tag {0} in flight")]
    UnknownTag(u64),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
}
