//! The network VSP crash soak: the netvsc harness guest (smoltcp) talks through `vsp-net serve`
//! in a supervised child process to a persistent TAP in a network namespace, where the kernel
//! answers pings and a thread echoes a TCP stream. The daemon is killed with SIGKILL every 200 ms
//! (≥ 20 kills) while the ping stream and the TCP transfer run: the guest must never see the link
//! go down, the echoed TCP stream must come back complete and byte-exact, and most pings must be
//! answered (the loss is printed, as is the time from each kill to the first frame the restarted
//! daemon delivers to the guest).
//!
//! Also: the seccomp allow-list of the daemon is active (a daemon that makes a forbidden call
//! after installing it dies with `EXIT_FORBIDDEN`).
//!
//! The child is this test binary again (`vsp_net_child`), which runs exactly what the `vsp-net`
//! binary's `serve` subcommand runs (`vsp_net::netvsp::daemon::serve`) with the arguments in
//! [`ARGS_ENV`].
#![allow(clippy::unwrap_used)]

use clap::Parser;
use smoltcp::socket::{icmp, tcp};
use smoltcp::wire::{Icmpv4Packet, Icmpv4Repr, IpAddress};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vmbus_core::device::DeviceDescription;
use vmbus_core::oop::{Connection, SOCKET_FD_ENV, VspClient, seccomp};
use vmbus_core::wire::{Guid, class};
use vsc_guest::net_harness::smol::SmolStack;
use vsc_guest::net_harness::{NetVm, VmConfig};
use vsc_guest::netvsc::NetvscEvent;
use vsp_net::netvsp::daemon::ServeArgs;

/// The daemon's command line (after `serve`), for the child.
const ARGS_ENV: &str = "VSP_NET_SOAK_ARGS";
const INSTANCE: &str = "5e3c0a11-7d2b-4c1e-9f00-00000000a77a";
const GUEST_MAC: [u8; 6] = [0x02, 0x15, 0x5d, 0x77, 0x00, 0x02];
const GUEST_IP: [u8; 4] = [10, 77, 0, 2];
const HOST_IP: [u8; 4] = [10, 77, 0, 1];
const ECHO_PORT: u16 = 7000;

#[derive(Parser)]
struct ChildCli {
    #[command(flatten)]
    serve: ServeArgs,
}

/// The VSP child: returns at once in a normal test run (no supervisor socket / arguments).
#[test]
fn vsp_net_child() {
    let (Ok(args), Ok(_)) = (std::env::var(ARGS_ENV), std::env::var(SOCKET_FD_ENV)) else {
        return;
    };
    let cli = ChildCli::parse_from(std::iter::once("serve").chain(args.split_whitespace()));
    vsp_net::netvsp::daemon::serve(cli.serve).unwrap();
}

/// Set to a path prefix to run every daemon under `strace -f -o PREFIX.N` (to review the
/// system calls the seccomp allow-list must cover).
const STRACE_ENV: &str = "VSP_NET_SOAK_STRACE";

fn child_command(args: String) -> Command {
    let exe = std::env::current_exe().unwrap();
    let mut c = match std::env::var(STRACE_ENV) {
        Ok(prefix) => {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut c = Command::new("strace");
            c.args(["-f", "-qq", "-o", &format!("{prefix}.{n}")])
                .arg(exe);
            c
        }
        Err(_) => Command::new(exe),
    };
    c.args([
        "--exact",
        "vsp_net_child",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(ARGS_ENV, args)
    .stdout(Stdio::null());
    c
}

fn run(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A network namespace with a persistent, configured TAP (deleted on drop).
struct NetNs {
    name: String,
}

impl NetNs {
    fn create(name: &str, tap: &str) -> Result<Self, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not root".into());
        }
        if !std::path::Path::new("/dev/net/tun").exists() {
            return Err("no /dev/net/tun".into());
        }
        run("ip", &["netns", "del", name]);
        if !run("ip", &["netns", "add", name]) {
            return Err("`ip netns add` failed (no iproute2 or no namespace support)".into());
        }
        let ns = NetNs { name: name.into() };
        let host = format!(
            "{}.{}.{}.{}/24",
            HOST_IP[0], HOST_IP[1], HOST_IP[2], HOST_IP[3]
        );
        let steps: [&[&str]; 4] = [
            &[
                "-n", name, "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr",
            ],
            &["-n", name, "addr", "add", &host, "dev", tap],
            &["-n", name, "link", "set", tap, "up"],
            &["-n", name, "link", "set", "lo", "up"],
        ];
        for s in steps {
            if !run("ip", s) {
                return Err(format!("ip {s:?} failed"));
            }
        }
        Ok(ns)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        run("ip", &["netns", "del", &self.name]);
    }
}

/// Echoes one TCP connection on `HOST_IP:ECHO_PORT` inside the namespace; returns the bytes echoed.
fn spawn_echo(ns: &str) -> std::thread::JoinHandle<u64> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let path = vsp_net::tap::netns::netns_path(ns);
    let h = std::thread::spawn(move || {
        let f = std::fs::File::open(path).unwrap();
        // SAFETY: setns on this thread only, with an open namespace descriptor.
        let r = unsafe { libc::setns(f.as_fd().as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        let l =
            std::net::TcpListener::bind((std::net::Ipv4Addr::from(HOST_IP), ECHO_PORT)).unwrap();
        ready_tx.send(()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    total += n as u64;
                }
            }
        }
        let _ = s.shutdown(std::net::Shutdown::Write);
        total
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    h
}

/// Byte `i` of the stream the guest sends.
fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(0x9e37_79b9) >> 13) as u8 ^ (i >> 20) as u8
}

