//! RNDIS control: INITIALIZE, the OID queries and sets Linux makes during probe (`rndis_filter_
//! device_add`, `rndis_netdev_set_hwcaps`, `rndis_set_subchannel`, `ifup`), and their replies.
//!
//! Requests go GPA direct from a page of the control area (one page per request in flight), on the
//! primary channel, channel type control, no send section — as Linux `rndis_filter_send_request`.

use super::bringup::Phase;
use super::{
    DriverState, LINUX_MAX_TRANSFER_SIZE, Netvsc, NetvscError, NetvscEvent, OutKind, OutPacket,
    PAGE_SIZE, PageBuffer, TxSlot,
};
use alloc::string::String;
use alloc::vec::Vec;
use core::mem::size_of;
use vmbus_core::devices::nvsp::{self, NvspMessage, version};
use vmbus_core::devices::rndis::ndis::{
    self, ObjectHeader, Offload, OffloadParams, RecvScaleCapabilities, RecvScaleParameters,
    offload_param,
};
use vmbus_core::devices::rndis::{self, RndisMessage, oid, status as rs};
use vmbus_core::memory::GuestMemory;
use zerocopy::{FromBytes, IntoBytes};

/// The bring-up's RNDIS steps, in Linux's order.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(super) enum Step {
    Initialize,
    MaxFrameSize,
    Mac,
    FriendlyName,
    HwCaps,
    OffloadParams,
    LinkStatus,
    LinkSpeed,
    RssCaps,
    RssDisable,
    RssEnable,
    PacketFilter,
}

/// What an outstanding RNDIS request was for.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(super) enum Request {
    Step(Step),
    /// A packet filter change after the bring-up.
    Filter,
}

/// Reads a header-led NDIS object of which `bytes` may hold only a prefix (the rest reads 0).
fn object<T: FromBytes + IntoBytes>(bytes: &[u8]) -> T {
    let mut v = T::new_zeroed();
    let n = bytes.len().min(size_of::<T>());
    if let (Some(d), Some(s)) = (v.as_mut_bytes().get_mut(..n), bytes.get(..n)) {
        d.copy_from_slice(s);
    }
    v
}

fn u32_of(info: &[u8]) -> Option<u32> {
    <[u8; 4]>::try_from(info).ok().map(u32::from_le_bytes)
}

/// The offload parameters Linux sets for these capabilities (`rndis_netdev_set_hwcaps`).
pub fn linux_offload_params(caps: &Offload, nvsp_version: u32) -> OffloadParams {
    use ndis::{csum_cap as c, lsov2_cap as l};
    let mut p = OffloadParams {
        ip4_csum: offload_param::TX_RX_DISABLED,
        ..OffloadParams::default()
    };
    let (ip4_tx, ip6_tx) = (caps.csum.ip4_tx_csum, caps.csum.ip6_tx_csum);
    let lso = caps.lsov2;
    if ip4_tx & (c::TCP4 | c::TCP4_OPTIONS) == c::TCP4 | c::TCP4_OPTIONS {
        p.tcp4_csum = offload_param::TX_RX_ENABLED;
        if lso.ip4_encap & ndis::ENCAP_802_3 != 0 {
            p.lsov2_ip4 = offload_param::ENABLED;
        }
        if ip4_tx & c::UDP4 != 0 {
            p.udp4_csum = offload_param::TX_RX_ENABLED;
        }
    }
    let all6 = c::TCP6 | c::TCP6_OPTIONS | c::IP6_EXTENSIONS;
    if ip6_tx & all6 == all6 {
        p.tcp6_csum = offload_param::TX_RX_ENABLED;
        let opts = l::IP6_EXTENSIONS | l::TCP6_OPTIONS;
        if lso.ip6_encap & ndis::ENCAP_802_3 != 0 && lso.ip6_options & opts == opts {
            p.lsov2_ip6 = offload_param::ENABLED;
        }
        if ip6_tx & c::UDP6 != 0 {
            p.udp6_csum = offload_param::TX_RX_ENABLED;
        }
    }
    if nvsp_version >= version::V5 && caps.rsc.ip4 != 0 && caps.rsc.ip6 != 0 {
        // LRO is off when the parameters are first set (features are filled in afterwards).
        p.rsc_ip4 = offload_param::DISABLED;
        p.rsc_ip6 = offload_param::DISABLED;
    }
    let size = if nvsp_version <= version::V4 {
        ndis::OFFLOAD_PARAMS_SIZE_V4
    } else {
        size_of::<OffloadParams>()
    };
    p.header = ObjectHeader {
        ty: ndis::object_type::DEFAULT,
        revision: 3,
        size: size as u16,
    };
    p
}

