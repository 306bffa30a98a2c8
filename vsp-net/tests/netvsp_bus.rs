//! netvsp on a real VMBus: the guest client creates the ring, receive and send buffer GPADLs, the
//! host server hands them to the device (`Server::gpadl`), the device asks the server for
//! sub-channels (`Server::add_subchannels`) and the client sees their offers and opens them.
//! Then frames make a round trip through a loopback backend on the sub-channel.
#![allow(clippy::unwrap_used)]

use ringbuf::mmap::{MappedRing, ring_memfd};
use ringbuf::{OutgoingPacket, PacketType, RingReader, RingWriter, init_control};
use std::fs::File;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use vmbus_core::device::{ChannelControl, OpenChannelInfo, VmbusDevice};
use vmbus_core::devices::nvsp::{self, NvspMessage};
use vmbus_core::devices::rndis;
use vmbus_core::gpadl::RamRanges;
use vmbus_core::guest::{Client, ClientConfig, ClientEvent, OpenParams};
use vmbus_core::host::{HostAction, Server, ServerConfig};
use vmbus_core::memory::{GuestMemory, MappedMemory};
use vmbus_core::wire::Version;
use vsp_net::backend::MemoryBackend;
use vsp_net::netvsp::{ChannelRings, Netvsp, NetvspConfig, NetvspResources};

const RAM_PAGES: u64 = 4096;
const RING_PAGES: u64 = 16;

struct BusSubchannels {
    server: Arc<Mutex<Server>>,
    primary: Arc<AtomicU32>,
}

impl ChannelControl for BusSubchannels {
    fn offer_subchannels(&mut self, count: u16) -> u16 {
        let primary = self.primary.load(Ordering::Acquire);
        self.server
            .lock()
            .unwrap()
            .add_subchannels(primary, count)
            .len() as u16
    }
}

struct Bus {
    client: Client,
    server: Arc<Mutex<Server>>,
    events: Vec<ClientEvent>,
    work: Vec<HostAction>,
}

impl Bus {
    fn pump(&mut self) {
        loop {
            let mut moved = false;
            while let Some(p) = self.client.poll_post() {
                let _ = self
                    .server
                    .lock()
                    .unwrap()
                    .handle_message(p.connection_id, &p.msg);
                moved = true;
            }
            loop {
                let a = self.server.lock().unwrap().poll_action();
                match a {
                    Some(HostAction::Send { msg, .. }) => {
                        self.client.handle_message(&msg).unwrap();
                        moved = true;
                    }
                    Some(other) => self.work.push(other),
                    None => break,
                }
            }
            while let Some(e) = self.client.poll_event() {
                self.events.push(e);
            }
            if !moved {
                return;
            }
        }
    }
}

struct GuestRings {
    tx: RingWriter<MappedRing>,
    rx: RingReader<MappedRing>,
}

fn map(ram: &File, pages: &[u64]) -> MappedRing {
    let offs: Vec<u64> = pages.iter().map(|p| p * 4096).collect();
    MappedRing::map_pages(ram.as_fd(), &offs).unwrap()
}

/// Creates the ring GPADL, opens `relid` through the bus, hands the open to the device.
fn open(
    bus: &mut Bus,
    dev: &mut Netvsp<MappedRing>,
    ram: &File,
    relid: u32,
    first_pfn: u64,
) -> GuestRings {
    let pfns: Vec<u64> = (first_pfn..first_pfn + 2 * RING_PAGES).collect();
    let gpadl = bus.client.create_gpadl(relid, &pfns).unwrap();
    bus.pump();
    let (up, down) = (
        map(ram, &pfns[..RING_PAGES as usize]),
        map(ram, &pfns[RING_PAGES as usize..]),
    );
    init_control(&up);
    init_control(&down);
    bus.client
        .open_channel(relid, OpenParams::new(gpadl, RING_PAGES as u32, 0))
        .unwrap();
    bus.pump();
    let work = std::mem::take(&mut bus.work);
    let [HostAction::Open(info)] = &work[..] else {
        panic!("{work:?}")
    };
    let ok = dev.open(info.clone(), &mut NoControl).is_ok();
    bus.server.lock().unwrap().complete_open(relid, ok).unwrap();
    bus.pump();
    assert!(
        bus.events
            .iter()
            .any(|e| matches!(e, ClientEvent::OpenResult { relid: r, status: 0 } if *r == relid))
    );
    GuestRings {
        tx: RingWriter::new(up).unwrap(),
        rx: RingReader::new(down).unwrap(),
    }
}

struct NoControl;
impl ChannelControl for NoControl {
    fn offer_subchannels(&mut self, _: u16) -> u16 {
        0
    }
}

