//! Requests a VSP had read but not answered when it was killed are executed by its successor.
//!
//! storvsp runs in a child process (this test binary re-run as a VSP) over a disk whose I/O can be
//! held back. The guest side writes requests, waits until the VSP has every one of them in hand
//! (each has entered the disk), and the VSP is killed with SIGKILL. A fresh VSP on the same rings,
//! restored from the saved session, must answer every request exactly once, without the guest
//! sending anything again: the dead VSP left them in the guest→host ring (its `read_index` only
//! passes a request once the completion is published).
//!
//! Requests answered out of order behind a held one also stay in the ring; the in-flight journal
//! the supervisor keeps across VSP processes tells the successor they were answered, so it does not
//! execute them again.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use ringbuf::ControlWord;
use ringbuf::mmap::MappedRing;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmbus_core::oop::{Region, Supervisor, connection_from_env, serve};
use vmbus_core::wire::Guid;
use vsp_storage::backend::raw::{RawDisk, RawOptions};
use vsp_storage::block::{BlockDevice, BlockError};
use vsp_storage::storvsp::{LunAddr, StorVsp, StorVspConfig};

const DISK_ENV: &str = "VSP_STORAGE_UNANSWERED_DISK";
const HOLD_ENV: &str = "VSP_STORAGE_UNANSWERED_HOLD";
const LOG_ENV: &str = "VSP_STORAGE_UNANSWERED_LOG";
const DISK_BYTES: u64 = 4 << 20;
const CHUNK: u32 = 16 * 1024;
/// Requests in the VSP's hands when it is killed (fewer than its worker threads, so every one
/// of them reaches the disk).
const HELD: u64 = 8;

/// A disk whose I/O waits while the hold file exists (all of it if the file is empty, else only
/// I/O at the byte offset written in it); every call is logged (one line) first.
struct Gate {
    inner: RawDisk,
    hold: PathBuf,
    log: Mutex<std::fs::File>,
}

impl Gate {
    fn held(&self, offset: Option<u64>) -> bool {
        let Ok(text) = std::fs::read_to_string(&self.hold) else {
            return false;
        };
        match text.trim() {
            "" => true,
            t => t.parse::<u64>().ok() == offset,
        }
    }

    fn enter(&self, offset: Option<u64>) {
        {
            let mut log = self.log.lock().unwrap();
            log.write_all(b"io\n").unwrap();
            log.flush().unwrap();
        }
        while self.held(offset) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl BlockDevice for Gate {
    fn sector_size(&self) -> u32 {
        self.inner.sector_size()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.enter(Some(offset));
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8], fua: bool) -> Result<(), BlockError> {
        self.enter(Some(offset));
        self.inner.write_at(offset, buf, fua)
    }
    fn flush(&self) -> Result<(), BlockError> {
        self.enter(None);
        self.inner.flush()
    }
}

/// The VSP process: serves the gated disk named in the environment until killed.
#[test]
fn unanswered_vsp_child() {
    let (Ok(disk), Ok(hold), Ok(log)) = (
        std::env::var(DISK_ENV),
        std::env::var(HOLD_ENV),
        std::env::var(LOG_ENV),
    ) else {
        return;
    };
    // SAFETY: the supervisor passed this socket to this process only; it is taken once, here.
    let Some(conn) = (unsafe { connection_from_env() }) else {
        return;
    };
    let gate = Gate {
        inner: RawDisk::open(disk.as_ref(), &RawOptions::default()).unwrap(),
        hold: hold.into(),
        log: Mutex::new(
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(log)
                .unwrap(),
        ),
    };
    let mut config = StorVspConfig::new(Guid::from_u128(0x0DEAD));
    config.io_threads = 2 * HELD as usize;
    let mut vsp = StorVsp::new(config, None).unwrap();
    // No asynchronous queue: every SRB goes through the (gated) worker pool.
    vsp.add_lun(LunAddr::new(0, 0, 0), Arc::new(gate), None, None);
    serve(&conn, &mut vsp).unwrap();
}

fn log_lines(log: &Path) -> usize {
    std::fs::read(log).map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count())
}