fn fnv(h: &mut u64, b: &[u8]) {
    for &x in b {
        *h = (*h ^ u64::from(x)).wrapping_mul(0x100_0000_01b3);
    }
}

#[derive(Default, Debug)]
struct Report {
    kills: usize,
    pings_sent: u32,
    pings_answered: u32,
    tcp_sent: u64,
    tcp_echoed: u64,
    tcp_mismatches: u64,
    /// Kill → first frame delivered to the guest by the successor.
    first_frame: Vec<Duration>,
    /// The supervisor's kill-noticed → channels re-opened times.
    restarts: Vec<Duration>,
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v.get(((v.len() as f64 - 1.0) * p).round() as usize)
        .copied()
        .unwrap_or_default()
}

#[test]
fn netvsp_daemon_survives_sigkills_during_ping_and_tcp() {
    soak_test(1);
}

/// The same with a sub-channel: the daemon asks the VMM for it, and every successor resumes a
/// two-queue session (RSS spreads the received frames over both channels).
#[test]
fn netvsp_daemon_with_two_queues_survives_sigkills() {
    soak_test(2);
}

fn soak_test(queues: u16) {
    let tag = std::process::id() % 100_000;
    let (ns_name, tap) = (
        format!("vspnet{tag}q{queues}"),
        format!("vsn{tag}q{queues}"),
    );
    let ns = match NetNs::create(&ns_name, &tap) {
        Ok(ns) => ns,
        Err(why) => {
            eprintln!("SKIP netvsp soak ({queues} queues): {why}");
            return;
        }
    };
    let echo = spawn_echo(&ns.name);
    let mac = GUEST_MAC.map(|b| format!("{b:02x}")).join(":");
    let args = format!(
        "--tap {tap} --netns {} --mac {mac} --instance {INSTANCE} --queues {queues}",
        ns.name
    );
    let mut desc = DeviceDescription::new(class::NETWORK, INSTANCE.parse::<Guid>().unwrap());
    desc.max_subchannels = queues - 1;
    let cfg = VmConfig {
        queues,
        ..VmConfig::default()
    };
    let mut vm = NetVm::in_child(cfg, desc, move || child_command(args.clone())).unwrap();
    vm.bring_up().unwrap();
    assert_eq!(vm.driver.info().mac, GUEST_MAC);
    assert_eq!(vm.channel_relids().len(), usize::from(queues));
    // What a restarted daemon resumes from.
    vm.host_mut().supervisor().unwrap().refresh_state().unwrap();
    // The TAP's carrier follows the daemon's attach through the kernel's linkwatch (up to ~1 s
    // late), so the link may come up just after the bring-up; from then on it must stay up.
    let t = Instant::now();
    while !vm.driver.info().link_up {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the link never came up"
        );
        vm.service().unwrap();
        vm.wait(Duration::from_millis(1));
    }
    let events_before = vm.events.len();
    let mut g = SmolStack::new(vm, GUEST_IP, 24);
    let rep = soak(&mut g, 25, Duration::from_millis(200));
    let echoed_by_host = echo.join().unwrap();

    let mut first = rep.first_frame.clone();
    let mut restarts = rep.restarts.clone();
    let loss =
        100.0 * f64::from(rep.pings_sent - rep.pings_answered) / f64::from(rep.pings_sent.max(1));
    eprintln!("{rep:?}");
    eprintln!(
        "RESULT vspnetsoak queues={queues} kills={} tcp_bytes={} tcp_mismatches={} pings={}/{} loss_pct={loss:.1} \
         first_frame_p50_ms={:.1} first_frame_p99_ms={:.1} first_frame_max_ms={:.1} restart_p50_ms={:.1}",
        rep.kills,
        rep.tcp_echoed,
        rep.tcp_mismatches,
        rep.pings_answered,
        rep.pings_sent,
        pct(&mut first, 0.5).as_secs_f64() * 1e3,
        pct(&mut first, 0.99).as_secs_f64() * 1e3,
        first.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        pct(&mut restarts, 0.5).as_secs_f64() * 1e3,
    );
    let link_down = g.vm.events[events_before..]
        .iter()
        .filter(|e| {
            matches!(
                e,
                NetvscEvent::Link { up: false } | NetvscEvent::NetworkChange
            )
        })
        .count();
    assert_eq!(
        link_down,
        0,
        "the guest saw the link go down during the kills: {:?}",
        &g.vm.events[events_before..]
    );
    assert!(rep.kills >= 20, "kills {}", rep.kills);
    assert!(restarts.len() >= 20, "restarts {}", restarts.len());
    assert!(rep.tcp_sent > 0);
    assert_eq!(rep.tcp_echoed, rep.tcp_sent, "TCP stream incomplete");
    assert_eq!(rep.tcp_mismatches, 0, "TCP stream corrupted");
    assert_eq!(echoed_by_host, rep.tcp_sent);
    assert!(
        rep.pings_answered * 2 >= rep.pings_sent,
        "most pings lost: {}/{}",
        rep.pings_answered,
        rep.pings_sent
    );
    g.vm.shutdown().unwrap();
}

