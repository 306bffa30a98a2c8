//! RNDIS control messages: INITIALIZE, QUERY, SET, HALT, RESET, KEEPALIVE, and the OIDs.
//!
//! Replies are queued as RNDIS messages and delivered in receive sections on the primary channel
//! (`Core::deliver_control`). Replies follow what Linux 6.1 checks (reference §3.9): QUERY_CMPLT
//! always carries `info_buf_offset` 16, failures carry no data, PERMANENT_ADDRESS is exactly 6
//! bytes, the offload capabilities are sized by the NVSP version.

use super::core::{Core, RndisPhase, Rss};
use super::tx::TxError;
use ringbuf::RingMem;
use vmbus_core::devices::nvsp::version;
use vmbus_core::devices::rndis::ndis::{self, *};
use vmbus_core::devices::rndis::{self, RndisMessage, oid, status};
use zerocopy::IntoBytes;

/// RNDIS INITIALIZE_CMPLT values (OpenVMM's).
const MAX_PACKETS_PER_MESSAGE: u32 = 8;
const MAX_TRANSFER_SIZE: u32 = 0xEFFF_FFFF;
const PACKET_ALIGNMENT_FACTOR: u32 = 3;
/// Largest LSO v2 frame advertised (OpenVMM: 62780).
pub const LSO_MAX_SIZE: u32 = 62780;
/// Longest friendly name answered (UTF-16 code units, NUL included).
const MAX_FRIENDLY_NAME: usize = 128;

/// OIDs answered by QUERY (GEN_SUPPORTED_LIST).
const SUPPORTED_OIDS: &[u32] = &[
    oid::GEN_SUPPORTED_LIST,
    oid::GEN_HARDWARE_STATUS,
    oid::GEN_MEDIA_SUPPORTED,
    oid::GEN_MEDIA_IN_USE,
    oid::GEN_MAXIMUM_LOOKAHEAD,
    oid::GEN_MAXIMUM_FRAME_SIZE,
    oid::GEN_LINK_SPEED,
    oid::GEN_CURRENT_PACKET_FILTER,
    oid::GEN_CURRENT_LOOKAHEAD,
    oid::GEN_MAXIMUM_TOTAL_SIZE,
    oid::GEN_MAC_OPTIONS,
    oid::GEN_MEDIA_CONNECT_STATUS,
    oid::GEN_MAXIMUM_SEND_PACKETS,
    oid::GEN_VENDOR_DRIVER_VERSION,
    oid::GEN_XMIT_OK,
    oid::GEN_RCV_OK,
    oid::GEN_XMIT_ERROR,
    oid::GEN_RCV_ERROR,
    oid::GEN_RCV_NO_BUFFER,
    oid::_802_3_PERMANENT_ADDRESS,
    oid::_802_3_CURRENT_ADDRESS,
    oid::_802_3_MULTICAST_LIST,
    oid::_802_3_MAXIMUM_LIST_SIZE,
    oid::TCP_OFFLOAD_HARDWARE_CAPABILITIES,
    oid::TCP_OFFLOAD_CURRENT_CONFIG,
    oid::TCP_OFFLOAD_PARAMETERS,
    oid::OFFLOAD_ENCAPSULATION,
    oid::GEN_RECEIVE_SCALE_CAPABILITIES,
    oid::GEN_RECEIVE_SCALE_PARAMETERS,
    oid::GEN_RNDIS_CONFIG_PARAMETER,
];

fn u32_reply(v: u32) -> (u32, Vec<u8>) {
    (status::SUCCESS, v.to_le_bytes().to_vec())
}

