//! vhost-user-blk end to end: the `vhost` crate's frontend drives the daemon (in a thread here;
//! the real binary in `vhost_user_blk_binary.rs`) with virtqueues laid out by hand in memfd guest
//! RAM (`tests/src/virtio_driver.rs`), and every effect is checked on the image file.

mod vhost_user_blk_common;
use vhost_user_blk_common::*;

#[test]
fn negotiation_and_config_space_are_byte_exact() {
    let dir = tempfile::tempdir().expect("tmp");
    let disk = image(dir.path());
    let d = in_process(
        dir.path(),
        &disk,
        BlkOptions {
            num_queues: 2,
            ..BlkOptions::default()
        },
    );
    let mut fe = connect(&d.socket, 2, T).expect("connect");
    let (features, proto_acked) = negotiate(&mut fe, ALL, proto()).expect("negotiate");
    for bit in [1, 2, 6, 9, 10, 12, 13, 14, 28, 29, 30, 32] {
        assert_ne!(features & (1 << bit), 0, "feature bit {bit} offered");
    }
    assert_eq!(features & (1 << 5), 0, "not read-only");
    assert_eq!(proto_acked, proto());
    assert_eq!(fe.get_queue_num().expect("queue num"), 2);
    let (_, cfg) = fe
        .get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60])
        .expect("config");
    let mut want = [0u8; 60];
    want[0..8].copy_from_slice(&(DISK / 512).to_le_bytes()); // capacity
    want[8..12].copy_from_slice(&(1u32 << 20).to_le_bytes()); // size_max
    want[12..16].copy_from_slice(&126u32.to_le_bytes()); // seg_max
    want[20..24].copy_from_slice(&512u32.to_le_bytes()); // blk_size
    want[26..28].copy_from_slice(&1u16.to_le_bytes()); // min_io_size
    want[32] = 1; // writeback
    want[34..36].copy_from_slice(&2u16.to_le_bytes()); // num_queues
    want[36..40].copy_from_slice(&(1u32 << 22).to_le_bytes()); // max_discard_sectors
    want[40..44].copy_from_slice(&16u32.to_le_bytes()); // max_discard_seg
    want[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
    want[48..52].copy_from_slice(&(1u32 << 17).to_le_bytes()); // max_write_zeroes_sectors
    want[52..56].copy_from_slice(&16u32.to_le_bytes()); // max_write_zeroes_seg
    assert_eq!(cfg.as_slice(), &want[..]);
    // A partial read at an offset: num_queues alone.
    let (_, nq) = fe
        .get_config(34, 2, VhostUserConfigFlags::WRITABLE, &[0u8; 2])
        .expect("config");
    assert_eq!(nq.as_slice(), &2u16.to_le_bytes());
}

#[test]
fn write_read_flush_get_id_over_several_segments() {
    let dir = tempfile::tempdir().expect("tmp");
    let disk = image(dir.path());
    let opts = BlkOptions {
        serial: b"serial-0123456789abcdef".to_vec(),
        ..BlkOptions::default()
    };
    let d = in_process(dir.path(), &disk, opts);
    let mut s = Session::open(&d.socket, 1, 128);
    assert_ne!(s.features & (1 << 29), 0, "EVENT_IDX in use");
    for round in 0..20u64 {
        let sector = 100 + round * 40;
        let w = alloc_req(&mut s.ram, &[4096, 512, 8192, 1024]);
        let data = fill(&s.ram, &w, round as u8);
        assert_eq!(
            submit(&mut s, 0, &w, blk::T_OUT, sector, false),
            (blk::S_OK, 1)
        );
        assert_eq!(
            file_bytes(&disk, sector * 512, data.len()),
            data,
            "round {round} on disk"
        );
        let r = alloc_req(&mut s.ram, &[512, 12288, 1024]);
        let (st, len) = submit(&mut s, 0, &r, blk::T_IN, sector, true);
        assert_eq!((st, len), (blk::S_OK, data.len() as u32 + 1));
        assert_eq!(gather(&s.ram, &r), data, "round {round} read back");
    }
    // Untouched sectors still read the original pattern.
    let r = alloc_req(&mut s.ram, &[4096]);
    assert_eq!(submit(&mut s, 0, &r, blk::T_IN, 8, true).0, blk::S_OK);
    assert_eq!(
        gather(&s.ram, &r),
        (4096..8192).map(pattern).collect::<Vec<_>>()
    );
    let f = alloc_req(&mut s.ram, &[]);
    assert_eq!(
        submit(&mut s, 0, &f, blk::T_FLUSH, 0, false),
        (blk::S_OK, 1)
    );
    let id = alloc_req(&mut s.ram, &[20]);
    assert_eq!(
        submit(&mut s, 0, &id, blk::T_GET_ID, 0, true),
        (blk::S_OK, 21)
    );
    assert_eq!(gather(&s.ram, &id), b"serial-0123456789abc");
}

