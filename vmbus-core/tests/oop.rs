//! A VSP in its own process (this test binary re-run as a child) serving an echo device over the
//! VMM ↔ VSP protocol, killed with SIGKILL again and again while the guest side keeps sending: the
//! VMM restarts it, re-sends the memory table and re-opens the channel from the rings' saved
//! positions; every request is answered, in order (repeats allowed for requests whose reply was
//! sent but not yet committed when the VSP died).
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use ringbuf::mmap::{MappedRing, ring_memfd};
use ringbuf::signal::{ChannelError, Doorbell, Receiver, Sender, SpinPolicy};
use ringbuf::{OutgoingPacket, PacketType, RingReader, RingWriter, init_control};
use std::os::fd::AsFd;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;
use vmbus_core::device::{ChannelControl, DeviceError, OpenChannelInfo};
use vmbus_core::oop::{
    ChannelResources, HostedDevice, Region, Supervisor, connection_from_env, serve,
};

const MIB: u64 = 1 << 20;

/// Echo device: every in-band packet comes back as a completion with the same payload. One thread
/// per channel, waiting on the kick doorbell for both "data in" and "space out".
#[derive(Default)]
struct Echo {
    channels: Vec<(u32, Arc<AtomicBool>, JoinHandle<()>)>,
}

impl HostedDevice for Echo {
    fn open(
        &mut self,
        ch: ChannelResources,
        _bus: &mut dyn ChannelControl,
    ) -> Result<(), DeviceError> {
        let mut rx = Receiver::new(
            RingReader::new(ch.incoming).map_err(DeviceError::BadRing)?,
            ch.call
                .try_clone()
                .map_err(|e| DeviceError::RingMapping(e.to_string()))?,
            ch.kick
                .try_clone()
                .map_err(|e| DeviceError::RingMapping(e.to_string()))?,
        );
        let mut tx = Sender::new(
            RingWriter::new(ch.outgoing).map_err(DeviceError::BadRing)?,
            ch.call,
            ch.kick,
        );
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let t = std::thread::spawn(move || {
            let mut buf = Vec::new();
            while !flag.load(Ordering::Acquire) {
                let mut replies: Vec<(u64, Vec<u8>)> = Vec::new();
                // Requests leave the ring only once answered: after a crash the
                // unanswered ones are still there for the next VSP.
                match rx.recv_batch_uncommitted(32, Some(Duration::from_millis(20)), |p| {
                    buf.resize(p.payload_len(), 0);
                    p.copy_payload(0, &mut buf).unwrap();
                    replies.push((p.trans_id(), buf.clone()));
                }) {
                    Ok(_) | Err(ChannelError::TimedOut) => {}
                    Err(e) => panic!("echo: {e}"),
                }
                for (id, payload) in &replies {
                    let parts: [&[u8]; 1] = [payload];
                    tx.send(
                        &OutgoingPacket::completion(*id, &parts),
                        Some(Duration::from_secs(10)),
                    )
                    .unwrap();
                }
                rx.commit().unwrap();
            }
        });
        self.channels.push((ch.info.relid, stop, t));
        Ok(())
    }

    fn save(&self) -> Vec<u8> {
        b"echo-v1".to_vec()
    }

    /// Only its own state is accepted: a restarted VSP that got anything else fails to start.
    fn restore(&mut self, state: &[u8]) -> Result<(), DeviceError> {
        if state == b"echo-v1" {
            Ok(())
        } else {
            Err(DeviceError::BadSavedState("not an echo state".into()))
        }
    }

    fn close(&mut self, relid: u32) {
        if let Some(i) = self.channels.iter().position(|c| c.0 == relid) {
            let (_, stop, t) = self.channels.swap_remove(i);
            stop.store(true, Ordering::Release);
            t.join().unwrap();
        }
    }
}

/// The VSP process: serves until the VMM hangs up (or the process is killed).
#[test]
fn oop_vsp_child() {
    // SAFETY: the supervisor passed this socket to this process only; it is taken once, here.
    let Some(conn) = (unsafe { connection_from_env() }) else {
        return;
    };
    serve(&conn, &mut Echo::default()).unwrap();
}

fn vsp_command() -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args([
        "--exact",
        "oop_vsp_child",
        "--nocapture",
        "--test-threads=1",
    ])
    .stdout(std::process::Stdio::null());
    c
}

