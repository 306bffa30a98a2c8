//! Hostile peers on the VMM ↔ VSP socket: a fake VMM with bad memory tables and ring pages outside
//! guest memory, a fake VSP answering garbage. The honest side refuses clearly and survives.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use ringbuf::mmap::ring_memfd;
use ringbuf::signal::Doorbell;
use std::os::fd::AsFd;
use std::time::Duration;
use vmbus_core::device::{ChannelControl, DeviceError, OpenChannelInfo};
use vmbus_core::oop::wire::{ChannelOpen, GpadlInfo, ty};
use vmbus_core::oop::{
    ChannelResources, Connection, HostedDevice, Message, ProtocolError, Region, ServeError,
    VmmError, VspClient, serve,
};

struct Nothing;

impl HostedDevice for Nothing {
    fn open(&mut self, _: ChannelResources, _: &mut dyn ChannelControl) -> Result<(), DeviceError> {
        Ok(())
    }
    fn close(&mut self, _: u32) {}
}

const T: Option<Duration> = Some(Duration::from_secs(5));

fn reply_status(conn: &Connection, request: u32) -> u32 {
    match conn.recv(T).unwrap().0 {
        Message::Reply {
            request: r, status, ..
        } if r == request => status,
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn vsp_refuses_bad_memory_tables_and_rings_outside_memory() {
    let (vmm, vsp) = Connection::pair().unwrap();
    let server = std::thread::spawn(move || serve(&vsp, &mut Nothing));
    vmm.send(
        &Message::Hello {
            version: 1,
            features: 0,
        },
        &[],
    )
    .unwrap();
    assert!(matches!(
        vmm.recv(T).unwrap().0,
        Message::Hello { version: 1, .. }
    ));
    let f = ring_memfd("ram", 1 << 20).unwrap();
    let region = |gpa, size, fd_offset| Region {
        gpa,
        size,
        fd_offset,
    };
    let kick = Doorbell::new().unwrap();
    let call = Doorbell::new().unwrap();
    let open = |pages: Vec<u64>, offset| {
        Message::Open(ChannelOpen {
            relid: 1,
            subchannel_index: 0,
            target_vp: 0,
            connection_id: 1,
            downstream_offset: offset,
            user_data: [0; 120],
            ring_pages: pages,
        })
    };
    // Open before any memory table.
    vmm.send(&open((0..8).collect(), 4), &[kick.as_fd(), call.as_fd()])
        .unwrap();
    assert_ne!(reply_status(&vmm, ty::OPEN), 0);
    // Region past the end of its file; unaligned; overlapping.
    for table in [
        vec![region(0, 2 << 20, 0)],
        vec![region(0, 4096, 100)],
        vec![region(0, 1 << 19, 0), region(4096, 4096, 0)],
    ] {
        let fds: Vec<_> = table.iter().map(|_| f.as_fd()).collect();
        vmm.send(&Message::SetMemory { regions: table }, &fds)
            .unwrap();
        assert_ne!(reply_status(&vmm, ty::SET_MEMORY), 0);
    }
    vmm.send(
        &Message::SetMemory {
            regions: vec![region(0, 1 << 20, 0)],
        },
        &[f.as_fd()],
    )
    .unwrap();
    assert_eq!(reply_status(&vmm, ty::SET_MEMORY), 0);
    // Ring pages outside guest memory; a one-page ring; then a good one.
    vmm.send(
        &open((250..258).collect(), 4),
        &[kick.as_fd(), call.as_fd()],
    )
    .unwrap();
    assert_ne!(reply_status(&vmm, ty::OPEN), 0);
    vmm.send(&open((0..8).collect(), 7), &[kick.as_fd(), call.as_fd()])
        .unwrap();
    assert_ne!(reply_status(&vmm, ty::OPEN), 0);
    vmm.send(&open((0..8).collect(), 4), &[kick.as_fd(), call.as_fd()])
        .unwrap();
    assert_eq!(reply_status(&vmm, ty::OPEN), 0);
    // GPADLs: outside guest memory, ranges not covering the PFNs, a good one, a duplicate handle,
    // revoking it twice.
    let gpadl = |handle, ranges: Vec<(u32, u32, u32)>, pfns: Vec<u64>| {
        Message::Gpadl(GpadlInfo {
            relid: 1,
            handle,
            ranges,
            pfns,
        })
    };
    for bad in [
        gpadl(7, vec![(0, 8192, 2)], vec![300, 301]),
        gpadl(7, vec![(0, 8192, 2)], vec![10]),
        gpadl(7, vec![(4096, 1, 1)], vec![10]),
        gpadl(7, vec![], vec![]),
    ] {
        vmm.send(&bad, &[]).unwrap();
        assert_ne!(reply_status(&vmm, ty::GPADL), 0);
    }
    vmm.send(
        &gpadl(7, vec![(0, 8192, 2), (100, 50, 1)], vec![10, 11, 12]),
        &[],
    )
    .unwrap();
    assert_eq!(reply_status(&vmm, ty::GPADL), 0);
    vmm.send(&gpadl(7, vec![(0, 4096, 1)], vec![13]), &[])
        .unwrap();
    assert_ne!(reply_status(&vmm, ty::GPADL), 0);
    vmm.send(&Message::GpadlRevoke { handle: 7 }, &[]).unwrap();
    assert_eq!(reply_status(&vmm, ty::GPADL_REVOKE), 0);
    vmm.send(&Message::GpadlRevoke { handle: 7 }, &[]).unwrap();
    assert_ne!(reply_status(&vmm, ty::GPADL_REVOKE), 0);
    // A second open of the same relid, a close of an unknown one.
    vmm.send(&open((8..16).collect(), 4), &[kick.as_fd(), call.as_fd()])
        .unwrap();
    assert_ne!(reply_status(&vmm, ty::OPEN), 0);
    vmm.send(&Message::Close { relid: 9 }, &[]).unwrap();
    assert_ne!(reply_status(&vmm, ty::CLOSE), 0);
    // Garbage ends the connection with a protocol error, not a crash.
    vmm.send(
        &Message::Reply {
            request: 77,
            relid: 0,
            status: 0,
        },
        &[],
    )
    .unwrap();
    let r = server.join().unwrap();
    assert!(
        matches!(r, Err(ServeError::Protocol(ProtocolError::Unexpected(_)))),
        "{r:?}"
    );
}

#[test]
fn vmm_cuts_off_a_vsp_that_answers_garbage() {
    // Wrong version.
    let (vmm, vsp) = Connection::pair().unwrap();
    let fake = std::thread::spawn(move || {
        vsp.recv(T).unwrap();
        vsp.send(
            &Message::Hello {
                version: 99,
                features: 0,
            },
            &[],
        )
        .unwrap();
    });
    assert!(matches!(
        VspClient::connect(vmm, T),
        Err(VmmError::Protocol(ProtocolError::Version(99)))
    ));
    fake.join().unwrap();

    // A reply to the wrong request, then silence.
    let (vmm, vsp) = Connection::pair().unwrap();
    let fake = std::thread::spawn(move || {
        vsp.recv(T).unwrap();
        vsp.send(
            &Message::Hello {
                version: 1,
                features: 0,
            },
            &[],
        )
        .unwrap();
        vsp.recv(T).unwrap();
        vsp.send(
            &Message::Reply {
                request: ty::CLOSE,
                relid: 5,
                status: 0,
            },
            &[],
        )
        .unwrap();
        vsp.recv(T).unwrap();
        std::thread::sleep(Duration::from_millis(300));
    });
    let mut client = VspClient::connect(vmm, Some(Duration::from_millis(100))).unwrap();
    let info = OpenChannelInfo {
        relid: 1,
        subchannel_index: 0,
        ring_pages: (0..8).collect(),
        downstream_offset: 4,
        target_vp: 0,
        connection_id: 1,
        user_data: [0; 120],
    };
    let kick = Doorbell::new().unwrap();
    let r = client.open(&info, kick.as_fd(), kick.as_fd());
    assert!(
        matches!(r, Err(VmmError::Protocol(ProtocolError::Unexpected(_)))),
        "{r:?}"
    );
    // A hung VSP times out instead of hanging the VMM.
    let r = client.close(1);
    assert!(
        matches!(r, Err(VmmError::Recv(vmbus_core::oop::RecvError::TimedOut))),
        "{r:?}"
    );
    fake.join().unwrap();

    // Raw garbage bytes on the socket.
    let (vmm, vsp) = Connection::pair().unwrap();
    let fake = std::thread::spawn(move || {
        vsp.recv(T).unwrap();
        let junk = [0xAAu8; 40];
        // SAFETY: writes 40 bytes from a live buffer to a socket we own.
        unsafe {
            libc::write(
                std::os::fd::AsRawFd::as_raw_fd(&vsp.as_fd()),
                junk.as_ptr().cast(),
                junk.len(),
            )
        };
    });
    assert!(matches!(VspClient::connect(vmm, T), Err(VmmError::Recv(_))));
    fake.join().unwrap();
}

#[test]
fn vsp_refuses_bad_inflight_journals() {
    let (vmm, vsp) = Connection::pair().unwrap();
    let server = std::thread::spawn(move || serve(&vsp, &mut Nothing));
    vmm.send(
        &Message::Hello {
            version: 1,
            features: 0,
        },
        &[],
    )
    .unwrap();
    assert!(matches!(
        vmm.recv(T).unwrap().0,
        Message::Hello { version: 1, .. }
    ));
    let f = ring_memfd("inflight", 64 * 1024).unwrap();
    // Larger than the file, smaller than the file, not a page multiple, zero, beyond 1 MiB.
    for size in [128 * 1024, 4096, 1000, 0, 2 << 20] {
        vmm.send(&Message::Inflight { size }, &[f.as_fd()]).unwrap();
        assert_ne!(reply_status(&vmm, ty::INFLIGHT), 0, "size {size}");
    }
    let big = ring_memfd("inflight-big", 2 << 20).unwrap();
    vmm.send(&Message::Inflight { size: 2 << 20 }, &[big.as_fd()])
        .unwrap();
    assert_ne!(reply_status(&vmm, ty::INFLIGHT), 0);
    vmm.send(&Message::Inflight { size: 64 * 1024 }, &[f.as_fd()])
        .unwrap();
    assert_eq!(reply_status(&vmm, ty::INFLIGHT), 0);
    // Without its descriptor the message is a protocol violation: the VSP hangs up.
    vmm.send(&Message::Inflight { size: 64 * 1024 }, &[])
        .unwrap();
    assert!(matches!(
        server.join().unwrap(),
        Err(ServeError::Recv(vmbus_core::oop::RecvError::Protocol(
            ProtocolError::FdCount {
                expected: 1,
                got: 0
            }
        )))
    ));
}

#[test]
fn vmm_polls_unsolicited_vsp_messages_and_cuts_off_garbage() {
    // Sub-channel requests between VMM requests are collected (and answered); a flood of them or
    // any other unsolicited message is a protocol violation.
    let (vmm, vsp) = Connection::pair().unwrap();
    let fake = std::thread::spawn(move || {
        vsp.recv(T).unwrap();
        vsp.send(
            &Message::Hello {
                version: 1,
                features: 0,
            },
            &[],
        )
        .unwrap();
        vsp.send(&Message::OfferSubchannels { count: 3 }, &[])
            .unwrap();
        // The VMM's acknowledgement.
        let (ack, _) = vsp.recv(T).unwrap();
        assert!(matches!(
            ack,
            Message::Reply {
                request: ty::OFFER_SUBCHANNELS,
                ..
            }
        ));
        // Give the VMM time to collect the request before the garbage arrives.
        std::thread::sleep(Duration::from_millis(200));
        vsp.send(
            &Message::State {
                state: vec![1, 2, 3],
            },
            &[],
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(300));
    });
    let mut client = VspClient::connect(vmm, T).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    while got.is_empty() && std::time::Instant::now() < deadline {
        client.poll_requests().unwrap();
        got = client.take_subchannel_requests();
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(got, [3]);
    let r = loop {
        match client.poll_requests() {
            Ok(()) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            r => break r,
        }
    };
    assert!(
        matches!(r, Err(VmmError::Protocol(ProtocolError::Unexpected(_)))),
        "{r:?}"
    );
    fake.join().unwrap();

    // A flood of requests nobody collects.
    let (vmm, vsp) = Connection::pair().unwrap();
    let fake = std::thread::spawn(move || {
        vsp.recv(T).unwrap();
        vsp.send(
            &Message::Hello {
                version: 1,
                features: 0,
            },
            &[],
        )
        .unwrap();
        for _ in 0..100 {
            if vsp
                .send(&Message::OfferSubchannels { count: 1 }, &[])
                .is_err()
            {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    });
    let mut client = VspClient::connect(vmm, T).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let r = client.poll_requests();
    assert!(
        matches!(r, Err(VmmError::Protocol(ProtocolError::Invalid(_)))),
        "{r:?}"
    );
    fake.join().unwrap();
}

/// Keeps the call doorbell of the channel it opens, for the test to ring as the device would.
struct CallKeeper(std::sync::Arc<std::sync::Mutex<Option<Doorbell>>>);

impl HostedDevice for CallKeeper {
    fn open(&mut self, r: ChannelResources, _: &mut dyn ChannelControl) -> Result<(), DeviceError> {
        *self.0.lock().unwrap() = Some(r.call);
        Ok(())
    }
    fn close(&mut self, _: u32) {
        *self.0.lock().unwrap() = None;
    }
}

#[test]
fn vsp_refuses_signal_targets_outside_memory_and_sets_the_flag_before_calling() {
    use std::os::unix::fs::FileExt;
    let (vmm, vsp) = Connection::pair().unwrap();
    let slot = std::sync::Arc::new(std::sync::Mutex::new(None));
    let keeper = CallKeeper(slot.clone());
    let server = std::thread::spawn(move || serve(&vsp, &mut { keeper }));
    vmm.send(
        &Message::Hello {
            version: 1,
            features: vmbus_core::oop::wire::FEATURE_SIGNAL_TARGET,
        },
        &[],
    )
    .unwrap();
    match vmm.recv(T).unwrap().0 {
        Message::Hello { features, .. } => {
            assert_ne!(features & vmbus_core::oop::wire::FEATURE_SIGNAL_TARGET, 0)
        }
        other => panic!("unexpected {other:?}"),
    }
    // 1 MiB of guest RAM at GPA 1 MiB.
    let base = 1u64 << 20;
    let f = ring_memfd("ram", 1 << 20).unwrap();
    vmm.send(
        &Message::SetMemory {
            regions: vec![Region {
                gpa: base,
                size: 1 << 20,
                fd_offset: 0,
            }],
        },
        &[f.as_fd()],
    )
    .unwrap();
    assert_eq!(reply_status(&vmm, ty::SET_MEMORY), 0);
    let target = |relid, target| Message::SignalTarget { relid, target };
    // Before the channel is open: refused.
    vmm.send(&target(1, Some((base + 0x800, 5))), &[]).unwrap();
    assert_ne!(reply_status(&vmm, ty::SIGNAL_TARGET), 0);
    let kick = Doorbell::new().unwrap();
    let call = Doorbell::new().unwrap();
    vmm.send(
        &Message::Open(ChannelOpen {
            relid: 1,
            subchannel_index: 0,
            target_vp: 0,
            connection_id: 1,
            downstream_offset: 4,
            user_data: [0; 120],
            ring_pages: (256..264).collect(),
        }),
        &[kick.as_fd(), call.as_fd()],
    )
    .unwrap();
    assert_eq!(reply_status(&vmm, ty::OPEN), 0);
    // Outside the memory table (below, past the end, straddling it), misaligned, another relid.
    for bad in [
        target(1, Some((0x800, 0))),
        target(1, Some((base + (1 << 20), 0))),
        target(1, Some((base + (1 << 20) - 2, 0))),
        target(1, Some((u64::MAX - 3, 0))),
        target(1, Some((base + 0x801, 0))),
        target(9, Some((base + 0x800, 0))),
    ] {
        vmm.send(&bad, &[]).unwrap();
        assert_ne!(reply_status(&vmm, ty::SIGNAL_TARGET), 0, "{bad:?}");
    }
    let ring = || slot.lock().unwrap().as_ref().unwrap().ring().unwrap();
    let word = || {
        let mut b = [0u8; 4];
        f.read_exact_at(&mut b, 0x800).unwrap();
        u32::from_le_bytes(b)
    };
    // Refused targets changed nothing: the device only calls.
    ring();
    assert!(call.clear().unwrap());
    assert_eq!(word(), 0);
    // A good target: flag first, then the call; a flag still set needs no second call.
    vmm.send(&target(1, Some((base + 0x800, 5))), &[]).unwrap();
    assert_eq!(reply_status(&vmm, ty::SIGNAL_TARGET), 0);
    ring();
    assert_eq!(word(), 1 << 5);
    assert!(call.clear().unwrap());
    ring();
    assert!(!call.clear().unwrap());
    // Back to the VMM: call only.
    vmm.send(&target(1, None), &[]).unwrap();
    assert_eq!(reply_status(&vmm, ty::SIGNAL_TARGET), 0);
    f.write_all_at(&[0; 4], 0x800).unwrap();
    ring();
    assert!(call.clear().unwrap());
    assert_eq!(word(), 0);
    // The VSP is alive and serving.
    vmm.send(&Message::Close { relid: 1 }, &[]).unwrap();
    assert_eq!(reply_status(&vmm, ty::CLOSE), 0);
    drop(vmm);
    assert!(server.join().unwrap().is_ok());
}
