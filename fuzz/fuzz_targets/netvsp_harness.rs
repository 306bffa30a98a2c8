//! Shared by the `nvsp` and `rndis` fuzz targets: a netvsp device on in-process rings and heap
//! guest RAM, and a minimal guest that can bring it up and checks every packet the host sends.
#![allow(dead_code)]

use ringbuf::{HeaderInfo, HeapRing, OutgoingPacket, PacketType, RingReader, RingWriter};
use std::sync::Arc;
use vmbus_core::device::{ChannelControl, OpenChannelInfo, VmbusDevice};
use vmbus_core::devices::nvsp::{self, Direction, NvspMessage};
use vmbus_core::devices::rndis;
use vmbus_core::gpadl::{Gpadl, GpadlRange};
use vmbus_core::memory::{GuestMemory, VecMemory};
use vsp_net::backend::{MemoryBackend, MemoryHandle, RxMeta};
use vsp_net::netvsp::{ChannelRings, Netvsp, NetvspConfig, NetvspResources};

pub const RAM_PAGES: u64 = 256;
pub const RECV: (u32, u64, u64) = (1, 16, 32); // (gpadl, first pfn, pages)
pub const SEND: (u32, u64, u64) = (2, 48, 6);
pub const SCRATCH: u64 = 64; // pfns 64.. free for GPA-direct data
pub const MAC: [u8; 6] = [0, 0x15, 0x5d, 1, 2, 3];

struct Subs;
impl ChannelControl for Subs {
    fn offer_subchannels(&mut self, count: u16) -> u16 {
        count
    }
}

fn gpadl(handle: u32, pfn: u64, pages: u64) -> Gpadl {
    Gpadl {
        handle,
        relid: 1,
        ranges: vec![GpadlRange {
            byte_offset: 0,
            byte_count: (pages * 4096) as u32,
            first_pfn: 0,
            pfn_count: pages as usize,
        }],
        pfns: (pfn..pfn + pages).collect(),
    }
}

pub struct Fz {
    pub dev: Netvsp<Arc<HeapRing>>,
    pub mem: Arc<VecMemory>,
    pub backend: MemoryHandle,
    tx: RingWriter<Arc<HeapRing>>,
    rx: RingReader<Arc<HeapRing>>,
    trans: u64,
}

impl Fz {
    pub fn new() -> Self {
        let mem = Arc::new(VecMemory::new((RAM_PAGES * 4096) as usize));
        let up = Arc::new(HeapRing::new(8).expect("ring"));
        let down = Arc::new(HeapRing::new(8).expect("ring"));
        let (u2, d2) = (up.clone(), down.clone());
        let res = NetvspResources {
            memory: mem.clone(),
            gpadls: Arc::new(|h: u32| match h {
                1 => Some(gpadl(RECV.0, RECV.1, RECV.2)),
                2 => Some(gpadl(SEND.0, SEND.1, SEND.2)),
                3 => Some(gpadl(3, RAM_PAGES + 1, 4)), // pages outside RAM
                _ => None,
            }),
            map_rings: Box::new(move |_info: &OpenChannelInfo| {
                Ok(ChannelRings {
                    inbound: u2.clone(),
                    outbound: d2.clone(),
                    kick: None,
                    call: None,
                })
            }),
            subchannels: Box::new(Subs),
        };
        let (b, h) = MemoryBackend::loopback(MAC, 64);
        let mut dev = Netvsp::new(NetvspConfig::default(), Box::new(b), res).expect("device");
        let info = OpenChannelInfo {
            relid: 1,
            subchannel_index: 0,
            ring_pages: vec![],
            downstream_offset: 0,
            target_vp: 0,
            connection_id: 1,
            user_data: [0; 120],
        };
        dev.open(info, &mut Subs).expect("open");
        Fz {
            dev,
            mem,
            backend: h,
            tx: RingWriter::new(up).expect("writer"),
            rx: RingReader::new(down).expect("reader"),
            trans: 0,
        }
    }

    fn write(&mut self, pkt: &OutgoingPacket<'_>) {
        for _ in 0..4 {
            match self.tx.try_write(pkt) {
                Ok(_) => return,
                Err(ringbuf::WriteError::Full { .. }) => self.step(),
                Err(_) => return,
            }
        }
    }

    pub fn inband(&mut self, payload: &[u8], completion: bool) -> u64 {
        self.trans += 1;
        let parts: [&[u8]; 1] = [payload];
        let t = self.trans;
        self.write(&OutgoingPacket::in_band(t, completion, &parts));
        t
    }

    pub fn completion(&mut self, trans_id: u64, payload: &[u8]) {
        let parts: [&[u8]; 1] = [payload];
        self.write(&OutgoingPacket::completion(trans_id, &parts));
    }

