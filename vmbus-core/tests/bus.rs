//! Guest client ↔ host server, in one process: every version, enumeration, GPADLs, open, an echo
//! device moving 1 M packets through rings in shared "guest RAM" (a memfd, mapped page by page from
//! the GPADL as a VSP would), close, rescind and re-offer, unload and reconnect.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use ringbuf::mmap::{MappedRing, ring_memfd};
use ringbuf::signal::{Doorbell, Receiver, Sender};
use ringbuf::{OutgoingPacket, PacketType, RingReader, RingWriter, init_control};
use std::fs::File;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;
use vmbus_core::device::{
    ChannelControl, DeviceDescription, DeviceError, OpenChannelInfo, VmbusDevice,
};
use vmbus_core::gpadl::RamRanges;
use vmbus_core::guest::{Client, ClientConfig, ClientEvent, OpenParams};
use vmbus_core::host::{HostAction, Server, ServerConfig, ServerSnapshot};
use vmbus_core::wire::{Guid, Version, class};

const RAM_PAGES: u64 = 4096;
const TIMEOUT: Option<Duration> = Some(Duration::from_secs(30));

struct Bus {
    client: Client,
    server: Server,
    /// Device work the host asked for, in order.
    work: Vec<HostAction>,
    events: Vec<ClientEvent>,
}

impl Bus {
    fn new(client_versions: Vec<Version>, server_versions: Vec<Version>) -> Self {
        let client = Client::new(ClientConfig {
            versions: client_versions,
            ..ClientConfig::default()
        });
        let server = Server::new(
            ServerConfig {
                vp_count: 2,
                versions: server_versions,
                ..ServerConfig::default()
            },
            RamRanges(vec![(0, RAM_PAGES)]),
        );
        Bus {
            client,
            server,
            work: Vec::new(),
            events: Vec::new(),
        }
    }

