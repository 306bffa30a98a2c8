//! Guest-side VMBus drivers (VSCs), `no_std` + `alloc` at the core so the same code runs in a
//! bare-metal guest, in a host process and in the kvm-host test guest.
//!
//! - [`storvsc`]: the storage VSC (vstor protocol, SCSI probe, block I/O), sans-IO.
//! - `harness` (feature `std`): runs storvsc in a host process against a storage VSP over shared
//!   rings, with the VSP in-process (threads) or in a child process (`vmbus_core::oop`).
//! - [`netvsc`]: the network VSC (NVSP + RNDIS, Linux `hv_netvsc` bring-up order, send sections /
//!   GPA direct, transfer-page receive, offload PPIs, link state, multi-queue), sans-IO.
//! - `net_harness` (feature `std`): runs netvsc in a host process against a network VSP (netvsp in
//!   the tests) over shared rings, in-process or in a supervised child process, with a smoltcp stack.
#![cfg_attr(not(feature = "std"), no_std)]

extern crate alloc;

#[cfg(feature = "std")]
mod control_plane;

#[cfg(feature = "std")]
pub mod harness;
#[cfg(feature = "std")]
pub mod net_harness;
pub mod netvsc;
pub mod storvsc;
