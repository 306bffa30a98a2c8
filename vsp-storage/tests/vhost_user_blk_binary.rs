//! vhost-user-blk end to end through the real `vsp-storage vhost-user-blk` binary: reconnect,
//! SIGTERM, in-flight requests surviving a SIGKILL, VHD images and O_DIRECT bounce buffers.

mod vhost_user_blk_common;
use vhost_user_blk_common::*;

// ---- the real binary ----

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_daemon(socket: &Path, disk: &Path, extra: &[&str]) -> Daemon {
    let _ = std::fs::remove_file(socket);
    let child = Command::new(env!("CARGO_BIN_EXE_vsp-storage"))
        .arg("vhost-user-blk")
        .arg("--socket")
        .arg(socket)
        .arg("--disk")
        .arg(disk)
        .args(extra)
        .spawn()
        .expect("spawn vsp-storage");
    Daemon(child)
}

#[test]
fn binary_serves_reconnects_and_exits_on_sigterm() {
    let dir = tempfile::tempdir().expect("tmp");
    let disk = image(dir.path());
    let socket = dir.path().join("bin.sock");
    let mut d = spawn_daemon(&socket, &disk, &["--queues", "2", "--format", "raw"]);
    for round in 0..2u64 {
        let mut s = Session::open(&socket, 2, 64);
        let w = alloc_req(&mut s.ram, &[4096, 4096]);
        let data = fill(&s.ram, &w, round as u8 + 1);
        assert_eq!(
            submit(&mut s, 1, &w, blk::T_OUT, 256 + round * 16, false).0,
            blk::S_OK
        );
        assert_eq!(file_bytes(&disk, (256 + round * 16) * 512, 8192), data);
        // Dropping the session disconnects; the daemon listens again.
    }
    // SAFETY: plain kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(d.0.id() as i32, libc::SIGTERM) }, 0);
    let end = std::time::Instant::now() + T;
    let status = loop {
        if let Some(st) = d.0.try_wait().expect("try_wait") {
            break st;
        }
        assert!(
            std::time::Instant::now() < end,
            "daemon still running after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal(),
        Some(libc::SIGTERM),
        "daemon ended: {status:?}"
    );
}

#[test]
fn inflight_requests_survive_a_daemon_kill() {
    let dir = tempfile::tempdir().expect("tmp");
    let disk = image(dir.path());
    let socket = dir.path().join("inflight.sock");
    let size = 64u16;
    let mut d = spawn_daemon(&socket, &disk, &["--test-hold-sector", "64"]);
    let mut s = Session::open(&socket, 1, size);
    // The queue is running; set up the inflight region the way QEMU does before the first start
    // (here: right after, which the daemon picks up on the next ring restart).
    let want = VhostUserInflight {
        mmap_size: 0,
        mmap_offset: 0,
        num_queues: 1,
        queue_size: size,
    };
    let (info, region) = s.fe.get_inflight_fd(&want).expect("GET_INFLIGHT_FD");
    assert!(info.mmap_size >= 16 + 16 * u64::from(size));
    // Re-start the ring so it tracks into the region.
    s.qs[0].setup(&mut s.fe, &s.ram, true).expect("restart");

    let a = alloc_req(&mut s.ram, &[4096]);
    let b = alloc_req(&mut s.ram, &[8192]);
    let da = fill(&s.ram, &a, 0x11);
    let db = fill(&s.ram, &b, 0x22);
    blk::header(&s.ram, a.hdr, blk::T_OUT, 0).expect("hdr");
    blk::header(&s.ram, b.hdr, blk::T_OUT, 60).expect("hdr"); // covers the held sector 64
    let ha = s.qs[0]
        .add(
            &s.ram,
            &[
                (a.hdr, 16, false),
                (a.data[0].0, 4096, false),
                (a.status, 1, true),
            ],
        )
        .expect("add");
    let hb = s.qs[0]
        .add(
            &s.ram,
            &[
                (b.hdr, 16, false),
                (b.data[0].0, 8192, false),
                (b.status, 1, true),
            ],
        )
        .expect("add");
    s.qs[0].kick().expect("kick");
    let done = s.qs[0].wait_used(&s.ram, 1, T).expect("first write");
    assert_eq!(done, vec![(ha, 1)]);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        s.qs[0].poll_used(&s.ram).expect("poll").is_empty(),
        "held request completed"
    );
    assert_eq!(
        file_bytes(&disk, 60 * 512, 8192),
        (60 * 512..60 * 512 + 8192).map(pattern).collect::<Vec<_>>()
    );

    // SIGKILL with `b` in flight, then a fresh daemon without the hold.
    d.0.kill().expect("kill");
    d.0.wait().expect("wait");
    let _d2 = spawn_daemon(&socket, &disk, &[]);
    let mut fe = connect(&socket, 1, T).expect("reconnect");
    negotiate(&mut fe, ALL, proto()).expect("negotiate");
    fe.set_mem_table(&[s.ram.region().expect("region")])
        .expect("mem table");
    use std::os::fd::AsRawFd;
    fe.set_inflight_fd(&info, region.as_raw_fd())
        .expect("SET_INFLIGHT_FD");
    // Like QEMU after a backend crash: the ring restarts at the used index.
    let used = s.qs[0].used_idx(&s.ram).expect("used idx");
    s.qs[0]
        .setup_at(&mut fe, &s.ram, true, used)
        .expect("setup");
    let done = s.qs[0]
        .wait_used(&s.ram, 1, T)
        .expect("re-run of the in-flight write");
    assert_eq!(done, vec![(hb, 1)]);
    assert_eq!(s.ram.read(b.status, 1).expect("st")[0], blk::S_OK);
    assert_eq!(file_bytes(&disk, 60 * 512, 8192), db);
    assert_eq!(file_bytes(&disk, 0, 4096), da);
    // And the ring goes on normally after recovery.
    let r = alloc_req(&mut s.ram, &[8192]);
    s.fe = fe;
    assert_eq!(
        submit(&mut s, 0, &r, blk::T_IN, 60, true),
        (blk::S_OK, 8193)
    );
    assert_eq!(gather(&s.ram, &r), db);
}

