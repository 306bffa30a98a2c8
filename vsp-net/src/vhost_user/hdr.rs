//! The virtio-net header of a frame the driver transmits: decoded from bytes copied out of the
//! chain once, then checked against the negotiated features and the frame (pure bytes; fuzzed).

use thiserror::Error;

use super::config::feat;
use crate::tap::offload::ETH_HLEN;
use crate::tap::vnet::{VirtioNetHdr, VnetError};
use crate::tap::{Checksum, FrameMeta, GsoKind};

/// Largest frame accepted from the driver: a 64 KiB super-frame plus Ethernet and VLAN headers.
pub const MAX_FRAME: usize = 65535 + ETH_HLEN + 4;

/// Why a transmitted frame was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum TxHdrError {
    /// The header itself does not decode.
    #[error(transparent)]
    Header(#[from] VnetError),
    /// Fewer frame bytes than an Ethernet header.
    #[error("frame of {0} bytes is shorter than an Ethernet header")]
    Runt(usize),
    /// Larger than [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds {MAX_FRAME}")]
    TooLong(usize),
    /// `NEEDS_CSUM` / GSO without the feature that allows it.
    #[error("offload {0} used without negotiating it")]
    NotNegotiated(&'static str),
    /// The checksum field lies outside the frame.
    #[error("checksum at {start}+{offset} outside a {len}-byte frame")]
    CsumOutside {
        /// `csum_start`.
        start: u16,
        /// `csum_offset`.
        offset: u16,
        /// Frame length.
        len: usize,
    },
}

/// Header size for the negotiated features: 12 with `VERSION_1` or `MRG_RXBUF`, else 10.
pub fn hdr_len(acked: u64) -> usize {
    if acked & (feat::VERSION_1 | feat::MRG_RXBUF) != 0 {
        12
    } else {
        10
    }
}

/// Splits `buf` (header + frame) and returns the frame with its metadata.
pub fn parse_tx(buf: &[u8], acked: u64) -> Result<(FrameMeta, &[u8]), TxHdrError> {
    let hl = hdr_len(acked);
    let h = VirtioNetHdr::decode(buf, hl)?;
    let frame = &buf[hl..];
    if frame.len() < ETH_HLEN {
        return Err(TxHdrError::Runt(frame.len()));
    }
    if frame.len() > MAX_FRAME {
        return Err(TxHdrError::TooLong(frame.len()));
    }
    let meta = h.to_meta()?;
    if let Checksum::Partial { start, offset } = meta.csum {
        if acked & feat::CSUM == 0 {
            return Err(TxHdrError::NotNegotiated("CSUM"));
        }
        if usize::from(start) + usize::from(offset) + 2 > frame.len() {
            return Err(TxHdrError::CsumOutside {
                start,
                offset,
                len: frame.len(),
            });
        }
    }
    if let Some(g) = meta.gso {
        let (need, name) = match g.kind {
            GsoKind::TcpV4 => (feat::HOST_TSO4, "HOST_TSO4"),
            GsoKind::TcpV6 => (feat::HOST_TSO6, "HOST_TSO6"),
            GsoKind::UdpL4 => (0, "HOST_USO"),
        };
        if need == 0 || acked & need == 0 {
            return Err(TxHdrError::NotNegotiated(name));
        }
        if g.ecn && acked & feat::HOST_ECN == 0 {
            return Err(TxHdrError::NotNegotiated("HOST_ECN"));
        }
    } else if frame.len() > MAX_FRAME - 65535 + 9216 {
        // Not a super-frame: anything past a jumbo frame is a lie about its size.
        return Err(TxHdrError::TooLong(frame.len()));
    }
    Ok((meta, frame))
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::IntoBytes;
    use zerocopy::little_endian::U16;

    const ALL: u64 = feat::VERSION_1 | feat::CSUM | feat::HOST_TSO4 | feat::HOST_TSO6;

    fn with_hdr(h: VirtioNetHdr, len: usize) -> Vec<u8> {
        let mut v = h.as_bytes().to_vec();
        v.resize(12 + len, 0);
        v
    }

    #[test]
    fn accepts_plain_and_offloaded() {
        let plain = with_hdr(VirtioNetHdr::default(), 60);
        let (m, f) = parse_tx(&plain, ALL).unwrap();
        assert_eq!((m, f.len()), (FrameMeta::default(), 60));
        let h = VirtioNetHdr {
            flags: 1,
            gso_type: 1,
            hdr_len: U16::new(54),
            gso_size: U16::new(1448),
            csum_start: U16::new(34),
            csum_offset: U16::new(16),
            ..Default::default()
        };
        let (m, _) = parse_tx(&with_hdr(h, 3000), ALL).unwrap();
        assert_eq!(m.gso.unwrap().mss, 1448);
        // Legacy 10-byte header without VERSION_1.
        let mut legacy = VirtioNetHdr::default().as_bytes()[..10].to_vec();
        legacy.extend_from_slice(&[0u8; 60]);
        assert_eq!(parse_tx(&legacy, 0).unwrap().1.len(), 60);
    }

    #[test]
    fn refuses_hostile_headers() {
        assert!(matches!(
            parse_tx(&[0; 11], ALL),
            Err(TxHdrError::Header(_))
        ));
        assert!(matches!(
            parse_tx(&with_hdr(VirtioNetHdr::default(), 13), ALL),
            Err(TxHdrError::Runt(13))
        ));
        let csum = VirtioNetHdr {
            flags: 1,
            csum_start: U16::new(58),
            csum_offset: U16::new(6),
            ..Default::default()
        };
        assert!(matches!(
            parse_tx(&with_hdr(csum, 60), ALL),
            Err(TxHdrError::CsumOutside { .. })
        ));
        assert!(matches!(
            parse_tx(&with_hdr(csum, 100), feat::VERSION_1),
            Err(TxHdrError::NotNegotiated("CSUM"))
        ));
        let tso6 = VirtioNetHdr {
            flags: 1,
            gso_type: 4,
            gso_size: U16::new(1000),
            csum_start: U16::new(54),
            csum_offset: U16::new(16),
            ..Default::default()
        };
        assert!(matches!(
            parse_tx(&with_hdr(tso6, 3000), ALL & !feat::HOST_TSO6),
            Err(TxHdrError::NotNegotiated("HOST_TSO6"))
        ));
        assert!(matches!(
            parse_tx(&with_hdr(VirtioNetHdr::default(), 20000), ALL),
            Err(TxHdrError::TooLong(20000))
        ));
    }
}
