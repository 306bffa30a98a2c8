//! Two processes over memfd + eventfd: this test binary re-runs itself as the reading child, the parent
//! writes ≥ 1 M packets of varied sizes, and both sides checksum every payload byte.

use ringbuf::handoff::SharedRing;
use ringbuf::{OutgoingPacket, PacketType};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

const ENV: &str = "RINGBUF_XPROC_CHILD";
const PACKETS: u64 = 1_100_000;
const TIMEOUT: Option<Duration> = Some(Duration::from_secs(60));

/// FNV-1a over a payload, folded into a running sum that depends on packet order.
fn fold(acc: u64, bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    acc.rotate_left(5) ^ h
}

/// Payload of packet `seq`: its number, then bytes derived from it; 8 to 1032 bytes long.
fn fill(seq: u64, buf: &mut Vec<u8>) {
    let len = 8 + (seq.wrapping_mul(2_654_435_761) % 1025) as usize;
    buf.clear();
    buf.extend_from_slice(&seq.to_le_bytes());
    let mut x = seq | 1;
    while buf.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        buf.push(x as u8);
    }
}

#[test]
fn two_processes_move_a_million_packets() {
    let ring = SharedRing::create("xproc-test", 16).expect("ring");
    let exe = std::env::current_exe().expect("test binary");
    let mut cmd = Command::new(exe);
    cmd.args([
        "--exact",
        "xproc_child_entry",
        "--nocapture",
        "--test-threads=1",
    ])
    .stdout(Stdio::piped());
    ring.pass_to_child(&mut cmd, ENV).expect("pass fds");
    let mut child = cmd.spawn().expect("spawn child");

    let mut tx = ring.sender().expect("sender");
    let mut acc = 0u64;
    let mut payload = Vec::new();
    for seq in 0..PACKETS {
        fill(seq, &mut payload);
        acc = fold(acc, &payload);
        let parts: [&[u8]; 1] = [&payload];
        tx.send(&OutgoingPacket::in_band(seq, seq % 5 == 0, &parts), TIMEOUT)
            .expect("send");
    }
    // End marker: a completion packet.
    tx.send(&OutgoingPacket::completion(u64::MAX, &[]), TIMEOUT)
        .expect("send end");

    // Read to the end: closing the pipe early would fail the child's later writes.
    let stdout = child.stdout.take().expect("piped");
    let lines: Vec<String> = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .collect();
    // libtest prints the test name on the same line first.
    let line = lines
        .iter()
        .find_map(|l| l.find("XPROC ").map(|at| l[at..].to_string()))
        .expect("child reports");
    assert!(child.wait().expect("child exit").success());
    assert_eq!(line, format!("XPROC count={PACKETS} checksum={acc:016x}"));
}

/// The child half: a no-op unless started by the test above with the ring in its environment.
#[test]
fn xproc_child_entry() {
    // SAFETY: the parent passed these descriptors to this process only, and they are taken once here.
    let Some(ring) = (unsafe { SharedRing::from_env(ENV) }).expect("fds from parent") else {
        return;
    };
    let mut rx = ring.receiver().expect("receiver");
    let (mut count, mut acc, mut done) = (0u64, 0u64, false);
    let mut buf = vec![0u8; 2048];
    let mut expect = Vec::new();
    while !done {
        rx.recv_batch(64, TIMEOUT, |pkt| {
            if pkt.packet_type() == PacketType::Completion {
                done = true;
                return;
            }
            assert_eq!(pkt.trans_id(), count, "packets arrive in order");
            assert_eq!(pkt.completion_requested(), count % 5 == 0);
            fill(count, &mut expect);
            let n = expect.len();
            assert_eq!(
                pkt.payload_len(),
                n.next_multiple_of(8),
                "padded payload length"
            );
            pkt.copy_payload(0, &mut buf[..n]).expect("in bounds");
            assert_eq!(&buf[..n], &expect[..], "payload of packet {count}");
            acc = fold(acc, &buf[..n]);
            count += 1;
        })
        .expect("receive");
    }
    println!("XPROC count={count} checksum={acc:016x}");
}