    /// GPA-direct packet; ranges `(byte_offset, byte_count, first pfn)` with consecutive pfns.
    pub fn gpa(&mut self, payload: &[u8], ranges: &[(u32, u32, u64)]) -> u64 {
        // GPA-direct header: reserved, range count; each range: byte_count, byte_offset, pfns.
        let mut headers = 0u32.to_le_bytes().to_vec();
        headers.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
        for &(off, count, pfn) in ranges {
            headers.extend_from_slice(&count.to_le_bytes());
            headers.extend_from_slice(&off.to_le_bytes());
            let n = (u64::from(off) + u64::from(count)).div_ceil(4096);
            for i in 0..n {
                headers.extend_from_slice(&pfn.wrapping_add(i).to_le_bytes());
            }
        }
        self.trans += 1;
        let parts: [&[u8]; 1] = [payload];
        let pkt = OutgoingPacket {
            packet_type: PacketType::GpaDirect,
            completion_requested: true,
            trans_id: self.trans,
            headers: &headers,
            payload: &parts,
        };
        self.write(&pkt);
        self.trans
    }

    /// An RNDIS control message sent as Linux does (GPA direct from scratch memory).
    pub fn rndis_control(&mut self, msg: &[u8]) {
        let _ = self.mem.write_at(SCRATCH * 4096, msg);
        let body = NvspMessage::SendRndisPacket(nvsp::SendRndisPacket {
            channel_type: 1,
            send_buffer_section_index: nvsp::INVALID_SECTION_INDEX,
            send_buffer_section_size: 0,
        })
        .to_bytes(40);
        self.gpa(&body, &[(0, msg.len() as u32, SCRATCH)]);
        self.step();
    }

    pub fn inject(&mut self, frame: &[u8]) {
        self.backend.inject(frame, RxMeta::default());
    }

    /// Polls the device and checks everything it sent: completions parse as NVSP, receive
    /// packets name ranges inside the receive buffer that hold exactly one valid RNDIS message.
    /// Receive packets are completed.
    pub fn step(&mut self) {
        self.dev.poll();
        let mut done = Vec::new();
        while let Ok(Some(p)) = self.rx.peek() {
            let info = *p.info();
            let mut payload = vec![0u8; p.payload_len()];
            p.copy_payload(0, &mut payload).expect("payload");
            match info.header {
                HeaderInfo::TransferPages { set_id, .. } => {
                    assert_eq!(set_id, 0xCAFE);
                    let ranges: Vec<(u32, u32)> = p
                        .transfer_ranges()
                        .expect("ranges")
                        .iter()
                        .map(|r| (r.byte_offset.get(), r.byte_count.get()))
                        .collect();
                    assert!(!ranges.is_empty() && ranges.len() <= nvsp::MAX_RECEIVE_RANGES);
                    for (off, len) in ranges {
                        assert!(
                            u64::from(off) + u64::from(len) <= RECV.2 * 4096,
                            "range inside the buffer"
                        );
                        let mut m = vec![0u8; len as usize];
                        self.mem
                            .read_at(RECV.1 * 4096 + u64::from(off), &mut m)
                            .expect("buffer");
                        let (_, l) = rndis::parse(&m).expect("host sends valid RNDIS");
                        assert_eq!(l, m.len());
                        assert!(l <= rndis::LINUX_MAX_RESPONSE_LEN || m[0] == 1);
                    }
                    done.push(info.trans_id);
                }
                HeaderInfo::None if info.packet_type == PacketType::Completion => {
                    if !payload.is_empty() {
                        NvspMessage::parse(&payload, Direction::HostToGuest)
                            .expect("host completion parses");
                    }
                }
                _ => {
                    let ty = nvsp::peek_type(&payload).expect("type");
                    assert_eq!(ty, nvsp::msg_type::SEND_INDIRECTION_TABLE);
                }
            }
            p.consume();
        }
        let _ = self.rx.commit();
        for t in done {
            let c = [108u32.to_le_bytes(), 1u32.to_le_bytes()].concat();
            self.completion(t, &c);
        }
        self.dev.poll();
    }

    /// The Linux 6.1 handshake: NVSP 6.1, NDIS config and version, buffers, RNDIS INITIALIZE,
    /// packet filter.
    pub fn bring_up(&mut self) {
        self.inband(
            &NvspMessage::Init(nvsp::Init {
                min_protocol_version: 0x60001,
                max_protocol_version: 0x60001,
            })
            .to_bytes(40),
            true,
        );
        self.inband(
            &NvspMessage::SendNdisConfig(nvsp::SendNdisConfig {
                mtu: 1514,
                reserved: 0,
                capabilities: 0xAC,
            })
            .to_bytes(40),
            false,
        );
        self.inband(
            &NvspMessage::SendNdisVersion(nvsp::SendNdisVersion {
                ndis_major_version: 6,
                ndis_minor_version: 30,
            })
            .to_bytes(40),
            false,
        );
        self.inband(
            &NvspMessage::SendReceiveBuffer(nvsp::SendBuffer {
                gpadl_handle: RECV.0,
                id: 0xCAFE,
            })
            .to_bytes(40),
            true,
        );
        self.inband(
            &NvspMessage::SendSendBuffer(nvsp::SendBuffer {
                gpadl_handle: SEND.0,
                id: 0,
            })
            .to_bytes(40),
            true,
        );
        self.step();
        self.rndis_control(&rndis::initialize_request(1, 0x4000));
        self.rndis_control(&rndis::set_request(
            2,
            rndis::oid::GEN_CURRENT_PACKET_FILTER,
            &0x2Fu32.to_le_bytes(),
        ));
    }
}