/// Runs the ping stream and the TCP echo transfer while killing the daemon `kills` times, one kill
/// every `every`; then finishes the transfer.
fn soak(g: &mut SmolStack, kills: usize, every: Duration) -> Report {
    let mut rep = Report::default();
    let rx = icmp::PacketBuffer::new(vec![icmp::PacketMetadata::EMPTY; 64], vec![0; 16384]);
    let tx = icmp::PacketBuffer::new(vec![icmp::PacketMetadata::EMPTY; 64], vec![0; 16384]);
    let mut ping = icmp::Socket::new(rx, tx);
    ping.bind(icmp::Endpoint::Ident(0x5157)).unwrap();
    let ph = g.sockets.add(ping);
    let th = g.sockets.add(tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; 256 * 1024]),
        tcp::SocketBuffer::new(vec![0; 256 * 1024]),
    ));
    let cx = g.iface.context();
    let host = IpAddress::v4(HOST_IP[0], HOST_IP[1], HOST_IP[2], HOST_IP[3]);
    g.sockets
        .get_mut::<tcp::Socket>(th)
        .connect(cx, (host, ECHO_PORT), 49152)
        .unwrap();
    let caps = smoltcp::phy::ChecksumCapabilities::default();
    let (mut sent_hash, mut echo_hash) = (0xcbf2_9ce4_8422_2325u64, 0xcbf2_9ce4_8422_2325u64);
    let mut answered = std::collections::BTreeSet::new();
    let start = Instant::now();
    let deadline = start + Duration::from_secs(180);
    let mut next_kill = start + every;
    let mut next_ping = start;
    let mut awaiting_first: Option<(Instant, u64)> = None;
    let mut closed = false;
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        assert!(Instant::now() < deadline, "soak timed out: {rep:?}");
        let moved = g.poll().unwrap();
        let now = Instant::now();
        if let Some((t, base)) = awaiting_first
            && g.vm.driver.stats().rx_frames > base
        {
            rep.first_frame.push(now - t);
            awaiting_first = None;
        }
        if rep.kills < kills && now >= next_kill {
            let base = g.vm.driver.stats().rx_frames;
            let t = Instant::now();
            let sup = g.vm.host_mut().supervisor().unwrap();
            sup.kill();
            assert!(sup.ensure_running().unwrap(), "the VSP did not restart");
            rep.kills += 1;
            awaiting_first = Some((t, base));
            next_kill = Instant::now() + every;
        }
        // Pings every 20 ms while the kills go on.
        let s = g.sockets.get_mut::<icmp::Socket>(ph);
        if rep.kills < kills && now >= next_ping && s.can_send() {
            let seq = rep.pings_sent as u16;
            let repr = Icmpv4Repr::EchoRequest {
                ident: 0x5157,
                seq_no: seq,
                data: b"vsp-net soak",
            };
            let buf = s.send(repr.buffer_len(), host).unwrap();
            repr.emit(&mut Icmpv4Packet::new_unchecked(buf), &caps);
            rep.pings_sent += 1;
            next_ping = now + Duration::from_millis(20);
        }
        while s.can_recv() {
            let (data, _) = s.recv().unwrap();
            if let Ok(pkt) = Icmpv4Packet::new_checked(data)
                && let Ok(Icmpv4Repr::EchoReply { seq_no, .. }) = Icmpv4Repr::parse(&pkt, &caps)
            {
                answered.insert(seq_no);
            }
        }
        rep.pings_answered = answered.len() as u32;
        // The TCP stream: send while killing, then close and wait for the echo to finish.
        let t = g.sockets.get_mut::<tcp::Socket>(th);
        if rep.kills < kills {
            if t.can_send() {
                for (i, b) in chunk.iter_mut().enumerate() {
                    *b = pattern(rep.tcp_sent + i as u64);
                }
                let n = t.send_slice(&chunk).unwrap();
                fnv(&mut sent_hash, &chunk[..n]);
                rep.tcp_sent += n as u64;
            }
        } else if !closed && t.send_queue() == 0 {
            t.close();
            closed = true;
        }
        while t.can_recv() {
            t.recv(|b| {
                for (i, &x) in b.iter().enumerate() {
                    if x != pattern(rep.tcp_echoed + i as u64) {
                        rep.tcp_mismatches += 1;
                    }
                }
                fnv(&mut echo_hash, b);
                rep.tcp_echoed += b.len() as u64;
                (b.len(), ())
            })
            .unwrap();
        }
        if closed && rep.tcp_echoed >= rep.tcp_sent && !t.may_recv() {
            break;
        }
        if !moved {
            let d = g.delay(Duration::from_millis(1));
            g.vm.wait(d.max(Duration::from_micros(100)));
        }
    }
    eprintln!(
        "TCP: {} bytes sent (fnv {sent_hash:#018x}), {} echoed (fnv {echo_hash:#018x})",
        rep.tcp_sent, rep.tcp_echoed
    );
    assert_eq!(sent_hash, echo_hash, "TCP checksum differs");
    rep.restarts = g.vm.host_mut().supervisor().unwrap().restarts.clone();
    rep
}