#[test]
fn discard_and_write_zeroes_reach_the_file() {
    let dir = tempfile::tempdir().expect("tmp");
    let disk = image(dir.path());
    let d = in_process(dir.path(), &disk, BlkOptions::default());
    let mut s = Session::open(&d.socket, 1, 64);
    let req = alloc_req(&mut s.ram, &[32]);
    let mut list = blk::dwz(16, 8, 0).to_vec();
    list.extend(blk::dwz(64, 24, 0));
    s.ram.write(req.data[0].0, &list).expect("list");
    assert_eq!(
        submit(&mut s, 0, &req, blk::T_WRITE_ZEROES, 0, false).0,
        blk::S_OK
    );
    assert_eq!(file_bytes(&disk, 16 * 512, 8 * 512), vec![0u8; 8 * 512]);
    assert_eq!(file_bytes(&disk, 64 * 512, 24 * 512), vec![0u8; 24 * 512]);
    assert_eq!(
        file_bytes(&disk, 24 * 512, 512),
        (24 * 512..25 * 512).map(pattern).collect::<Vec<_>>()
    );
    // Discard punches a hole: reads back zero, neighbours intact.
    let req = alloc_req(&mut s.ram, &[16]);
    s.ram
        .write(req.data[0].0, &blk::dwz(1024, 2048, 0))
        .expect("list");
    assert_eq!(
        submit(&mut s, 0, &req, blk::T_DISCARD, 0, false).0,
        blk::S_OK
    );
    assert_eq!(
        file_bytes(&disk, 1024 * 512, 2048 * 512),
        vec![0u8; 2048 * 512]
    );
    assert_eq!(
        file_bytes(&disk, 1023 * 512, 512),
        (1023 * 512..1024 * 512).map(pattern).collect::<Vec<_>>()
    );
    // Reserved flag on a discard, and a segment past the end: IOERR, file untouched.
    s.ram
        .write(req.data[0].0, &blk::dwz(8, 8, 1))
        .expect("list");
    assert_eq!(
        submit(&mut s, 0, &req, blk::T_DISCARD, 0, false).0,
        blk::S_IOERR
    );
    s.ram
        .write(req.data[0].0, &blk::dwz(DISK / 512 - 4, 8, 0))
        .expect("list");
    assert_eq!(
        submit(&mut s, 0, &req, blk::T_WRITE_ZEROES, 0, false).0,
        blk::S_IOERR
    );
    assert_eq!(
        file_bytes(&disk, 8 * 512, 512),
        (8 * 512..9 * 512).map(pattern).collect::<Vec<_>>()
    );
}

#[test]
fn read_only_disk_refuses_writes() {
    let dir = tempfile::tempdir().expect("tmp");
    let disk = image(dir.path());
    let opts = BlkOptions {
        read_only: true,
        ..BlkOptions::default()
    };
    let d = in_process(dir.path(), &disk, opts);
    let mut s = Session::open(&d.socket, 1, 64);
    assert_ne!(s.features & (1 << 5), 0, "VIRTIO_BLK_F_RO");
    assert_eq!(
        s.features & (1 << 13 | 1 << 14),
        0,
        "no discard/write-zeroes on RO"
    );
    let w = alloc_req(&mut s.ram, &[4096]);
    fill(&s.ram, &w, 9);
    assert_eq!(submit(&mut s, 0, &w, blk::T_OUT, 0, false).0, blk::S_IOERR);
    assert_eq!(
        file_bytes(&disk, 0, 4096),
        (0..4096).map(pattern).collect::<Vec<_>>()
    );
    let r = alloc_req(&mut s.ram, &[4096]);
    assert_eq!(submit(&mut s, 0, &r, blk::T_IN, 0, true).0, blk::S_OK);
    assert_eq!(
        gather(&s.ram, &r),
        (0..4096).map(pattern).collect::<Vec<_>>()
    );
}

