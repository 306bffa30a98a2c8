//! Device protocols that ride on VMBus channels, shared by the host-side VSPs and the guest drivers
//! (no_std): wire structs, versions and total parsers.

pub mod nvsp;
pub mod rndis;
pub mod vstor;