/// The allow-list is active in `vsp-net serve`: a forbidden call after it is installed kills the
/// daemon with `EXIT_FORBIDDEN` and names the call; without it the daemon serves.
#[test]
fn vsp_net_seccomp_kills_a_daemon_making_a_forbidden_call() {
    let args = format!("--switch --instance {INSTANCE}");
    for (probe, nr) in [("socket", libc::SYS_socket), ("execve", libc::SYS_execve)] {
        let (ours, theirs) = Connection::pair().unwrap();
        ringbuf::mmap::set_inheritable(theirs.as_fd()).unwrap();
        let mut c = child_command(args.clone());
        c.env(SOCKET_FD_ENV, theirs.as_fd().as_raw_fd().to_string())
            .env(seccomp::SELFTEST_ENV, probe)
            .stderr(Stdio::piped());
        let child = c.spawn().unwrap();
        drop(theirs);
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(seccomp::EXIT_FORBIDDEN),
            "{probe}: {err}"
        );
        assert!(
            err.contains(&format!("forbidden system call {nr}")),
            "{probe}: {err}"
        );
        drop(ours);
    }
    // The same daemon with the filter on and no probe serves the VMM: handshake, memory table.
    let (ours, theirs) = Connection::pair().unwrap();
    ringbuf::mmap::set_inheritable(theirs.as_fd()).unwrap();
    let mut c = child_command(args);
    c.env(SOCKET_FD_ENV, theirs.as_fd().as_raw_fd().to_string());
    let mut child = c.spawn().unwrap();
    drop(theirs);
    let mut client = VspClient::connect(ours, Some(Duration::from_secs(10))).unwrap();
    let ram = ringbuf::mmap::ring_memfd("seccomp-ram", 1 << 20).unwrap();
    let region = vmbus_core::oop::Region {
        gpa: 0,
        size: 1 << 20,
        fd_offset: 0,
    };
    client.set_memory(&[(region, ram.as_fd())]).unwrap();
    drop(client);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}
