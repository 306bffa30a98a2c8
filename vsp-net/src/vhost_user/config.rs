//! Feature bits and the `virtio_net_config` space.

use crate::switch::MacAddr;

/// `VIRTIO_NET_F_*` / transport feature masks (bit numbers from the virtio 1.2 spec, the same as
/// `virtio_bindings::virtio_net`).
pub mod feat {
    /// Device completes partial checksums the driver leaves (guest TX).
    pub const CSUM: u64 = 1 << 0;
    /// Driver accepts partial checksums (guest RX).
    pub const GUEST_CSUM: u64 = 1 << 1;
    /// `mtu` field valid.
    pub const MTU: u64 = 1 << 3;
    /// `mac` field valid.
    pub const MAC: u64 = 1 << 5;
    /// Driver accepts TCPv4 super-frames.
    pub const GUEST_TSO4: u64 = 1 << 7;
    /// Driver accepts TCPv6 super-frames.
    pub const GUEST_TSO6: u64 = 1 << 8;
    /// Driver accepts TSO super-frames with ECN.
    pub const GUEST_ECN: u64 = 1 << 9;
    /// Device accepts TCPv4 super-frames.
    pub const HOST_TSO4: u64 = 1 << 11;
    /// Device accepts TCPv6 super-frames.
    pub const HOST_TSO6: u64 = 1 << 12;
    /// Device accepts TSO with ECN.
    pub const HOST_ECN: u64 = 1 << 13;
    /// Mergeable receive buffers.
    pub const MRG_RXBUF: u64 = 1 << 15;
    /// `status` field valid.
    pub const STATUS: u64 = 1 << 16;
    /// Control virtqueue.
    pub const CTRL_VQ: u64 = 1 << 17;
    /// RX mode and MAC table commands.
    pub const CTRL_RX: u64 = 1 << 18;
    /// Extra RX mode commands.
    pub const CTRL_RX_EXTRA: u64 = 1 << 20;
    /// Several queue pairs.
    pub const MQ: u64 = 1 << 22;
    /// MAC_ADDR_SET.
    pub const CTRL_MAC_ADDR: u64 = 1 << 23;
    /// Indirect descriptors.
    pub const INDIRECT_DESC: u64 = 1 << 28;
    /// used_event / avail_event.
    pub const EVENT_IDX: u64 = 1 << 29;
    /// vhost-user: protocol features supported.
    pub const PROTOCOL_FEATURES: u64 = 1 << 30;
    /// Virtio 1.
    pub const VERSION_1: u64 = 1 << 32;
}

/// `VIRTIO_NET_S_LINK_UP`.
pub const STATUS_LINK_UP: u16 = 1;

/// Size of `virtio_net_config` up to and including `mtu` (what this device fills).
pub const CONFIG_LEN: usize = 12;

/// Features this device offers, given the queue-pair count and whether an MTU is advertised.
pub fn offered(mtu: Option<u16>) -> u64 {
    use feat::*;
    let mut f = CSUM
        | GUEST_CSUM
        | MAC
        | GUEST_TSO4
        | GUEST_TSO6
        | GUEST_ECN
        | HOST_TSO4
        | HOST_TSO6
        | HOST_ECN
        | MRG_RXBUF
        | STATUS
        | CTRL_VQ
        | CTRL_RX
        | CTRL_RX_EXTRA
        | MQ
        | CTRL_MAC_ADDR
        | INDIRECT_DESC
        | EVENT_IDX
        | PROTOCOL_FEATURES
        | VERSION_1;
    if mtu.is_some() {
        f |= MTU;
    }
    f
}

/// The config space bytes: `mac[6] @0, status le16 @6, max_virtqueue_pairs le16 @8, mtu le16 @10`.
pub fn config_bytes(mac: MacAddr, link_up: bool, pairs: u16, mtu: Option<u16>) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    c[..6].copy_from_slice(&mac);
    let status = if link_up { STATUS_LINK_UP } else { 0 };
    c[6..8].copy_from_slice(&status.to_le_bytes());
    c[8..10].copy_from_slice(&pairs.to_le_bytes());
    c[10..12].copy_from_slice(&mtu.unwrap_or(0).to_le_bytes());
    c
}

/// The `[offset, offset + size)` window of the config space; bytes past its end read as zero
/// (a frontend may ask for the whole `virtio_net_config`). `size` is capped by the vhost-user
/// message limit before this is called.
pub fn config_window(cfg: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let size = size as usize;
    let mut out = vec![0u8; size];
    let off = offset as usize;
    if off < cfg.len() {
        let n = (cfg.len() - off).min(size);
        out[..n].copy_from_slice(&cfg[off..off + n]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_net as vn;

    #[test]
    fn bits_match_bindings() {
        assert_eq!(feat::CSUM, 1 << vn::VIRTIO_NET_F_CSUM);
        assert_eq!(feat::GUEST_TSO6, 1 << vn::VIRTIO_NET_F_GUEST_TSO6);
        assert_eq!(feat::HOST_ECN, 1 << vn::VIRTIO_NET_F_HOST_ECN);
        assert_eq!(feat::GUEST_ECN, 1 << vn::VIRTIO_NET_F_GUEST_ECN);
        assert_eq!(feat::MRG_RXBUF, 1 << vn::VIRTIO_NET_F_MRG_RXBUF);
        assert_eq!(feat::CTRL_RX_EXTRA, 1 << vn::VIRTIO_NET_F_CTRL_RX_EXTRA);
        assert_eq!(feat::MQ, 1 << vn::VIRTIO_NET_F_MQ);
        assert_eq!(feat::CTRL_MAC_ADDR, 1 << vn::VIRTIO_NET_F_CTRL_MAC_ADDR);
        assert_eq!(
            feat::EVENT_IDX,
            1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX
        );
        assert_eq!(
            feat::VERSION_1,
            1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1
        );
    }

    #[test]
    fn config_layout() {
        let c = config_bytes([2, 0, 0, 0, 0, 7], true, 2, Some(1500));
        assert_eq!(c, [2, 0, 0, 0, 0, 7, 1, 0, 2, 0, 0xdc, 0x05]);
        assert_eq!(config_window(&c, 6, 4), vec![1, 0, 2, 0]);
        assert_eq!(config_window(&c, 10, 8), vec![0xdc, 5, 0, 0, 0, 0, 0, 0]);
        assert_eq!(config_window(&c, 100, 2), vec![0, 0]);
    }
}
