//! SynIC port across two processes: this test binary re-runs itself as the guest child over a shared
//! memfd and eventfds. Phase 1 measures message round trips (host posts into the slot, guest takes it
//! and answers with HvPostMessage); phase 2 streams 10,000 messages each way at once through busy
//! slots (pending flag, EOM), a bounded host queue and a bounded guest→host ring, with event signals
//! both ways. Both sides check order and content of every message.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmbus_core::synic::shared::{SharedLayout, SharedSynic};
use vmbus_core::synic::{GuestPort, HostInbox, HostPort, HvStatus, PortKind, Sint, SynicError};

const ENV: &str = "VMBUS_SYNIC_XPROC_CHILD";
const ROUND_TRIPS: u32 = 10_000;
const STREAM: u32 = 10_000;
const MSG_PORT: u32 = 1;
const EVENT_PORT: u32 = 0x2001;
const GUEST_FLAG: u32 = 5;
const T: Option<Duration> = Some(Duration::from_secs(60));
/// Latch polls before sleeping; `SYNIC_XPROC_SPINS` overrides (0 = every wait sleeps on the eventfd).
fn spins() -> u32 {
    std::env::var("SYNIC_XPROC_SPINS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5_000)
}

/// Payload `seq` of a stream: its number, then bytes derived from it, 8..=240 bytes.
fn payload(tag: u8, seq: u32) -> Vec<u8> {
    let len = 8 + (seq.wrapping_mul(2_654_435_761) % 233) as usize;
    let mut v = seq.to_le_bytes().to_vec();
    v.push(tag);
    let mut x = seq | 1;
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        v.push(x as u8 ^ tag);
    }
    v
}

fn round_trip_msg(tag: u8, seq: u32) -> [u8; 16] {
    let mut b = [tag; 16];
    b[..4].copy_from_slice(&seq.to_le_bytes());
    b
}

#[test]
fn synic_two_processes() {
    let synic = SharedSynic::create("synic-xproc", SharedLayout::default()).expect("memfd");
    let host = synic.host(64).expect("host end").with_spins(spins());
    host.register_port(MSG_PORT, PortKind::Message)
        .expect("message port");
    host.register_port(EVENT_PORT, PortKind::Event)
        .expect("event port");

    let exe = std::env::current_exe().expect("test binary");
    let mut cmd = Command::new(exe);
    cmd.args([
        "--exact",
        "synic_xproc_guest_entry",
        "--nocapture",
        "--test-threads=1",
    ])
    .stdout(Stdio::piped());
    synic.pass_to_child(&mut cmd, ENV).expect("pass fds");
    let mut child = cmd.spawn().expect("spawn guest");

    // Phase 1: round trips.
    let vmbus = Sint::VMBUS;
    let start = Instant::now();
    for i in 0..ROUND_TRIPS {
        host.post_to_guest(0, vmbus, &round_trip_msg(0xA1, i))
            .expect("post");
        let reply = loop {
            if let Some(m) = host.recv_message().expect("recv") {
                break m;
            }
            assert!(
                host.wait(T).expect("wait"),
                "guest silent at round trip {i}"
            );
        };
        assert_eq!(reply.connection_id, MSG_PORT);
        assert_eq!(&reply.payload[..], &round_trip_msg(0xB2, i)[..]);
    }
    let rt = start.elapsed();

    // Phase 2: both directions at once.
    let start = Instant::now();
    let (mut rx, mut tx, mut events, mut full) = (0u32, 0u32, 0u32, 0u32);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        while let Some(m) = host.recv_message().expect("recv") {
            assert_eq!(m.connection_id, MSG_PORT);
            assert_eq!(&m.payload[..], &payload(0x6E, rx)[..], "guest message {rx}");
            rx += 1;
        }
        host.take_events(&mut |id| {
            assert_eq!(id, EVENT_PORT);
            events += 1;
        })
        .expect("events");
        let mut progressed = false;
        while tx < STREAM {
            match host.post_to_guest(0, vmbus, &payload(0x4F, tx)) {
                Ok(_) => {
                    if tx % 100 == 0 {
                        host.signal_guest(0, vmbus, GUEST_FLAG).expect("signal");
                    }
                    tx += 1;
                    progressed = true;
                }
                Err(SynicError::QueueFull { .. }) => {
                    full += 1;
                    break;
                }
                Err(e) => panic!("post_to_guest: {e}"),
            }
        }
        if rx == STREAM && tx == STREAM && child.try_wait().expect("child").is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "stream stalled: rx={rx} tx={tx}");
        if !progressed {
            // Also where EOMs are handled: keep serving until the guest has everything.
            host.wait(Some(Duration::from_millis(5))).expect("wait");
        }
    }
    let stream = start.elapsed();

    let stdout = child.stdout.take().expect("piped");
    let lines: Vec<String> = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .collect();
    let line = lines
        .iter()
        .find_map(|l| l.find("SYNIC ").map(|at| l[at..].to_string()))
        .expect("guest reports");
    assert!(child.wait().expect("child exit").success());
    assert!(
        line.starts_with(&format!("SYNIC rt={ROUND_TRIPS} rx={STREAM} tx={STREAM} ")),
        "{line}"
    );
    assert!(events >= 1, "guest events arrived");
    assert_eq!(host.dropped_messages(), 0);
    println!(
        "RESULT synic_xproc round_trips_per_s={:.0} rt_us={:.2} stream_msgs_per_s={:.0} \
         host_queue_full={full} host_events={events} guest: {line}",
        f64::from(ROUND_TRIPS) / rt.as_secs_f64(),
        rt.as_secs_f64() * 1e6 / f64::from(ROUND_TRIPS),
        f64::from(2 * STREAM) / stream.as_secs_f64(),
    );
}

