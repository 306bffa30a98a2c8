//! Network data-path benchmark: the netvsc guest driver (vsc-guest harness) → netvsp → virtual
//! switch, against baselines measured in the same run.
//!
//! - `net64`: 64-byte frames/s from one harness guest to another through netvsp + switch + netvsp,
//!   divided by 64-byte packets/s through one raw VMBus ring (memfd-mapped, eventfd-signalled,
//!   writer and reader threads) — the transport alone.
//! - `net1500`: 1514-byte Ethernet frames (IPv4/UDP, 1472-byte payload) from a harness guest through
//!   netvsp + switch + TAP uplink into a network namespace, counted by a UDP socket there, divided
//!   by the same frames written with an AF_PACKET socket into one end of a veth pair whose other end
//!   is in the same namespace (same generator, same sink). Skipped without root / TUN / `ip`.
//!
//! `--quick` keeps the whole run under 60 s. The last lines are `RESULT net64 ratio_vs_ring=X` and
//! `RESULT net1500 gbps=G ratio_vs_veth=Y`.
#![allow(clippy::unwrap_used)] // a benchmark binary: any failure is fatal and reported

use ringbuf::mmap::{MappedRing, ring_memfd};
use ringbuf::signal::{ChannelError, Doorbell, Receiver, Sender};
use ringbuf::{OutgoingPacket, RingReader, RingWriter, init_control};
use std::net::UdpSocket;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use vmbus_core::wire::Guid;
use vsc_guest::net_harness::{DeviceResources, HarnessError, NetVm, VmConfig, VmbusDevice};
use vsc_guest::netvsc::{SendError, TxMeta};
use vsp_net::backend::NetBackend;
use vsp_net::netvsp::{ChannelRings, Netvsp, NetvspConfig, NetvspResources};
use vsp_net::switch::uplink::{TapUplink, UplinkOptions};
use vsp_net::switch::{PortConfig, Switch, SwitchConfig};
use vsp_net::tap::netns::{netns_path, run_in_netns};
use vsp_net::tap::{Tap, TapConfig};

const MAC_A: [u8; 6] = [0x02, 0x15, 0x5d, 0x50, 0x00, 0x01];
const MAC_B: [u8; 6] = [0x02, 0x15, 0x5d, 0x50, 0x00, 0x02];
const SINK_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0xaa];
const SINK_IP: [u8; 4] = [10, 96, 0, 1];
const SRC_IP: [u8; 4] = [10, 96, 0, 2];
const SINK_PORT: u16 = 9000;

fn netvsp(
    res: DeviceResources,
    backend: Box<dyn NetBackend>,
    tag: u128,
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
    let cfg = NetvspConfig {
        instance: Guid::from_u128(0xbe9c_0000 + tag),
        max_queues: 1,
        ..NetvspConfig::default()
    };
    let mut dev = Netvsp::new(cfg, backend, resources)?;
    dev.spawn_worker()?;
    Ok(Box::new(dev))
}

fn switch_vm(switch: &Switch, name: &str, mac: [u8; 6]) -> NetVm {
    let port = switch.add_port(PortConfig::nic(name, mac)).unwrap();
    let tag = u128::from(mac[5]);
    let mut vm = NetVm::in_process(VmConfig::default(), move |res| {
        netvsp(res, Box::new(port), tag)
    })
    .unwrap();
    vm.bring_up().unwrap();
    vm
}

/// Sends `frame` as fast as the driver takes it (batches of 32 per send section run) until `stop`.
fn blast(vm: &mut NetVm, frame: &[u8], stop: &AtomicBool) -> u64 {
    let meta = TxMeta::default();
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let mut n = 0;
        for i in 0..32 {
            match vm.driver.send(0, frame, &meta, i < 31) {
                Ok(()) => n += 1,
                Err(SendError::Busy) => break,
                Err(e) => panic!("send: {e}"),
            }
        }
        vm.driver.flush(0);
        sent += n;
        let moved = vm.service().unwrap();
        if n == 0 && !moved {
            vm.wait(Duration::from_micros(200));
        }
    }
    sent
}

