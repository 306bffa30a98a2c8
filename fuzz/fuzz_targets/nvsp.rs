//! Fuzzes NVSP: the total parser (both directions, the indirection-table reader) and a netvsp
//! device fed arbitrary guest packets — in-band NVSP messages, GPA-direct SEND_RNDIS_PKTs with
//! arbitrary ranges, completions with arbitrary transaction ids, received frames — from a fresh
//! channel (pre-INIT paths) or a brought-up one. Every packet the device sends back must be well
//! formed (see `netvsp_harness::Fz::step`); nothing may panic.

#![no_main]

#[path = "netvsp_harness.rs"]
mod netvsp_harness;

use libfuzzer_sys::fuzz_target;
use netvsp_harness::Fz;
use vmbus_core::devices::nvsp::{self, Direction, NvspMessage};

fuzz_target!(|data: &[u8]| {
    for dir in [Direction::GuestToHost, Direction::HostToGuest] {
        if let Ok(m) = NvspMessage::parse(data, dir) {
            let out = m.to_bytes(40);
            assert_eq!(NvspMessage::parse(&out, dir), Ok(m));
        }
    }
    for v in nvsp::version::ALL {
        let _ = nvsp::indirection_table(data, v);
    }
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let mut fz = Fz::new();
    if mode & 1 == 1 {
        fz.bring_up();
    }
    // Records: [op, len, bytes...].
    while let [op, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (bytes, next) = tail.split_at(n);
        rest = next;
        match op % 5 {
            0 => {
                // An NVSP message (type from the first two bytes for depth), completion per op bit.
                let mut m = vec![0u8; 40];
                if let [a, b, body @ ..] = bytes {
                    let ty = [
                        1u32,
                        100,
                        101,
                        103,
                        104,
                        106,
                        107,
                        125,
                        129,
                        133,
                        u32::from(*a),
                    ][usize::from(*b) % 11];
                    m[..4].copy_from_slice(&ty.to_le_bytes());
                    let k = body.len().min(36);
                    m[4..4 + k].copy_from_slice(&body[..k]);
                    m.truncate(4 + body.len().min(36).max(usize::from(*a) % 37));
                }
                fz.inband(&m, op & 0x80 != 0);
            }
            1 => {
                // SEND_RNDIS_PKT, GPA direct: section fields and ranges from the input.
                let w = |i: usize| {
                    bytes
                        .get(i..i + 4)
                        .map_or(0, |b| u32::from_le_bytes(b.try_into().unwrap_or([0; 4])))
                };
                let body = NvspMessage::SendRndisPacket(nvsp::SendRndisPacket {
                    channel_type: w(0) & 1,
                    send_buffer_section_index: if w(4) & 1 == 0 {
                        nvsp::INVALID_SECTION_INDEX
                    } else {
                        w(4) % 8
                    },
                    send_buffer_section_size: w(8) % 7000,
                })
                .to_bytes(40);
                let ranges: Vec<(u32, u32, u64)> = (0..(w(12) % 4) as usize)
                    .map(|i| {
                        (
                            w(16 + i * 12) % 4096,
                            w(20 + i * 12) % 9000 + 1,
                            u64::from(w(24 + i * 12)) % 300,
                        )
                    })
                    .collect();
                if !ranges.is_empty() {
                    let _ = fz.mem.as_ref();
                    fz.gpa(&body, &ranges);
                } else {
                    fz.inband(&body, true);
                }
            }
            2 => {
                let id = bytes
                    .iter()
                    .take(8)
                    .fold(0u64, |a, b| (a << 8) | u64::from(*b))
                    % 64;
                fz.completion(id, bytes.get(8..).unwrap_or_default());
            }
            3 => fz.inject(bytes),
            _ => {
                // Raw bytes into scratch guest memory (what GPA-direct ranges read).
                use vmbus_core::memory::GuestMemory;
                let _ = fz
                    .mem
                    .write_at(netvsp_harness::SCRATCH * 4096 + u64::from(*len) * 16, bytes);
            }
        }
        fz.step();
    }
    fz.step();
});