/// Publishes a hand-built chain (descriptors `(addr, len, flags)` linked in order) and returns
/// what came back for it.
fn hostile(s: &mut Session, descs: &[(u64, u32, u16)]) -> (u16, u32) {
    let ids = s.qs[0].reserve(descs.len()).expect("reserve");
    for (i, &(addr, len, flags)) in descs.iter().enumerate() {
        let (flags, next) = match ids.get(i + 1) {
            Some(&n) => (flags | virtio_driver::DESC_F_NEXT, n),
            None => (flags, 0),
        };
        s.qs[0]
            .write_desc(&s.ram, ids[i], addr, len, flags, next)
            .expect("desc");
    }
    s.qs[0].push_avail(&s.ram, ids[0]).expect("avail");
    s.qs[0].kick().expect("kick");
    let done = s.qs[0]
        .wait_used(&s.ram, 1, T)
        .expect("hostile request returned");
    assert_eq!(done[0].0, ids[0]);
    done[0]
}

#[test]
fn hostile_chains_fail_cleanly_and_the_daemon_lives_on() {
    let dir = tempfile::tempdir().expect("tmp");
    let disk = image(dir.path());
    let d = in_process(dir.path(), &disk, BlkOptions::default());
    let mut s = Session::open(&d.socket, 1, 256);
    let (w, r) = (virtio_driver::DESC_F_WRITE, 0u16);
    let req = alloc_req(&mut s.ram, &[4096]);
    let (hdr, buf, st) = (req.hdr.0, req.data[0].0.0, req.status.0);
    let status = |s: &Session| s.ram.read(req.status, 1).expect("status")[0];
    let set = |s: &Session, ty: u32, sector: u64| {
        blk::header(&s.ram, req.hdr, ty, sector).expect("hdr");
        s.ram.write(req.status, &[0xee]).expect("status");
    };
    let outside = s.ram.size() + 0x1000;

    // Status descriptor not writable: nothing to report into, returned with length 0.
    set(&s, blk::T_IN, 0);
    assert_eq!(
        hostile(&mut s, &[(hdr, 16, r), (buf, 4096, w), (st, 1, r)]).1,
        0
    );
    assert_eq!(status(&s), 0xee);
    // Header too short.
    set(&s, blk::T_IN, 0);
    assert_eq!(
        hostile(&mut s, &[(hdr, 8, r), (buf, 4096, w), (st, 1, w)]).1,
        1
    );
    assert_eq!(status(&s), blk::S_IOERR);
    // Sector range past the end of the disk, and one that overflows.
    for sector in [DISK / 512 - 7, u64::MAX / 4] {
        set(&s, blk::T_IN, sector);
        hostile(&mut s, &[(hdr, 16, r), (buf, 4096, w), (st, 1, w)]);
        assert_eq!(status(&s), blk::S_IOERR);
    }
    // Data descriptor outside guest memory (and straddling its end).
    for addr in [outside, s.ram.size() - 512] {
        set(&s, blk::T_IN, 0);
        hostile(&mut s, &[(hdr, 16, r), (addr, 4096, w), (st, 1, w)]);
        assert_eq!(status(&s), blk::S_IOERR);
    }
    // Direction mismatch: a write whose data descriptor is device-writable.
    set(&s, blk::T_OUT, 0);
    hostile(&mut s, &[(hdr, 16, r), (buf, 4096, w), (st, 1, w)]);
    assert_eq!(status(&s), blk::S_IOERR);
    // Unknown request type.
    set(&s, 0x77, 0);
    hostile(&mut s, &[(hdr, 16, r), (st, 1, w)]);
    assert_eq!(status(&s), blk::S_UNSUPP);
    // Header GPA outside memory.
    set(&s, blk::T_IN, 0);
    hostile(&mut s, &[(outside, 16, r), (buf, 4096, w), (st, 1, w)]);
    assert_eq!(status(&s), blk::S_IOERR);
    // Status byte outside memory: dropped with length 0.
    assert_eq!(
        hostile(&mut s, &[(hdr, 16, r), (buf, 4096, w), (outside, 1, w)]).1,
        0
    );
    // Over-long chain: 200 descriptors (the device takes at most seg_max + 2).
    set(&s, blk::T_IN, 0);
    let mut long = vec![(hdr, 16, r)];
    long.extend((0..198).map(|_| (buf, 512, w)));
    long.push((st, 1, w));
    assert_eq!(hostile(&mut s, &long).1, 0);
    // A loop: the last descriptor points back at the head.
    let ids = s.qs[0].reserve(2).expect("reserve");
    let q = &s.qs[0];
    q.write_desc(&s.ram, ids[0], hdr, 16, virtio_driver::DESC_F_NEXT, ids[1])
        .expect("d");
    q.write_desc(
        &s.ram,
        ids[1],
        buf,
        512,
        w | virtio_driver::DESC_F_NEXT,
        ids[0],
    )
    .expect("d");
    s.qs[0].push_avail(&s.ram, ids[0]).expect("avail");
    s.qs[0].kick().expect("kick");
    let done = s.qs[0].wait_used(&s.ram, 1, T).expect("loop returned");
    assert_eq!(done[0], (ids[0], 0));
    // `next` out of the table.
    let ids = s.qs[0].reserve(1).expect("reserve");
    s.qs[0]
        .write_desc(&s.ram, ids[0], hdr, 16, virtio_driver::DESC_F_NEXT, 4000)
        .expect("d");
    s.qs[0].push_avail(&s.ram, ids[0]).expect("avail");
    s.qs[0].kick().expect("kick");
    assert_eq!(
        s.qs[0].wait_used(&s.ram, 1, T).expect("returned")[0],
        (ids[0], 0)
    );

    // Still serving: a good read.
    let good = alloc_req(&mut s.ram, &[4096]);
    assert_eq!(
        submit(&mut s, 0, &good, blk::T_IN, 0, true),
        (blk::S_OK, 4097)
    );
    assert_eq!(
        gather(&s.ram, &good),
        (0..4096).map(pattern).collect::<Vec<_>>()
    );
}

