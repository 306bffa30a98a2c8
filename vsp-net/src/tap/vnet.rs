//! `virtio_net_hdr` (the header a TAP opened with `IFF_VNET_HDR` puts before every frame) and its
//! mapping to [`FrameMeta`].
//!
//! Layout (little-endian on every host this runs on; `TUNSETVNETLE` makes it explicit on big-endian):
//! `flags u8 @0, gso_type u8 @1, hdr_len u16 @2, gso_size u16 @4, csum_start u16 @6,
//! csum_offset u16 @8` (10 bytes, legacy), plus `num_buffers u16 @10` (12 bytes, v1 /
//! mergeable buffers). The TAP is told which one via `TUNSETVNETHDRSZ`.

use thiserror::Error;
use zerocopy::little_endian::U16;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::offload::{Checksum, FrameMeta, Gso, GsoKind};

/// `flags`: checksum to be completed from `csum_start`, field at `csum_start + csum_offset`.
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
/// `flags`: checksums already validated.
pub const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;
/// `gso_type`: not a super-frame.
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
/// `gso_type`: TCP over IPv4.
pub const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
/// `gso_type`: UDP fragmentation offload (obsolete, never produced by current kernels).
pub const VIRTIO_NET_HDR_GSO_UDP: u8 = 3;
/// `gso_type`: TCP over IPv6.
pub const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
/// `gso_type`: UDP segmentation (USO).
pub const VIRTIO_NET_HDR_GSO_UDP_L4: u8 = 5;
/// `gso_type` flag: TCP ECN (CWR on the first segment only).
pub const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;

/// Size of the legacy header (no `num_buffers`).
pub const VNET_HDR_LEN_LEGACY: usize = 10;
/// Size of the v1 / mergeable-buffers header.
pub const VNET_HDR_LEN_V1: usize = 12;

/// Errors decoding a received header.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum VnetError {
    /// Fewer bytes than the negotiated header size.
    #[error("virtio-net header truncated: {0} bytes")]
    Truncated(usize),
    /// `gso_type` this code does not handle.
    #[error("unsupported virtio-net gso_type {0:#04x}")]
    UnsupportedGso(u8),
    /// A super-frame without a partial checksum or with gso_size 0.
    #[error("virtio-net super-frame without NEEDS_CSUM or with gso_size 0")]
    BadGso,
}

/// The 12-byte `virtio_net_hdr_v1` (the legacy 10-byte header is its prefix).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct VirtioNetHdr {
    /// `VIRTIO_NET_HDR_F_*`.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`.
    pub gso_type: u8,
    /// Length of the headers (a hint on receive).
    pub hdr_len: U16,
    /// MSS.
    pub gso_size: U16,
    /// Checksum start.
    pub csum_start: U16,
    /// Checksum field offset from `csum_start`.
    pub csum_offset: U16,
    /// Mergeable buffers (0 for a TAP).
    pub num_buffers: U16,
}

impl VirtioNetHdr {
    /// Decodes the first `len` (10 or 12) bytes of `buf`.
    pub fn decode(buf: &[u8], len: usize) -> Result<Self, VnetError> {
        if buf.len() < len || len < VNET_HDR_LEN_LEGACY {
            return Err(VnetError::Truncated(buf.len()));
        }
        let mut raw = [0u8; VNET_HDR_LEN_V1];
        let n = len.min(VNET_HDR_LEN_V1);
        raw[..n].copy_from_slice(&buf[..n]);
        Self::read_from_bytes(&raw).map_err(|_| VnetError::Truncated(buf.len()))
    }

    /// Builds the header for a frame to transmit. `meta` must already be normalised by
    /// [`super::offload::finalize_tx`] (no `Checksum::Offload`; a `gso` carries `hdr_len`).
    pub fn from_meta(meta: &FrameMeta) -> Self {
        let mut h = Self::default();
        match meta.csum {
            Checksum::Partial { start, offset } => {
                h.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
                h.csum_start = U16::new(start);
                h.csum_offset = U16::new(offset);
            }
            Checksum::Valid => h.flags = VIRTIO_NET_HDR_F_DATA_VALID,
            Checksum::None | Checksum::Offload { .. } => {}
        }
        if let Some(g) = meta.gso {
            h.gso_type = match g.kind {
                GsoKind::TcpV4 => VIRTIO_NET_HDR_GSO_TCPV4,
                GsoKind::TcpV6 => VIRTIO_NET_HDR_GSO_TCPV6,
                GsoKind::UdpL4 => VIRTIO_NET_HDR_GSO_UDP_L4,
            };
            if g.ecn {
                h.gso_type |= VIRTIO_NET_HDR_GSO_ECN;
            }
            h.gso_size = U16::new(g.mss);
            h.hdr_len = U16::new(g.hdr_len);
        }
        h
    }

