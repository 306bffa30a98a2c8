//! Durability: storvsp runs in a real child process (this test binary re-run as a VSP over the
//! VMM ↔ VSP protocol), serving a raw image file through io_uring. The guest side (this process)
//! writes, gets SYNCHRONIZE CACHE and FUA writes acknowledged, keeps more writes in flight, and
//! then the VSP is killed with SIGKILL. Everything acknowledged must be in the file.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use std::os::fd::{AsFd, OwnedFd};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use vmbus_core::oop::{Region, Supervisor, connection_from_env, serve};
use vmbus_core::wire::Guid;
use vsp_storage::backend::raw::{RawDisk, RawOptions};
use vsp_storage::storvsp::{LunAddr, StorVsp, StorVspConfig};

const DISK_ENV: &str = "VSP_STORAGE_DURABILITY_DISK";
const DISK_BYTES: u64 = 16 << 20;
const CHUNK: u32 = 64 * 1024;

/// The VSP process: serves the disk named in the environment until killed.
#[test]
fn durability_vsp_child() {
    let Ok(path) = std::env::var(DISK_ENV) else {
        return;
    };
    // SAFETY: the supervisor passed this socket to this process only; it is taken once, here.
    let Some(conn) = (unsafe { connection_from_env() }) else {
        return;
    };
    let disk = Arc::new(RawDisk::open(path.as_ref(), &RawOptions::default()).unwrap());
    let mut vsp = StorVsp::new(StorVspConfig::new(Guid::from_u128(0xD15C)), None).unwrap();
    vsp.add_raw_lun(LunAddr::new(0, 0, 0), disk);
    serve(&conn, &mut vsp).unwrap();
}

#[test]
fn acknowledged_writes_survive_sigkill_of_the_vsp() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("durable.raw");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(DISK_BYTES)
        .unwrap();
    let ram = Ram::new();
    let exe = std::env::current_exe().unwrap();
    let p = path.clone();
    let command = move || {
        let mut c = Command::new(&exe);
        c.args([
            "--exact",
            "durability_vsp_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(DISK_ENV, &p)
        .stdout(Stdio::null());
        c
    };
    let memory = vec![(
        Region {
            gpa: 0,
            size: RAM_PAGES * PAGE,
            fd_offset: 0,
        },
        OwnedFd::from(ram.file.try_clone().unwrap()),
    )];
    let mut sup = Supervisor::start(command, memory, Duration::from_secs(20)).unwrap();
    let mut ch = GuestChannel::new(&ram, 1, 0, 64);
    sup.open(
        ch.info.clone(),
        ch.kick.as_fd().try_clone_to_owned().unwrap(),
        ch.call.as_fd().try_clone_to_owned().unwrap(),
    )
    .unwrap();
    let pid = sup.pid().unwrap();
    ch.linux_init();
    let mem = ram.mem.clone();
    let blocks = (CHUNK / 512) as u16;
    let write = |ch: &mut GuestChannel, id: u64, chunk: u64, generation: u64, fua: bool| {
        let b = Buf::new(1000 + (id % 64) * 17, 0, CHUNK);
        b.write(mem.as_ref(), &pattern(chunk, generation, CHUNK as usize));
        let lba = (chunk * u64::from(CHUNK) / 512) as u32;
        ch.send(
            id,
            &srb((0, 0, 0), &write10(lba, blocks, fua), 0, CHUNK),
            64,
            b.range(),
        );
    };
    let ok = |r: &Reply| {
        let s = r.srb();
        assert_eq!(
            (s.srb_status, s.scsi_status, s.data_transfer_length),
            (1, 0, CHUNK)
        );
    };

    // Round 1: 32 chunks in flight at once, then SYNCHRONIZE CACHE; its completion is the ack.
    for c in 0..32 {
        write(&mut ch, 1 + c, c, 1, false);
        if c % 16 == 15 {
            for id in c - 14..=c + 1 {
                ok(&ch.wait(id));
            }
        }
    }
    ch.send(
        100,
        &srb((0, 0, 0), &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], 2, 0),
        64,
        None,
    );
    let r = ch.wait(100);
    assert_eq!((r.srb().srb_status, r.status()), (1, 0));
    // Round 2: FUA writes, each acknowledged on its own.
    for c in 32..48 {
        write(&mut ch, 200 + c, c, 2, true);
        ok(&ch.wait(200 + c));
    }
    // Round 3: unacknowledged writes still in flight (overwriting round 1 chunks 0..16).
    for c in 0..16 {
        write(&mut ch, 400 + c, c, 3, false);
    }
    sup.kill();
    // SIGKILL and reaped: the process is gone.
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());

    let file = std::fs::read(&path).unwrap();
    let at = |c: u64| &file[(c * u64::from(CHUNK)) as usize..((c + 1) * u64::from(CHUNK)) as usize];
    for c in 0..16 {
        // Acknowledged by the flush, possibly overwritten by the in-flight round 3: either is fine,
        // anything else (a torn or lost write) is not.
        let chunk = at(c);
        assert!(
            chunk == &pattern(c, 1, CHUNK as usize)[..]
                || chunk == &pattern(c, 3, CHUNK as usize)[..]
                || (0..CHUNK as usize / 512).all(|s| {
                    let sector = &chunk[s * 512..(s + 1) * 512];
                    sector == &pattern(c, 1, CHUNK as usize)[s * 512..(s + 1) * 512]
                        || sector == &pattern(c, 3, CHUNK as usize)[s * 512..(s + 1) * 512]
                }),
            "chunk {c} lost its acknowledged data"
        );
    }
    for c in 16..32 {
        assert!(
            at(c) == &pattern(c, 1, CHUNK as usize)[..],
            "flushed chunk {c} lost"
        );
    }
    for c in 32..48 {
        assert!(
            at(c) == &pattern(c, 2, CHUNK as usize)[..],
            "FUA chunk {c} lost"
        );
    }
    assert!(file[48 * CHUNK as usize..].iter().all(|&b| b == 0));
}
