//! [`NetBackend`] for a TAP, and the conversions between the netvsp metadata ([`TxMeta`],
//! [`RxMeta`]: RNDIS PPI terms) and [`FrameMeta`] (used by the TAP and the switch).
//!
//! `RxMeta` has no way to say "super-frame" or "checksum still pending", so received frames are
//! segmented and their checksums completed in software before they reach netvsp
//! ([`deliver_rx`]); open the TAP with [`TapBackend::recommended_config`] (checksum offload only,
//! completed in place) to have the kernel segment and avoid copies.

use std::os::fd::{AsRawFd, RawFd};

use tracing::debug;

use super::offload::{
    self, Checksum, FrameMeta, Gso, GsoKind, L3Proto, L4Proto, OffloadError, VlanTag,
};
use super::{Tap, TapConfig, TapError, TapOffloads};
use crate::backend::{BackendCaps, NetBackend, NetError, RxMeta, TxMeta};

/// Largest super-frame accepted from netvsp (IPv4 total length is 16 bits).
pub const MAX_GSO_SIZE: usize = 65535;

/// Converts netvsp transmit metadata (RNDIS checksum / LSOv2 / 802.1Q PPIs) into [`FrameMeta`].
pub fn frame_meta_from_tx(meta: &TxMeta) -> Result<FrameMeta, NetError> {
    let mut m = FrameMeta {
        vlan: meta.vlan_tci.map(VlanTag::from_tci),
        ..FrameMeta::default()
    };
    if let Some(c) = meta.csum {
        let l3 = if c.ipv6 { L3Proto::Ipv6 } else { L3Proto::Ipv4 };
        let l4 = if c.tcp {
            Some(L4Proto::Tcp)
        } else if c.udp {
            Some(L4Proto::Udp)
        } else {
            None
        };
        let ip_header = c.ip_header && !c.ipv6;
        if l4.is_some() || ip_header {
            m.csum = Checksum::Offload {
                l3,
                l4,
                ip_header,
                l4_offset: c.transport_offset,
            };
        }
    }
    if let Some(g) = meta.gso {
        let mss = u16::try_from(g.mss)
            .ok()
            .filter(|&v| v > 0)
            .ok_or(NetError::Unsupported("LSO MSS of 0 or above 65535"))?;
        let (kind, l3) = if g.ipv6 {
            (GsoKind::TcpV6, L3Proto::Ipv6)
        } else {
            (GsoKind::TcpV4, L3Proto::Ipv4)
        };
        m.gso = Some(Gso {
            kind,
            mss,
            hdr_len: 0,
            ecn: false,
        });
        // The offset from the LSO PPI is checked against the headers like a checksum request.
        m.csum = Checksum::Offload {
            l3,
            l4: Some(L4Proto::Tcp),
            ip_header: !g.ipv6,
            l4_offset: g.tcp_offset,
        };
    }
    Ok(m)
}

/// Receive metadata for a frame without pending offload work: `Valid` becomes the IP/TCP/UDP
/// "checksum ok" bits that apply to the frame; the out-of-band tag becomes `vlan_tci`.
pub fn rx_meta_from_frame(frame: &[u8], meta: &FrameMeta) -> RxMeta {
    let mut r = RxMeta {
        vlan_tci: meta.vlan.map(VlanTag::tci),
        ..RxMeta::default()
    };
    if meta.csum == Checksum::Valid
        && let Ok(h) = offload::parse(frame)
    {
        r.csum.ip_ok = h.l3 == Some(L3Proto::Ipv4);
        r.csum.tcp_ok = h.l4 == Some(L4Proto::Tcp);
        r.csum.udp_ok = h.l4 == Some(L4Proto::Udp);
    }
    r
}

/// Hands a received frame to a netvsp consumer: moves an in-band 802.1Q tag to `vlan_tci` when
/// `strip_vlan`, segments super-frames and completes pending checksums. Returns the number of
/// frames delivered.
pub fn deliver_rx(
    frame: &[u8],
    meta: &FrameMeta,
    strip_vlan: bool,
    out: &mut dyn FnMut(&[u8], &RxMeta),
) -> Result<usize, OffloadError> {
    let mut m = *meta;
    let stripped = if strip_vlan {
        offload::strip_vlan(frame, &mut m)
    } else {
        None
    };
    let frame = stripped.as_deref().unwrap_or(frame);
    if m.gso.is_some() {
        return offload::segment(frame, &m, true, &mut |s, sm| {
            out(s, &rx_meta_from_frame(s, sm))
        });
    }
    if matches!(m.csum, Checksum::Partial { .. } | Checksum::Offload { .. }) {
        let mut copy = frame.to_vec();
        offload::complete_checksum(&mut copy, &mut m)?;
        out(&copy, &rx_meta_from_frame(&copy, &m));
    } else {
        out(frame, &rx_meta_from_frame(frame, &m));
    }
    Ok(1)
}

/// Maps a TAP error to the backend error netvsp understands.
pub fn net_error(e: TapError) -> NetError {
    match e {
        TapError::WouldBlock => NetError::WouldBlock,
        TapError::Frame(_) => NetError::Unsupported("offload metadata does not match the frame"),
        TapError::Runt(_) => NetError::Unsupported("frame shorter than an Ethernet header"),
        TapError::Io { source, .. }
        | TapError::OpenTun(source)
        | TapError::Netns { source, .. } => NetError::Io(source),
        other => NetError::Io(std::io::Error::other(other.to_string())),
    }
}

