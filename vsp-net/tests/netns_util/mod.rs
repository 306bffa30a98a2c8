//! Shared helpers for the tests that run against the kernel network stack: a network-namespace
//! guard (deleted on drop, also on panic), unique names, hand-built frames and a tiny "guest"
//! that answers ARP.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use vsp_net::tap::Tap;
use vsp_net::tap::netns::{netns_path, run_in_netns};
use vsp_net::tap::offload::{self, ETH_P_ARP, ETH_P_IPV4, internet_checksum};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Why these tests cannot run here, if they cannot.
pub fn skip_reason() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("?");
    if euid != "0" {
        return Some(format!("needs root (euid {euid})"));
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("the `ip` command (iproute2) is not available".into()),
    }
}

/// Returns from the test (printing why) when namespaces, TAP or root are unavailable.
#[macro_export]
macro_rules! require_netns {
    () => {
        if let Some(why) = netns_util::skip_reason() {
            eprintln!("SKIP {}: {why}", module_path!());
            return;
        }
    };
}

/// A name unique to this process and call: `<prefix><pid><n>` (≤ 15 bytes for interfaces).
pub fn unique(prefix: &str) -> String {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id() % 100_000)
}

/// Runs `ip <args>`; panics with its output on failure.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace that is deleted when dropped.
#[derive(Debug)]
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// `ip netns add vspn-<tag>-<pid>x<n>`, then brings `lo` up.
    pub fn new(tag: &str) -> Result<Self, String> {
        let name = unique(&format!("vspn-{tag}-"));
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "ip netns add: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        netns_path(&self.name)
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) {
        let mut v = vec!["-n", self.name.as_str()];
        v.extend_from_slice(args);
        ip(&v);
    }

    /// Runs `f` in the namespace (sockets it creates live there).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        run_in_netns(&self.path(), f).unwrap()
    }

    /// A counter from the namespace's /proc/net/snmp, e.g. ("Udp", "InCsumErrors").
    pub fn snmp(&self, proto: &str, field: &str) -> u64 {
        let text = self.run(|| std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap());
        let mut lines = text.lines().filter(|l| l.starts_with(&format!("{proto}:")));
        let names: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        let values: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        let i = names.iter().position(|n| *n == field).unwrap();
        values[i].parse().unwrap()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

pub type Mac = [u8; 6];
pub const BROADCAST: Mac = [0xff; 6];

pub fn eth_header(dst: Mac, src: Mac, ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(1514);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// ARP packet (request op 1 / reply op 2).
pub fn arp(op: u16, src_mac: Mac, src_ip: [u8; 4], dst_mac: Mac, dst_ip: [u8; 4]) -> Vec<u8> {
    let eth_dst = if op == 1 { BROADCAST } else { dst_mac };
    let mut f = eth_header(eth_dst, src_mac, ETH_P_ARP);
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&src_ip);
    f.extend_from_slice(&if op == 1 { [0; 6] } else { dst_mac });
    f.extend_from_slice(&dst_ip);
    f
}

/// IPv4 header (20 bytes, DF, TTL 64) with a correct checksum unless `zero_csum`.
pub fn ipv4(
    f: &mut Vec<u8>,
    proto: u8,
    src: [u8; 4],
    dst: [u8; 4],
    payload_len: usize,
    zero_csum: bool,
) {
    let start = f.len();
    let tot = (20 + payload_len) as u16;
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&tot.to_be_bytes());
    f.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, proto, 0, 0]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    if !zero_csum {
        let c = internet_checksum(&f[start..]);
        f[start + 10..start + 12].copy_from_slice(&c.to_be_bytes());
    }
}

/// ICMP echo request frame.
pub fn icmp_echo(
    src_mac: Mac,
    dst_mac: Mac,
    src: [u8; 4],
    dst: [u8; 4],
    id: u16,
    seq: u16,
    data: &[u8],
) -> Vec<u8> {
    let mut f = eth_header(dst_mac, src_mac, ETH_P_IPV4);
    ipv4(&mut f, 1, src, dst, 8 + data.len(), false);
    let start = f.len();
    f.extend_from_slice(&[8, 0, 0, 0]);
    f.extend_from_slice(&id.to_be_bytes());
    f.extend_from_slice(&seq.to_be_bytes());
    f.extend_from_slice(data);
    let c = internet_checksum(&f[start..]);
    f[start + 2..start + 4].copy_from_slice(&c.to_be_bytes());
    f
}

