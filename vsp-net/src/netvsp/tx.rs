//! Guest → host: SEND_RNDIS_PKT. The RNDIS bytes come from a send-buffer section, from GPA-direct
//! pages, or both ("partial copy": the section first, then the pages, as one stream); they hold
//! one or more RNDIS messages walked by `msg_len`. Data packets go to the backend with their
//! offload requests, finished in software where the backend cannot.

use super::core::{Core, InKind, InPacket, RndisPhase};
use crate::backend::{NetError, TxChecksum, TxGso, TxMeta};
use crate::tap::offload::{
    self, Checksum, FrameMeta, Gso, GsoKind, L3Proto, L4Proto, OffloadError, VlanTag,
};
use ringbuf::RingMem;
use vmbus_core::devices::nvsp::{self, NvspMessage, msg_type, status};
use vmbus_core::devices::rndis::ppi::TxChecksumInfo;
use vmbus_core::devices::rndis::{self, Messages, PacketMessage, RndisError, RndisMessage};
use vmbus_core::memory::{MemoryError, PagedRange};

/// Largest LSO frame accepted: a maximal IP packet behind an Ethernet header and one VLAN tag.
const MAX_GSO_FRAME: usize = 65535 + 14 + 4;
/// Ethernet header length.
const ETH_HLEN: usize = 14;

/// One validated RNDIS message of a transmit, or an OID request to refuse.
enum Item<'a> {
    Msg(RndisMessage<'a>),
    BadOid { ty: u32, req_id: u32 },
}

