//! Fuzzes the virtio-blk request parser (`vsp_storage::vhost_user::request`) and the
//! DISCARD/WRITE_ZEROES segment decoder on arbitrary descriptor lists and headers.
//!
//! Input: byte 0 = flags (bit 0 read-only, bit 1 discard, bit 2 write-zeroes, bit 3 header
//! unreadable), bytes 1..17 = header, then 13-byte descriptors (addr u64, len u32, flags u8 with
//! bit 0 = device-writable); the rest after the last whole descriptor feeds `parse_dwz`.
//!
//! Properties (besides never panicking):
//! - an accepted request has the 16-byte readable header first and a writable status last, its
//!   data descriptors all go the direction of the request type, and IN/OUT ranges fit the disk;
//! - a refusal that names a status address names the last descriptor's;
//! - decoded DISCARD/WRITE_ZEROES segments lie inside the disk.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vsp_storage::vhost_user::request::{Desc, Kind, Limits, parse, parse_dwz};

const CAPACITY: u64 = 1 << 30;

fuzz_target!(|data: &[u8]| {
    if data.len() < 17 {
        return;
    }
    let flags = data[0];
    let mut header = [0u8; 16];
    header.copy_from_slice(&data[1..17]);
    let rest = &data[17..];
    let descs: Vec<Desc> = rest
        .chunks_exact(13)
        .take(130)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&c[0..8]);
            Desc {
                addr: u64::from_le_bytes(a),
                len: u32::from_le_bytes([c[8], c[9], c[10], c[11]]),
                write: c[12] & 1 != 0,
            }
        })
        .collect();
    let limits = Limits {
        capacity: CAPACITY,
        read_only: flags & 1 != 0,
        max_data: 8 << 20,
        max_dwz_segs: 16,
        discard: flags & 2 != 0,
        write_zeroes: flags & 4 != 0,
    };
    let hdr = (flags & 8 == 0).then_some(header);
    match parse(&descs, hdr, &limits) {
        Ok(r) => {
            let first = descs[0];
            let last = descs[descs.len() - 1];
            assert!(!first.write && first.len == 16);
            assert!(last.write && last.len >= 1 && r.status == last.addr);
            let dev_writes = matches!(r.kind, Kind::In | Kind::GetId);
            assert!(r.data.iter().all(|d| d.write == dev_writes));
            assert_eq!(r.data.len(), descs.len() - 2);
            if matches!(r.kind, Kind::In | Kind::Out) {
                assert!(r.sector * 512 + r.data_len <= CAPACITY);
                assert!(r.kind == Kind::In || !limits.read_only);
            }
        }
        Err(e) => {
            if let Some(st) = e.status {
                assert_eq!(Some(st), descs.last().map(|d| d.addr));
            }
        }
    }
    let tail = &rest[rest.len() - rest.len() % 13..];
    for kind in [Kind::Discard, Kind::WriteZeroes] {
        if let Ok(segs) = parse_dwz(tail, kind, CAPACITY, 1 << 22) {
            assert!(
                segs.iter()
                    .all(|s| s.len > 0 && s.offset + s.len <= CAPACITY)
            );
        }
    }
});