    /// Metadata for a received frame.
    pub fn to_meta(&self) -> Result<FrameMeta, VnetError> {
        let mut meta = FrameMeta::default();
        if self.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
            meta.csum = Checksum::Partial {
                start: self.csum_start.get(),
                offset: self.csum_offset.get(),
            };
        } else if self.flags & VIRTIO_NET_HDR_F_DATA_VALID != 0 {
            meta.csum = Checksum::Valid;
        }
        let kind = match self.gso_type & !VIRTIO_NET_HDR_GSO_ECN {
            VIRTIO_NET_HDR_GSO_NONE => None,
            VIRTIO_NET_HDR_GSO_TCPV4 => Some(GsoKind::TcpV4),
            VIRTIO_NET_HDR_GSO_TCPV6 => Some(GsoKind::TcpV6),
            VIRTIO_NET_HDR_GSO_UDP_L4 => Some(GsoKind::UdpL4),
            other => return Err(VnetError::UnsupportedGso(other)),
        };
        if let Some(kind) = kind {
            if self.gso_size.get() == 0 || !matches!(meta.csum, Checksum::Partial { .. }) {
                return Err(VnetError::BadGso);
            }
            meta.gso = Some(Gso {
                kind,
                mss: self.gso_size.get(),
                hdr_len: self.hdr_len.get(),
                ecn: self.gso_type & VIRTIO_NET_HDR_GSO_ECN != 0,
            });
        }
        Ok(meta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tap::offload::VlanTag;

    #[test]
    fn layout() {
        assert_eq!(size_of::<VirtioNetHdr>(), VNET_HDR_LEN_V1);
        let h = VirtioNetHdr {
            flags: 1,
            gso_type: 4,
            hdr_len: U16::new(0x0102),
            gso_size: U16::new(0x0304),
            csum_start: U16::new(0x0506),
            csum_offset: U16::new(0x0708),
            num_buffers: U16::new(0x090a),
        };
        assert_eq!(h.as_bytes(), &[1, 4, 2, 1, 4, 3, 6, 5, 8, 7, 0x0a, 9]);
        assert_eq!(VirtioNetHdr::decode(h.as_bytes(), 12), Ok(h));
        let legacy = VirtioNetHdr::decode(&h.as_bytes()[..10], 10).unwrap();
        assert_eq!(legacy.num_buffers.get(), 0);
        assert_eq!(legacy.csum_offset.get(), 0x0708);
        assert!(VirtioNetHdr::decode(&h.as_bytes()[..9], 10).is_err());
    }

    #[test]
    fn meta_round_trip() {
        let meta = FrameMeta {
            csum: Checksum::Partial {
                start: 34,
                offset: 16,
            },
            gso: Some(Gso {
                kind: GsoKind::TcpV4,
                mss: 1448,
                hdr_len: 66,
                ecn: true,
            }),
            vlan: None,
        };
        let h = VirtioNetHdr::from_meta(&meta);
        assert_eq!(h.flags, VIRTIO_NET_HDR_F_NEEDS_CSUM);
        assert_eq!(
            h.gso_type,
            VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN
        );
        assert_eq!(h.to_meta(), Ok(meta));
        // The VLAN tag is not part of the header: it goes in-band.
        let tagged = FrameMeta {
            vlan: Some(VlanTag::new(5)),
            ..FrameMeta::default()
        };
        assert_eq!(VirtioNetHdr::from_meta(&tagged), VirtioNetHdr::default());
        let valid = VirtioNetHdr {
            flags: VIRTIO_NET_HDR_F_DATA_VALID,
            ..Default::default()
        };
        assert_eq!(valid.to_meta().unwrap().csum, Checksum::Valid);
    }

    #[test]
    fn bad_rx_headers() {
        let ufo = VirtioNetHdr {
            flags: 1,
            gso_type: VIRTIO_NET_HDR_GSO_UDP,
            gso_size: U16::new(100),
            ..Default::default()
        };
        assert_eq!(ufo.to_meta(), Err(VnetError::UnsupportedGso(3)));
        let no_csum = VirtioNetHdr {
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
            gso_size: U16::new(100),
            ..Default::default()
        };
        assert_eq!(no_csum.to_meta(), Err(VnetError::BadGso));
        let no_mss = VirtioNetHdr {
            flags: 1,
            gso_type: VIRTIO_NET_HDR_GSO_TCPV6,
            ..Default::default()
        };
        assert_eq!(no_mss.to_meta(), Err(VnetError::BadGso));
    }
}
