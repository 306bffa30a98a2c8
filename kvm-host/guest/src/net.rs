//! A minimal netvsc: NVSP negotiation and a receive buffer as Linux 6.1 sets them up, RNDIS
//! control messages and data frames as GPA-direct SEND_RNDIS_PKTs, received frames from transfer-
//! page packets. (vsc-guest's netvsc was not committed when this was written; this is the test
//! program's own sequence, built on vmbus-core's NVSP/RNDIS wire types.) Plus the ARP and ICMP
//! echo frames the guest exchanges with the host's endpoint on the switch.

use alloc::collections::VecDeque;
use alloc::vec::Vec;

use ringbuf::PacketType;
use vmbus_core::devices::nvsp::{self, Direction, NvspMessage};
use vmbus_core::devices::rndis::{self, RndisMessage};

use crate::bus::Bus;
use crate::chan::{ChanError, Channel, create_gpadl};
use crate::mem;

/// Receive buffer size in pages (Linux uses 16 MiB; the test needs little).
pub const RECV_PAGES: usize = 16;

pub struct Netvsc {
    pub ch: Channel,
    next_id: u64,
    pub version: u32,
    recv_gpa: u64,
    recv_len: u32,
    /// One page for the request being sent (a control message or a frame).
    tx_page: u64,
    req_id: u32,
    completions: VecDeque<(u64, Vec<u8>)>,
    controls: VecDeque<Vec<u8>>,
    pub frames: VecDeque<Vec<u8>>,
    /// Last RNDIS status indication (media connect, ...).
    pub last_status: Option<u32>,
    pub rx_packets: u32,
}

fn status_err(what: &'static str, s: u32) -> ChanError {
    ChanError::Status(what, s)
}

impl Netvsc {
    pub fn new(ch: Channel) -> Result<Netvsc, ChanError> {
        Ok(Netvsc {
            ch,
            next_id: 1,
            version: 0,
            recv_gpa: 0,
            recv_len: 0,
            tx_page: mem::pages(1).ok_or(ChanError::NoMemory)?,
            req_id: 0,
            completions: VecDeque::new(),
            controls: VecDeque::new(),
            frames: VecDeque::new(),
            last_status: None,
            rx_packets: 0,
        })
    }

