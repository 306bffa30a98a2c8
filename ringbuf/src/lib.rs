//! The VMBus ring buffer: one direction of a VMBus channel, byte-exact with Linux `hv_ring_buffer`
//! and OpenVMM `vmbus_ring`.
//!
//! A ring is a 4 KiB control page (`write_index`, `read_index`, `interrupt_mask`, `pending_send_sz`,
//! `feature_bits`) followed by a data area of whole pages holding packets: a 16-byte descriptor,
//! a type-specific header, the payload padded to 8 bytes and an 8-byte trailer.
//!
//! - [`layout`]: the wire structures and offsets.
//! - [`RingMem`]: what a ring needs from memory; [`HeapRing`] (in-process) and, with `std`,
//!   [`mmap::MappedRing`] (any fd's pages, e.g. a memfd shared with another process or guest RAM pages
//!   named by a GPADL, with the data pages mapped twice so wrapping copies are one piece).
//! - [`RingWriter`] / [`RingReader`]: the two halves. They return "signal needed" decisions made
//!   exactly as Linux makes them; they never signal by themselves.
//! - With `std`, [`signal`]: eventfd doorbells and blocking send/receive with spin-then-park.
//!
//! The peer is untrusted: every index and length it writes is loaded once, validated, then used, and
//! type-specific headers are parsed from a private copy. A violation returns a [`RingError`], logs a
//! tracing event and breaks the half, which refuses all further use.
#![cfg_attr(not(feature = "std"), no_std)]

extern crate alloc;

pub mod error;
pub mod layout;
pub mod mem;
pub mod reader;
pub mod writer;

#[cfg(all(feature = "std", not(loom)))]
pub mod handoff;
#[cfg(all(feature = "std", not(loom)))]
pub mod mmap;
#[cfg(all(feature = "std", not(loom)))]
pub mod signal;

pub use error::{PacketFault, PayloadBounds, RingError, WriteError};
pub use layout::{ControlWord, PacketType};
#[cfg(not(loom))]
pub use mem::HeapRing;
pub use mem::{RingMem, init_control};
pub use reader::{GpaRange, GpaRanges, HeaderInfo, IncomingPacket, PacketInfo, RingReader};
pub use writer::{OutgoingPacket, RingWriter, WriteBatch};

/// Atomics and fences: loom's under `--cfg loom`, core's otherwise.
pub mod sync {
    #[cfg(not(loom))]
    pub use core::sync::atomic::{AtomicU32, Ordering, fence};
    #[cfg(loom)]
    pub use loom::sync::atomic::{AtomicU32, Ordering, fence};
}

/// Data-area sizes the halves accept: non-zero multiples of 8 below 2 GiB (so index sums fit a u32).
fn checked_size(size: u32) -> Result<u32, RingError> {
    if size == 0 || !size.is_multiple_of(8) || size > 0x8000_0000 {
        return Err(RingError::BadSize(size));
    }
    Ok(size)
}

/// An index the peer wrote: inside the data area and 8-byte aligned.
fn checked_index(field: &'static str, value: u32, size: u32) -> Result<u32, RingError> {
    if value >= size || !value.is_multiple_of(8) {
        return Err(RingError::BadIndex { field, value, size });
    }
    Ok(value)
}

/// Breaks a ring half on a peer-caused error, once, with a tracing event.
fn mark_broken(broken: &mut bool, half: &'static str, e: RingError) -> RingError {
    if !*broken && e != RingError::Broken {
        tracing::warn!(half, error = %e, "vmbus ring broken by peer");
    }
    *broken = true;
    e
}
