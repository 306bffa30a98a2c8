//! Storage VSP (storvsp): the vstor protocol over VMBus, SCSI emulation, disk backends (raw files
//! through io_uring, VHD fixed/dynamic/differencing) and the VHD tools.

pub mod backend;
pub mod block;
pub mod scsi;
pub mod storvsp;
pub mod vhd;
pub mod vhost_user;