    fn trans(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Takes one packet from the ring and files it: completions, RNDIS control replies, frames.
    /// Receive packets are completed to the host at once (their sections are copied out).
    fn pump_one(&mut self) -> Result<(), ChanError> {
        let p = self.ch.recv()?;
        match p.ty {
            PacketType::Completion => self.completions.push_back((p.trans_id, p.payload)),
            PacketType::TransferPages => {
                self.rx_packets += 1;
                // Only our receive buffer's set id names pages we know.
                let ranges: &[(u32, u32)] = if p.set_id == nvsp::LINUX_RECEIVE_BUFFER_ID {
                    &p.ranges
                } else {
                    &[]
                };
                for &(off, len) in ranges {
                    let end = off.saturating_add(len);
                    if end > self.recv_len {
                        continue;
                    }
                    let mut bytes = alloc::vec![0u8; len as usize];
                    mem::read(self.recv_gpa + u64::from(off), &mut bytes);
                    match rndis::parse(&bytes) {
                        Ok((RndisMessage::Packet(pm), _)) => {
                            self.frames.push_back(pm.data.to_vec())
                        }
                        Ok((RndisMessage::IndicateStatus(s), _)) => {
                            self.last_status = Some(s.indicate.status);
                        }
                        Ok(_) => self.controls.push_back(bytes),
                        Err(_) => {}
                    }
                }
                let done = [
                    nvsp::msg_type::SEND_RNDIS_PACKET_COMPLETE.to_le_bytes(),
                    nvsp::status::SUCCESS.to_le_bytes(),
                ]
                .concat();
                let parts: [&[u8]; 1] = [&done];
                self.ch
                    .send(&ringbuf::OutgoingPacket::completion(p.trans_id, &parts))?;
            }
            // In-band NVSP from the host (indirection table, ...): nothing to do here.
            _ => {}
        }
        Ok(())
    }

    fn wait_completion(&mut self, id: u64) -> Result<Vec<u8>, ChanError> {
        loop {
            if let Some(i) = self.completions.iter().position(|(t, _)| *t == id)
                && let Some((_, c)) = self.completions.remove(i)
            {
                return Ok(c);
            }
            self.pump_one()?;
        }
    }

    /// Sends an NVSP message (40 bytes, as Linux); with `reply`, waits for its completion.
    fn nvsp(&mut self, msg: NvspMessage, reply: bool) -> Result<Option<NvspMessage>, ChanError> {
        let id = self.trans();
        self.ch
            .send_inband(id, &msg.to_bytes(nvsp::MESSAGE_SIZE_V61), reply)?;
        if !reply {
            return Ok(None);
        }
        let c = self.wait_completion(id)?;
        NvspMessage::parse(&c, Direction::HostToGuest)
            .map(Some)
            .map_err(|_| status_err("NVSP completion", u32::MAX))
    }

    /// NVSP INIT (newest version first), NDIS config and version, receive buffer.
    pub fn init(&mut self, bus: &mut Bus) -> Result<(), ChanError> {
        for v in nvsp::version::LINUX_ORDER {
            let r = self.nvsp(
                NvspMessage::Init(nvsp::Init {
                    min_protocol_version: v,
                    max_protocol_version: v,
                }),
                true,
            )?;
            if let Some(NvspMessage::InitComplete(c)) = r
                && { c.status } == nvsp::status::SUCCESS
            {
                self.version = v;
                break;
            }
        }
        if self.version == 0 {
            return Err(status_err("NVSP INIT", u32::MAX));
        }
        if self.version >= nvsp::version::V2 {
            self.nvsp(
                NvspMessage::SendNdisConfig(nvsp::SendNdisConfig {
                    mtu: 1514,
                    reserved: 0,
                    capabilities: nvsp::capability::IEEE8021Q,
                }),
                false,
            )?;
        }
        let (major, minor) = if self.version <= nvsp::version::V4 {
            (6, 1)
        } else {
            (6, 30)
        };
        self.nvsp(
            NvspMessage::SendNdisVersion(nvsp::SendNdisVersion {
                ndis_major_version: major,
                ndis_minor_version: minor,
            }),
            false,
        )?;
        let gpa = mem::pages(RECV_PAGES).ok_or(ChanError::NoMemory)?;
        let handle = create_gpadl(bus, self.ch.relid, gpa, RECV_PAGES)?;
        self.recv_gpa = gpa;
        self.recv_len = (RECV_PAGES * 4096) as u32;
        let r = self.nvsp(
            NvspMessage::SendReceiveBuffer(nvsp::SendBuffer {
                gpadl_handle: handle,
                id: nvsp::LINUX_RECEIVE_BUFFER_ID,
            }),
            true,
        )?;
        match r {
            Some(NvspMessage::SendReceiveBufferComplete(c))
                if { c.status } == nvsp::status::SUCCESS =>
            {
                Ok(())
            }
            Some(NvspMessage::SendReceiveBufferComplete(c)) => {
                Err(status_err("SEND_RECV_BUF", c.status))
            }
            _ => Err(status_err("SEND_RECV_BUF", u32::MAX)),
        }
    }

    /// Sends one RNDIS message through the tx page (GPA direct) on `channel_type`; waits for
    /// SEND_RNDIS_PKT_COMPLETE.
    fn send_rndis(&mut self, msg: &[u8], channel_type: u32) -> Result<(), ChanError> {
        mem::write(self.tx_page, msg);
        let id = self.trans();
        let body = NvspMessage::SendRndisPacket(nvsp::SendRndisPacket {
            channel_type,
            send_buffer_section_index: nvsp::INVALID_SECTION_INDEX,
            send_buffer_section_size: 0,
        })
        .to_bytes(nvsp::MESSAGE_SIZE_V61);
        self.ch
            .send_gpa(id, &body, self.tx_page, 0, msg.len() as u32)?;
        let c = self.wait_completion(id)?;
        match NvspMessage::parse(&c, Direction::HostToGuest) {
            Ok(NvspMessage::SendRndisPacketComplete(s))
                if { s.status } == nvsp::status::SUCCESS =>
            {
                Ok(())
            }
            Ok(NvspMessage::SendRndisPacketComplete(s)) => {
                Err(status_err("SEND_RNDIS_PKT", s.status))
            }
            _ => Err(status_err("SEND_RNDIS_PKT", u32::MAX)),
        }
    }

    /// Sends an RNDIS control request and returns the reply's bytes.
    fn control(&mut self, msg: &[u8]) -> Result<Vec<u8>, ChanError> {
        self.send_rndis(msg, nvsp::CHANNEL_TYPE_CONTROL)?;
        loop {
            if let Some(r) = self.controls.pop_front() {
                return Ok(r);
            }
            self.pump_one()?;
        }
    }

    fn next_req(&mut self) -> u32 {
        self.req_id += 1;
        self.req_id
    }

    /// RNDIS INITIALIZE, the MAC (OID_802_3_PERMANENT_ADDRESS), the packet filter.
    pub fn rndis_up(&mut self) -> Result<[u8; 6], ChanError> {
        let id = self.next_req();
        let r = self.control(&rndis::initialize_request(id, 0x4000))?;
        match rndis::parse(&r) {
            Ok((RndisMessage::InitializeComplete(c), _))
                if { c.status } == rndis::status::SUCCESS => {}
            Ok((RndisMessage::InitializeComplete(c), _)) => {
                return Err(status_err("RNDIS INITIALIZE", c.status));
            }
            _ => return Err(status_err("RNDIS INITIALIZE", u32::MAX)),
        }
        let id = self.next_req();
        let r = self.control(&rndis::query_request(
            id,
            rndis::oid::_802_3_PERMANENT_ADDRESS,
            &[],
        ))?;
        let mac = match rndis::parse(&r) {
            Ok((RndisMessage::QueryComplete(q), _)) if q.info.len() >= 6 => {
                let mut m = [0u8; 6];
                m.copy_from_slice(&q.info[..6]);
                m
            }
            Ok((RndisMessage::QueryComplete(q), _)) => {
                return Err(status_err("QUERY MAC", q.complete.status));
            }
            _ => return Err(status_err("QUERY MAC", u32::MAX)),
        };
        let id = self.next_req();
        let filter = rndis::packet_filter::LINUX_DEFAULT.to_le_bytes();
        let r = self.control(&rndis::set_request(
            id,
            rndis::oid::GEN_CURRENT_PACKET_FILTER,
            &filter,
        ))?;
        match rndis::parse(&r) {
            Ok((RndisMessage::SetComplete(c), _)) if { c.status } == rndis::status::SUCCESS => {
                Ok(mac)
            }
            Ok((RndisMessage::SetComplete(c), _)) => Err(status_err("SET PACKET FILTER", c.status)),
            _ => Err(status_err("SET PACKET FILTER", u32::MAX)),
        }
    }

    /// Transmits one Ethernet frame.
    pub fn send_frame(&mut self, frame: &[u8]) -> Result<(), ChanError> {
        let mut m = rndis::packet_header(frame.len(), &[]);
        m.extend_from_slice(frame);
        self.send_rndis(&m, nvsp::CHANNEL_TYPE_DATA)
    }

    /// Waits for a received frame `want` accepts (others are dropped, at most `limit` of them).
    pub fn recv_frame(
        &mut self,
        limit: u32,
        mut want: impl FnMut(&[u8]) -> bool,
    ) -> Result<Vec<u8>, ChanError> {
        let mut skipped = 0;
        loop {
            while let Some(f) = self.frames.pop_front() {
                if want(&f) {
                    return Ok(f);
                }
                skipped += 1;
                if skipped > limit {
                    return Err(status_err("no matching frame", skipped));
                }
            }
            self.pump_one()?;
        }
    }
}

/// The guest's and the host endpoint's IPv4 addresses.
pub const GUEST_IP: [u8; 4] = [10, 0, 0, 2];
pub const PEER_IP: [u8; 4] = [10, 0, 0, 1];

/// An ARP request from `mac`/GUEST_IP for `target`.
pub fn arp_request(mac: [u8; 6], target: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xFF; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&GUEST_IP);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target);
    f.resize(60, 0);
    f
}

