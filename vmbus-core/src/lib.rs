//! VMBus channel protocol: wire messages, host and guest sans-IO state machines, GPADLs, the SynIC
//! port trait and the out-of-process VSP protocol.
//!
//! Built so far:
//! - [`wire`]: the VMBus channel-management messages (`CHANNELMSG_*`) byte-exact with Linux
//!   `hv_vmbus`, the wire [`wire::Guid`], protocol [`wire::Version`]s, and a total parser /
//!   serializer ([`wire::ChannelMessage`]).
#![cfg_attr(not(any(test, feature = "std")), no_std)]

extern crate alloc;

// The wire structs use native integers; that is only the little-endian VMBus layout on a
// little-endian machine. Every VMBus target (x86_64, aarch64) is little-endian.
#[cfg(target_endian = "big")]
compile_error!("vmbus-core's wire structs assume a little-endian target");

pub mod device;
pub mod devices;
pub mod gpadl;
pub mod guest;
pub mod host;
pub mod memory;
#[cfg(feature = "std")]
pub mod oop;
pub mod savestate;
pub mod synic;
pub mod wire;
