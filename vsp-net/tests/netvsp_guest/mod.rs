//! A minimal guest netvsc for the netvsp tests: guest RAM in a memfd (the device reads it through
//! `MappedMemory`, rings through `MappedRing`, as a VSP process would), GPADLs handed to the
//! device through a table, and helpers that send exactly what Linux 6.1 `hv_netvsc` sends.
#![allow(dead_code, clippy::unwrap_used)]

use ringbuf::layout::{GpaDirectHeader, GpaRangeHeader};
use ringbuf::mmap::{MappedRing, ring_memfd};
use ringbuf::signal::Doorbell;
use ringbuf::{HeaderInfo, OutgoingPacket, PacketType, RingReader, RingWriter, init_control};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};
use vmbus_core::device::{ChannelControl, OpenChannelInfo, VmbusDevice};
use vmbus_core::devices::nvsp::{self, Direction, NvspMessage};
use vmbus_core::devices::rndis::{self, RndisMessage};
use vmbus_core::gpadl::{Gpadl, GpadlRange};
use vmbus_core::memory::{GuestMemory, MappedMemory};
use vsp_net::backend::{MemoryBackend, MemoryHandle};
use vsp_net::netvsp::{ChannelRings, Netvsp, NetvspConfig, NetvspResources};
use zerocopy::IntoBytes;

pub const RAM_PAGES: u64 = 16384; // 64 MiB
pub const MAC: [u8; 6] = [0x00, 0x15, 0x5d, 0x01, 0x02, 0x03];
pub const RX_BUF_ID: u16 = 0xCAFE;

/// Records the sub-channel offers the device asks the bus for.
#[derive(Clone, Default)]
pub struct Offers(pub Arc<Mutex<Vec<u16>>>);

impl ChannelControl for Offers {
    fn offer_subchannels(&mut self, count: u16) -> u16 {
        self.0.lock().unwrap().push(count);
        count
    }
}

/// A packet the host put in a guest ring.
#[derive(Clone, Debug)]
pub struct HostPacket {
    pub queue: u16,
    pub ty: PacketType,
    pub trans_id: u64,
    pub completion_requested: bool,
    pub payload: Vec<u8>,
    pub set_id: u16,
    /// Transfer-page ranges `(byte_offset, byte_count)`.
    pub ranges: Vec<(u32, u32)>,
}

pub struct GuestChannel {
    pub relid: u32,
    pub tx: RingWriter<MappedRing>,
    pub rx: RingReader<MappedRing>,
}

pub struct Guest {
    pub ram: Arc<File>,
    pub mem: Arc<MappedMemory>,
    pub dev: Netvsp<MappedRing>,
    pub backend: MemoryHandle,
    pub gpadls: Arc<Mutex<HashMap<u32, Gpadl>>>,
    pub offers: Offers,
    pub chans: BTreeMap<u16, GuestChannel>,
    pub inbox: Vec<HostPacket>,
    next_pfn: u64,
    next_gpadl: u32,
    next_trans: u64,
    pub next_req: u32,
    pub ring_pages: usize,
    /// Receive buffer: (first pfn, bytes).
    pub recv_buf: Option<(u64, u64)>,
    /// Send buffer: (first pfn, bytes, section size).
    pub send_buf: Option<(u64, u64, u32)>,
    pub version: u32,
    /// Per relid: (kick: guest rings it, call: the device rings it).
    pub bells: Arc<Mutex<HashMap<u32, (Doorbell, Doorbell)>>>,
}

impl Guest {
    pub fn new(cfg: NetvspConfig, backend: MemoryBackend, handle: MemoryHandle) -> Self {
        Self::with_ring_pages(cfg, backend, handle, 32)
    }