/// The sender MAC of an ARP reply from `ip`, if `f` is one.
pub fn arp_reply_from(f: &[u8], ip: [u8; 4]) -> Option<[u8; 6]> {
    if f.get(12..14)? != [0x08, 0x06] || f.get(20..22)? != [0, 2] || f.get(28..32)? != ip {
        return None;
    }
    let mut m = [0u8; 6];
    m.copy_from_slice(f.get(22..28)?);
    Some(m)
}

/// The Internet checksum.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let w = u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]);
        sum = sum.wrapping_add(u32::from(w));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP echo request with `id`/`seq` and `payload`.
pub fn echo_request(src: [u8; 6], dst: [u8; 6], id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut icmp = Vec::with_capacity(8 + payload.len());
    icmp.extend_from_slice(&[8, 0, 0, 0]);
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend_from_slice(payload);
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let total = (20 + icmp.len()) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[4..6].copy_from_slice(&seq.to_be_bytes());
    ip[8] = 64;
    ip[9] = 1;
    ip[12..16].copy_from_slice(&GUEST_IP);
    ip[16..20].copy_from_slice(&PEER_IP);
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::with_capacity(14 + total as usize);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&icmp);
    f
}

/// Whether `f` is the echo reply to (`id`, `seq`) carrying `payload` with valid checksums.
pub fn is_echo_reply(f: &[u8], id: u16, seq: u16, payload: &[u8]) -> bool {
    let ok = || -> Option<bool> {
        let ip = f.get(14..34)?;
        let icmp = f.get(34..)?;
        Some(
            f.get(12..14)? == [0x08, 0x00]
                && ip[9] == 1
                && ip[12..16] == PEER_IP
                && ip[16..20] == GUEST_IP
                && checksum(ip) == 0
                && icmp.first() == Some(&0)
                && icmp.get(4..6)? == id.to_be_bytes()
                && icmp.get(6..8)? == seq.to_be_bytes()
                && icmp.get(8..)? == payload
                && checksum(icmp) == 0,
        )
    };
    ok().unwrap_or(false)
}
