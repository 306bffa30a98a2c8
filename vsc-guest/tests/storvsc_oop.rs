//! storvsc against storvsp in a child process (`vmbus_core::oop::Supervisor` + `serve`), guest RAM
//! and rings shared by memfd: bring-up, read / write / flush / unmap round trips and QD32 I/O over
//! two channels.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use vmbus_core::oop::{HostedDevice, connection_from_env, serve};
use vmbus_core::wire::Guid;
use vsc_guest::harness::{HarnessConfig, IoOp, StorHarness, Vsp};
use vsc_guest::storvsc::DiscardMode;
use vsp_storage::backend::raw::{RawDisk, RawOptions};
use vsp_storage::storvsp::{LunAddr, StorVsp, StorVspConfig};

const INSTANCE: Guid = Guid::from_u128(0x5c5c_0002_0000_4000_8000_0000_0000_0002);
const DISK_ENV: &str = "STORVSC_OOP_DISK";
const SUBS_ENV: &str = "STORVSC_OOP_SUBCHANNELS";
/// Set for a restarted VSP: the storvsp session state (`HostedDevice::save` format) to resume.
const RESTORE_ENV: &str = "STORVSC_OOP_RESTORE";

/// The VSP process: storvsp over the raw file named in the environment, until the VMM hangs up.
#[test]
fn storvsp_child() {
    // SAFETY: the supervisor passed this socket to this process only; it is taken once, here.
    let Some(conn) = (unsafe { connection_from_env() }) else {
        return;
    };
    let path = std::env::var(DISK_ENV).unwrap();
    let subs: u16 = std::env::var(SUBS_ENV).unwrap().parse().unwrap();
    let mut cfg = StorVspConfig::new(INSTANCE);
    cfg.protocol.max_subchannels = subs;
    cfg.io_threads = 2;
    let vsp = StorVsp::new(cfg, None).unwrap();
    let disk = RawDisk::open(Path::new(&path), &RawOptions::default()).unwrap();
    vsp.add_raw_lun(LunAddr::new(0, 0, 0), Arc::new(disk));
    let mut vsp = vsp;
    if let Ok(hex) = std::env::var(RESTORE_ENV) {
        let state: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        HostedDevice::restore(&mut vsp, &state).unwrap();
    }
    serve(&conn, &mut vsp).unwrap();
}

