//! The device half that does not depend on the connection: which disk, which features, and the
//! byte-exact `struct virtio_blk_config` served through GET_CONFIG.

use super::request::{ID_LEN, Limits, SECTOR};
use crate::backend::AsyncDisk;
use crate::block::BlockDevice;
use std::sync::Arc;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Largest virtqueue the device accepts.
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Data descriptors per request (the Linux driver's `sg_elems`); QEMU's default is queue size − 2.
pub const SEG_MAX: u32 = 126;
/// Largest single data descriptor advertised (`size_max`).
pub const SIZE_MAX: u32 = 1 << 20;
/// Largest IN/OUT payload accepted (bounds the daemon's buffer memory per request).
pub const MAX_DATA: u64 = 8 << 20;
/// DISCARD / WRITE_ZEROES limits.
pub const MAX_DWZ_SEGS: u32 = 16;
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 17;
/// `VHOST_USER_F_PROTOCOL_FEATURES`.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;
/// Size of `struct virtio_blk_config` (Linux 6.x, with the secure-erase and zoned fields).
pub const CONFIG_LEN: usize = 96;

/// Options of one vhost-user-blk device.
#[derive(Clone, Debug)]
pub struct BlkOptions {
    pub num_queues: u16,
    /// Refuse writes (adds `VIRTIO_BLK_F_RO`).
    pub read_only: bool,
    /// GET_ID answer (at most 20 bytes; shorter is NUL-padded).
    pub serial: Vec<u8>,
    /// Test hook: requests touching this sector are fetched and tracked as in flight but never
    /// executed, so a test can kill the daemon with I/O provably in flight.
    pub hold_sector: Option<u64>,
    /// Adaptive polling window of the queue workers in microseconds (0: always sleep), like
    /// QEMU's `poll-max-ns`: worth it with spare CPUs, costly on a busy host.
    pub poll_us: u32,
}

impl Default for BlkOptions {
    fn default() -> Self {
        BlkOptions {
            num_queues: 1,
            read_only: false,
            serial: b"vsp-blk".to_vec(),
            hold_sector: None,
            poll_us: 0,
        }
    }
}

/// A disk served as a virtio-blk device; shared by every connection and queue.
pub struct BlkDevice {
    pub(crate) disk: Arc<dyn BlockDevice>,
    pub(crate) async_disk: Option<Arc<dyn AsyncDisk>>,
    pub(crate) opts: BlkOptions,
}

impl BlkDevice {
    /// `async_disk` is the same disk when it can keep many requests in flight (raw io_uring).
    pub fn new(
        disk: Arc<dyn BlockDevice>,
        async_disk: Option<Arc<dyn AsyncDisk>>,
        mut opts: BlkOptions,
    ) -> Self {
        opts.num_queues = opts.num_queues.clamp(1, 64);
        opts.serial.truncate(ID_LEN);
        BlkDevice {
            disk,
            async_disk,
            opts,
        }
    }

    pub fn num_queues(&self) -> u16 {
        self.opts.num_queues
    }

    fn read_only(&self) -> bool {
        self.opts.read_only || self.disk.read_only()
    }

    fn discard(&self) -> bool {
        !self.read_only() && self.disk.supports_unmap()
    }

    /// Virtio feature bits offered.
    pub fn features(&self) -> u64 {
        let mut f = [
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_TOPOLOGY,
            VIRTIO_BLK_F_MQ,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_F_VERSION_1,
            VHOST_USER_F_PROTOCOL_FEATURES,
        ]
        .iter()
        .fold(0u64, |a, b| a | (1u64 << b));
        if self.read_only() {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= 1 << VIRTIO_BLK_F_WRITE_ZEROES;
            if self.discard() {
                f |= 1 << VIRTIO_BLK_F_DISCARD;
            }
        }
        f
    }

    /// Limits the request parser enforces.
    pub fn limits(&self, acked: u64) -> Limits {
        Limits {
            capacity: self.disk.size() - self.disk.size() % SECTOR,
            read_only: self.read_only(),
            max_data: MAX_DATA,
            max_dwz_segs: MAX_DWZ_SEGS,
            discard: self.discard() && acked & (1 << VIRTIO_BLK_F_DISCARD) != 0,
            write_zeroes: !self.read_only() && acked & (1 << VIRTIO_BLK_F_WRITE_ZEROES) != 0,
        }
    }

    /// `struct virtio_blk_config`, little-endian (virtio 1.x devices are LE).
    pub fn config(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let put = |c: &mut [u8; CONFIG_LEN], at: usize, v: &[u8]| {
            c[at..at + v.len()].copy_from_slice(v);
        };
        let blk = self.disk.sector_size().max(512);
        put(&mut c, 0, &(self.disk.size() / SECTOR).to_le_bytes()); // capacity
        put(&mut c, 8, &SIZE_MAX.to_le_bytes()); // size_max
        put(&mut c, 12, &SEG_MAX.to_le_bytes()); // seg_max
        // 16: geometry (not offered)
        put(&mut c, 20, &blk.to_le_bytes()); // blk_size
        // 24: physical_block_exp, 25: alignment_offset = 0 (physical == logical)
        put(&mut c, 26, &1u16.to_le_bytes()); // min_io_size (in blk_size units)
        put(&mut c, 28, &0u32.to_le_bytes()); // opt_io_size
        c[32] = 1; // writeback: completed writes need FLUSH to be durable
        put(&mut c, 34, &self.opts.num_queues.to_le_bytes()); // num_queues
        if self.discard() {
            put(&mut c, 36, &MAX_DISCARD_SECTORS.to_le_bytes());
            put(&mut c, 40, &MAX_DWZ_SEGS.to_le_bytes());
            put(&mut c, 44, &(blk / 512).to_le_bytes()); // discard_sector_alignment
        }
        if !self.read_only() {
            put(&mut c, 48, &MAX_WRITE_ZEROES_SECTORS.to_le_bytes());
            put(&mut c, 52, &MAX_DWZ_SEGS.to_le_bytes());
            c[56] = 0; // write_zeroes_may_unmap
        }
        c
    }

    /// The 20-byte GET_ID answer.
    pub fn serial(&self) -> [u8; ID_LEN] {
        let mut id = [0u8; ID_LEN];
        id[..self.opts.serial.len()].copy_from_slice(&self.opts.serial);
        id
    }
}