/// Why a guest transmit is refused (the whole SEND_RNDIS_PKT completes with FAIL).
#[derive(Debug, thiserror::Error)]
pub(crate) enum TxError {
    #[error("send buffer: {0}")]
    Section(#[from] super::buffers::SectionError),
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
    #[error("transmit of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: u64, max: usize },
    #[error("SEND_RNDIS_PKT carries no RNDIS bytes")]
    Empty,
    #[error("RNDIS: {0}")]
    Rndis(#[from] RndisError),
    #[error("RNDIS {0:#x} is a host-to-guest message")]
    HostMessage(u32),
    #[error("offload request: {0}")]
    Offload(&'static str),
    #[error("offload: {0}")]
    Headers(#[from] OffloadError),
    #[error("RNDIS control reply queue full")]
    ControlQueueFull,
}

impl<R: RingMem> Core<R> {
    pub(crate) fn handle_send_rndis(&mut self, q: u16, pkt: &InPacket, req: nvsp::SendRndisPacket) {
        let result = self
            .gather(pkt, req)
            .and_then(|bytes| self.process_rndis(&bytes));
        match result {
            Ok(()) => {
                if pkt.completion_requested {
                    let reply =
                        NvspMessage::SendRndisPacketComplete(nvsp::SendRndisPacketComplete {
                            status: status::SUCCESS,
                        });
                    let size = self.msg_size();
                    self.complete(q, pkt.trans_id, reply.to_bytes(size));
                }
            }
            Err(e) => self.refuse(q, pkt, msg_type::SEND_RNDIS_PACKET, &e.to_string()),
        }
    }

    /// Copies the RNDIS bytes of a SEND_RNDIS_PKT out of guest memory: section bytes, then the
    /// GPA-direct ranges.
    fn gather(&self, pkt: &InPacket, req: nvsp::SendRndisPacket) -> Result<Vec<u8>, TxError> {
        let (index, size) = (req.send_buffer_section_index, req.send_buffer_section_size);
        let ranges: &[super::core::OwnedRange] = match &pkt.kind {
            InKind::GpaDirect(r) => r,
            _ => &[],
        };
        let section_len = if index == nvsp::INVALID_SECTION_INDEX {
            0
        } else {
            size
        };
        let total = ranges.iter().fold(u64::from(section_len), |a, r| {
            a.saturating_add(u64::from(r.byte_count))
        });
        if total > self.cfg.max_tx_message as u64 {
            return Err(TxError::TooLarge {
                len: total,
                max: self.cfg.max_tx_message,
            });
        }
        if total == 0 {
            return Err(TxError::Empty);
        }
        let mut out = vec![0u8; total as usize];
        let mut at = 0usize;
        if index != nvsp::INVALID_SECTION_INDEX {
            let tx = self
                .tx
                .as_ref()
                .ok_or(super::buffers::SectionError::NoBuffer)?;
            let offset = tx.section(index, size)?;
            let n = size as usize;
            tx.buf.read(self.mem.as_ref(), offset, &mut out[..n])?;
            at = n;
        }
        for r in ranges {
            let range = PagedRange::new(r.byte_offset, r.byte_count, &r.pfns)?;
            let n = r.byte_count as usize;
            self.mem.read_paged(&range, 0, &mut out[at..at + n])?;
            at += n;
        }
        Ok(out)
    }

    /// Validates every message first (a malformed one fails the whole packet before anything is
    /// sent), then handles them in order.
    fn process_rndis(&mut self, bytes: &[u8]) -> Result<(), TxError> {
        let mut items = Vec::new();
        for m in Messages::new(bytes) {
            let m = m?;
            match rndis::parse(m) {
                Ok((msg, _)) => {
                    if let RndisMessage::Packet(p) = &msg {
                        p.info()?;
                    }
                    items.push(Item::Msg(msg));
                }
                // A QUERY / SET whose information buffer lies outside the message still has a
                // request id: answer it with INVALID_DATA instead of leaving the guest waiting.
                Err(e @ RndisError::OutOfBounds { .. }) => {
                    let (ty, _) = rndis::peek(m)?;
                    let req = m.get(rndis::HEADER_SIZE..).and_then(|b| b.get(..4));
                    match (ty, req) {
                        (rndis::msg_type::QUERY | rndis::msg_type::SET, Some(r)) => {
                            let req_id = u32::from_le_bytes(r.try_into().unwrap_or([0; 4]));
                            tracing::debug!(error = %e, req_id, "netvsp: OID request refused");
                            self.stats.bad_packets += 1;
                            items.push(Item::BadOid { ty, req_id });
                        }
                        _ => return Err(e.into()),
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        if items.is_empty() {
            return Err(TxError::Empty);
        }
        for item in items {
            match item {
                Item::Msg(RndisMessage::Packet(p)) => self.transmit(&p)?,
                Item::Msg(other) => self.handle_control(other)?,
                Item::BadOid { ty, req_id } => {
                    let reply = if ty == rndis::msg_type::QUERY {
                        rndis::query_complete(req_id, rndis::status::INVALID_DATA, &[])
                    } else {
                        rndis::set_complete(req_id, rndis::status::INVALID_DATA)
                    };
                    if !self.queue_control(reply) {
                        return Err(TxError::ControlQueueFull);
                    }
                }
            }
        }
        Ok(())
    }

    /// One RNDIS_PACKET to the backend.
    fn transmit(&mut self, p: &PacketMessage<'_>) -> Result<(), TxError> {
        if self.rndis.phase != RndisPhase::Initialized {
            self.stats.tx_dropped += 1;
            return Ok(());
        }
        let info = p.info()?;
        let frame = p.data;
        let mut meta = TxMeta {
            vlan_tci: info.vlan.map(|v| v.tci()),
            hash: info.hash,
            ..TxMeta::default()
        };
        if let Some(l) = info.lso.filter(|l| l.0 != 0) {
            if l.lso_type() != 1 {
                return Err(TxError::Offload("LSO v1 is not supported"));
            }
            let (mss, off) = (l.mss(), usize::from(l.tcp_header_offset()));
            if mss == 0 {
                return Err(TxError::Offload("LSO with MSS 0"));
            }
            let doff = frame.get(off + 12).map(|b| usize::from(b >> 4) * 4);
            if off < ETH_HLEN || doff.is_none_or(|d| d < 20 || off + d >= frame.len()) {
                return Err(TxError::Offload("LSO TCP header offset outside the frame"));
            }
            meta.gso = Some(TxGso {
                mss,
                tcp_offset: off as u16,
                ipv6: l.is_ipv6(),
            });
        }
        if let Some(c) = info.checksum.map(TxChecksumInfo)
            && (c.tcp_checksum() || c.udp_checksum() || c.ip_header_checksum())
        {
            let off = c.transport_offset();
            if (c.tcp_checksum() || c.udp_checksum())
                && (usize::from(off) < ETH_HLEN || usize::from(off) >= frame.len())
            {
                return Err(TxError::Offload(
                    "checksum transport offset outside the frame",
                ));
            }
            if c.is_ipv4() == c.is_ipv6() {
                return Err(TxError::Offload(
                    "checksum request is neither IPv4 nor IPv6",
                ));
            }
            meta.csum = Some(TxChecksum {
                ipv4: c.is_ipv4(),
                ipv6: c.is_ipv6(),
                tcp: c.tcp_checksum(),
                udp: c.udp_checksum(),
                ip_header: c.ip_header_checksum(),
                transport_offset: off,
            });
        }
        let max = if meta.gso.is_some() {
            MAX_GSO_FRAME
        } else {
            self.session.mtu as usize + 4
        };
        if frame.len() > max || frame.len() < ETH_HLEN {
            self.stats.tx_dropped += 1;
            return Ok(());
        }
        self.send_frame(frame, &meta)
    }

    /// Hands a frame to the backend, doing in software what it cannot.
    fn send_frame(&mut self, frame: &[u8], meta: &TxMeta) -> Result<(), TxError> {
        let caps = self.backend.caps();
        let sw_gso = meta.gso.is_some() && !(caps.tx_gso && frame.len() <= caps.max_gso_size);
        let sw_csum = meta.csum.is_some() && !caps.tx_csum;
        let sw_vlan = meta.vlan_tci.is_some() && !caps.tx_vlan;
        let Core { backend, stats, .. } = self;
        let mut send = |f: &[u8], m: &TxMeta| match backend.send(f, m) {
            Ok(()) => {
                stats.tx_frames += 1;
                stats.tx_bytes += f.len() as u64;
            }
            Err(NetError::WouldBlock | NetError::FrameTooLarge { .. }) => stats.tx_dropped += 1,
            Err(e) => {
                stats.tx_errors += 1;
                tracing::debug!(error = %e, "netvsp: backend send failed");
            }
        };
        if !sw_gso && !sw_csum && !sw_vlan {
            send(frame, meta);
            return Ok(());
        }
        // Software path: finish checksums and segmentation when the backend cannot, then put
        // the VLAN tag in-band if the backend cannot take it out of band.
        let vlan = |f: &[u8]| -> Option<Vec<u8>> {
            let tci = meta.vlan_tci.filter(|_| sw_vlan)?;
            let mut fm = FrameMeta {
                vlan: Some(VlanTag::from_tci(tci)),
                ..FrameMeta::default()
            };
            offload::insert_vlan(f, &mut fm)
        };
        let pass_vlan = meta.vlan_tci.filter(|_| !sw_vlan);
        if !sw_gso && !sw_csum {
            let tagged = vlan(frame);
            let m = TxMeta {
                vlan_tci: pass_vlan,
                ..*meta
            };
            send(tagged.as_deref().unwrap_or(frame), &m);
            return Ok(());
        }
        let fm = frame_meta(meta)?;
        let out_meta = TxMeta {
            vlan_tci: pass_vlan,
            hash: meta.hash,
            ..TxMeta::default()
        };
        offload::segment(frame, &fm, true, &mut |seg, _| {
            let tagged = vlan(seg);
            send(tagged.as_deref().unwrap_or(seg), &out_meta);
        })?;
        Ok(())
    }
}

/// The offload metadata of the software offload code for a guest request.
fn frame_meta(meta: &TxMeta) -> Result<FrameMeta, TxError> {
    let csum = match meta.csum {
        Some(c) => Checksum::Offload {
            l3: if c.ipv6 { L3Proto::Ipv6 } else { L3Proto::Ipv4 },
            l4: if c.tcp {
                Some(L4Proto::Tcp)
            } else if c.udp {
                Some(L4Proto::Udp)
            } else {
                None
            },
            ip_header: c.ip_header,
            l4_offset: c.transport_offset,
        },
        None => Checksum::None,
    };
    let gso = match meta.gso {
        Some(g) => Some(Gso {
            kind: if g.ipv6 {
                GsoKind::TcpV6
            } else {
                GsoKind::TcpV4
            },
            mss: u16::try_from(g.mss).map_err(|_| TxError::Offload("LSO MSS above 65535"))?,
            hdr_len: 0,
            ecn: false,
        }),
        None => None,
    };
    Ok(FrameMeta {
        csum,
        gso,
        vlan: None,
    })
}