    /// Moves messages both ways until nothing moves (what the SynIC does, in order).
    fn pump(&mut self) {
        loop {
            let mut moved = false;
            while let Some(p) = self.client.poll_post() {
                // Refusals are answered on the wire where the protocol has a status; ignore here.
                let _ = self.server.handle_message(p.connection_id, &p.msg);
                moved = true;
            }
            while let Some(a) = self.server.poll_action() {
                match a {
                    HostAction::Send { msg, .. } => {
                        self.client
                            .handle_message(&msg)
                            .expect("host messages are valid");
                        moved = true;
                    }
                    other => self.work.push(other),
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

    fn take_events(&mut self) -> Vec<ClientEvent> {
        std::mem::take(&mut self.events)
    }

    fn take_work(&mut self) -> Vec<HostAction> {
        std::mem::take(&mut self.work)
    }
}

#[test]
fn connects_at_every_version_both_sides_support() {
    let host_set = ServerConfig::default().versions;
    for v in Version::ALL {
        let mut bus = Bus::new(vec![v], host_set.clone());
        bus.client.connect().unwrap();
        bus.pump();
        let events = bus.take_events();
        if host_set.contains(&v) {
            assert!(
                matches!(events[..], [ClientEvent::Connected { version, .. }] if version == v),
                "{v}: {events:?}"
            );
            assert_eq!(bus.server.version(), Some(v));
        } else {
            assert_eq!(events, [ClientEvent::ConnectFailed], "{v}");
            assert_eq!(bus.server.version(), None);
        }
    }
    // A host configured for every version, 0.13 through 6.0: each one connects.
    for v in Version::ALL {
        let mut bus = Bus::new(vec![v], Version::ALL.to_vec());
        bus.client.connect().unwrap();
        bus.pump();
        let events = bus.take_events();
        assert!(
            matches!(events[..], [ClientEvent::Connected { version, .. }] if version == v),
            "{v}: {events:?}"
        );
    }
    // Linux's order against a host that stops at 4.0: lands on 4.0.
    let mut bus = Bus::new(
        Version::LINUX_NEGOTIATION_ORDER.to_vec(),
        vec![Version::Win8_1, Version::Win10],
    );
    bus.client.connect().unwrap();
    bus.pump();
    assert!(matches!(
        bus.take_events()[..],
        [ClientEvent::Connected {
            version: Version::Win10,
            ..
        }]
    ));
}

/// A device serving one channel: echoes every in-band packet back as a completion.
struct EchoDevice {
    stop: Arc<AtomicBool>,
    kick: Doorbell,
    thread: Option<JoinHandle<u64>>,
}

/// The two rings of an open channel, mapped from guest RAM pages by GPADL PFN.
fn map_rings(ram: &File, pages: &[u64], offset: u32) -> (MappedRing, MappedRing) {
    let at = |p: &[u64]| p.iter().map(|pfn| pfn * 4096).collect::<Vec<u64>>();
    let (up, down) = pages.split_at(offset as usize);
    (
        MappedRing::map_pages(ram.as_fd(), &at(up)).unwrap(),
        MappedRing::map_pages(ram.as_fd(), &at(down)).unwrap(),
    )
}

/// Doorbells of one channel: (guest→host data, host→guest space, host→guest data, guest→host space).
struct Bells {
    up_data: Doorbell,
    up_space: Doorbell,
    down_data: Doorbell,
    down_space: Doorbell,
}

impl Bells {
    fn new() -> Self {
        Bells {
            up_data: Doorbell::new().unwrap(),
            up_space: Doorbell::new().unwrap(),
            down_data: Doorbell::new().unwrap(),
            down_space: Doorbell::new().unwrap(),
        }
    }
}

impl EchoDevice {
    fn open(ram: &File, info: &OpenChannelInfo, bells: &Bells) -> Self {
        let (up, down) = map_rings(ram, &info.ring_pages, info.downstream_offset);
        let mut rx = Receiver::new(
            RingReader::new(up).unwrap(),
            bells.up_space.try_clone().unwrap(),
            bells.up_data.try_clone().unwrap(),
        );
        let mut tx = Sender::new(
            RingWriter::new(down).unwrap(),
            bells.down_data.try_clone().unwrap(),
            bells.down_space.try_clone().unwrap(),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut echoed = 0u64;
                let mut buf = Vec::new();
                while !stop.load(Ordering::Acquire) {
                    let mut replies = Vec::new();
                    match rx.recv_batch(64, Some(Duration::from_millis(50)), |pkt| {
                        buf.resize(pkt.payload_len(), 0);
                        pkt.copy_payload(0, &mut buf).unwrap();
                        replies.push((pkt.trans_id(), buf.clone()));
                    }) {
                        Ok(_) => {}
                        Err(ringbuf::signal::ChannelError::TimedOut) => continue,
                        Err(e) => panic!("echo receive: {e}"),
                    }
                    for (id, payload) in &replies {
                        let parts: [&[u8]; 1] = [payload];
                        tx.send(&OutgoingPacket::completion(*id, &parts), TIMEOUT)
                            .unwrap();
                        echoed += 1;
                    }
                }
                echoed
            })
        };
        EchoDevice {
            stop,
            kick: bells.up_data.try_clone().unwrap(),
            thread: Some(thread),
        }
    }

    fn close(mut self) -> u64 {
        self.stop.store(true, Ordering::Release);
        self.kick.ring().unwrap();
        self.thread.take().unwrap().join().unwrap()
    }
}

fn device(n: u128) -> DeviceDescription {
    DeviceDescription::new(class::SCSI, Guid::from_u128(0xabc0 + n))
}

/// The echo device behind the narrow VSP trait: what the host hands over on open and close.
struct EchoVsp {
    ram: Arc<File>,
    bells: Arc<Bells>,
    running: Option<EchoDevice>,
    echoed: u64,
}

impl VmbusDevice for EchoVsp {
    fn description(&self) -> DeviceDescription {
        device(1)
    }

    fn open(
        &mut self,
        channel: OpenChannelInfo,
        _bus: &mut dyn ChannelControl,
    ) -> Result<(), DeviceError> {
        if self.running.is_some() {
            return Err(DeviceError::NoResources);
        }
        self.running = Some(EchoDevice::open(&self.ram, &channel, &self.bells));
        Ok(())
    }

    fn close(&mut self, _relid: u32) {
        if let Some(d) = self.running.take() {
            self.echoed += d.close();
        }
    }
}

struct NoSubchannels;

impl ChannelControl for NoSubchannels {
    fn offer_subchannels(&mut self, _count: u16) -> u16 {
        0
    }
}

fn expect_event(bus: &mut Bus, want: impl Fn(&ClientEvent) -> bool) -> ClientEvent {
    bus.pump();
    let events = bus.take_events();
    events
        .iter()
        .find(|e| want(e))
        .copied()
        .unwrap_or_else(|| panic!("missing event in {events:?}"))
}

#[test]
fn full_lifecycle_with_an_echo_device() {
    let mut bus = Bus::new(
        Version::LINUX_NEGOTIATION_ORDER.to_vec(),
        ServerConfig::default().versions,
    );
    let ram = Arc::new(ring_memfd("guest-ram", RAM_PAGES * 4096).unwrap());
    let bells = Arc::new(Bells::new());
    let mut vsp = EchoVsp {
        ram: ram.clone(),
        bells: bells.clone(),
        running: None,
        echoed: 0,
    };
    let echo_relid = bus.server.add_device(vsp.description()).unwrap();
    let other_relid = bus.server.add_device(device(2)).unwrap();

    // Connect and enumerate.
    bus.client.connect().unwrap();
    expect_event(&mut bus, |e| {
        matches!(
            e,
            ClientEvent::Connected {
                version: Version::Win10V5_3,
                ..
            }
        )
    });
    bus.client.request_offers().unwrap();
    bus.pump();
    let events = bus.take_events();
    let offered: Vec<u32> = events
        .iter()
        .filter_map(|e| match e {
            ClientEvent::Offer(o) => Some(o.relid),
            _ => None,
        })
        .collect();
    assert_eq!(offered, [echo_relid, other_relid]);
    assert_eq!(events.last(), Some(&ClientEvent::AllOffersDelivered));

    // A single-page GPADL (header only) and a 1,024-page one (header + 36 bodies), then the ring:
    // 64 pages scattered through RAM in reverse order, 32 per direction.
    let small = bus.client.create_gpadl(other_relid, &[7]).unwrap();
    let big_pfns: Vec<u64> = (1000..2024).collect();
    let big = bus.client.create_gpadl(other_relid, &big_pfns).unwrap();
    let ring_pfns: Vec<u64> = (0..64u64).map(|i| 900 - i * 3).collect();
    let ring_gpadl = bus.client.create_gpadl(echo_relid, &ring_pfns).unwrap();
    bus.pump();
    let created: Vec<(u32, u32)> = bus
        .take_events()
        .iter()
        .filter_map(|e| match *e {
            ClientEvent::GpadlCreated { handle, status, .. } => Some((handle, status)),
            _ => None,
        })
        .collect();
    assert_eq!(created, [(small, 0), (big, 0), (ring_gpadl, 0)]);
    assert_eq!(bus.server.gpadl(big).unwrap().pfns, big_pfns);

    // The guest initialises its rings' control pages before OPENCHANNEL, as Linux does.
    let (guest_up, guest_down) = map_rings(&ram, &ring_pfns, 32);
    init_control(&guest_up);
    init_control(&guest_down);
    bus.client
        .open_channel(echo_relid, OpenParams::new(ring_gpadl, 32, 1))
        .unwrap();
    bus.pump();
    let work = bus.take_work();
    let [HostAction::Open(info)] = &work[..] else {
        panic!("{work:?}")
    };
    assert_eq!(info.ring_pages, ring_pfns);
    let opened = vsp.open(info.clone(), &mut NoSubchannels).is_ok();
    bus.server.complete_open(echo_relid, opened).unwrap();
    expect_event(
        &mut bus,
        |e| matches!(e, ClientEvent::OpenResult { relid, status: 0 } if *relid == echo_relid),
    );

    // 1 M packets through the echo device, checked on the way back.
    const PACKETS: u64 = 1_000_000;
    let mut tx = Sender::new(
        RingWriter::new(guest_up).unwrap(),
        bells.up_data.try_clone().unwrap(),
        bells.up_space.try_clone().unwrap(),
    );
    let mut rx = Receiver::new(
        RingReader::new(guest_down).unwrap(),
        bells.down_space.try_clone().unwrap(),
        bells.down_data.try_clone().unwrap(),
    );
    let sender = std::thread::spawn(move || {
        for seq in 1..=PACKETS {
            let payload = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes();
            let tail = [seq as u8; 24];
            let parts: [&[u8]; 2] = [&payload, &tail[..(seq % 25) as usize]];
            tx.send(&OutgoingPacket::in_band(seq, true, &parts), TIMEOUT)
                .unwrap();
        }
    });
    let mut next = 1u64;
    let mut buf = [0u8; 40];
    let mut restored = false;
    while next <= PACKETS {
        if !restored && next > PACKETS / 2 {
            // Mid-I/O: save the bus, restore it into a fresh server and carry on with it (the
            // rings' positions live in guest memory, the device keeps running).
            let bytes = bus.server.save().to_bytes();
            let snap = ServerSnapshot::from_bytes(&bytes).unwrap();
            bus.server = Server::restore(
                bus.server.config().clone(),
                RamRanges(vec![(0, RAM_PAGES)]),
                snap,
            )
            .unwrap();
            assert_eq!(bus.server.open_info(echo_relid).as_ref(), Some(info));
            restored = true;
        }
        rx.recv_batch(64, TIMEOUT, |pkt| {
            assert_eq!(pkt.packet_type(), PacketType::Completion);
            assert_eq!(pkt.trans_id(), next);
            let len = 8 + (next % 25) as usize;
            assert_eq!(pkt.payload_len(), len.next_multiple_of(8));
            pkt.copy_payload(0, &mut buf[..len]).unwrap();
            assert_eq!(
                buf[..8],
                next.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes()
            );
            assert!(buf[8..len].iter().all(|&b| b == next as u8));
            next += 1;
        })
        .unwrap();
    }
    sender.join().unwrap();

    // Close: the host tells the device to stop, then the ring GPADL can be torn down.
    bus.client.close_channel(echo_relid).unwrap();
    bus.pump();
    assert_eq!(bus.take_work(), [HostAction::Close { relid: echo_relid }]);
    vsp.close(echo_relid);
    assert_eq!(vsp.echoed, PACKETS);
    bus.client.teardown_gpadl(echo_relid, ring_gpadl).unwrap();
    expect_event(
        &mut bus,
        |e| matches!(e, ClientEvent::GpadlTorndown { handle } if *handle == ring_gpadl),
    );

    // Hot remove and re-offer of the other device; its GPADLs go with the relid.
    bus.server.rescind(other_relid);
    expect_event(
        &mut bus,
        |e| matches!(e, ClientEvent::Rescinded { relid } if *relid == other_relid),
    );
    bus.client.release_relid(other_relid).unwrap();
    bus.pump();
    assert!(bus.server.gpadl(big).is_none());
    let again = bus.server.add_device(device(3)).unwrap();
    expect_event(
        &mut bus,
        |e| matches!(e, ClientEvent::Offer(o) if o.relid == again),
    );

    // Unload and reconnect: the devices are offered again.
    bus.client.unload().unwrap();
    expect_event(&mut bus, |e| matches!(e, ClientEvent::Unloaded));
    assert_eq!(bus.server.version(), None);
    bus.client.connect().unwrap();
    bus.pump();
    bus.client.request_offers().unwrap();
    bus.pump();
    let offers = bus
        .take_events()
        .iter()
        .filter(|e| matches!(e, ClientEvent::Offer(_)))
        .count();
    assert_eq!(offers, 2);
}

/// The same control-plane sequence, but every message crosses real SynIC message pages (slot
/// busy → pending → EOM) and ports: the guest posts with HvPostMessage semantics (status codes),
/// the host delivers into the guest's SINT 2 slot.
#[test]
fn control_plane_through_the_synic_port() {
    use vmbus_core::synic::local::{LocalConfig, pair};
    use vmbus_core::synic::{GuestPort, HostInbox, HostPort, PortKind, Sint};

    let (host, guests) = pair(LocalConfig {
        vps: 2,
        host_queue_depth: 8,
        ..LocalConfig::default()
    })
    .unwrap();
    // The host listens on message connection ids 1 and 4, as OpenVMM does.
    host.register_port(1, PortKind::Message).unwrap();
    host.register_port(4, PortKind::Message).unwrap();
    let mut client = Client::new(ClientConfig::default());
    let mut server = Server::new(
        ServerConfig {
            vp_count: 2,
            ..ServerConfig::default()
        },
        RamRanges(vec![(0, RAM_PAGES)]),
    );
    for n in 0..40 {
        server.add_device(device(n)).unwrap();
    }
    let guest = &guests[0];
    let mut events = Vec::new();
    // Host messages the SynIC queue had no room for: the VMM holds them (back-pressure) and
    // retries after the guest frees slots.
    let mut backlog: std::collections::VecDeque<(u32, u8, Vec<u8>)> = Default::default();
    let mut pump = |client: &mut Client, server: &mut Server, events: &mut Vec<ClientEvent>| {
        for _ in 0..10_000 {
            let mut moved = false;
            while let Some(p) = client.poll_post() {
                if let Err(status) = guest.post_message(p.connection_id, &p.msg) {
                    client.post_failed(status.code()).unwrap();
                }
                moved = true;
            }
            while let Some(m) = host.recv_message().unwrap() {
                let _ = server.handle_message(m.connection_id, &m.payload);
                moved = true;
            }
            while let Some(a) = server.poll_action() {
                if let HostAction::Send { vp, sint, msg } = a {
                    backlog.push_back((vp, sint, msg.to_vec()));
                }
            }
            while let Some((vp, sint, msg)) = backlog.front() {
                // Queued behind a busy slot is fine (delivered on the guest's EOM); a full queue
                // means wait.
                match host.post_to_guest(*vp, Sint::new(*sint).unwrap(), msg) {
                    Ok(_) => {
                        backlog.pop_front();
                        moved = true;
                    }
                    Err(vmbus_core::synic::SynicError::QueueFull { .. }) => break,
                    Err(e) => panic!("{e}"),
                }
            }
            while let Some(m) = guest.next_message(Sint::VMBUS) {
                client.handle_message(&m.unwrap().payload).unwrap();
                moved = true;
            }
            events.extend(core::iter::from_fn(|| client.poll_event()));
            if !moved {
                return;
            }
        }
        panic!("the bus never went quiet");
    };
    client.connect().unwrap();
    pump(&mut client, &mut server, &mut events);
    assert!(
        matches!(
            events[..],
            [ClientEvent::Connected {
                version: Version::Win10V5_3,
                ..
            }]
        ),
        "{events:?}"
    );
    // 40 offers + ALLOFFERS through a slot that is busy most of the time (queue depth 8).
    client.request_offers().unwrap();
    pump(&mut client, &mut server, &mut events);
    let offers = events
        .iter()
        .filter(|e| matches!(e, ClientEvent::Offer(_)))
        .count();
    assert_eq!(offers, 40);
    assert_eq!(events.last(), Some(&ClientEvent::AllOffersDelivered));
    // A multi-body GPADL, then unload.
    events.clear();
    let pfns: Vec<u64> = (10..300).collect();
    let handle = client.create_gpadl(1, &pfns).unwrap();
    pump(&mut client, &mut server, &mut events);
    assert!(
        events.contains(&ClientEvent::GpadlCreated {
            relid: 1,
            handle,
            status: 0
        }),
        "{events:?}"
    );
    client.unload().unwrap();
    pump(&mut client, &mut server, &mut events);
    assert!(events.contains(&ClientEvent::Unloaded));
    // A post to a connection id nobody listens on fails with HV_STATUS_INVALID_CONNECTION_ID.
    assert_eq!(guest.post_message(9, &[0u8; 16]).unwrap_err().code(), 0x12);
}