/// Packets/s of 64-byte in-band packets through one ring (writer → reader threads).
fn ring_baseline(secs: f64) -> f64 {
    let pages = 128usize;
    let ram = ring_memfd("netbench-ring", (pages * 4096) as u64).unwrap();
    let offsets: Vec<u64> = (0..pages as u64).map(|p| p * 4096).collect();
    let map = || MappedRing::map_pages(ram.as_fd(), &offsets).unwrap();
    let (w, r) = (map(), map());
    init_control(&w);
    let (data, space) = (Doorbell::new().unwrap(), Doorbell::new().unwrap());
    let mut tx = Sender::new(
        RingWriter::new(w).unwrap(),
        data.try_clone().unwrap(),
        space.try_clone().unwrap(),
    );
    let mut rx = Receiver::new(RingReader::new(r).unwrap(), space, data);
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let writer = std::thread::spawn(move || {
        let payload = [0x5au8; 64];
        let parts: [&[u8]; 1] = [&payload];
        let pkts: Vec<OutgoingPacket<'_>> = (0..32)
            .map(|i| OutgoingPacket::in_band(i, false, &parts))
            .collect();
        while !s2.load(Ordering::Relaxed) {
            match tx.send_all(&pkts, Some(Duration::from_millis(100))) {
                Ok(()) | Err(ChannelError::TimedOut) => {}
                Err(e) => panic!("ring send: {e}"),
            }
        }
    });
    let t0 = Instant::now();
    let mut count = 0u64;
    let mut buf = [0u8; 64];
    while t0.elapsed().as_secs_f64() < secs {
        match rx.recv_batch(256, Some(Duration::from_millis(100)), |p| {
            p.copy_payload(0, &mut buf).unwrap();
            count += 1;
        }) {
            Ok(_) | Err(ChannelError::TimedOut) => {}
            Err(e) => panic!("ring receive: {e}"),
        }
    }
    let rate = count as f64 / t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    rate
}

/// 64-byte frames/s from guest A to guest B through netvsp + switch + netvsp.
fn net64(secs: f64) -> (f64, u64) {
    let switch = Switch::new(SwitchConfig::default());
    let mut a = switch_vm(&switch, "a", MAC_A);
    let mut b = switch_vm(&switch, "b", MAC_B);
    let mut frame = MAC_B.to_vec();
    frame.extend_from_slice(&MAC_A);
    frame.extend_from_slice(&[0x88, 0xB5]);
    frame.resize(64, 0x11);
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let sender = std::thread::spawn(move || (blast(&mut a, &frame, &s2), a));
    let warm = Instant::now() + Duration::from_millis(300);
    let mut count = 0u64;
    let mut t0 = None;
    loop {
        let moved = b.service().unwrap();
        while b.driver.poll_receive().is_some() {
            if t0.is_some() {
                count += 1;
            }
        }
        match t0 {
            None if Instant::now() > warm => t0 = Some(Instant::now()),
            Some(t) if t.elapsed().as_secs_f64() >= secs => break,
            _ => {}
        }
        if !moved {
            b.wait(Duration::from_micros(200));
        }
    }
    let rate = count as f64 / t0.map_or(1.0, |t| t.elapsed().as_secs_f64());
    stop.store(true, Ordering::Relaxed);
    let (sent, _a) = sender.join().unwrap();
    (rate, sent)
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn checksum(b: &[u8]) -> u16 {
    let mut acc: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while acc >> 16 != 0 {
        acc = (acc & 0xFFFF) + (acc >> 16);
    }
    !(acc as u16)
}

/// The generator: a 1514-byte Ethernet/IPv4/UDP frame to the sink (UDP checksum 0 = none).
fn udp_frame(src_mac: [u8; 6]) -> Vec<u8> {
    let mut f = SINK_MAC.to_vec();
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = vec![0x45, 0, 0x05, 0xdc, 0, 0, 0x40, 0, 64, 17, 0, 0];
    ip.extend_from_slice(&SRC_IP);
    ip.extend_from_slice(&SINK_IP);
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&4000u16.to_be_bytes());
    f.extend_from_slice(&SINK_PORT.to_be_bytes());
    f.extend_from_slice(&1480u16.to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.resize(1514, 0x77);
    f
}

/// The sink: a UDP socket in the namespace counting datagrams until `stop`.
fn sink(
    sock: UdpSocket,
    count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !stop.load(Ordering::Relaxed) {
            if sock.recv(&mut buf).is_ok() {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
    })
}

/// Frames/s reaching the sink while `generate` runs in another thread for `secs` (after warm-up).
fn measure(count: &AtomicU64, secs: f64, generate: impl FnOnce(Arc<AtomicBool>) + Send) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    std::thread::scope(|s| {
        let st = stop.clone();
        s.spawn(move || generate(st));
        std::thread::sleep(Duration::from_millis(300));
        let (c0, t0) = (count.load(Ordering::Relaxed), Instant::now());
        std::thread::sleep(Duration::from_secs_f64(secs));
        let rate = (count.load(Ordering::Relaxed) - c0) as f64 / t0.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        rate
    })
}

fn packet_socket(ifname: &str) -> OwnedFd {
    // SAFETY: socket(2); the descriptor is owned by the OwnedFd below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
    // SAFETY: fresh descriptor, owned only here.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(ifname).unwrap();
    // SAFETY: NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert!(index > 0, "no interface {ifname}");
    // SAFETY: zeroed sockaddr_ll is valid; fields set below.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = index as i32;
    // SAFETY: address valid for its size.
    let r = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "bind AF_PACKET: {}", std::io::Error::last_os_error());
    sock
}