/// A TAP serving one netvsp device.
#[derive(Debug)]
pub struct TapBackend {
    tap: Tap,
    mac: [u8; 6],
    strip_vlan: bool,
    rx_dropped: u64,
}

impl TapBackend {
    /// TAP settings suited to netvsp: checksum offload only (the kernel segments), partial
    /// checksums completed in place, interface up.
    pub fn recommended_config(name: &str) -> TapConfig {
        TapConfig {
            offloads: TapOffloads::csum_only(),
            complete_rx_csum: true,
            up: true,
            ..TapConfig::named(name)
        }
    }

    /// Wraps an open TAP; `guest_mac` is the permanent address reported to the guest.
    pub fn new(tap: Tap, guest_mac: [u8; 6]) -> Self {
        Self {
            tap,
            mac: guest_mac,
            strip_vlan: true,
            rx_dropped: 0,
        }
    }

    /// Opens a TAP with `config` and wraps it.
    pub fn open(config: &TapConfig, guest_mac: [u8; 6]) -> Result<Self, TapError> {
        Ok(Self::new(Tap::open(config)?, guest_mac))
    }

    /// Whether in-band 802.1Q tags of received frames are moved to `RxMeta::vlan_tci` (default on).
    pub fn set_strip_vlan(&mut self, on: bool) {
        self.strip_vlan = on;
    }

    /// The TAP.
    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    /// The TAP, mutably (e.g. to change offloads).
    pub fn tap_mut(&mut self) -> &mut Tap {
        &mut self.tap
    }

    /// Received frames dropped because their offload metadata could not be applied.
    pub fn rx_dropped(&self) -> u64 {
        self.rx_dropped
    }

    /// Gives the TAP back.
    pub fn into_inner(self) -> Tap {
        self.tap
    }
}

impl NetBackend for TapBackend {
    fn send(&mut self, frame: &[u8], meta: &TxMeta) -> Result<(), NetError> {
        let fm = frame_meta_from_tx(meta)?;
        self.tap.send(frame, &fm).map_err(net_error)
    }

    fn poll_recv(
        &mut self,
        budget: usize,
        out: &mut dyn FnMut(&[u8], &RxMeta),
    ) -> Result<usize, NetError> {
        let strip = self.strip_vlan;
        let mut dropped = 0;
        let n = self
            .tap
            .poll_recv(budget, &mut |f, m| {
                if let Err(e) = deliver_rx(f, m, strip, out) {
                    debug!(error = %e, "TAP backend: dropping received frame");
                    dropped += 1;
                }
            })
            .map_err(net_error)?;
        self.rx_dropped += dropped;
        Ok(n)
    }

    fn link_up(&self) -> bool {
        self.tap.link_up().unwrap_or(false)
    }

    fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn caps(&self) -> BackendCaps {
        BackendCaps {
            tx_csum: true,
            tx_gso: true,
            max_gso_size: MAX_GSO_SIZE,
            tx_vlan: true,
        }
    }

    fn rx_fd(&self) -> Option<RawFd> {
        Some(self.tap.as_raw_fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{TxChecksum, TxGso};

    #[test]
    fn tx_meta_conversion() {
        let t = TxMeta {
            csum: Some(TxChecksum {
                ipv4: true,
                tcp: true,
                ip_header: true,
                transport_offset: 34,
                ..TxChecksum::default()
            }),
            vlan_tci: Some(0x2007),
            ..TxMeta::default()
        };
        let m = frame_meta_from_tx(&t).unwrap();
        assert_eq!(
            m.csum,
            Checksum::Offload {
                l3: L3Proto::Ipv4,
                l4: Some(L4Proto::Tcp),
                ip_header: true,
                l4_offset: 34
            }
        );
        assert_eq!(
            m.vlan,
            Some(VlanTag {
                vid: 7,
                pcp: 1,
                dei: false
            })
        );
        let g = TxMeta {
            gso: Some(TxGso {
                mss: 1440,
                tcp_offset: 54,
                ipv6: true,
            }),
            ..TxMeta::default()
        };
        let m = frame_meta_from_tx(&g).unwrap();
        assert_eq!(m.gso.map(|g| (g.kind, g.mss)), Some((GsoKind::TcpV6, 1440)));
        assert!(matches!(
            m.csum,
            Checksum::Offload {
                l4_offset: 54,
                ip_header: false,
                ..
            }
        ));
        for mss in [0, 70_000] {
            let bad = TxMeta {
                gso: Some(TxGso {
                    mss,
                    tcp_offset: 34,
                    ipv6: false,
                }),
                ..TxMeta::default()
            };
            assert!(frame_meta_from_tx(&bad).is_err());
        }
        // IPv6 has no header checksum; an IPv6 request with only ip_header set means nothing.
        let v6 = TxMeta {
            csum: Some(TxChecksum {
                ipv6: true,
                ip_header: true,
                ..TxChecksum::default()
            }),
            ..TxMeta::default()
        };
        assert_eq!(frame_meta_from_tx(&v6).unwrap().csum, Checksum::None);
    }
}