    pub fn with_ring_pages(
        cfg: NetvspConfig,
        backend: MemoryBackend,
        handle: MemoryHandle,
        ring_pages: usize,
    ) -> Self {
        let ram = Arc::new(ring_memfd("guest-ram", RAM_PAGES * 4096).unwrap());
        let mem = Arc::new(MappedMemory::map(ram.as_fd(), (RAM_PAGES * 4096) as usize).unwrap());
        let gpadls: Arc<Mutex<HashMap<u32, Gpadl>>> = Arc::default();
        let offers = Offers::default();
        let (g2, r2) = (gpadls.clone(), ram.clone());
        let bells: Arc<Mutex<HashMap<u32, (Doorbell, Doorbell)>>> = Arc::default();
        let b2 = bells.clone();
        let res = NetvspResources {
            memory: mem.clone(),
            gpadls: Arc::new(move |h: u32| g2.lock().unwrap().get(&h).cloned()),
            map_rings: Box::new(move |info: &OpenChannelInfo| {
                let (up, down) = info.ring_pages.split_at(info.downstream_offset as usize);
                let at = |p: &[u64]| p.iter().map(|x| x * 4096).collect::<Vec<_>>();
                let (kick, call) = (Doorbell::new().unwrap(), Doorbell::new().unwrap());
                b2.lock().unwrap().insert(
                    info.relid,
                    (kick.try_clone().unwrap(), call.try_clone().unwrap()),
                );
                Ok(ChannelRings {
                    inbound: MappedRing::map_pages(r2.as_fd(), &at(up)).unwrap(),
                    outbound: MappedRing::map_pages(r2.as_fd(), &at(down)).unwrap(),
                    kick: Some(kick),
                    call: Some(call),
                })
            }),
            subchannels: Box::new(offers.clone()),
        };
        let dev = Netvsp::new(cfg, Box::new(backend), res).unwrap();
        Guest {
            ram,
            mem,
            dev,
            backend: handle,
            gpadls,
            offers,
            chans: BTreeMap::new(),
            inbox: Vec::new(),
            next_pfn: 16,
            next_gpadl: 0x100,
            next_trans: 1,
            next_req: 1,
            ring_pages,
            recv_buf: None,
            send_buf: None,
            version: 0,
            bells,
        }
    }

    pub fn default_pair() -> Self {
        let (b, h) = MemoryBackend::new(MAC, 64);
        Self::new(NetvspConfig::default(), b, h)
    }

    pub fn alloc_pages(&mut self, n: u64) -> u64 {
        let p = self.next_pfn;
        self.next_pfn += n;
        assert!(self.next_pfn <= RAM_PAGES, "test RAM exhausted");
        p
    }

