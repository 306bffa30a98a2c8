//! The NVSP session on the primary channel: version negotiation, NDIS version and config,
//! receive/send buffer registration and revocation, sub-channel allocation, data-path switch; and
//! how a refused guest packet is answered.

use super::buffers::{BufferError, RX_HEADER_AREA, ReceiveBuffer, SendBuffer};
use super::core::{Core, DEFAULT_MTU, InPacket, Pending};
use ringbuf::RingMem;
use vmbus_core::devices::nvsp::{self, Direction, NvspMessage, msg_type, status, version};

/// OpenVMM's `max_mdl_chain_length` in INIT_COMPLETE.
const MAX_MDL_CHAIN_LENGTH: u32 = 34;
/// Smallest NDIS-config MTU accepted (Ethernet header included).
const MIN_MTU: u32 = 68 + 14;
/// Largest NDIS-config MTU accepted (Linux `NETVSC_MTU`).
const MAX_MTU: u32 = 65535;

impl<R: RingMem> Core<R> {
    /// Refuses a guest packet: counted, logged (warn on the 1st, 2nd, 4th... occurrence, so a
    /// flood cannot flood the log), and answered with a failure where the message has a reply.
    pub(crate) fn refuse(&mut self, q: u16, pkt: &InPacket, ty: u32, reason: &str) {
        self.stats.bad_packets += 1;
        let relid = self.channels.get(&q).map_or(0, |c| c.relid);
        if self.stats.bad_packets.is_power_of_two() {
            tracing::warn!(
                relid,
                msg_type = ty,
                reason,
                count = self.stats.bad_packets,
                "netvsp: guest packet refused"
            );
        } else {
            tracing::debug!(relid, msg_type = ty, reason, "netvsp: guest packet refused");
        }
        if !pkt.completion_requested {
            return;
        }
        let reply = match ty {
            msg_type::INIT => Some(NvspMessage::InitComplete(nvsp::InitComplete {
                negotiated_protocol_version: u32::MAX,
                max_mdl_chain_length: MAX_MDL_CHAIN_LENGTH,
                status: status::FAIL,
            })),
            msg_type::SEND_RECEIVE_BUFFER => Some(NvspMessage::SendReceiveBufferComplete(
                nvsp::SendReceiveBufferComplete {
                    status: status::FAIL,
                    ..Default::default()
                },
            )),
            msg_type::SEND_SEND_BUFFER => Some(NvspMessage::SendSendBufferComplete(
                nvsp::SendSendBufferComplete {
                    status: status::FAIL,
                    section_size: 0,
                },
            )),
            msg_type::SEND_RNDIS_PACKET => Some(NvspMessage::SendRndisPacketComplete(
                nvsp::SendRndisPacketComplete {
                    status: status::FAIL,
                },
            )),
            msg_type::SUBCHANNEL => {
                Some(NvspMessage::SubchannelComplete(nvsp::SubchannelComplete {
                    status: status::FAIL,
                    num_subchannels: 0,
                }))
            }
            msg_type::SWITCH_DATA_PATH => {
                self.complete(q, pkt.trans_id, Vec::new());
                None
            }
            _ => None,
        };
        if let Some(r) = reply {
            let size = self.msg_size();
            self.complete(q, pkt.trans_id, r.to_bytes(size));
        }
    }

