//! A harness guest and the Linux kernel: the guest's netvsp sits on a virtual switch whose uplink is
//! a TAP inside a network namespace this test creates. The kernel pings the guest, the guest pings
//! the kernel, then 1 MiB goes guest → kernel over TCP and 1 MiB comes back (kernel TSO frames are
//! segmented for the guest, the guest's TCP checksums are left to the host). Needs root,
//! /dev/net/tun and `ip`; prints why and skips otherwise.
#![allow(clippy::unwrap_used)]

mod netvsc_common;

use netvsc_common::*;
use smoltcp::socket::tcp;
use smoltcp::wire::IpAddress;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};
use vsc_guest::net_harness::smol::SmolStack;
use vsp_net::switch::uplink::{TapUplink, UplinkOptions};
use vsp_net::switch::{PortConfig, Switch, SwitchConfig};
use vsp_net::tap::netns::{netns_path, run_in_netns};
use vsp_net::tap::{Tap, TapConfig};

/// Why this test cannot run here, if it cannot (vsp-net's TAP tests check the same things; their
/// helpers are private to that crate's tests).
fn skip_reason() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        == Some("0");
    if !root {
        return Some("needs root".into());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("the `ip` command (iproute2) is not available".into()),
    }
}

/// A network namespace, deleted on drop (also on panic).
struct NetNs {
    name: String,
}

impl NetNs {
    fn new() -> Self {
        let name = format!("nvsc{}", std::process::id() % 100_000);
        ip(&["netns", "add", &name]);
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    fn ip(&self, args: &[&str]) {
        let mut v = vec!["-n", self.name.as_str()];
        v.extend_from_slice(args);
        ip(&v);
    }

    fn path(&self) -> std::path::PathBuf {
        netns_path(&self.name)
    }

    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        run_in_netns(&self.path(), f).unwrap()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A raw ICMP socket (the namespace's kernel pinging; no `ping` binary needed).
fn raw_icmp_socket() -> OwnedFd {
    // SAFETY: plain socket(2); the descriptor is owned by the returned OwnedFd.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMP,
        )
    };
    assert!(
        fd >= 0,
        "raw ICMP socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fd is a fresh descriptor nobody else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn icmp_checksum(b: &[u8]) -> u16 {
    let mut acc: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while acc >> 16 != 0 {
        acc = (acc & 0xFFFF) + (acc >> 16);
    }
    !(acc as u16)
}

/// Sends `count` echo requests from the kernel to `dst` and waits for each reply.
fn kernel_ping(sock: &OwnedFd, dst: [u8; 4], count: u16) -> Vec<Duration> {
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(dst),
        },
        sin_zero: [0; 8],
    };
    let tv = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: valid option buffer of the right size for SO_RCVTIMEO.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    let mut rtts = Vec::new();
    for seq in 1..=count {
        let mut req = vec![8u8, 0, 0, 0, 0x12, 0x34, (seq >> 8) as u8, seq as u8];
        req.extend_from_slice(b"kernel to netvsc guest");
        let c = icmp_checksum(&req);
        req[2..4].copy_from_slice(&c.to_be_bytes());
        let t0 = Instant::now();
        // SAFETY: buffer and address are valid for the call.
        let n = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                req.as_ptr().cast(),
                req.len(),
                0,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        assert_eq!(
            n,
            req.len() as isize,
            "sendto: {}",
            std::io::Error::last_os_error()
        );
        loop {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "no echo reply for seq {seq}"
            );
            let mut buf = [0u8; 2048];
            // SAFETY: buffer valid for its length.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 28 {
                continue;
            }
            let ihl = usize::from(buf[0] & 0xF) * 4;
            let icmp = &buf[ihl..n as usize];
            if buf[12..16] == dst && icmp[0] == 0 && icmp[4..8] == req[4..8] {
                assert_eq!(icmp[8..], req[8..]);
                assert_eq!(icmp_checksum(icmp), 0);
                rtts.push(t0.elapsed());
                break;
            }
        }
    }
    rtts
}

const GUEST_MAC: [u8; 6] = [0x00, 0x15, 0x5d, 0x40, 0x00, 0x02];
const T: Duration = Duration::from_secs(60);

#[test]
fn guest_and_kernel_ping_and_move_a_mebibyte_each_way() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIP guest_and_kernel_ping_and_move_a_mebibyte_each_way: {why}");
        return;
    }
    let ns = NetNs::new();
    let name = format!("nvt{}", std::process::id() % 100_000);
    let tap = Tap::open(&TapConfig {
        netns: Some(ns.path()),
        up: true,
        ..TapConfig::named(&name)
    })
    .unwrap();
    ns.ip(&["addr", "add", "10.97.0.1/24", "dev", &name]);
    let switch = Switch::new(SwitchConfig::default());
    let port = switch.add_port(PortConfig::uplink(&name)).unwrap();
    let uplink = TapUplink::spawn(tap, port, UplinkOptions::default()).unwrap();
    let vm = switch_vm(&switch, "guest", GUEST_MAC, 1);
    let mut g = SmolStack::new(vm, [10, 97, 0, 2], 24);

    // Guest → kernel ping, then the kernel pings the guest (3 echoes) while the guest runs.
    let rtt = ping(&mut [&mut g], 0, [10, 97, 0, 1], 1, T);
    eprintln!("guest -> kernel ping {rtt:?}");
    let sock = ns.run(raw_icmp_socket);
    let pinger = std::thread::spawn(move || kernel_ping(&sock, [10, 97, 0, 2], 3));
    run(&mut [&mut g], T, |_| pinger.is_finished());
    let rtts = pinger.join().unwrap();
    eprintln!("kernel -> guest ping {rtts:?}");

    // TCP: the kernel listens, reads 1 MiB, checks it, answers with 1 MiB.
    let listener = ns.run(|| TcpListener::bind("10.97.0.1:6000").unwrap());
    let data = pattern(1 << 20, 0x33);
    let reply = pattern(1 << 20, 0x44);
    let (d2, r2) = (data.clone(), reply.clone());
    let kernel = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        c.set_read_timeout(Some(T)).unwrap();
        let mut got = vec![0u8; d2.len()];
        c.read_exact(&mut got).unwrap();
        assert!(got == d2, "kernel received different bytes");
        c.write_all(&r2).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let ch = g.sockets.add(tcp_socket(256 * 1024));
    let cx = g.iface.context();
    g.sockets
        .get_mut::<tcp::Socket>(ch)
        .connect(cx, (IpAddress::v4(10, 97, 0, 1), 6000), 46000)
        .unwrap();
    let (mut sent, mut back) = (0usize, Vec::new());
    let t0 = Instant::now();
    run(&mut [&mut g], T, |st| {
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
        back.len() >= reply.len()
    });
    eprintln!("1 MiB each way with the kernel in {:?}", t0.elapsed());
    kernel.join().unwrap();
    assert!(back == reply, "guest received different bytes");
    assert_eq!(g.vm.driver.stats().bad_packets, 0, "{:?}", g.vm.refused);
    drop(uplink);
}