/// The guest half: a no-op unless started by the test above.
#[test]
fn synic_xproc_guest_entry() {
    // SAFETY: the parent passed these descriptors to this process only; they are taken once here.
    let Some(synic) = (unsafe { SharedSynic::from_env(ENV) }).expect("fds from parent") else {
        return;
    };
    let guest = synic
        .guest()
        .expect("guest end")
        .into_iter()
        .next()
        .expect("VP 0")
        .with_spins(spins());
    let vmbus = Sint::VMBUS;

    for i in 0..ROUND_TRIPS {
        let m = loop {
            if let Some(m) = guest.next_message(vmbus) {
                break m.expect("well-formed");
            }
            assert!(
                guest.wait(T).expect("wait"),
                "host silent at round trip {i}"
            );
        };
        assert_eq!(&m.payload[..], &round_trip_msg(0xA1, i)[..]);
        guest
            .post_message(MSG_PORT, &round_trip_msg(0xB2, i))
            .expect("reply");
    }

    let (mut rx, mut tx, mut flags, mut busy) = (0u32, 0u32, 0u32, 0u32);
    while rx < STREAM || tx < STREAM {
        while let Some(m) = guest.next_message(vmbus) {
            let m = m.expect("well-formed");
            assert_eq!(&m.payload[..], &payload(0x4F, rx)[..], "host message {rx}");
            rx += 1;
        }
        guest.take_events(vmbus, &mut |f| {
            assert_eq!(f, GUEST_FLAG);
            flags += 1;
        });
        let mut progressed = false;
        while tx < STREAM {
            match guest.post_message(MSG_PORT, &payload(0x6E, tx)) {
                Ok(()) => {
                    if tx % 100 == 0 {
                        guest.signal_event(EVENT_PORT, 0).expect("signal");
                    }
                    tx += 1;
                    progressed = true;
                }
                Err(HvStatus::InsufficientBuffers) => {
                    busy += 1;
                    break;
                }
                Err(e) => panic!("post_message: {e}"),
            }
        }
        if !progressed {
            // Linux retries 0x13 after a delay; an interrupt (more host messages) also wakes us.
            guest.wait(Some(Duration::from_millis(1))).expect("wait");
        }
    }
    assert!(flags >= 1, "host events arrived");
    println!("SYNIC rt={ROUND_TRIPS} rx={rx} tx={tx} flags={flags} insufficient_buffers={busy}");
}