impl<M: GuestMemory> Netvsc<M> {
    fn req_id(&mut self) -> u32 {
        let r = self.next_req;
        self.next_req = self.next_req.wrapping_add(1).max(1);
        r
    }

    /// Sends `msg` (a complete RNDIS message) GPA direct from a control page.
    fn send_control(&mut self, msg: &[u8]) -> Result<(), NetvscError> {
        if msg.len() as u64 > PAGE_SIZE {
            return Err(NetvscError::Exhausted("control page"));
        }
        let slot = self
            .free_control
            .pop()
            .ok_or(NetvscError::Exhausted("control page"))?;
        let gpa = self.cfg.control_area.gpa + u64::from(slot) * PAGE_SIZE;
        if let Err(e) = self.mem.write_at(gpa, msg) {
            self.free_control.push(slot);
            return Err(e.into());
        }
        let trans_id = self.trans_id();
        self.tx_pending.insert(trans_id, TxSlot::Control(slot));
        let payload = NvspMessage::SendRndisPacket(nvsp::SendRndisPacket {
            channel_type: nvsp::CHANNEL_TYPE_CONTROL,
            send_buffer_section_index: nvsp::INVALID_SECTION_INDEX,
            send_buffer_section_size: 0,
        })
        .to_bytes(nvsp::MESSAGE_SIZE_V61);
        self.queue_packet(
            0,
            OutPacket {
                kind: OutKind::GpaDirect(alloc::vec![PageBuffer {
                    pfn: gpa / PAGE_SIZE,
                    offset: 0,
                    len: msg.len() as u32,
                }]),
                trans_id,
                completion_requested: true,
                payload,
            },
        );
        Ok(())
    }

    fn request(&mut self, what: Request, build: impl FnOnce(u32) -> Vec<u8>) {
        let req = self.req_id();
        let msg = build(req);
        match self.send_control(&msg) {
            Ok(()) => {
                self.rndis_pending.insert(req, what);
            }
            Err(e) => {
                if matches!(what, Request::Step(_)) {
                    let _ = self.fail(e);
                }
            }
        }
    }

