//! vhost-user-blk: the same disk backends storvsp uses ([`crate::block::BlockDevice`], the raw
//! io_uring [`crate::backend::AsyncDisk`]), served as a standard virtio-blk device to QEMU or
//! Cloud Hypervisor over a vhost-user socket.
//!
//! - [`request`]: virtio-blk request parsing (pure, fuzzed);
//! - `chain`: walking descriptor chains out of guest memory (bounded, single fetch);
//! - [`device`]: features and the byte-exact `struct virtio_blk_config`;
//! - `worker`: one thread per virtqueue, asynchronous I/O, batched completions;
//! - [`inflight`]: QEMU's inflight I/O tracking region, so a restarted daemon re-runs what was in
//!   flight;
//! - `handler`: the vhost-user requests; [`server`]: accept, serve, listen again;
//! - [`cli`]: `vsp-storage vhost-user-blk`.

mod chain;
pub mod cli;
pub mod device;
mod handler;
pub mod inflight;
pub mod request;
pub mod server;
mod worker;

pub use device::{BlkDevice, BlkOptions};
pub use handler::BlkBackend;
pub use server::{BlkServer, StopHandle};