fn send(r: &mut GuestRings, trans_id: u64, msg: &[u8], completion: bool) {
    let parts: [&[u8]; 1] = [msg];
    r.tx.try_write(&OutgoingPacket::in_band(trans_id, completion, &parts))
        .unwrap();
}

/// Every packet waiting in the guest's receive ring: (type, trans id, payload, ranges).
/// (type, trans id, payload, transfer ranges)
type Received = (PacketType, u64, Vec<u8>, Vec<(u32, u32)>);

fn recv(r: &mut GuestRings) -> Vec<Received> {
    let mut out = Vec::new();
    while let Some(p) = r.rx.peek().unwrap() {
        let mut payload = vec![0u8; p.payload_len()];
        p.copy_payload(0, &mut payload).unwrap();
        let ranges = p
            .transfer_ranges()
            .map(|rs| {
                rs.iter()
                    .map(|x| (x.byte_offset.get(), x.byte_count.get()))
                    .collect()
            })
            .unwrap_or_default();
        out.push((p.packet_type(), p.trans_id(), payload, ranges));
        p.consume();
    }
    r.rx.commit().unwrap();
    out
}

#[test]
fn netvsp_through_the_vmbus_server_with_a_sub_channel() {
    let ram = Arc::new(ring_memfd("guest-ram", RAM_PAGES * 4096).unwrap());
    let mem = Arc::new(MappedMemory::map(ram.as_fd(), (RAM_PAGES * 4096) as usize).unwrap());
    let server = Arc::new(Mutex::new(Server::new(
        ServerConfig {
            vp_count: 2,
            ..ServerConfig::default()
        },
        RamRanges(vec![(0, RAM_PAGES)]),
    )));
    let primary = Arc::new(AtomicU32::new(0));
    let (backend, handle) = MemoryBackend::loopback([0, 0x15, 0x5d, 9, 9, 9], 64);
    let r2 = ram.clone();
    let s2 = server.clone();
    let res = NetvspResources {
        memory: mem.clone(),
        gpadls: Arc::new(move |h: u32| s2.lock().unwrap().gpadl(h).cloned()),
        map_rings: Box::new(move |info: &OpenChannelInfo| {
            let (up, down) = info.ring_pages.split_at(info.downstream_offset as usize);
            Ok(ChannelRings {
                inbound: map(&r2, up),
                outbound: map(&r2, down),
                kick: None,
                call: None,
            })
        }),
        subchannels: Box::new(BusSubchannels {
            server: server.clone(),
            primary: primary.clone(),
        }),
    };
    let cfg = NetvspConfig {
        max_queues: 2,
        ..NetvspConfig::default()
    };
    let mut dev = Netvsp::new(cfg, Box::new(backend), res).unwrap();
    let relid = server
        .lock()
        .unwrap()
        .add_device(dev.description())
        .unwrap();
    primary.store(relid, Ordering::Release);
    let mut bus = Bus {
        client: Client::new(ClientConfig {
            versions: Version::LINUX_NEGOTIATION_ORDER.to_vec(),
            ..ClientConfig::default()
        }),
        server: server.clone(),
        events: Vec::new(),
        work: Vec::new(),
    };
    bus.client.connect().unwrap();
    bus.pump();
    bus.client.request_offers().unwrap();
    bus.pump();
    assert!(
        bus.events
            .iter()
            .any(|e| matches!(e, ClientEvent::Offer(o) if o.relid == relid))
    );

    let mut q0 = open(&mut bus, &mut dev, &ram, relid, 16);
    // Receive buffer (64 pages) and send buffer (3 pages) GPADLs on the primary.
    let recv_pfn = 100u64;
    let recv_gpadl = bus
        .client
        .create_gpadl(relid, &(recv_pfn..recv_pfn + 64).collect::<Vec<_>>())
        .unwrap();
    let sendb = bus
        .client
        .create_gpadl(relid, &(200..203).collect::<Vec<_>>())
        .unwrap();
    bus.pump();

    let msgs = [
        (
            NvspMessage::Init(nvsp::Init {
                min_protocol_version: 0x60001,
                max_protocol_version: 0x60001,
            }),
            true,
        ),
        (
            NvspMessage::SendNdisConfig(nvsp::SendNdisConfig {
                mtu: 1514,
                reserved: 0,
                capabilities: 0xAC,
            }),
            false,
        ),
        (
            NvspMessage::SendNdisVersion(nvsp::SendNdisVersion {
                ndis_major_version: 6,
                ndis_minor_version: 30,
            }),
            false,
        ),
        (
            NvspMessage::SendReceiveBuffer(nvsp::SendBuffer {
                gpadl_handle: recv_gpadl,
                id: 0xCAFE,
            }),
            true,
        ),
        (
            NvspMessage::SendSendBuffer(nvsp::SendBuffer {
                gpadl_handle: sendb,
                id: 0,
            }),
            true,
        ),
    ];
    for (i, (m, c)) in msgs.iter().enumerate() {
        send(&mut q0, i as u64 + 1, &m.to_bytes(40), *c);
    }
    dev.poll();
    let got = recv(&mut q0);
    let status: Vec<u32> = got
        .iter()
        .map(|(_, _, p, _)| u32::from_le_bytes(p[4..8].try_into().unwrap()))
        .collect();
    assert_eq!(got.len(), 3);
    assert_eq!(
        u32::from_le_bytes(got[0].2[12..16].try_into().unwrap()),
        1,
        "INIT ok"
    );
    assert_eq!(&status[1..], [1, 1], "buffers from server GPADLs accepted");

    // RNDIS INITIALIZE from the send buffer, then the packet filter.
    let section = |mem: &MappedMemory, m: &[u8]| mem.write_at(200 * 4096, m).unwrap();
    for (t, m) in [
        (10, rndis::initialize_request(1, 0x4000)),
        (
            11,
            rndis::set_request(
                2,
                rndis::oid::GEN_CURRENT_PACKET_FILTER,
                &0x20u32.to_le_bytes(),
            ),
        ),
    ] {
        section(&mem, &m);
        let body = NvspMessage::SendRndisPacket(nvsp::SendRndisPacket {
            channel_type: 1,
            send_buffer_section_index: 0,
            send_buffer_section_size: m.len() as u32,
        });
        send(&mut q0, t, &body.to_bytes(40), true);
        dev.poll();
        for (ty, id, _, _) in recv(&mut q0) {
            if ty == PacketType::TransferPages {
                let c = [108u32.to_le_bytes(), 1u32.to_le_bytes()].concat();
                let parts: [&[u8]; 1] = [&c];
                q0.tx
                    .try_write(&OutgoingPacket::completion(id, &parts))
                    .unwrap();
            }
        }
    }

    // Sub-channel: the device asks the server, the client sees the offer and opens it.
    let req = NvspMessage::SubchannelRequest(nvsp::SubchannelRequest {
        operation: 1,
        num_subchannels: 1,
    });
    send(&mut q0, 20, &req.to_bytes(40), true);
    dev.poll();
    let got = recv(&mut q0);
    assert_eq!(&got[0].2[..12], &[133, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0]);
    bus.pump();
    let sub = bus
        .events
        .iter()
        .find_map(|e| match e {
            ClientEvent::Offer(o) if o.sub_channel_index == 1 => Some(o.relid),
            _ => None,
        })
        .expect("sub-channel offer");
    let mut q1 = open(&mut bus, &mut dev, &ram, sub, 300);
    dev.poll();
    let table = recv(&mut q0);
    assert_eq!(table[0].0, PacketType::InBand);
    assert_eq!(
        nvsp::indirection_table(&table[0].2[..76], 0x60001).unwrap()[1],
        1
    );

    // A frame sent on the sub-channel loops back and is received (promiscuous filter).
    let frame: Vec<u8> = (0..200u32).map(|i| i as u8).collect();
    let mut m = rndis::packet_header(frame.len(), &[]);
    m.extend_from_slice(&frame);
    mem.write_at(200 * 4096 + 6144, &m).unwrap();
    let body = NvspMessage::SendRndisPacket(nvsp::SendRndisPacket {
        channel_type: 0,
        send_buffer_section_index: 1,
        send_buffer_section_size: m.len() as u32,
    });
    send(&mut q1, 30, &body.to_bytes(40), true);
    dev.poll();
    dev.poll();
    let done = recv(&mut q1);
    assert_eq!((done[0].0, done[0].1), (PacketType::Completion, 30));
    let rx = recv(&mut q0);
    let (_, _, _, ranges) = rx
        .iter()
        .find(|p| p.0 == PacketType::TransferPages)
        .expect("frame back");
    let (off, len) = ranges[0];
    let mut bytes = vec![0u8; len as usize];
    mem.read_at(recv_pfn * 4096 + u64::from(off), &mut bytes)
        .unwrap();
    let (rndis::RndisMessage::Packet(p), _) = rndis::parse(&bytes).unwrap() else {
        panic!()
    };
    assert_eq!(p.data, &frame[..]);
    assert_eq!(handle.pending_rx(), 0);

    // Closing the primary through the bus resets the device's session.
    bus.client.close_channel(relid).unwrap();
    bus.pump();
    for w in std::mem::take(&mut bus.work) {
        if let HostAction::Close { relid } = w {
            dev.close(relid);
        }
    }
    assert_eq!(dev.nvsp_version(), None);
}