    /// A one-range GPADL over `pages` fresh pages; returns (handle, first pfn).
    pub fn gpadl(&mut self, pages: u64) -> (u32, u64) {
        let pfn = self.alloc_pages(pages);
        let handle = self.next_gpadl;
        self.next_gpadl += 1;
        self.gpadls.lock().unwrap().insert(
            handle,
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
            },
        );
        (handle, pfn)
    }

    /// Opens queue `index` (relid 10 + index) with fresh rings.
    pub fn open(&mut self, index: u16) {
        let n = self.ring_pages as u64;
        let up = self.alloc_pages(n);
        let down = self.alloc_pages(n);
        let pages: Vec<u64> = (up..up + n).chain(down..down + n).collect();
        let at = |p: &[u64]| p.iter().map(|x| x * 4096).collect::<Vec<_>>();
        let g_up = MappedRing::map_pages(self.ram.as_fd(), &at(&pages[..n as usize])).unwrap();
        let g_down = MappedRing::map_pages(self.ram.as_fd(), &at(&pages[n as usize..])).unwrap();
        init_control(&g_up);
        init_control(&g_down);
        let relid = 10 + u32::from(index);
        let info = OpenChannelInfo {
            relid,
            subchannel_index: index,
            ring_pages: pages,
            downstream_offset: n as u32,
            target_vp: 0,
            connection_id: relid,
            user_data: [0; 120],
        };
        self.dev.open(info, &mut Offers::default()).unwrap();
        self.chans.insert(
            index,
            GuestChannel {
                relid,
                tx: RingWriter::new(g_up).unwrap(),
                rx: RingReader::new(g_down).unwrap(),
            },
        );
    }

    pub fn close(&mut self, index: u16) {
        let ch = self.chans.remove(&index).unwrap();
        self.dev.close(ch.relid);
    }

    pub fn trans(&mut self) -> u64 {
        self.next_trans += 1;
        self.next_trans
    }

    pub fn req_id(&mut self) -> u32 {
        self.next_req += 1;
        self.next_req
    }

    pub fn send_inband(&mut self, q: u16, trans_id: u64, payload: &[u8], completion: bool) {
        let parts: [&[u8]; 1] = [payload];
        let ch = self.chans.get_mut(&q).unwrap();
        ch.tx
            .try_write(&OutgoingPacket::in_band(trans_id, completion, &parts))
            .unwrap();
    }

    /// Sends a completion; when the ring to the host is full, lets the device drain it first.
    pub fn send_completion(&mut self, q: u16, trans_id: u64, payload: &[u8]) {
        let parts: [&[u8]; 1] = [payload];
        for _ in 0..100 {
            let ch = self.chans.get_mut(&q).unwrap();
            match ch
                .tx
                .try_write(&OutgoingPacket::completion(trans_id, &parts))
            {
                Ok(_) => return,
                Err(ringbuf::WriteError::Full { .. }) => {
                    self.dev.poll();
                }
                Err(e) => panic!("{e}"),
            }
        }
        panic!("guest ring stays full");
    }

    /// A GPA-direct packet with ranges `(byte_offset, byte_count, pfns)`.
    pub fn send_gpa(
        &mut self,
        q: u16,
        trans_id: u64,
        payload: &[u8],
        ranges: &[(u32, u32, Vec<u64>)],
    ) {
        let mut headers = GpaDirectHeader {
            reserved: 0.into(),
            range_count: (ranges.len() as u32).into(),
        }
        .as_bytes()
        .to_vec();
        for (off, count, pfns) in ranges {
            headers.extend_from_slice(
                GpaRangeHeader {
                    byte_count: (*count).into(),
                    byte_offset: (*off).into(),
                }
                .as_bytes(),
            );
            for p in pfns {
                headers.extend_from_slice(&p.to_le_bytes());
            }
        }
        let parts: [&[u8]; 1] = [payload];
        let pkt = OutgoingPacket {
            packet_type: PacketType::GpaDirect,
            completion_requested: true,
            trans_id,
            headers: &headers,
            payload: &parts,
        };
        self.chans.get_mut(&q).unwrap().tx.try_write(&pkt).unwrap();
    }

    /// Polls the device once and collects everything it wrote.
    pub fn pump(&mut self) {
        self.dev.poll();
        for (&q, ch) in self.chans.iter_mut() {
            while let Some(p) = ch.rx.peek().unwrap() {
                let info = *p.info();
                let mut payload = vec![0u8; p.payload_len()];
                p.copy_payload(0, &mut payload).unwrap();
                let (set_id, ranges) = match info.header {
                    HeaderInfo::TransferPages { set_id, .. } => (
                        set_id,
                        p.transfer_ranges()
                            .unwrap()
                            .iter()
                            .map(|r| (r.byte_offset.get(), r.byte_count.get()))
                            .collect(),
                    ),
                    _ => (0, Vec::new()),
                };
                p.consume();
                self.inbox.push(HostPacket {
                    queue: q,
                    ty: info.packet_type,
                    trans_id: info.trans_id,
                    completion_requested: info.completion_requested,
                    payload,
                    set_id,
                    ranges,
                });
            }
            ch.rx.commit().unwrap();
        }
    }

    pub fn take(&mut self) -> Vec<HostPacket> {
        std::mem::take(&mut self.inbox)
    }

    /// Sends an NVSP message in-band (40 bytes, as Linux) and returns what came back.
    pub fn nvsp(&mut self, msg: NvspMessage, completion: bool) -> Vec<HostPacket> {
        let t = self.trans();
        self.send_inband(0, t, &msg.to_bytes(40), completion);
        self.pump();
        let got = self.take();
        for p in &got {
            if p.ty == PacketType::Completion {
                assert_eq!(p.trans_id, t, "completion echoes the transaction id");
            }
        }
        got
    }

    /// The one completion a request produced.
    pub fn nvsp_reply(&mut self, msg: NvspMessage) -> Vec<u8> {
        let got = self.nvsp(msg, true);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].ty, PacketType::Completion);
        got[0].payload.clone()
    }

    /// Reads a transfer-page range out of the receive buffer.
    pub fn read_range(&self, off: u32, len: u32) -> Vec<u8> {
        let (pfn, size) = self.recv_buf.unwrap();
        assert!(u64::from(off) + u64::from(len) <= size);
        let mut v = vec![0u8; len as usize];
        self.mem
            .read_at(pfn * 4096 + u64::from(off), &mut v)
            .unwrap();
        v
    }

    /// Completes a receive transfer-page packet the way Linux does.
    pub fn complete_rx(&mut self, p: &HostPacket) {
        let msg = [108u32.to_le_bytes(), 1u32.to_le_bytes()].concat();
        self.send_completion(p.queue, p.trans_id, &msg);
    }

    /// Sends an RNDIS control message as Linux does (GPA direct, one range, control channel) and
    /// returns the reply's bytes (`None` when no reply came, e.g. HALT). Checks the SEND_RNDIS_PKT
    /// completion and completes the receive packet.
    pub fn rndis(&mut self, msg: &[u8]) -> Option<Vec<u8>> {
        let pages = (msg.len() as u64 + 100).div_ceil(4096);
        let pfn = self.alloc_pages(pages);
        // Linux's request sits inside a kmalloc'ed struct: start it mid-page.
        let off = 100u32;
        self.mem.write_at(pfn * 4096 + u64::from(off), msg).unwrap();
        let n = (u64::from(off) + msg.len() as u64).div_ceil(4096);
        let t = self.trans();
        let body = NvspMessage::SendRndisPacket(nvsp::SendRndisPacket {
            channel_type: nvsp::CHANNEL_TYPE_CONTROL,
            send_buffer_section_index: nvsp::INVALID_SECTION_INDEX,
            send_buffer_section_size: 0,
        })
        .to_bytes(40);
        self.send_gpa(
            0,
            t,
            &body,
            &[(off, msg.len() as u32, (pfn..pfn + n).collect())],
        );
        self.pump();
        let got = self.take();
        let comp = got
            .iter()
            .find(|p| p.ty == PacketType::Completion)
            .expect("SEND_RNDIS_PKT completion");
        assert_eq!(comp.trans_id, t);
        assert_eq!(
            &comp.payload[..8],
            &[108, 0, 0, 0, 1, 0, 0, 0],
            "SEND_RNDIS_PKT_COMPLETE success"
        );
        let xfer: Vec<&HostPacket> = got
            .iter()
            .filter(|p| p.ty == PacketType::TransferPages)
            .collect();
        let p = match xfer.as_slice() {
            [] => return None,
            [p] => (*p).clone(),
            more => panic!("several replies: {more:?}"),
        };
        self.check_control_packet(&p);
        let bytes = self.read_range(p.ranges[0].0, p.ranges[0].1);
        self.complete_rx(&p);
        // Let the device see the completion (its sections are free again afterwards).
        self.dev.poll();
        Some(bytes)
    }

    /// What Linux checks on a control receive packet.
    pub fn check_control_packet(&self, p: &HostPacket) {
        assert_eq!(p.set_id, RX_BUF_ID);
        assert!(p.completion_requested);
        assert_eq!(p.ranges.len(), 1);
        let msg = NvspMessage::parse(&p.payload, Direction::HostToGuest).unwrap();
        assert_eq!(
            msg,
            NvspMessage::SendRndisPacket(nvsp::SendRndisPacket {
                channel_type: nvsp::CHANNEL_TYPE_CONTROL,
                send_buffer_section_index: nvsp::INVALID_SECTION_INDEX,
                send_buffer_section_size: 0,
            })
        );
        assert_eq!(
            p.payload.len(),
            nvsp::message_size(self.version).next_multiple_of(8)
        );
    }

    pub fn query(&mut self, oid: u32, input: &[u8]) -> (u32, Vec<u8>, Vec<u8>) {
        let id = self.req_id();
        let reply = self.rndis(&rndis::query_request(id, oid, input)).unwrap();
        let (m, len) = rndis::parse(&reply).unwrap();
        assert_eq!(len, reply.len());
        let RndisMessage::QueryComplete(q) = m else {
            panic!("{m:?}")
        };
        assert_eq!({ q.complete.req_id }, id);
        assert_eq!({ q.complete.info_buf_offset }, 16);
        ({ q.complete.status }, q.info.to_vec(), reply)
    }

    pub fn set(&mut self, oid: u32, input: &[u8]) -> u32 {
        let id = self.req_id();
        let reply = self.rndis(&rndis::set_request(id, oid, input)).unwrap();
        assert_eq!(reply.len(), 16);
        let (RndisMessage::SetComplete(c), _) = rndis::parse(&reply).unwrap() else {
            panic!()
        };
        assert_eq!({ c.req_id }, id);
        c.status
    }

    /// NVSP handshake + buffers as Linux 6.1 does at `version` (no RNDIS).
    pub fn connect(&mut self, version: u32, recv_pages: u64, send_pages: u64) {
        self.open(0);
        let r = self.nvsp_reply(NvspMessage::Init(nvsp::Init {
            min_protocol_version: version,
            max_protocol_version: version,
        }));
        assert_eq!(
            u32::from_le_bytes(r[12..16].try_into().unwrap()),
            nvsp::status::SUCCESS
        );
        self.version = version;
        if version >= nvsp::version::V2 {
            let caps = nvsp::capability::IEEE8021Q
                | nvsp::capability::SRIOV
                | nvsp::capability::TEAMING
                | nvsp::capability::RSC;
            assert!(
                self.nvsp(
                    NvspMessage::SendNdisConfig(nvsp::SendNdisConfig {
                        mtu: 1514,
                        reserved: 0,
                        capabilities: caps
                    }),
                    false
                )
                .is_empty()
            );
        }
        let (major, minor) = if version <= nvsp::version::V4 {
            (6, 1)
        } else {
            (6, 30)
        };
        assert!(
            self.nvsp(
                NvspMessage::SendNdisVersion(nvsp::SendNdisVersion {
                    ndis_major_version: major,
                    ndis_minor_version: minor
                }),
                false
            )
            .is_empty()
        );
        let (h, pfn) = self.gpadl(recv_pages);
        let r = self.nvsp_reply(NvspMessage::SendReceiveBuffer(nvsp::SendBuffer {
            gpadl_handle: h,
            id: RX_BUF_ID,
        }));
        assert_eq!(&r[..8], &[102, 0, 0, 0, 1, 0, 0, 0], "{r:?}");
        self.recv_buf = Some((pfn, recv_pages * 4096));
        let (h, pfn) = self.gpadl(send_pages);
        let r = self.nvsp_reply(NvspMessage::SendSendBuffer(nvsp::SendBuffer {
            gpadl_handle: h,
            id: 0,
        }));
        assert_eq!(&r[..8], &[105, 0, 0, 0, 1, 0, 0, 0]);
        let section = u32::from_le_bytes(r[8..12].try_into().unwrap());
        self.send_buf = Some((pfn, send_pages * 4096, section));
    }

    /// Connect + RNDIS INITIALIZE + packet filter: ready for data.
    pub fn bring_up(&mut self) {
        self.connect(nvsp::version::V61, 256, 255);
        let id = self.req_id();
        let r = self.rndis(&rndis::initialize_request(id, 0x4000)).unwrap();
        assert_eq!(
            &r[8..16],
            &[id.to_le_bytes(), 0u32.to_le_bytes()].concat()[..]
        );
        assert_eq!(
            self.set(
                rndis::oid::GEN_CURRENT_PACKET_FILTER,
                &0x0Du32.to_le_bytes()
            ),
            0
        );
    }

    /// Collects data frames from receive packets on every queue, completing each packet.
    /// Returns `(queue, frame, packet info)`.
    pub fn receive_frames(&mut self) -> Vec<(u16, Vec<u8>, rndis::ppi::PacketInfo)> {
        self.pump();
        let mut out = Vec::new();
        for p in self.take() {
            assert_eq!(p.ty, PacketType::TransferPages, "{p:?}");
            assert_eq!(p.set_id, RX_BUF_ID);
            assert_eq!(
                &p.payload[..8],
                &[107, 0, 0, 0, 0, 0, 0, 0],
                "data channel type"
            );
            for &(off, len) in &p.ranges {
                let bytes = self.read_range(off, len);
                let (RndisMessage::Packet(pk), l) = rndis::parse(&bytes).unwrap() else {
                    panic!()
                };
                assert_eq!(
                    l, len as usize,
                    "one message per range, msg_len = range length"
                );
                out.push((p.queue, pk.data.to_vec(), pk.info().unwrap()));
            }
            self.complete_rx(&p);
        }
        out
    }

    /// Writes `bytes` into send-buffer section `index`.
    pub fn write_section(&self, index: u32, bytes: &[u8]) {
        let (pfn, _, size) = self.send_buf.unwrap();
        assert!(bytes.len() <= size as usize);
        self.mem
            .write_at(pfn * 4096 + u64::from(index) * u64::from(size), bytes)
            .unwrap();
    }

    /// SEND_RNDIS_PKT (data) from a send-buffer section; returns the completion status.
    pub fn send_section(&mut self, q: u16, index: u32, len: u32) -> u32 {
        let t = self.trans();
        let body = NvspMessage::SendRndisPacket(nvsp::SendRndisPacket {
            channel_type: nvsp::CHANNEL_TYPE_DATA,
            send_buffer_section_index: index,
            send_buffer_section_size: len,
        })
        .to_bytes(40);
        self.send_inband(q, t, &body, true);
        self.completion_status(t)
    }

    /// Pumps and returns the SEND_RNDIS_PKT_COMPLETE status for `t` (other packets stay queued).
    pub fn completion_status(&mut self, t: u64) -> u32 {
        self.pump();
        let pos = self
            .inbox
            .iter()
            .position(|p| p.ty == PacketType::Completion && p.trans_id == t)
            .expect("completion");
        let p = self.inbox.remove(pos);
        assert_eq!(&p.payload[..4], &108u32.to_le_bytes());
        u32::from_le_bytes(p.payload[4..8].try_into().unwrap())
    }
}