struct Ns(String);

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// (our frames/s, veth frames/s) for 1514-byte frames into a namespace.
fn net1500(secs: f64) -> Result<(f64, f64), String> {
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
    if !root || !std::path::Path::new("/dev/net/tun").exists() {
        return Err("needs root and /dev/net/tun".into());
    }
    let pid = std::process::id() % 100_000;
    let (sink_ns, gen_ns) = (Ns(format!("nbs{pid}")), Ns(format!("nbg{pid}")));
    for ns in [&sink_ns.0, &gen_ns.0] {
        ip(&["netns", "add", ns])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
    }
    let s = sink_ns.0.as_str();
    let mac = SINK_MAC.map(|b| format!("{b:02x}")).join(":");
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let sock = run_in_netns(&netns_path(s), || UdpSocket::bind(("0.0.0.0", SINK_PORT)))
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let sink_thread = sink(sock, count.clone(), stop.clone());

    // Baseline: AF_PACKET into veth (generator namespace) → peer end in the sink namespace.
    let (vg, vs) = (format!("nbvg{pid}"), format!("nbvs{pid}"));
    ip(&["link", "add", &vg, "type", "veth", "peer", "name", &vs])?;
    ip(&["link", "set", &vg, "netns", &gen_ns.0])?;
    ip(&["link", "set", &vs, "netns", s])?;
    ip(&["-n", s, "link", "set", &vs, "address", &mac])?;
    ip(&["-n", s, "addr", "add", "10.96.0.1/24", "dev", &vs])?;
    ip(&["-n", s, "link", "set", &vs, "up"])?;
    ip(&["-n", &gen_ns.0, "link", "set", &vg, "up"])?;
    let psock =
        run_in_netns(&netns_path(&gen_ns.0), || packet_socket(&vg)).map_err(|e| e.to_string())?;
    let frame = udp_frame([0x02, 0, 0, 0, 0, 0xbb]);
    let veth = measure(&count, secs, |stop| {
        while !stop.load(Ordering::Relaxed) {
            // SAFETY: frame buffer valid for its length.
            unsafe { libc::send(psock.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        }
    });
    ip(&["-n", s, "link", "del", &vs])?;

    // Ours: guest → netvsp → switch → TAP uplink in the sink namespace.
    let tname = format!("nbt{pid}");
    let tap = Tap::open(&TapConfig {
        netns: Some(netns_path(s)),
        up: true,
        ..TapConfig::named(&tname)
    })
    .map_err(|e| e.to_string())?;
    ip(&["-n", s, "link", "set", &tname, "address", &mac])?;
    ip(&["-n", s, "addr", "add", "10.96.0.1/24", "dev", &tname])?;
    let switch = Switch::new(SwitchConfig::default());
    let port = switch.add_port(PortConfig::uplink(&tname)).unwrap();
    let uplink =
        TapUplink::spawn(tap, port, UplinkOptions::default()).map_err(|e| e.to_string())?;
    let mut vm = switch_vm(&switch, "guest", MAC_A);
    let frame = udp_frame(MAC_A);
    let ours = measure(&count, secs, |stop| {
        blast(&mut vm, &frame, &stop);
    });
    drop(uplink);
    stop.store(true, Ordering::Relaxed);
    sink_thread.join().unwrap();
    Ok((ours, veth))
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let secs = if quick { 3.0 } else { 10.0 };
    println!(
        "netbench ({} mode, {secs} s per measurement)",
        if quick { "quick" } else { "full" }
    );
    let ring = ring_baseline(secs);
    println!("ring     64-byte packets/s through one VMBus ring (writer -> reader): {ring:>12.0}");
    let (ours, sent) = net64(secs);
    println!(
        "net64    64-byte frames/s guest -> netvsp -> switch -> netvsp -> guest: {ours:>12.0} (sender offered {sent} frames)"
    );
    let ratio64 = ours / ring;
    let line1500 = match net1500(secs) {
        Ok((ours, veth)) => {
            let gbps = ours * 1514.0 * 8.0 / 1e9;
            println!(
                "veth     1514-byte frames/s AF_PACKET -> veth -> namespace UDP socket: {veth:>10.0} ({:.2} Gbit/s)",
                veth * 1514.0 * 8.0 / 1e9
            );
            println!(
                "net1500  1514-byte frames/s guest -> netvsp -> switch -> TAP -> namespace UDP socket: {ours:>10.0} ({gbps:.2} Gbit/s)"
            );
            format!(
                "RESULT net1500 gbps={gbps:.3} ratio_vs_veth={:.3}",
                ours / veth
            )
        }
        Err(why) => {
            println!("net1500 skipped: {why}");
            "RESULT net1500 skipped".to_string()
        }
    };
    println!("RESULT net64 ratio_vs_ring={ratio64:.3} frames_per_s={ours:.0} ring_per_s={ring:.0}");
    println!("{line1500}");
}