    /// Why `msg` may not be handled now, if it may not.
    fn not_allowed(&self, q: u16, msg: &NvspMessage) -> Option<String> {
        let ty = msg.msg_type();
        let s = &self.session;
        let Some(v) = s.version else {
            return (!matches!(msg, NvspMessage::Init(_))).then(|| "message before INIT".into());
        };
        if let Err(e) = nvsp::check_version(ty, v) {
            return Some(e.to_string());
        }
        if q != 0 && !matches!(msg, NvspMessage::SendRndisPacket(_)) {
            return Some("only SEND_RNDIS_PKT is allowed on a sub-channel".into());
        }
        let dup = |what: &str| Some(format!("{what} twice"));
        match msg {
            NvspMessage::Init(_) => dup("INIT"),
            NvspMessage::SendNdisVersion(_) if s.ndis_version.is_some() => dup("SEND_NDIS_VER"),
            NvspMessage::SendNdisConfig(_) if s.ndis_config.is_some() => dup("SEND_NDIS_CONFIG"),
            NvspMessage::SendReceiveBuffer(_) if self.rx.is_some() => dup("SEND_RECV_BUF"),
            NvspMessage::SendReceiveBuffer(_) if v >= version::V2 && s.ndis_config.is_none() => {
                Some("SEND_RECV_BUF before SEND_NDIS_CONFIG".into())
            }
            NvspMessage::SendSendBuffer(_) if self.tx.is_some() => dup("SEND_SEND_BUF"),
            NvspMessage::SendRndisPacketComplete(_) => {
                Some("SEND_RNDIS_PKT_COMPLETE must be a completion packet".into())
            }
            _ => None,
        }
    }

    pub(crate) fn handle_message(&mut self, q: u16, pkt: InPacket) {
        let msg = match NvspMessage::parse(&pkt.payload, Direction::GuestToHost) {
            Ok(m) => m,
            Err(e) => {
                let ty = nvsp::peek_type(&pkt.payload).unwrap_or(0);
                return self.refuse(q, &pkt, ty, &e.to_string());
            }
        };
        if let Some(reason) = self.not_allowed(q, &msg) {
            return self.refuse(q, &pkt, msg.msg_type(), &reason);
        }
        let size = self.msg_size();
        match msg {
            NvspMessage::Init(i) => self.handle_init(q, &pkt, i),
            NvspMessage::SendNdisVersion(v) => {
                self.session.ndis_version = Some((v.ndis_major_version, v.ndis_minor_version));
            }
            NvspMessage::SendNdisConfig(c) => {
                let mtu = c.mtu;
                self.session.mtu = if (MIN_MTU..=MAX_MTU).contains(&mtu) {
                    mtu
                } else {
                    DEFAULT_MTU
                };
                self.session.ndis_config = Some(c);
            }
            NvspMessage::SendReceiveBuffer(b) => {
                let sub_size = RX_HEADER_AREA + self.session.mtu + 36;
                let result = self
                    .gpadls
                    .gpadl(b.gpadl_handle)
                    .ok_or(BufferError::UnknownGpadl(b.gpadl_handle))
                    .and_then(|g| ReceiveBuffer::new(&g, b.id, sub_size))
                    .map(|rx| match &self.journal {
                        Some(j) => rx.with_journal(j.clone()),
                        None => rx,
                    });
                let reply = match result {
                    Ok(rx) => {
                        let r = nvsp::SendReceiveBufferComplete {
                            status: status::SUCCESS,
                            num_sections: 1,
                            section: nvsp::ReceiveBufferSection {
                                offset: 0,
                                sub_allocation_size: rx.sub_size,
                                num_sub_allocations: rx.count,
                                end_offset: rx.sub_size * rx.count,
                            },
                        };
                        tracing::debug!(
                            sections = rx.count,
                            size = rx.sub_size,
                            "netvsp: receive buffer registered"
                        );
                        self.rx = Some(rx);
                        r
                    }
                    Err(e) => {
                        return self.refuse(q, &pkt, msg_type::SEND_RECEIVE_BUFFER, &e.to_string());
                    }
                };
                if pkt.completion_requested {
                    self.complete(
                        q,
                        pkt.trans_id,
                        NvspMessage::SendReceiveBufferComplete(reply).to_bytes(size),
                    );
                }
            }
            NvspMessage::SendSendBuffer(b) => {
                let result = self
                    .gpadls
                    .gpadl(b.gpadl_handle)
                    .ok_or(BufferError::UnknownGpadl(b.gpadl_handle))
                    .and_then(|g| SendBuffer::new(&g, b.id, self.cfg.send_section_size));
                match result {
                    Ok(tx) => {
                        let r = nvsp::SendSendBufferComplete {
                            status: status::SUCCESS,
                            section_size: tx.section_size,
                        };
                        self.tx = Some(tx);
                        if pkt.completion_requested {
                            self.complete(
                                q,
                                pkt.trans_id,
                                NvspMessage::SendSendBufferComplete(r).to_bytes(size),
                            );
                        }
                    }
                    Err(e) => self.refuse(q, &pkt, msg_type::SEND_SEND_BUFFER, &e.to_string()),
                }
            }
            NvspMessage::RevokeReceiveBuffer(r) => {
                if self.rx.as_ref().is_some_and(|rx| rx.buf.id == r.id) {
                    self.rx = None;
                    for ch in self.channels.values_mut() {
                        ch.out.retain(|p| !matches!(p, Pending::Transfer { .. }));
                    }
                } else {
                    self.refuse(
                        q,
                        &pkt,
                        msg_type::REVOKE_RECEIVE_BUFFER,
                        "no receive buffer with that id",
                    );
                }
            }
            NvspMessage::RevokeSendBuffer(r) => {
                if self.tx.as_ref().is_some_and(|tx| tx.buf.id == r.id) {
                    self.tx = None;
                } else {
                    self.refuse(
                        q,
                        &pkt,
                        msg_type::REVOKE_SEND_BUFFER,
                        "no send buffer with that id",
                    );
                }
            }
            NvspMessage::SendRndisPacket(r) => self.handle_send_rndis(q, &pkt, r),
            NvspMessage::SwitchDataPath(d) => {
                tracing::debug!(
                    requested = { d.active_datapath },
                    "netvsp: no VF, data path stays synthetic"
                );
                if pkt.completion_requested {
                    self.complete(q, pkt.trans_id, Vec::new());
                }
            }
            NvspMessage::SubchannelRequest(r) => self.handle_subchannels(q, &pkt, r),
            // Host-to-guest types never parse in this direction.
            _ => self.refuse(q, &pkt, msg.msg_type(), "unexpected message"),
        }
    }

