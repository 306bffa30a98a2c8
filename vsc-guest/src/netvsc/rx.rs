//! Host → guest: the dispatch of every host packet, and the receive path (Linux `netvsc_receive`,
//! `rndis_filter_receive`, `netvsc_linkstatus_callback`).
//!
//! A transfer-page packet names ranges of the receive buffer, one RNDIS message each (data packets,
//! control replies and status indications alike). Each range is checked (inside the buffer, no
//! longer than a sub-allocation), copied out of the receive buffer, parsed, and used; the packet is
//! then completed — once, whatever happened, with FAIL if any range was bad — so the host can
//! reuse its sections.

use super::{Netvsc, NetvscError, NetvscEvent, OutKind, OutPacket};
use alloc::vec::Vec;
use ringbuf::PacketType;
use vmbus_core::devices::nvsp::{self, NvspMessage, msg_type, status};
use vmbus_core::devices::rndis::{self, RndisMessage, ppi, status as rs};
use vmbus_core::memory::GuestMemory;

/// A frame the host delivered, with what its per-packet info said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RxFrame {
    /// Channel (queue) it arrived on.
    pub queue: u16,
    pub data: Vec<u8>,
    /// Receive checksum flags ([`ppi::RxChecksumInfo`] bits), if reported.
    pub csum: Option<u32>,
    /// 802.1Q tag control information, if the host moved a tag out of the frame.
    pub vlan_tci: Option<u16>,
    /// RSS hash, if reported.
    pub hash: Option<u32>,
}

impl RxFrame {
    /// The host verified the TCP or UDP checksum.
    pub fn l4_checksum_ok(&self) -> bool {
        self.csum.is_some_and(|c| {
            c & (ppi::RxChecksumInfo::TCP_SUCCEEDED | ppi::RxChecksumInfo::UDP_SUCCEEDED) != 0
        })
    }
}

impl<M: GuestMemory> Netvsc<M> {
    /// Handles one host packet from queue `q`'s host→guest ring. An error says what was wrong
    /// with it; the driver carries on (unless the error failed the bring-up, see
    /// [`super::NetvscEvent::Failed`]).
    pub fn handle_packet(
        &mut self,
        q: u16,
        pkt: &super::HostPacket<'_>,
    ) -> Result<(), NetvscError> {
        let r = match pkt.packet_type {
            PacketType::Completion => self.handle_completion(pkt.trans_id, pkt.payload),
            PacketType::TransferPages => self.handle_transfer(q, pkt),
            PacketType::InBand => self.handle_inband(pkt.payload),
            PacketType::GpaDirect => Err(NetvscError::Unexpected("GPA-direct packet")),
        };
        if r.is_err() {
            self.stats.bad_packets = self.stats.bad_packets.saturating_add(1);
        }
        r
    }

    fn handle_inband(&mut self, payload: &[u8]) -> Result<(), NetvscError> {
        match nvsp::peek_type(payload)? {
            msg_type::SEND_INDIRECTION_TABLE => {
                let table = nvsp::indirection_table(payload, self.info.nvsp_version)?;
                self.indirection = Some(table);
                self.event(NetvscEvent::IndirectionTable(table));
                Ok(())
            }
            msg_type::SEND_VF_ASSOCIATION => {
                // No VF support: stay on the synthetic path (Linux only acts with a VF driver).
                let _ = NvspMessage::parse(payload, nvsp::Direction::HostToGuest)?;
                Ok(())
            }
            other => Err(NetvscError::UnexpectedNvsp(other)),
        }
    }

    fn complete_receive(&mut self, q: u16, trans_id: u64, ok: bool, at: usize) {
        let st = if ok { status::SUCCESS } else { status::FAIL };
        let mut payload = Vec::with_capacity(8);
        payload.extend_from_slice(&msg_type::SEND_RNDIS_PACKET_COMPLETE.to_le_bytes());
        payload.extend_from_slice(&st.to_le_bytes());
        self.stats.rx_completions = self.stats.rx_completions.saturating_add(1);
        if !ok {
            self.stats.rx_failed = self.stats.rx_failed.saturating_add(1);
        }
        if let Some(queue) = self.queues.get_mut(usize::from(q)) {
            let at = at.min(queue.out.len());
            queue.out.insert(
                at,
                OutPacket {
                    kind: OutKind::Completion,
                    trans_id,
                    completion_requested: false,
                    payload,
                },
            );
        }
    }