/// The task-offload capabilities this host advertises, at the size a guest of NVSP `v` expects.
pub fn offload_capabilities(v: u32) -> Vec<u8> {
    use ndis::csum_cap::*;
    let (revision, size) = if v >= version::V5 {
        (3, OFFLOAD_SIZE_REV3)
    } else if v >= version::V4 {
        (2, OFFLOAD_SIZE_REV2)
    } else {
        (1, OFFLOAD_SIZE_REV1)
    };
    let v4 = IP4_OPTIONS | TCP4_OPTIONS | TCP4 | UDP4 | IP4;
    let v6 = IP6_EXTENSIONS | TCP6_OPTIONS | TCP6 | UDP6;
    let o = Offload {
        header: ObjectHeader {
            ty: object_type::OFFLOAD,
            revision,
            size: size as u16,
        },
        csum: CsumOffload {
            ip4_tx_encap: ENCAP_802_3,
            ip4_tx_csum: v4,
            ip4_rx_encap: ENCAP_802_3,
            ip4_rx_csum: v4,
            ip6_tx_encap: ENCAP_802_3,
            ip6_tx_csum: v6,
            ip6_rx_encap: ENCAP_802_3,
            ip6_rx_csum: v6,
        },
        lsov2: LsoV2Offload {
            ip4_encap: ENCAP_802_3,
            ip4_max_size: LSO_MAX_SIZE,
            ip4_min_segments: 2,
            ip6_encap: ENCAP_802_3,
            ip6_max_size: LSO_MAX_SIZE,
            ip6_min_segments: 2,
            ip6_options: lsov2_cap::IP6_EXTENSIONS | lsov2_cap::TCP6_OPTIONS,
        },
        ..Offload::default()
    };
    o.as_bytes()[..size].to_vec()
}

impl<R: RingMem> Core<R> {
    /// Handles a non-packet RNDIS message from the guest.
    pub(crate) fn handle_control(&mut self, msg: RndisMessage<'_>) -> Result<(), TxError> {
        let initialized = self.rndis.phase == RndisPhase::Initialized;
        let reply = match msg {
            RndisMessage::Initialize(r) => {
                let ok = self.rndis.phase == RndisPhase::Uninitialized;
                if ok {
                    self.rndis.phase = RndisPhase::Initialized;
                }
                let (major, minor) = (r.major_version, r.minor_version);
                tracing::debug!(major, minor, ok, "netvsp: RNDIS INITIALIZE");
                rndis::initialize_complete(&rndis::InitializeComplete {
                    req_id: r.req_id,
                    status: if ok { status::SUCCESS } else { status::FAILURE },
                    major_version: rndis::MAJOR_VERSION,
                    minor_version: rndis::MINOR_VERSION,
                    device_flags: rndis::DF_CONNECTIONLESS,
                    medium: rndis::MEDIUM_802_3,
                    max_packets_per_message: MAX_PACKETS_PER_MESSAGE,
                    max_transfer_size: MAX_TRANSFER_SIZE,
                    packet_alignment_factor: PACKET_ALIGNMENT_FACTOR,
                    af_list_offset: 0,
                    af_list_size: 0,
                })
            }
            RndisMessage::Query(o) => {
                let oid = o.request.oid;
                let (st, data) = if initialized {
                    self.query(oid)
                } else {
                    (status::FAILURE, Vec::new())
                };
                tracing::debug!(oid, status = st, len = data.len(), "netvsp: RNDIS QUERY");
                let data = if st == status::SUCCESS {
                    data
                } else {
                    Vec::new()
                };
                rndis::query_complete(o.request.req_id, st, &data)
            }
            RndisMessage::Set(o) => {
                let oid = o.request.oid;
                let st = if initialized {
                    self.set(oid, o.info)
                } else {
                    status::FAILURE
                };
                tracing::debug!(oid, status = st, "netvsp: RNDIS SET");
                rndis::set_complete(o.request.req_id, st)
            }
            RndisMessage::Halt(_) => {
                tracing::debug!("netvsp: RNDIS HALT");
                self.rndis.phase = RndisPhase::Halted;
                return Ok(());
            }
            RndisMessage::Reset(_) => rndis::reset_complete(status::SUCCESS, 0),
            RndisMessage::Keepalive(k) => rndis::keepalive_complete(k.req_id, status::SUCCESS),
            RndisMessage::InitializeComplete(_) => {
                return Err(TxError::HostMessage(rndis::msg_type::INITIALIZE_COMPLETE));
            }
            RndisMessage::QueryComplete(_) => {
                return Err(TxError::HostMessage(rndis::msg_type::QUERY_COMPLETE));
            }
            RndisMessage::SetComplete(_) => {
                return Err(TxError::HostMessage(rndis::msg_type::SET_COMPLETE));
            }
            RndisMessage::ResetComplete(_) => {
                return Err(TxError::HostMessage(rndis::msg_type::RESET_COMPLETE));
            }
            RndisMessage::KeepaliveComplete(_) => {
                return Err(TxError::HostMessage(rndis::msg_type::KEEPALIVE_COMPLETE));
            }
            RndisMessage::IndicateStatus(_) => {
                return Err(TxError::HostMessage(rndis::msg_type::INDICATE_STATUS));
            }
            RndisMessage::Packet(_) => return Ok(()),
        };
        if self.queue_control(reply) {
            Ok(())
        } else {
            Err(TxError::ControlQueueFull)
        }
    }