    fn handle_init(&mut self, q: u16, pkt: &InPacket, i: nvsp::Init) {
        let (min, max) = (i.min_protocol_version, i.max_protocol_version);
        let granted = version::ALL
            .iter()
            .rev()
            .copied()
            .find(|&v| v <= self.cfg.max_nvsp_version && v >= min && v <= max);
        let reply = nvsp::InitComplete {
            negotiated_protocol_version: if granted == Some(version::V1) {
                version::V1
            } else {
                u32::MAX
            },
            max_mdl_chain_length: MAX_MDL_CHAIN_LENGTH,
            status: if granted.is_some() {
                status::SUCCESS
            } else {
                status::FAIL
            },
        };
        tracing::debug!(min, max, ?granted, "netvsp: NVSP INIT");
        self.session.version = granted;
        if pkt.completion_requested {
            let size = nvsp::message_size(granted.unwrap_or(max));
            self.complete(
                q,
                pkt.trans_id,
                NvspMessage::InitComplete(reply).to_bytes(size),
            );
        }
    }

    fn handle_subchannels(&mut self, q: u16, pkt: &InPacket, r: nvsp::SubchannelRequest) {
        let (op, want) = (r.operation, r.num_subchannels);
        let max = u32::from(self.cfg.max_queues.saturating_sub(1));
        if op != nvsp::SUBCHANNEL_ALLOCATE || want > max {
            return self.refuse(
                q,
                pkt,
                msg_type::SUBCHANNEL,
                &format!("op {op}, {want} sub-channels (max {max})"),
            );
        }
        let want = want as u16;
        if want > self.offered {
            let got = self.subchannel_ctl.offer_subchannels(want - self.offered);
            self.offered = self.offered.saturating_add(got);
        }
        let granted = want.min(self.offered);
        self.session.granted = granted;
        self.session.table_pending = granted > 0;
        tracing::debug!(want, granted, "netvsp: sub-channels");
        if pkt.completion_requested {
            let reply = NvspMessage::SubchannelComplete(nvsp::SubchannelComplete {
                status: status::SUCCESS,
                num_subchannels: u32::from(granted),
            });
            let size = self.msg_size();
            self.complete(q, pkt.trans_id, reply.to_bytes(size));
        }
    }
}
