//! Shared pieces of the netvsc end-to-end tests: harness VMs whose device is a real netvsp, attached
//! to a virtual-switch port or a memory backend, and smoltcp helpers.
#![allow(dead_code, clippy::unwrap_used)]

use smoltcp::iface::SocketHandle;
use smoltcp::socket::{icmp, tcp};
use smoltcp::wire::{Icmpv4Packet, Icmpv4Repr, IpAddress};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmbus_core::wire::Guid;
use vsc_guest::net_harness::smol::SmolStack;
use vsc_guest::net_harness::{DeviceResources, HarnessError, NetVm, VmConfig, VmbusDevice};
use vsp_net::backend::NetBackend;
use vsp_net::netvsp::{ChannelRings, Netvsp, NetvspConfig, NetvspResources};
use vsp_net::switch::{PortConfig, Switch};

/// A netvsp over `backend`, serving the harness VM's rings with its own worker thread.
pub fn netvsp(
    res: DeviceResources,
    cfg: NetvspConfig,
    backend: Box<dyn NetBackend>,
) -> Result<Box<dyn VmbusDevice + Send>, HarnessError> {
    let mapper = res.clone();
    let resources = NetvspResources {
        memory: res.memory.clone(),
        gpadls: Arc::new(res.gpadl_lookup()),
        map_rings: Box::new(move |info| {
            let m = mapper.map_channel(info)?;
            Ok(ChannelRings {
                inbound: m.inbound,
                outbound: m.outbound,
                kick: Some(m.kick),
                call: Some(m.call),
            })
        }),
        subchannels: Box::new(res.subchannel_control()),
    };
    let mut dev = Netvsp::new(cfg, backend, resources)?;
    dev.spawn_worker()?;
    Ok(Box::new(dev))
}

/// A VM whose NIC is netvsp on a new port of `switch` with `mac`, brought up.
pub fn switch_vm(switch: &Switch, name: &str, mac: [u8; 6], queues: u16) -> NetVm {
    let port = switch.add_port(PortConfig::nic(name, mac)).unwrap();
    let cfg = VmConfig {
        queues,
        ..VmConfig::default()
    };
    let mut vm = NetVm::in_process(cfg, move |res| {
        let ncfg = NetvspConfig {
            instance: Guid::from_u128(0x5eed_0000 + u128::from(mac[5])),
            max_queues: queues.max(1),
            ..NetvspConfig::default()
        };
        netvsp(res, ncfg, Box::new(port))
    })
    .unwrap();
    vm.bring_up().unwrap();
    vm
}

/// Polls every stack until `done` or the timeout; panics on timeout.
pub fn run(
    stacks: &mut [&mut SmolStack],
    timeout: Duration,
    mut done: impl FnMut(&mut [&mut SmolStack]) -> bool,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let mut moved = false;
        for s in stacks.iter_mut() {
            moved |= s.poll().unwrap();
        }
        if done(stacks) {
            return;
        }
        assert!(Instant::now() < deadline, "timed out");
        if !moved {
            let d = stacks[0].delay(Duration::from_millis(1));
            stacks[0].vm.wait(d.max(Duration::from_micros(100)));
        }
    }
}