#[test]
fn two_queues_run_in_parallel() {
    let dir = tempfile::tempdir().expect("tmp");
    let disk = image(dir.path());
    let d = in_process(
        dir.path(),
        &disk,
        BlkOptions {
            num_queues: 2,
            // Also exercises the adaptive-polling loop.
            poll_us: 50,
            ..BlkOptions::default()
        },
    );
    let mut s = Session::open(&d.socket, 2, 128);
    // Per queue: 16 writes of 8 KiB in flight at once, then read them back.
    let per_q = 16usize;
    let mut reqs: Vec<Vec<Req>> = (0..2)
        .map(|_| (0..per_q).map(|_| alloc_req(&mut s.ram, &[8192])).collect())
        .collect();
    let ram = &s.ram;
    let disk = &disk;
    let mut qs = std::mem::take(&mut s.qs);
    std::thread::scope(|sc| {
        for (qi, (q, reqs)) in qs.iter_mut().zip(reqs.iter_mut()).enumerate() {
            sc.spawn(move || {
                for round in 0..10u64 {
                    let mut expect = Vec::new();
                    for (i, r) in reqs.iter().enumerate() {
                        let sector = ((qi * per_q + i) as u64) * 16 + round * 1024;
                        let data = fill(ram, r, (qi * 100 + i) as u8 ^ round as u8);
                        blk::header(ram, r.hdr, blk::T_OUT, sector).expect("hdr");
                        let c = [
                            (r.hdr, 16, false),
                            (r.data[0].0, 8192, false),
                            (r.status, 1, true),
                        ];
                        q.add(ram, &c).expect("add");
                        expect.push((sector, data));
                    }
                    q.kick().expect("kick");
                    let done = q.wait_used(ram, per_q, T).expect("writes");
                    assert_eq!(done.len(), per_q);
                    for r in reqs.iter() {
                        assert_eq!(ram.read(r.status, 1).expect("st")[0], blk::S_OK);
                    }
                    for (sector, data) in &expect {
                        assert_eq!(&file_bytes(disk, sector * 512, 8192), data);
                    }
                }
            });
        }
    });
    s.qs = qs;
}