    /// Sends the request of bring-up step `step`.
    pub(super) fn rndis_step(&mut self, step: Step) {
        self.phase = Phase::Rndis(step);
        let v = self.info.nvsp_version;
        let query = |o: u32, info: Vec<u8>| move |req| rndis::query_request(req, o, &info);
        let what = Request::Step(step);
        match step {
            Step::Initialize => self.request(what, |req| {
                rndis::initialize_request(req, LINUX_MAX_TRANSFER_SIZE)
            }),
            Step::MaxFrameSize => {
                self.request(what, query(oid::GEN_MAXIMUM_FRAME_SIZE, Vec::new()))
            }
            Step::Mac => self.request(what, query(oid::_802_3_PERMANENT_ADDRESS, Vec::new())),
            Step::FriendlyName => self.request(what, query(oid::GEN_FRIENDLY_NAME, Vec::new())),
            Step::HwCaps => {
                let (revision, size) = if v >= version::V5 {
                    (3, ndis::OFFLOAD_SIZE_REV3)
                } else if v >= version::V4 {
                    (2, ndis::OFFLOAD_SIZE_REV2)
                } else {
                    (1, ndis::OFFLOAD_SIZE_REV1)
                };
                let mut info = alloc::vec![0u8; size];
                let h = ObjectHeader {
                    ty: ndis::object_type::OFFLOAD,
                    revision,
                    size: size as u16,
                };
                info[..4].copy_from_slice(h.as_bytes());
                self.request(what, query(oid::TCP_OFFLOAD_HARDWARE_CAPABILITIES, info));
            }
            Step::OffloadParams => {
                let caps = self.info.offload.unwrap_or_default();
                let p = linux_offload_params(&caps, v);
                self.info.offload_params = Some(p);
                let size = usize::from(p.header.size);
                let bytes = p.as_bytes().get(..size).unwrap_or_default().to_vec();
                self.request(what, move |req| {
                    rndis::set_request(req, oid::TCP_OFFLOAD_PARAMETERS, &bytes)
                });
            }
            Step::LinkStatus => {
                self.request(what, query(oid::GEN_MEDIA_CONNECT_STATUS, Vec::new()))
            }
            Step::LinkSpeed => self.request(what, query(oid::GEN_LINK_SPEED, Vec::new())),
            Step::RssCaps => {
                let cap = RecvScaleCapabilities {
                    header: ObjectHeader {
                        ty: ndis::object_type::RSS_CAPABILITIES,
                        revision: 2,
                        size: size_of::<RecvScaleCapabilities>() as u16,
                    },
                    ..RecvScaleCapabilities::default()
                };
                let info = cap.as_bytes().to_vec();
                self.request(what, query(oid::GEN_RECEIVE_SCALE_CAPABILITIES, info));
            }
            Step::RssDisable | Step::RssEnable => {
                let flag = if step == Step::RssDisable {
                    ndis::rss_flags::DISABLE_RSS
                } else {
                    0
                };
                let info = self.rss_params(flag);
                self.request(what, move |req| {
                    rndis::set_request(req, oid::GEN_RECEIVE_SCALE_PARAMETERS, &info)
                });
            }
            Step::PacketFilter => {
                let f = self.cfg.packet_filter;
                self.request(what, move |req| {
                    rndis::set_request(req, oid::GEN_CURRENT_PACKET_FILTER, &f.to_le_bytes())
                });
            }
        }
    }

    /// `ndis_recv_scale_param` + table (`i mod channels`) + Linux's key.
    fn rss_params(&self, flags: u16) -> Vec<u8> {
        let entries = match self.info.rss_table_entries {
            n @ 1..=256 => n,
            _ => ndis::RSS_DEFAULT_TABLE_ENTRIES,
        };
        let fixed = size_of::<RecvScaleParameters>() as u32;
        let table_size = u32::from(entries) * 4;
        let p = RecvScaleParameters {
            header: ObjectHeader {
                ty: ndis::object_type::RSS_PARAMETERS,
                revision: 2,
                size: fixed as u16,
            },
            flags,
            hash_info: ndis::hash_info::LINUX,
            indirection_table_size: table_size as u16,
            indirection_table_offset: fixed,
            hash_key_size: ndis::RSS_KEY_SIZE as u16,
            hash_key_offset: fixed + table_size,
            ..RecvScaleParameters::default()
        };
        let channels = u32::from(self.info.channels.max(1));
        let mut out = p.as_bytes().to_vec();
        for i in 0..u32::from(entries) {
            out.extend_from_slice(&(i % channels).to_le_bytes());
        }
        out.extend_from_slice(&ndis::LINUX_RSS_KEY);
        out
    }

    /// Changes the packet filter (Linux `ndo_set_rx_mode`); the reply is not awaited.
    pub fn set_packet_filter(&mut self, filter: u32) -> Result<(), NetvscError> {
        if self.state != DriverState::Ready {
            return Err(NetvscError::WrongState("set_packet_filter: not ready"));
        }
        let req = self.req_id();
        let msg = rndis::set_request(req, oid::GEN_CURRENT_PACKET_FILTER, &filter.to_le_bytes());
        self.send_control(&msg)?;
        self.rndis_pending.insert(req, Request::Filter);
        Ok(())
    }