/// Sends one ICMP echo request from `s` to `dst` and waits for the reply; returns the round trip.
pub fn ping(
    stacks: &mut [&mut SmolStack],
    from: usize,
    dst: [u8; 4],
    seq: u16,
    timeout: Duration,
) -> Duration {
    let rx = icmp::PacketBuffer::new(vec![icmp::PacketMetadata::EMPTY; 8], vec![0; 4096]);
    let tx = icmp::PacketBuffer::new(vec![icmp::PacketMetadata::EMPTY; 8], vec![0; 4096]);
    let mut sock = icmp::Socket::new(rx, tx);
    sock.bind(icmp::Endpoint::Ident(0x4242)).unwrap();
    let h: SocketHandle = stacks[from].sockets.add(sock);
    let dst = IpAddress::v4(dst[0], dst[1], dst[2], dst[3]);
    let payload = b"netvsc harness ping";
    let t0 = Instant::now();
    let mut sent = false;
    let mut got = false;
    run(stacks, timeout, |st| {
        let caps = smoltcp::phy::ChecksumCapabilities::default();
        let s = st[from].sockets.get_mut::<icmp::Socket>(h);
        if !sent && s.can_send() {
            let repr = Icmpv4Repr::EchoRequest {
                ident: 0x4242,
                seq_no: seq,
                data: payload,
            };
            let buf = s.send(repr.buffer_len(), dst).unwrap();
            repr.emit(&mut Icmpv4Packet::new_unchecked(buf), &caps);
            sent = true;
        }
        while s.can_recv() {
            let (data, _) = s.recv().unwrap();
            let pkt = Icmpv4Packet::new_checked(data).unwrap();
            if let Ok(Icmpv4Repr::EchoReply { seq_no, data, .. }) = Icmpv4Repr::parse(&pkt, &caps)
                && seq_no == seq
            {
                assert_eq!(data, payload);
                got = true;
            }
        }
        got
    });
    stacks[from].sockets.remove(h);
    t0.elapsed()
}

/// A TCP socket with `buf`-byte buffers.
pub fn tcp_socket(buf: usize) -> tcp::Socket<'static> {
    tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; buf]),
        tcp::SocketBuffer::new(vec![0; buf]),
    )
}

/// Deterministic test data.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Moves `data` over TCP from stack `from` to stack `to` (listening on `port` at `to_ip`); returns
/// what arrived and how long it took.
pub fn tcp_transfer(
    stacks: &mut [&mut SmolStack],
    from: usize,
    to: usize,
    to_ip: [u8; 4],
    port: u16,
    data: &[u8],
    timeout: Duration,
) -> (Vec<u8>, Duration) {
    let mut server = tcp_socket(256 * 1024);
    server.listen(port).unwrap();
    let sh = stacks[to].sockets.add(server);
    let ch = stacks[from].sockets.add(tcp_socket(256 * 1024));
    {
        let st = &mut *stacks[from];
        let cx = st.iface.context();
        st.sockets
            .get_mut::<tcp::Socket>(ch)
            .connect(
                cx,
                (IpAddress::v4(to_ip[0], to_ip[1], to_ip[2], to_ip[3]), port),
                40000 + port,
            )
            .unwrap();
    }
    let t0 = Instant::now();
    let mut sent = 0usize;
    let mut got = Vec::with_capacity(data.len());
    let mut closed = false;
    run(stacks, timeout, |st| {
        let c = st[from].sockets.get_mut::<tcp::Socket>(ch);
        if c.can_send() && sent < data.len() {
            sent += c.send_slice(&data[sent..]).unwrap();
        }
        if sent == data.len() && !closed {
            c.close();
            closed = true;
        }
        let s = st[to].sockets.get_mut::<tcp::Socket>(sh);
        while s.can_recv() {
            s.recv(|b| {
                got.extend_from_slice(b);
                (b.len(), ())
            })
            .unwrap();
        }
        got.len() >= data.len()
    });
    let elapsed = t0.elapsed();
    stacks[from].sockets.remove(ch);
    stacks[to].sockets.remove(sh);
    (got, elapsed)
}

/// A minimal Ethernet/IPv4/TCP frame (valid IPv4 header checksum, TCP checksum 0).
pub fn ipv4_tcp_frame(
    dst: [u8; 6],
    src: [u8; 6],
    sip: [u8; 4],
    dip: [u8; 4],
    sport: u16,
    dport: u16,
) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = vec![0x45, 0, 0, 44, 0, 0, 0x40, 0, 64, 6, 0, 0];
    ip.extend_from_slice(&sip);
    ip.extend_from_slice(&dip);
    let mut acc: u32 = ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while acc >> 16 != 0 {
        acc = (acc & 0xFFFF) + (acc >> 16);
    }
    ip[10..12].copy_from_slice(&(!(acc as u16)).to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0]);
    f.extend_from_slice(&[0xab; 4]);
    f
}
