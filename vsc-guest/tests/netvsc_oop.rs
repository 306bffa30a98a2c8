//! The netvsc driver against a netvsp running in another process: this test binary re-run as a
//! child by `vmbus_core::oop::Supervisor`, serving netvsp through `serve`. In the child, netvsp's
//! backend is a switch port; a smoltcp "peer" on another port of that switch answers pings and
//! echoes TCP. The guest (this process) pings it and moves 1 MiB each way over TCP.
#![allow(clippy::unwrap_used)]

mod netvsc_common;

use netvsc_common::*;
use ringbuf::mmap::MappedRing;
use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::wire::{EthernetAddress, IpAddress, IpCidr};
use std::collections::VecDeque;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmbus_core::device::{ChannelControl, DeviceDescription, DeviceError, VmbusDevice};
use vmbus_core::memory::GuestMemory;
use vmbus_core::oop::{ChannelResources, HostedDevice, connection_from_env, serve};
use vmbus_core::wire::{Guid, class};
use vsc_guest::net_harness::smol::SmolStack;
use vsc_guest::net_harness::{GPADL_TABLE_ENV, GpadlSideTable, NetVm, VmConfig};
use vsp_net::netvsp::{ChannelRings, Netvsp, NetvspConfig, NetvspResources};
use vsp_net::switch::{PortConfig, PortHandle, Switch, SwitchConfig};
use vsp_net::tap::FrameMeta;

const GUEST_MAC: [u8; 6] = [0x00, 0x15, 0x5d, 0x30, 0x00, 0x01];
const PEER_MAC: [u8; 6] = [0x00, 0x15, 0x5d, 0x30, 0x00, 0x02];
const GUEST_IP: [u8; 4] = [10, 98, 0, 1];
const PEER_IP: [u8; 4] = [10, 98, 0, 2];
const INSTANCE: u128 = 0x00c0_ffee_0000_0000_0000_0000_0000_0007;

type Rings = (
    MappedRing,
    MappedRing,
    ringbuf::signal::Doorbell,
    ringbuf::signal::Doorbell,
);

/// netvsp behind the VSP-process trait: built at the first open (guest memory arrives with it).
struct HostedNetvsp {
    dev: Option<Netvsp<MappedRing>>,
    port: Option<PortHandle>,
    stash: Arc<Mutex<Option<Rings>>>,
    table: u64,
}

struct NoSubchannels;

impl ChannelControl for NoSubchannels {
    fn offer_subchannels(&mut self, _: u16) -> u16 {
        0
    }
}

impl HostedDevice for HostedNetvsp {
    fn open(
        &mut self,
        ch: ChannelResources,
        bus: &mut dyn ChannelControl,
    ) -> Result<(), DeviceError> {
        if self.dev.is_none() {
            let mem: Arc<dyn GuestMemory> = ch.memory.clone();
            let lookup_mem = mem.clone();
            let table = self.table;
            let stash = self.stash.clone();
            let res = NetvspResources {
                memory: mem,
                gpadls: Arc::new(move |h| GpadlSideTable::lookup(lookup_mem.as_ref(), table, h)),
                map_rings: Box::new(move |_| {
                    let (inbound, outbound, kick, call) = stash
                        .lock()
                        .unwrap()
                        .take()
                        .ok_or(DeviceError::NoResources)?;
                    Ok(ChannelRings {
                        inbound,
                        outbound,
                        kick: Some(kick),
                        call: Some(call),
                    })
                }),
                subchannels: Box::new(NoSubchannels),
            };
            let cfg = NetvspConfig {
                instance: Guid::from_u128(INSTANCE),
                max_queues: 1,
                ..NetvspConfig::default()
            };
            let port = self.port.take().ok_or(DeviceError::NoResources)?;
            let mut dev = Netvsp::new(cfg, Box::new(port), res)
                .map_err(|e| DeviceError::RingMapping(e.to_string()))?;
            dev.spawn_worker()
                .map_err(|e| DeviceError::RingMapping(e.to_string()))?;
            self.dev = Some(dev);
        }
        *self.stash.lock().unwrap() = Some((ch.incoming, ch.outgoing, ch.kick, ch.call));
        let dev = self.dev.as_mut().ok_or(DeviceError::NoResources)?;
        VmbusDevice::open(dev, ch.info, bus)
    }

    fn close(&mut self, relid: u32) {
        if let Some(d) = self.dev.as_mut() {
            VmbusDevice::close(d, relid);
        }
    }
}

/// smoltcp on a switch port (the peer inside the VSP process).
struct PortNic {
    port: PortHandle,
    queue: VecDeque<Vec<u8>>,
}

struct Rx(Vec<u8>);
struct Tx<'a>(&'a mut PortHandle);

impl phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0; len];
        let r = f(&mut buf);
        self.0.send(&buf, &FrameMeta::default());
        r
    }
}