    /// Tears the device down as Linux `netvsc_remove` does before closing the channel: RNDIS HALT
    /// (no reply exists), then REVOKE_RECV_BUF and REVOKE_SEND_BUF (no completions). Frames still
    /// batched are sent first. The embedder then closes the channels and tears down the GPADLs.
    pub fn halt(&mut self) -> Result<(), NetvscError> {
        if self.state != DriverState::Ready {
            return Err(NetvscError::WrongState("halt: not ready"));
        }
        for q in 0..self.queue_count() {
            self.flush(q);
        }
        let req = self.req_id();
        self.send_control(&rndis::halt_request(req))?;
        self.send_nvsp(
            NvspMessage::RevokeReceiveBuffer(nvsp::RevokeBuffer {
                id: nvsp::LINUX_RECEIVE_BUFFER_ID,
            }),
            false,
        );
        self.send_nvsp(
            NvspMessage::RevokeSendBuffer(nvsp::RevokeBuffer {
                id: nvsp::LINUX_SEND_BUFFER_ID,
            }),
            false,
        );
        self.state = DriverState::Halted;
        self.phase = Phase::Halted;
        Ok(())
    }

    /// An RNDIS completion (INITIALIZE_CMPLT, QUERY_CMPLT, SET_CMPLT) from the receive buffer.
    pub(super) fn handle_rndis_reply(&mut self, msg: &RndisMessage<'_>) -> Result<(), NetvscError> {
        let req = match msg {
            RndisMessage::InitializeComplete(c) => c.req_id,
            RndisMessage::QueryComplete(q) => q.complete.req_id,
            RndisMessage::SetComplete(s) => s.req_id,
            _ => return Err(NetvscError::Unexpected("RNDIS request from host")),
        };
        let what = self
            .rndis_pending
            .remove(&req)
            .ok_or(NetvscError::UnknownRequest(req))?;
        let Request::Step(step) = what else {
            return Ok(());
        };
        if self.phase != Phase::Rndis(step) {
            return Err(NetvscError::Unexpected("RNDIS reply out of order"));
        }
        let next = match (step, msg) {
            (Step::Initialize, RndisMessage::InitializeComplete(c)) => {
                if c.status != rs::SUCCESS {
                    return Err(self.fail(NetvscError::HostStatus {
                        what: "RNDIS INITIALIZE",
                        status: c.status,
                    }));
                }
                let factor = c.packet_alignment_factor;
                if factor > 12 {
                    return Err(self.fail(NetvscError::BadRndisReply {
                        what: "INITIALIZE_CMPLT",
                        why: "packet alignment factor above 12",
                    }));
                }
                self.info.packet_alignment = 1 << factor;
                self.info.max_packets_per_message = c.max_packets_per_message.max(1);
                Some(Step::MaxFrameSize)
            }
            (_, RndisMessage::QueryComplete(q)) => {
                self.query_reply(step, q.complete.status, q.info)?
            }
            (_, RndisMessage::SetComplete(s)) => self.set_reply(step, s.status)?,
            _ => {
                return Err(self.fail(NetvscError::BadRndisReply {
                    what: "reply",
                    why: "type does not match the request",
                }));
            }
        };
        if let Some(n) = next {
            self.rndis_step(n);
        }
        Ok(())
    }