    /// QUERY: `(status, data)`.
    fn query(&mut self, oid: u32) -> (u32, Vec<u8>) {
        let mtu = self.session.mtu;
        let payload_mtu = mtu.saturating_sub(14);
        match oid {
            oid::GEN_SUPPORTED_LIST => (
                status::SUCCESS,
                SUPPORTED_OIDS
                    .iter()
                    .flat_map(|o| o.to_le_bytes())
                    .collect(),
            ),
            oid::GEN_HARDWARE_STATUS
            | oid::GEN_MEDIA_SUPPORTED
            | oid::GEN_MEDIA_IN_USE
            | oid::GEN_MAC_OPTIONS => u32_reply(0),
            oid::GEN_MAXIMUM_LOOKAHEAD
            | oid::GEN_CURRENT_LOOKAHEAD
            | oid::GEN_MAXIMUM_FRAME_SIZE => u32_reply(payload_mtu),
            oid::GEN_MAXIMUM_TOTAL_SIZE => u32_reply(mtu),
            oid::GEN_LINK_SPEED => u32_reply(self.cfg.link_speed),
            oid::GEN_CURRENT_PACKET_FILTER => u32_reply(self.rndis.filter),
            oid::GEN_MEDIA_CONNECT_STATUS => {
                let up = self.backend.link_up();
                self.rndis.reported_link = Some(up);
                u32_reply(if up { 0 } else { 1 })
            }
            oid::GEN_MAXIMUM_SEND_PACKETS => u32_reply(MAX_PACKETS_PER_MESSAGE),
            oid::GEN_VENDOR_DRIVER_VERSION => u32_reply(0x0001_0000),
            oid::GEN_XMIT_OK => u32_reply(self.stats.tx_frames as u32),
            oid::GEN_RCV_OK => u32_reply(self.stats.rx_frames as u32),
            oid::GEN_XMIT_ERROR => u32_reply((self.stats.tx_errors + self.stats.tx_dropped) as u32),
            oid::GEN_RCV_ERROR => u32_reply(0),
            oid::GEN_RCV_NO_BUFFER => u32_reply(self.stats.rx_dropped_no_buffer as u32),
            oid::_802_3_PERMANENT_ADDRESS => (status::SUCCESS, self.mac().to_vec()),
            oid::_802_3_CURRENT_ADDRESS => (status::SUCCESS, self.rndis.mac.to_vec()),
            oid::_802_3_MAXIMUM_LIST_SIZE => u32_reply(32),
            oid::GEN_FRIENDLY_NAME => match &self.cfg.friendly_name {
                Some(name) => {
                    let mut units: Vec<u16> =
                        name.encode_utf16().take(MAX_FRIENDLY_NAME - 1).collect();
                    units.push(0);
                    (
                        status::SUCCESS,
                        units.iter().flat_map(|u| u.to_le_bytes()).collect(),
                    )
                }
                None => (status::NOT_SUPPORTED, Vec::new()),
            },
            oid::TCP_OFFLOAD_HARDWARE_CAPABILITIES | oid::TCP_OFFLOAD_CURRENT_CONFIG => (
                status::SUCCESS,
                offload_capabilities(self.session.version.unwrap_or(version::V1)),
            ),
            oid::OFFLOAD_ENCAPSULATION => {
                let e = EncapsulationSetting {
                    enabled: 1,
                    encapsulation_type: ENCAP_802_3,
                    header_size: 14,
                };
                let o = OffloadEncapsulation {
                    header: ObjectHeader {
                        ty: object_type::OFFLOAD_ENCAPSULATION,
                        revision: 1,
                        size: size_of::<OffloadEncapsulation>() as u16,
                    },
                    ipv4: e,
                    ipv6: e,
                };
                (status::SUCCESS, o.as_bytes().to_vec())
            }
            oid::GEN_RECEIVE_SCALE_CAPABILITIES => {
                let queues = u32::from(self.cfg.max_queues.max(1));
                let c = RecvScaleCapabilities {
                    header: ObjectHeader {
                        ty: object_type::RSS_CAPABILITIES,
                        revision: 2,
                        size: size_of::<RecvScaleCapabilities>() as u16,
                    },
                    capabilities: rss_caps::HASH_TYPE_TCP_IPV4
                        | rss_caps::HASH_TYPE_TCP_IPV6
                        | rss_caps::HASH_TYPE_TCP_IPV6_EX,
                    num_interrupt_messages: queues,
                    num_receive_queues: queues,
                    num_indirection_entries: RSS_DEFAULT_TABLE_ENTRIES,
                };
                (status::SUCCESS, c.as_bytes().to_vec())
            }
            _ => (status::NOT_SUPPORTED, Vec::new()),
        }
    }