impl Device for PortNic {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _: smoltcp::time::Instant) -> Option<(Rx, Tx<'_>)> {
        if self.queue.is_empty() {
            let q = &mut self.queue;
            self.port
                .poll_recv_with(64, true, true, &mut |f, _| q.push_back(f.to_vec()));
        }
        let f = self.queue.pop_front()?;
        Some((Rx(f), Tx(&mut self.port)))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.port))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = 1514;
        c
    }
}

/// The peer: answers pings, echoes every TCP connection on port 7000.
fn run_peer(port: PortHandle) {
    let mut nic = PortNic {
        port,
        queue: VecDeque::new(),
    };
    let start = Instant::now();
    let now = || smoltcp::time::Instant::from_micros(start.elapsed().as_micros() as i64);
    let mut iface = Interface::new(
        Config::new(EthernetAddress(PEER_MAC).into()),
        &mut nic,
        now(),
    );
    iface.update_ip_addrs(|a| {
        let _ = a.push(IpCidr::new(
            IpAddress::v4(PEER_IP[0], PEER_IP[1], PEER_IP[2], PEER_IP[3]),
            24,
        ));
    });
    let mut sockets = SocketSet::new(Vec::new());
    let h = sockets.add(tcp_socket(256 * 1024));
    let mut carry: Vec<u8> = Vec::new();
    loop {
        iface.poll(now(), &mut nic, &mut sockets);
        let s = sockets.get_mut::<tcp::Socket>(h);
        if !s.is_open() {
            s.listen(7000).unwrap();
        }
        if s.can_recv() && carry.len() < 65536 {
            s.recv(|b| {
                carry.extend_from_slice(b);
                (b.len(), ())
            })
            .unwrap();
        }
        if s.can_send() && !carry.is_empty() {
            let n = s.send_slice(&carry).unwrap();
            carry.drain(..n);
        }
        if !s.may_recv() && carry.is_empty() && s.state() == tcp::State::CloseWait {
            s.close();
        }
        let d = iface
            .poll_delay(now(), &sockets)
            .map_or(Duration::from_millis(5), |d| {
                Duration::from_micros(d.total_micros()).min(Duration::from_millis(5))
            });
        nic.port.wait(Some(d));
    }
}

/// The VSP process: serves until the VMM hangs up (or the process is killed).
#[test]
fn netvsp_child() {
    // SAFETY: the supervisor passed this socket to this process only; it is taken once, here.
    let Some(conn) = (unsafe { connection_from_env() }) else {
        return;
    };
    let table: u64 = std::env::var(GPADL_TABLE_ENV).unwrap().parse().unwrap();
    let switch = Switch::new(SwitchConfig::default());
    let port = switch
        .add_port(PortConfig::nic("guest", GUEST_MAC))
        .unwrap();
    let peer = switch.add_port(PortConfig::nic("peer", PEER_MAC)).unwrap();
    std::thread::spawn(move || run_peer(peer));
    let mut dev = HostedNetvsp {
        dev: None,
        port: Some(port),
        stash: Arc::default(),
        table,
    };
    serve(&conn, &mut dev).unwrap();
}

#[test]
fn guest_talks_to_a_netvsp_in_another_process() {
    let mut desc = DeviceDescription::new(class::NETWORK, Guid::from_u128(INSTANCE));
    desc.max_subchannels = 0;
    let mut vm = NetVm::in_child(VmConfig::default(), desc, || {
        let mut c = Command::new(std::env::current_exe().unwrap());
        c.args(["--exact", "netvsp_child", "--nocapture", "--test-threads=1"])
            .stdout(Stdio::null());
        c
    })
    .unwrap();
    vm.bring_up().unwrap();
    assert_eq!(vm.driver.info().mac, GUEST_MAC);
    let mut g = SmolStack::new(vm, GUEST_IP, 24);
    let rtt = ping(&mut [&mut g], 0, PEER_IP, 1, Duration::from_secs(30));
    eprintln!("ping across processes: {rtt:?}");
    // 1 MiB out, the same 1 MiB echoed back.
    let data = pattern(1 << 20, 0x0f);
    let ch = g.sockets.add(tcp_socket(256 * 1024));
    let cx = g.iface.context();
    g.sockets
        .get_mut::<tcp::Socket>(ch)
        .connect(cx, (IpAddress::v4(10, 98, 0, 2), 7000), 45000)
        .unwrap();
    let (mut sent, mut back) = (0usize, Vec::with_capacity(data.len()));
    let t0 = Instant::now();
    run(&mut [&mut g], Duration::from_secs(60), |st| {
        let s = st[0].sockets.get_mut::<tcp::Socket>(ch);
        if s.can_send() && sent < data.len() {
            sent += s.send_slice(&data[sent..]).unwrap();
        }
        while s.can_recv() {
            s.recv(|b| {
                back.extend_from_slice(b);
                (b.len(), ())
            })
            .unwrap();
        }
        back.len() >= data.len()
    });
    eprintln!("1 MiB echoed across processes in {:?}", t0.elapsed());
    assert!(back == data, "echoed data differs");
    assert_eq!(g.vm.driver.stats().bad_packets, 0, "{:?}", g.vm.refused);
}