/// UDP/IPv4 frame. `csum`: `Some(v)` writes `v` into the UDP checksum field, `None` computes the
/// correct checksum.
pub fn udp4(
    src_mac: Mac,
    dst_mac: Mac,
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
    data: &[u8],
    ip_csum: bool,
    csum: Option<u16>,
) -> Vec<u8> {
    let mut f = eth_header(dst_mac, src_mac, ETH_P_IPV4);
    ipv4(&mut f, 17, src.0, dst.0, 8 + data.len(), !ip_csum);
    f.extend_from_slice(&src.1.to_be_bytes());
    f.extend_from_slice(&dst.1.to_be_bytes());
    f.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(data);
    let v = match csum {
        Some(v) => v,
        None => udp4_checksum(&f),
    };
    f[40..42].copy_from_slice(&v.to_be_bytes());
    f
}

/// Correct UDP checksum of a UDP/IPv4 frame (field must be 0).
pub fn udp4_checksum(f: &[u8]) -> u16 {
    let mut acc = offload::ones_sum(&f[26..34], 17 + (f.len() - 34) as u64);
    acc = offload::ones_sum(&f[34..], acc);
    let c = !offload::fold(acc);
    if c == 0 { 0xffff } else { c }
}

/// The folded pseudo-header sum of a UDP/IPv4 frame (what a NEEDS_CSUM frame carries).
pub fn udp4_pseudo(f: &[u8]) -> u16 {
    offload::fold(offload::ones_sum(&f[26..34], 17 + (f.len() - 34) as u64))
}

/// A pretend guest on the TAP: answers ARP requests for its address while waiting for frames.
pub struct Guest {
    pub mac: Mac,
    pub ip: [u8; 4],
}

impl Guest {
    /// If `frame` is an ARP request for us, the reply.
    pub fn arp_reply(&self, frame: &[u8]) -> Option<Vec<u8>> {
        if frame.len() < 42 || frame[12..14] != ETH_P_ARP.to_be_bytes() || frame[20..22] != [0, 1] {
            return None;
        }
        if frame[38..42] != self.ip {
            return None;
        }
        let mut their_mac = [0; 6];
        their_mac.copy_from_slice(&frame[22..28]);
        let mut their_ip = [0; 4];
        their_ip.copy_from_slice(&frame[28..32]);
        Some(arp(2, self.mac, self.ip, their_mac, their_ip))
    }

    /// Reads frames from the TAP until `want` accepts one (answering ARP on the way), or panics
    /// after `timeout`.
    pub fn wait_for(
        &self,
        tap: &mut Tap,
        timeout: Duration,
        mut want: impl FnMut(&[u8], &vsp_net::tap::FrameMeta) -> bool,
    ) -> (Vec<u8>, vsp_net::tap::FrameMeta) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "timed out waiting for a frame");
            tap.wait_readable(Some(left)).unwrap();
            while let Some((f, m)) = tap.recv().unwrap() {
                let (f, m) = (f.to_vec(), m);
                if let Some(reply) = self.arp_reply(&f) {
                    tap.send(&reply, &Default::default()).unwrap();
                    continue;
                }
                if want(&f, &m) {
                    return (f, m);
                }
            }
        }
    }
}

/// `struct tpacket_auxdata` (linux/if_packet.h).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AuxData {
    pub tp_status: u32,
    pub tp_len: u32,
    pub tp_snaplen: u32,
    pub tp_mac: u16,
    pub tp_net: u16,
    pub tp_vlan_tci: u16,
    pub tp_vlan_tpid: u16,
}

pub const PACKET_AUXDATA: libc::c_int = 8;
pub const TP_STATUS_CSUMNOTREADY: u32 = 1 << 3;
pub const TP_STATUS_VLAN_VALID: u32 = 1 << 4;

/// An AF_PACKET socket on one interface: sees frames as the kernel sees them (VLAN tag in the
/// auxiliary data, checksum-pending flag) and injects raw frames. Create it inside the
/// namespace (`NetNs::run`).
pub struct PacketSock(std::os::fd::OwnedFd);