    fn handle_transfer(&mut self, q: u16, pkt: &super::HostPacket<'_>) -> Result<(), NetvscError> {
        self.stats.rx_packets = self.stats.rx_packets.saturating_add(1);
        let before = self.queues.get(usize::from(q)).map_or(0, |x| x.out.len());
        let result = self.receive_ranges(q, pkt);
        // Completed exactly once, whatever was wrong (the host can then recycle its sections),
        // ahead of anything the packet's contents made the driver send.
        self.complete_receive(q, pkt.trans_id, result.is_ok(), before);
        result
    }

    fn receive_ranges(&mut self, q: u16, pkt: &super::HostPacket<'_>) -> Result<(), NetvscError> {
        let msg = NvspMessage::parse(pkt.payload, nvsp::Direction::HostToGuest)?;
        if !matches!(msg, NvspMessage::SendRndisPacket(_)) {
            return Err(NetvscError::UnexpectedNvsp(msg.msg_type()));
        }
        let Some((set_id, ranges)) = pkt.transfer else {
            return Err(NetvscError::Unexpected(
                "transfer-page packet without ranges",
            ));
        };
        if set_id != nvsp::LINUX_RECEIVE_BUFFER_ID || self.recv_gpadl.is_none() {
            return Err(NetvscError::BadSetId(set_id));
        }
        let buf_len = self.recv_buffer_len();
        let section = u64::from(self.info.recv_section_size);
        let mut first_err = None;
        let mut data = Vec::new();
        for &(offset, len) in ranges {
            let why = if u64::from(offset) > buf_len || u64::from(len) > buf_len - u64::from(offset)
            {
                Some("outside the receive buffer")
            } else if u64::from(len) > section {
                Some("longer than a receive sub-allocation")
            } else {
                None
            };
            if let Some(why) = why {
                first_err.get_or_insert(NetvscError::BadRange { offset, len, why });
                continue;
            }
            data.clear();
            data.resize(len as usize, 0);
            let gpa = self.cfg.recv_buffer.gpa + u64::from(offset);
            if let Err(e) = self.mem.read_at(gpa, &mut data) {
                first_err.get_or_insert(e.into());
                continue;
            }
            if let Err(e) = self.receive_message(q, &data) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// One RNDIS message out of a receive range.
    fn receive_message(&mut self, q: u16, bytes: &[u8]) -> Result<(), NetvscError> {
        let (msg, _) = rndis::parse(bytes)?;
        match msg {
            RndisMessage::Packet(p) => {
                let info = p.info()?;
                if self.rx_frames.len() >= self.cfg.rx_queue_limit {
                    self.stats.rx_dropped = self.stats.rx_dropped.saturating_add(1);
                    return Ok(());
                }
                self.stats.rx_frames = self.stats.rx_frames.saturating_add(1);
                self.stats.rx_bytes = self.stats.rx_bytes.saturating_add(p.data.len() as u64);
                self.rx_frames.push_back(RxFrame {
                    queue: q,
                    data: p.data.to_vec(),
                    csum: info.checksum,
                    vlan_tci: info.vlan.map(|v| v.tci()),
                    hash: info.hash,
                });
                Ok(())
            }
            RndisMessage::InitializeComplete(_)
            | RndisMessage::QueryComplete(_)
            | RndisMessage::SetComplete(_) => self.handle_rndis_reply(&msg),
            RndisMessage::IndicateStatus(s) => {
                self.link_status(s.indicate.status, s.buffer);
                Ok(())
            }
            // Linux ignores RESET_CMPLT and never asks for keep-alives.
            RndisMessage::ResetComplete(_) | RndisMessage::KeepaliveComplete(_) => Ok(()),
            _ => Err(NetvscError::Unexpected("RNDIS request from host")),
        }
    }

    /// An INDICATE_STATUS (Linux `netvsc_linkstatus_callback`).
    fn link_status(&mut self, st: u32, buffer: &[u8]) {
        let event = match st {
            rs::MEDIA_CONNECT => {
                self.info.link_up = true;
                NetvscEvent::Link { up: true }
            }
            rs::MEDIA_DISCONNECT => {
                self.info.link_up = false;
                NetvscEvent::Link { up: false }
            }
            rs::NETWORK_CHANGE => NetvscEvent::NetworkChange,
            rs::LINK_SPEED_CHANGE => {
                let Some(speed) = buffer
                    .get(..4)
                    .and_then(|b| <[u8; 4]>::try_from(b).ok())
                    .map(u32::from_le_bytes)
                else {
                    return;
                };
                self.info.link_speed = Some(speed);
                NetvscEvent::LinkSpeed(speed)
            }
            _ => return,
        };
        self.stats.link_events = self.stats.link_events.saturating_add(1);
        self.event(event);
    }
}