    /// A QUERY_CMPLT for `step`; returns the next step (`None`: the phase moved on otherwise).
    fn query_reply(
        &mut self,
        step: Step,
        st: u32,
        info: &[u8],
    ) -> Result<Option<Step>, NetvscError> {
        let ok = st == rs::SUCCESS;
        Ok(match step {
            Step::MaxFrameSize => {
                self.info.host_mtu = u32_of(info).filter(|_| ok);
                Some(Step::Mac)
            }
            Step::Mac => {
                let Ok(mac) = <[u8; 6]>::try_from(info) else {
                    return Err(self.fail(NetvscError::BadRndisReply {
                        what: "PERMANENT_ADDRESS",
                        why: "reply is not 6 bytes",
                    }));
                };
                if !ok {
                    return Err(self.fail(NetvscError::HostStatus {
                        what: "PERMANENT_ADDRESS",
                        status: st,
                    }));
                }
                self.info.mac = mac;
                Some(Step::FriendlyName)
            }
            Step::FriendlyName => {
                if ok && !info.is_empty() && info.len() <= 512 {
                    let units = info
                        .chunks_exact(2)
                        .map(|c| u16::from_le_bytes([c[0], c[1]]))
                        .take_while(|&u| u != 0);
                    let name: String = char::decode_utf16(units)
                        .map(|r| r.unwrap_or(char::REPLACEMENT_CHARACTER))
                        .collect();
                    self.info.friendly_name = Some(name);
                }
                Some(Step::HwCaps)
            }
            Step::HwCaps => {
                let bad = |why| NetvscError::BadRndisReply {
                    what: "TCP_OFFLOAD_HARDWARE_CAPABILITIES",
                    why,
                };
                let Ok((h, _)) = ObjectHeader::read_from_prefix(info) else {
                    return Err(self.fail(bad("reply shorter than an NDIS header")));
                };
                let why = if info.len() > ndis::OFFLOAD_SIZE_REV3 {
                    Some("reply longer than 156 bytes")
                } else if h.ty != ndis::object_type::OFFLOAD {
                    Some("header type is not 0xA7")
                } else if h.revision < 1 {
                    Some("header revision 0")
                } else if usize::from(h.size) > info.len()
                    || usize::from(h.size) < ndis::OFFLOAD_SIZE_REV1
                {
                    Some("header size outside 112..=reply length")
                } else {
                    None
                };
                if let Some(why) = why {
                    return Err(self.fail(bad(why)));
                }
                self.info.offload = Some(object::<Offload>(info));
                Some(Step::OffloadParams)
            }
            Step::LinkStatus => {
                // Linux keeps "connected" when the query fails.
                let up = !(ok && u32_of(info).is_some_and(|s| s != 0));
                self.info.link_up = up;
                self.event(NetvscEvent::Link { up });
                if self.info.nvsp_version >= version::V5 {
                    Some(Step::LinkSpeed)
                } else {
                    self.after_rss_caps();
                    None
                }
            }
            Step::LinkSpeed => {
                if let Some(s) = u32_of(info).filter(|_| ok) {
                    self.info.link_speed = Some(s);
                    self.event(NetvscEvent::LinkSpeed(s));
                }
                Some(Step::RssCaps)
            }
            Step::RssCaps => {
                let size = size_of::<RecvScaleCapabilities>();
                if ok && info.len() <= size {
                    let c: RecvScaleCapabilities = object(info);
                    self.info.rss_queues = c.num_receive_queues;
                    self.info.rss_table_entries = c.num_indirection_entries;
                }
                self.after_rss_caps();
                None
            }
            _ => {
                return Err(self.fail(NetvscError::BadRndisReply {
                    what: "QUERY_CMPLT",
                    why: "answers a SET",
                }));
            }
        })
    }

    fn set_reply(&mut self, step: Step, st: u32) -> Result<Option<Step>, NetvscError> {
        Ok(match step {
            Step::OffloadParams => {
                if st != rs::SUCCESS {
                    return Err(self.fail(NetvscError::HostStatus {
                        what: "TCP_OFFLOAD_PARAMETERS",
                        status: st,
                    }));
                }
                Some(Step::LinkStatus)
            }
            // A failed disable leaves RSS as it was (Linux ignores RSS failures).
            Step::RssDisable if st == rs::SUCCESS => Some(Step::RssEnable),
            Step::RssDisable | Step::RssEnable => Some(Step::PacketFilter),
            Step::PacketFilter => {
                self.become_ready();
                None
            }
            _ => {
                return Err(self.fail(NetvscError::BadRndisReply {
                    what: "SET_CMPLT",
                    why: "answers a QUERY",
                }));
            }
        })
    }
}