    /// SET: the status.
    fn set(&mut self, oid: u32, info: &[u8]) -> u32 {
        let word = info
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes);
        match oid {
            oid::GEN_CURRENT_PACKET_FILTER => match word {
                Some(f) => {
                    self.rndis.filter = f;
                    status::SUCCESS
                }
                None => status::INVALID_LENGTH,
            },
            oid::GEN_CURRENT_LOOKAHEAD => status::SUCCESS,
            oid::_802_3_MULTICAST_LIST if info.len().is_multiple_of(6) => status::SUCCESS,
            oid::_802_3_MULTICAST_LIST => status::INVALID_LENGTH,
            oid::TCP_OFFLOAD_PARAMETERS => match parse_offload_params(info) {
                Ok(p) => {
                    let rx_on =
                        |v: u8, cur: bool| match v {
                            offload_param::TX_RX_DISABLED
                            | offload_param::TX_ENABLED_RX_DISABLED => false,
                            offload_param::RX_ENABLED_TX_DISABLED
                            | offload_param::TX_RX_ENABLED => true,
                            _ => cur,
                        };
                    let (ip, tcp, udp) = self.rndis.rx_csum;
                    self.rndis.rx_csum = (
                        rx_on(p.ip4_csum, ip),
                        rx_on(p.tcp4_csum, tcp) || rx_on(p.tcp6_csum, tcp),
                        rx_on(p.udp4_csum, udp) || rx_on(p.udp6_csum, udp),
                    );
                    status::SUCCESS
                }
                Err(e) => {
                    tracing::debug!(error = %e, "netvsp: offload parameters refused");
                    status::INVALID_DATA
                }
            },
            oid::OFFLOAD_ENCAPSULATION => status::SUCCESS,
            oid::GEN_RECEIVE_SCALE_PARAMETERS => self.set_rss(info),
            oid::GEN_RNDIS_CONFIG_PARAMETER => match parse_config_parameter(info) {
                Ok(c) if c.name_is("NetworkAddress") => match c.mac_address() {
                    Some(mac) => {
                        self.rndis.mac = mac;
                        status::SUCCESS
                    }
                    None => status::INVALID_DATA,
                },
                Ok(_) => status::SUCCESS,
                Err(_) => status::INVALID_DATA,
            },
            _ => status::NOT_SUPPORTED,
        }
    }

    fn set_rss(&mut self, info: &[u8]) -> u32 {
        let p = match parse_rss_params(info) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(error = %e, "netvsp: RSS parameters refused");
                return status::INVALID_DATA;
            }
        };
        if p.disable() {
            self.rndis.rss = None;
            return status::SUCCESS;
        }
        let queues = u32::from(self.session.granted) + 1;
        let mut rss: Rss = self.rndis.rss.clone().unwrap_or_else(|| self.default_rss());
        if p.table.is_some() {
            let table: Vec<u32> = p.entries().collect();
            if table.iter().any(|&q| q >= queues) {
                return status::INVALID_DATA;
            }
            rss.table = table;
        }
        if let Some(key) = p.key.and_then(|k| <[u8; 40]>::try_from(k).ok()) {
            rss.key = key;
        }
        if p.params.flags & rss_flags::HASH_INFO_UNCHANGED == 0 {
            rss.hash_info = p.params.hash_info;
        }
        self.rndis.rss = Some(rss);
        status::SUCCESS
    }
}