fn check(rc: libc::c_int, what: &str) {
    assert!(rc >= 0, "{what}: {}", std::io::Error::last_os_error());
}

impl PacketSock {
    pub fn bind(ifindex: u32) -> Self {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain syscall, no pointers.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::c_int::from(proto),
            )
        };
        check(fd, "socket(AF_PACKET)");
        // SAFETY: fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let sll = libc::sockaddr_ll {
            sll_family: libc::AF_PACKET as u16,
            sll_protocol: proto,
            sll_ifindex: ifindex as i32,
            sll_hatype: 0,
            sll_pkttype: 0,
            sll_halen: 0,
            sll_addr: [0; 8],
        };
        // SAFETY: `sll` is a valid sockaddr_ll of the length passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::from_ref(&sll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        check(rc, "bind(AF_PACKET)");
        let one: libc::c_int = 1;
        // SAFETY: option value is a c_int of the given size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                PACKET_AUXDATA,
                std::ptr::from_ref(&one).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        check(rc, "PACKET_AUXDATA");
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: option value is a timeval of the given size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                std::ptr::from_ref(&tv).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        check(rc, "SO_RCVTIMEO");
        Self(fd)
    }

    /// Transmits a raw frame on the interface (it comes out of the TAP descriptor).
    pub fn send(&self, frame: &[u8]) {
        use std::os::fd::AsRawFd;
        // SAFETY: the buffer is valid for `frame.len()` bytes.
        let n = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            n,
            frame.len() as isize,
            "send(AF_PACKET): {}",
            std::io::Error::last_os_error()
        );
    }

    /// Next frame seen on the interface with its auxiliary data, or `None` after 200 ms.
    pub fn recv(&self) -> Option<(Vec<u8>, AuxData)> {
        use std::os::fd::AsRawFd;
        let mut buf = vec![0u8; 65536];
        let mut ctrl = [0u64; 16];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: an all-zero msghdr is valid; the pointers are filled in below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = ctrl.as_mut_ptr().cast();
        msg.msg_controllen = size_of_val(&ctrl);
        // SAFETY: `msg` points to live buffers of the declared sizes for the whole call.
        let n = unsafe { libc::recvmsg(self.0.as_raw_fd(), &mut msg, 0) };
        if n < 0 {
            return None;
        }
        buf.truncate(n as usize);
        let mut aux = AuxData::default();
        // SAFETY: walking the control buffer the kernel filled, with the libc CMSG helpers.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_PACKET && (*c).cmsg_type == PACKET_AUXDATA {
                    aux = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<AuxData>());
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        Some((buf, aux))
    }
}

/// TCP/IPv4 frame (ACK|PSH, 20-byte TCP header) in the NDIS LSOv2 form the guest hands over: IP
/// total length and header checksum 0, TCP checksum = pseudo-header sum without length.
pub fn tcp4_lso(
    src_mac: Mac,
    dst_mac: Mac,
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
    seq: u32,
    data: &[u8],
) -> Vec<u8> {
    let mut f = eth_header(dst_mac, src_mac, ETH_P_IPV4);
    ipv4(&mut f, 6, src.0, dst.0, 20 + data.len(), true);
    f[16..18].copy_from_slice(&[0, 0]);
    f.extend_from_slice(&src.1.to_be_bytes());
    f.extend_from_slice(&dst.1.to_be_bytes());
    f.extend_from_slice(&seq.to_be_bytes());
    f.extend_from_slice(&1u32.to_be_bytes());
    f.extend_from_slice(&[0x50, 0x18, 0x40, 0x00, 0, 0, 0, 0]);
    let pseudo = offload::fold(offload::ones_sum(&f[26..34], 6));
    f[50..52].copy_from_slice(&pseudo.to_be_bytes());
    f.extend_from_slice(data);
    f
}

/// Writes `value` to a sysctl of the namespace (e.g. "net/ipv4/ip_forward").
pub fn sysctl(ns: &NetNs, key: &str, value: &str) {
    let path = format!("/proc/sys/{key}");
    ns.run(|| std::fs::write(&path, value)).unwrap();
}