#[test]
fn vhd_image_through_the_binary_uses_the_synchronous_path() {
    use vsp_storage::block::BlockDevice;
    use vsp_storage::vhd::{CreateOptions, DiskKind, OpenOptions, Vhd};
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("disk.vhd");
    let mut o = CreateOptions::new(DISK, DiskKind::Dynamic);
    o.exact_size = true;
    drop(vsp_storage::vhd::create(&path, &o).expect("create vhd"));
    let socket = dir.path().join("vhd.sock");
    let d = spawn_daemon(
        &socket,
        &path,
        &["--format", "auto", "--serial", "vhd-disk"],
    );
    let mut s = Session::open(&socket, 1, 64);
    let (_, cfg) =
        s.fe.get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0u8; 8])
            .expect("config");
    assert_eq!(cfg.as_slice(), &(DISK / 512).to_le_bytes());
    let w = alloc_req(&mut s.ram, &[512, 4096, 3584]);
    let data = fill(&s.ram, &w, 0x5c);
    assert_eq!(
        submit(&mut s, 0, &w, blk::T_OUT, 4000, false),
        (blk::S_OK, 1)
    );
    let f = alloc_req(&mut s.ram, &[]);
    assert_eq!(submit(&mut s, 0, &f, blk::T_FLUSH, 0, false).0, blk::S_OK);
    let r = alloc_req(&mut s.ram, &[8192]);
    assert_eq!(
        submit(&mut s, 0, &r, blk::T_IN, 4000, true),
        (blk::S_OK, 8193)
    );
    assert_eq!(gather(&s.ram, &r), data);
    let id = alloc_req(&mut s.ram, &[20]);
    assert_eq!(submit(&mut s, 0, &id, blk::T_GET_ID, 0, true).0, blk::S_OK);
    assert_eq!(&gather(&s.ram, &id)[..9], b"vhd-disk\0");
    drop(s);
    drop(d);
    // The image itself holds the data (read with the VHD code, not through the daemon).
    let vhd = Vhd::open(&path, &OpenOptions::default()).expect("reopen");
    let mut back = vec![0u8; data.len()];
    vhd.read_at(4000 * 512, &mut back).expect("read");
    assert_eq!(back, data);
}

#[test]
fn o_direct_with_unaligned_guest_buffers_bounces() {
    let dir = tempfile::tempdir().expect("tmp");
    let disk = image(dir.path());
    let ro = RawOptions {
        direct: true,
        ..RawOptions::default()
    };
    let raw = match RawDisk::open(&disk, &ro) {
        Ok(r) => Arc::new(r),
        Err(e) => {
            eprintln!("skipping: O_DIRECT unavailable on this file system: {e}");
            return;
        }
    };
    let dev = Arc::new(BlkDevice::new(
        raw.clone(),
        Some(raw),
        BlkOptions::default(),
    ));
    let socket = dir.path().join("direct.sock");
    let mut server = BlkServer::bind(&socket, dev).expect("bind");
    let stop = server.stop_handle();
    let thread = std::thread::spawn(move || server.serve().expect("serve"));
    let _d = InProcess {
        stop,
        thread: Some(thread),
        socket: socket.clone(),
    };
    let mut s = Session::open(&socket, 1, 64);
    // Buffers 512 bytes off page alignment: O_DIRECT cannot take them as they are.
    let base = s.ram.alloc(3 * 8192, 4096).expect("alloc");
    let req = |s: &mut Session| Req {
        hdr: s.ram.alloc(16, 16).expect("alloc"),
        data: vec![
            (GuestAddress(base.0 + 512), 4096),
            (GuestAddress(base.0 + 8192 + 512), 4096),
        ],
        status: s.ram.alloc(1, 1).expect("alloc"),
    };
    let w = req(&mut s);
    let data = fill(&s.ram, &w, 0x77);
    assert_eq!(submit(&mut s, 0, &w, blk::T_OUT, 16, false), (blk::S_OK, 1));
    assert_eq!(file_bytes(&disk, 16 * 512, 8192), data);
    s.ram
        .write(GuestAddress(base.0 + 512), &[0u8; 4096])
        .expect("clear");
    s.ram
        .write(GuestAddress(base.0 + 8192 + 512), &[0u8; 4096])
        .expect("clear");
    let r = req(&mut s);
    assert_eq!(
        submit(&mut s, 0, &r, blk::T_IN, 16, true),
        (blk::S_OK, 8193)
    );
    assert_eq!(gather(&s.ram, &r), data);
}