fn until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn requests_read_but_unanswered_by_a_killed_vsp_are_executed_by_its_successor() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    let hold = dir.path().join("hold");
    let log = dir.path().join("io.log");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(DISK_BYTES)
        .unwrap();
    let ram = Ram::new();
    let exe = std::env::current_exe().unwrap();
    let (d, h, l) = (disk.clone(), hold.clone(), log.clone());
    let command = move || {
        let mut c = Command::new(&exe);
        c.args([
            "--exact",
            "unanswered_vsp_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(DISK_ENV, &d)
        .env(HOLD_ENV, &h)
        .env(LOG_ENV, &l)
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
    ch.linux_init();
    // The session survives the restart (no new handshake from the guest).
    sup.refresh_state().unwrap();

    // The guest→host ring as the guest sees it (its first RING_PAGES pages).
    let up: Vec<u64> = ch.info.ring_pages[..RING_PAGES as usize]
        .iter()
        .map(|pfn| pfn * PAGE)
        .collect();
    let up = MappedRing::map_pages(ram.file.as_fd(), &up).unwrap();
    let index = |w: ControlWord| {
        use ringbuf::RingMem;
        up.control(w).load(Ordering::Acquire)
    };

    let mem = ram.mem.clone();
    let blocks = (CHUNK / 512) as u16;
    let bufs: Vec<Buf> = (0..16).map(|i| Buf::new(1000 + i * 8, 0, CHUNK)).collect();
    let write = |ch: &mut GuestChannel, id: u64, chunk: u64, generation: u64| {
        let b = &bufs[(id % 16) as usize];
        b.write(mem.as_ref(), &pattern(chunk, generation, CHUNK as usize));
        let lba = (chunk * u64::from(CHUNK) / 512) as u32;
        ch.send(
            id,
            &srb((0, 0, 0), &write10(lba, blocks, false), 0, CHUNK),
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

    // Answered requests: their space goes back to the guest.
    for c in 0..4 {
        write(&mut ch, 1 + c, c, 1);
        ok(&ch.wait(1 + c));
    }
    until(
        "answered requests released",
        Duration::from_secs(10),
        || index(ControlWord::ReadIndex) == index(ControlWord::WriteIndex),
    );
    let released = index(ControlWord::ReadIndex);
    assert_eq!(log_lines(&log), 4);

    // Requests the VSP takes and cannot answer yet.
    std::fs::File::create(&hold).unwrap();
    for i in 0..HELD {
        write(&mut ch, 100 + i, 4 + i, 2);
    }
    until(
        "every held request in the VSP's hands",
        Duration::from_secs(20),
        || log_lines(&log) == 4 + HELD as usize,
    );
    // Read, not answered: still in the ring as far as the guest and a successor can tell.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        index(ControlWord::ReadIndex),
        released,
        "the VSP released ring space of requests it had not answered"
    );
    assert_eq!(ch.poll(Duration::from_millis(50)), 0, "nothing answered");

    sup.kill();
    std::fs::remove_file(&hold).unwrap();
    assert!(sup.ensure_running().unwrap(), "a new VSP");

    // The successor answers every request once; the guest sent nothing again.
    for i in 0..HELD {
        assert!(
            ch.arrives(100 + i, Duration::from_secs(20)),
            "request {} lost with the killed VSP",
            100 + i
        );
        ok(&ch.wait(100 + i));
    }
    // No late duplicates (`poll` refuses a second completion for an id).
    ch.poll(Duration::from_millis(300));
    assert!(
        ch.early.is_empty(),
        "unexpected completions: {:?}",
        ch.early
    );
    until("everything released", Duration::from_secs(10), || {
        index(ControlWord::ReadIndex) == index(ControlWord::WriteIndex)
    });
    // Executed again by the successor, exactly the held ones.
    assert_eq!(log_lines(&log), 4 + 2 * HELD as usize);

    let file = std::fs::read(&disk).unwrap();
    let at = |c: u64| &file[(c * u64::from(CHUNK)) as usize..((c + 1) * u64::from(CHUNK)) as usize];
    for c in 0..4 {
        assert!(at(c) == &pattern(c, 1, CHUNK as usize)[..], "chunk {c}");
    }
    for i in 0..HELD {
        let c = 4 + i;
        assert!(at(c) == &pattern(c, 2, CHUNK as usize)[..], "chunk {c}");
    }
    assert!(
        file[((4 + HELD) * u64::from(CHUNK)) as usize..]
            .iter()
            .all(|&b| b == 0)
    );
}

#[test]
fn requests_answered_out_of_order_are_not_executed_again_by_a_successor() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    let hold = dir.path().join("hold");
    let log = dir.path().join("io.log");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(DISK_BYTES)
        .unwrap();
    let ram = Ram::new();
    let exe = std::env::current_exe().unwrap();
    let (d, h, l) = (disk.clone(), hold.clone(), log.clone());
    let command = move || {
        let mut c = Command::new(&exe);
        c.args([
            "--exact",
            "unanswered_vsp_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(DISK_ENV, &d)
        .env(HOLD_ENV, &h)
        .env(LOG_ENV, &l)
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
    ch.linux_init();
    sup.refresh_state().unwrap();
    let up: Vec<u64> = ch.info.ring_pages[..RING_PAGES as usize]
        .iter()
        .map(|pfn| pfn * PAGE)
        .collect();
    let up = MappedRing::map_pages(ram.file.as_fd(), &up).unwrap();
    let index = |w: ControlWord| {
        use ringbuf::RingMem;
        up.control(w).load(Ordering::Acquire)
    };
    let released = index(ControlWord::ReadIndex);
    assert_eq!(released, index(ControlWord::WriteIndex));

    let mem = ram.mem.clone();
    let blocks = (CHUNK / 512) as u16;
    let bufs: Vec<Buf> = (0..4).map(|i| Buf::new(1000 + i * 8, 0, CHUNK)).collect();
    let write = |ch: &mut GuestChannel, id: u64, chunk: u64, generation: u64| {
        let b = &bufs[(id % 4) as usize];
        b.write(mem.as_ref(), &pattern(chunk, generation, CHUNK as usize));
        let lba = (chunk * u64::from(CHUNK) / 512) as u32;
        ch.send(
            id,
            &srb((0, 0, 0), &write10(lba, blocks, false), 0, CHUNK),
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

    // A (chunk 0) is held in the disk; B (chunk 1), read after it, completes.
    std::fs::write(&hold, b"0").unwrap();
    write(&mut ch, 1, 0, 1);
    until("A in the disk", Duration::from_secs(20), || {
        log_lines(&log) == 1
    });
    write(&mut ch, 2, 1, 1);
    assert!(ch.arrives(2, Duration::from_secs(20)), "B answered");
    ok(&ch.wait(2));
    assert_eq!(log_lines(&log), 2);
    // Both stay in the ring: A is unanswered and B lies behind it.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(index(ControlWord::ReadIndex), released);

    sup.kill();
    std::fs::remove_file(&hold).unwrap();
    assert!(sup.ensure_running().unwrap(), "a new VSP");

    assert!(ch.arrives(1, Duration::from_secs(20)), "A lost");
    ok(&ch.wait(1));
    ch.poll(Duration::from_millis(300));
    assert!(
        ch.early.is_empty(),
        "unexpected completions: {:?}",
        ch.early
    );
    until("everything released", Duration::from_secs(10), || {
        index(ControlWord::ReadIndex) == index(ControlWord::WriteIndex)
    });
    // A ran twice (killed in the disk, then again); B only once.
    assert_eq!(log_lines(&log), 3, "B executed again by the successor");

    // The ring and the journal keep working: a later request is executed and released.
    write(&mut ch, 3, 2, 1);
    assert!(ch.arrives(3, Duration::from_secs(20)));
    ok(&ch.wait(3));
    assert_eq!(log_lines(&log), 4);
    until("released again", Duration::from_secs(10), || {
        index(ControlWord::ReadIndex) == index(ControlWord::WriteIndex)
    });

    let file = std::fs::read(&disk).unwrap();
    let at = |c: u64| &file[(c * u64::from(CHUNK)) as usize..((c + 1) * u64::from(CHUNK)) as usize];
    for c in 0..3 {
        assert!(at(c) == &pattern(c, 1, CHUNK as usize)[..], "chunk {c}");
    }
}