#[test]
fn vsp_killed_repeatedly_guest_sees_every_reply() {
    // Guest RAM: 8 MiB at GPA 0 and 8 MiB at GPA 16 MiB, in two memfds.
    let ram = [
        ring_memfd("ram0", 8 * MIB).unwrap(),
        ring_memfd("ram1", 8 * MIB).unwrap(),
    ];
    let regions = [
        Region {
            gpa: 0,
            size: 8 * MIB,
            fd_offset: 0,
        },
        Region {
            gpa: 16 * MIB,
            size: 8 * MIB,
            fd_offset: 0,
        },
    ];
    // Ring pages straddle both regions: 16 pages up, 16 down.
    let ring_pages: Vec<u64> = (0..16)
        .map(|i| 100 + i)
        .chain((0..16).map(|i| 16 * 256 + 50 + i))
        .collect();
    let page_of = |pfn: u64| -> (std::os::fd::BorrowedFd<'_>, u64) {
        if pfn < 2048 {
            (ram[0].as_fd(), pfn * 4096)
        } else {
            (ram[1].as_fd(), (pfn - 4096) * 4096)
        }
    };
    let up: Vec<_> = ring_pages[..16].iter().map(|&p| page_of(p)).collect();
    let down: Vec<_> = ring_pages[16..].iter().map(|&p| page_of(p)).collect();
    let guest_up = MappedRing::map_page_list(&up).unwrap();
    let guest_down = MappedRing::map_page_list(&down).unwrap();
    init_control(&guest_up);
    init_control(&guest_down);
    let info = OpenChannelInfo {
        relid: 1,
        subchannel_index: 0,
        ring_pages,
        downstream_offset: 16,
        target_vp: 0,
        connection_id: 0x2001,
        user_data: [0; 120],
    };
    let kick = Doorbell::new().unwrap();
    let call = Doorbell::new().unwrap();
    let memory = vec![
        (regions[0], ram[0].as_fd().try_clone_to_owned().unwrap()),
        (regions[1], ram[1].as_fd().try_clone_to_owned().unwrap()),
    ];
    let mut sup = Supervisor::start(vsp_command, memory, Duration::from_secs(10)).unwrap();
    sup.open(
        info,
        kick.as_fd().try_clone_to_owned().unwrap(),
        call.as_fd().try_clone_to_owned().unwrap(),
    )
    .unwrap();
    // The device's state goes to every restarted VSP before its channels re-open.
    sup.refresh_state().unwrap();
    assert_eq!(sup.device_state(), Some(&b"echo-v1"[..]));

    // Guest: one thread, a window of outstanding requests, so a single waiter uses the call bell.
    // It runs until told to stop, then waits for its outstanding replies.
    const WINDOW: u64 = 64;
    const KILLS: u32 = 12;
    let stop = Arc::new(AtomicBool::new(false));
    let guest = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut tx = Sender::new(
                RingWriter::new(guest_up).unwrap(),
                kick.try_clone().unwrap(),
                call.try_clone().unwrap(),
            )
            .with_spin(SpinPolicy { spins: 200 });
            let mut rx = Receiver::new(RingReader::new(guest_down).unwrap(), kick, call)
                .with_spin(SpinPolicy { spins: 200 });
            let (mut sent, mut next, mut repeats) = (1u64, 1u64, 0u64);
            loop {
                let stopping = stop.load(Ordering::Acquire);
                if stopping && next == sent {
                    break;
                }
                while !stopping && sent - next < WINDOW {
                    let payload = sent.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes();
                    let parts: [&[u8]; 1] = [&payload];
                    tx.send(
                        &OutgoingPacket::in_band(sent, true, &parts),
                        Some(Duration::from_secs(20)),
                    )
                    .unwrap();
                    sent += 1;
                }
                rx.recv_batch(64, Some(Duration::from_secs(20)), |p| {
                    assert_eq!(p.packet_type(), PacketType::Completion);
                    let id = p.trans_id();
                    let mut v = [0u8; 8];
                    p.copy_payload(0, &mut v).unwrap();
                    assert_eq!(
                        v,
                        id.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes(),
                        "payload of {id}"
                    );
                    if id == next {
                        next += 1;
                    } else {
                        // Only a request answered just before a crash may come back again.
                        assert!(id < next, "reply {id} skipped ahead of {next}");
                        repeats += 1;
                    }
                })
                .unwrap();
            }
            (next - 1, repeats)
        })
    };

    // Kill the VSP every 100 ms while the guest works.
    let mut kills = 0;
    while kills < KILLS {
        std::thread::sleep(Duration::from_millis(100));
        let pid = sup.pid();
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(pid.unwrap() as i32, libc::SIGKILL) };
        while sup.is_alive() {
            std::thread::sleep(Duration::from_millis(1));
        }
        kills += 1;
        assert!(sup.ensure_running().unwrap());
        assert_ne!(sup.pid(), pid);
    }
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Release);
    let (answered, repeats) = guest.join().unwrap();
    sup.close(1).unwrap();
    let mut restarts = sup.restarts.clone();
    assert_eq!(restarts.len(), kills as usize);
    assert!(
        sup.shutdown().unwrap().success(),
        "the last VSP exits cleanly when the VMM hangs up"
    );
    restarts.sort();
    eprintln!(
        "answered={answered} kills={kills} repeats={repeats} restart median={:?} max={:?}",
        restarts[restarts.len() / 2],
        restarts.last().unwrap()
    );
    assert!(answered > 1000, "only {answered} requests answered");
}