fn child(path: &Path, subs: u16) -> Vsp {
    let path = path.to_path_buf();
    let mut starts = 0u32;
    Vsp::Child(Box::new(move || {
        let mut c = Command::new(std::env::current_exe().unwrap());
        c.args([
            "--exact",
            "storvsp_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(DISK_ENV, &path)
        .env(SUBS_ENV, subs.to_string())
        .stdout(std::process::Stdio::null());
        if starts > 0 {
            // A restart resumes the session the guest negotiated (WIN10, initialised, `subs`
            // sub-channels) in storvsp's saved-state layout: Supervisor cannot fetch it itself.
            let s = subs.to_le_bytes();
            c.env(
                RESTORE_ENV,
                format!("56535431020601{:02x}{:02x}", s[0], s[1]),
            );
        }
        starts += 1;
        c
    }))
}

fn pattern(lba: u64, seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((lba * 512 + i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed) as u8)
        .collect()
}

#[test]
fn cross_process_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    drop(RawDisk::create(&path, 16384 * 512, &RawOptions::default()).unwrap());
    let mut cfg = HarnessConfig {
        queues: 2,
        ram_pages: 16384,
        timeout: Duration::from_secs(20),
        ..HarnessConfig::default()
    };
    cfg.description.instance = INSTANCE;
    cfg.description.max_subchannels = 1;
    let mut h = StorHarness::start(cfg, child(&path, 1)).unwrap();
    let pid = h.supervisor().unwrap().pid().unwrap();
    assert_ne!(pid, std::process::id());
    assert_eq!(h.channel_relids().len(), 2);
    let d = h.disk().unwrap().clone();
    assert_eq!((d.blocks, d.discard), (16384, DiscardMode::Unmap));

    let data = pattern(10, 1, 512 << 10);
    h.write(10, &data).unwrap();
    let mut back = vec![0u8; data.len()];
    h.read(10, &mut back).unwrap();
    assert_eq!(back, data);
    h.flush().unwrap();
    h.unmap(10, 64).unwrap();
    let mut z = vec![1u8; 64 * 512];
    h.read(10, &mut z).unwrap();
    assert!(z.iter().all(|&b| b == 0));

    // QD32 over both channels.
    let bufs: Vec<_> = (0..32).map(|_| h.ram().alloc(16384).unwrap()).collect();
    for round in 0..20u64 {
        for (i, b) in bufs.iter().enumerate() {
            let lba = 4096 + i as u64 * 32;
            h.ram().write(b, 0, &pattern(lba, round, 16384)).unwrap();
            h.submit(IoOp::Write {
                lba,
                buf: b.clone(),
                fua: false,
            })
            .unwrap();
        }
        let mut done = 0;
        while done < 32 {
            for d in h.poll(Duration::from_secs(10)).unwrap() {
                assert_eq!(d.result, Ok(16384));
                done += 1;
            }
        }
    }
    let file = std::fs::read(&path).unwrap();
    for i in 0..32u64 {
        let lba = 4096 + i * 32;
        let at = (lba * 512) as usize;
        assert_eq!(
            &file[at..at + 16384],
            &pattern(lba, 19, 16384)[..],
            "slot {i}"
        );
    }
    assert!(h.completions_per_channel().iter().all(|&n| n > 0));
    let st = h.driver().stats();
    assert_eq!((st.duplicates, st.unknown, st.malformed), (0, 0, 0));
    // The child is still the one we started.
    assert_eq!(h.supervisor().unwrap().pid(), Some(pid));
}

#[test]
fn vsp_killed_during_io_is_restarted_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    const BLOCKS: u64 = 16 * 64;
    drop(RawDisk::create(&path, BLOCKS * 512, &RawOptions::default()).unwrap());
    let mut cfg = HarnessConfig {
        queues: 2,
        ram_pages: 8192,
        timeout: Duration::from_secs(20),
        targets: Some(vec![(0, 0)]),
        ..HarnessConfig::default()
    };
    cfg.description.instance = INSTANCE;
    cfg.description.max_subchannels = 1;
    let mut h = StorHarness::start(cfg, child(&path, 1)).unwrap();
    // 16 slots, each rewriting its own 32 KiB region and reading it back; the VSP is killed
    // every 60 ms. Requests the dead VSP had taken and not answered are sent again; the rest are
    // still in the ring for its successor. Data must come out exactly as the model says.
    let mut model = vec![0u8; (BLOCKS * 512) as usize];
    let bufs: Vec<_> = (0..16).map(|_| h.ram().alloc(32768).unwrap()).collect();
    let mut state: Vec<(u64, bool, u64)> = Vec::new(); // (tag, writing, round)
    let issue = |h: &mut StorHarness, s: usize, round: u64, model: &mut [u8]| -> (u64, bool) {
        let lba = s as u64 * 64;
        let writing = round.is_multiple_of(2);
        let tag = if writing {
            let data = pattern(lba, round, 32768);
            h.ram().write(&bufs[s], 0, &data).unwrap();
            model[(lba * 512) as usize..(lba * 512) as usize + 32768].copy_from_slice(&data);
            h.submit(IoOp::Write {
                lba,
                buf: bufs[s].clone(),
                fua: false,
            })
            .unwrap()
        } else {
            h.submit(IoOp::Read {
                lba,
                buf: bufs[s].clone(),
            })
            .unwrap()
        };
        (tag, writing)
    };
    for s in 0..16 {
        let (tag, w) = issue(&mut h, s, 0, &mut model);
        state.push((tag, w, 0));
    }
    let start = std::time::Instant::now();
    let mut last_kill = start;
    let mut kills = 0;
    let mut completed = 0u64;
    while kills < 8 || completed < 2000 {
        if kills < 8 && last_kill.elapsed() > Duration::from_millis(60) {
            // SIGKILL, as a crash would.
            h.supervisor().unwrap().kill();
            last_kill = std::time::Instant::now();
            kills += 1;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "stuck: {completed} done"
        );
        for d in h.poll(Duration::from_secs(5)).unwrap() {
            let s = state.iter().position(|x| x.0 == d.tag).unwrap();
            assert_eq!(d.result, Ok(32768), "slot {s}");
            if !state[s].1 {
                let mut got = vec![0u8; 32768];
                h.ram().read(&bufs[s], 0, &mut got).unwrap();
                let at = s * 64 * 512;
                assert!(
                    got == model[at..at + 32768],
                    "slot {s} round {}",
                    state[s].2
                );
            }
            completed += 1;
            let round = state[s].2 + 1;
            let (tag, w) = issue(&mut h, s, round, &mut model);
            state[s] = (tag, w, round);
        }
    }
    while h.in_flight() > 0 {
        h.poll(Duration::from_secs(5)).unwrap();
    }
    h.flush().unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), model);
    assert!(h.vsp_restarts >= 8, "restarts {}", h.vsp_restarts);
    let st = h.driver().stats();
    eprintln!(
        "completed={completed} restarts={} resent={} duplicates={}",
        h.vsp_restarts, st.resent, st.duplicates
    );
    assert_eq!(st.unknown, 0);
}