/// An RNDIS data message for `frame` with the given PPIs.
pub fn rndis_packet(frame: &[u8], ppis: &[u8]) -> Vec<u8> {
    let mut m = rndis::packet_header(frame.len(), ppis);
    m.extend_from_slice(frame);
    m
}

/// An Ethernet + IPv4 + TCP frame with `payload` bytes, checksums left zero.
pub fn tcp4_frame(dst: [u8; 6], payload: usize) -> Vec<u8> {
    let mut f = vec![0u8; 14 + 20 + 20 + payload];
    f[..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&MAC);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    f[14] = 0x45;
    f[16..18].copy_from_slice(&((40 + payload) as u16).to_be_bytes());
    f[18..20].copy_from_slice(&0x1234u16.to_be_bytes());
    f[22] = 64;
    f[23] = 6;
    f[26..30].copy_from_slice(&[10, 0, 0, 1]);
    f[30..34].copy_from_slice(&[10, 0, 0, 2]);
    f[34..36].copy_from_slice(&40000u16.to_be_bytes());
    f[36..38].copy_from_slice(&80u16.to_be_bytes());
    f[38..42].copy_from_slice(&1000u32.to_be_bytes());
    f[46] = 5 << 4;
    f[47] = 0x18; // PSH | ACK
    f[48..50].copy_from_slice(&65535u16.to_be_bytes());
    for (i, b) in f[54..].iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    f
}
