//! Fuzzes RNDIS: the total parser (batches walked by msg_len, every message, PPI chains, the NDIS
//! OID payload parsers) and a brought-up netvsp device transmitting the same bytes from a
//! send-buffer section, from GPA-direct pages, or split between both (partial copy). The device
//! must answer every request with a well-formed packet and never panic.

#![no_main]

#[path = "netvsp_harness.rs"]
mod netvsp_harness;

use libfuzzer_sys::fuzz_target;
use netvsp_harness::{Fz, SCRATCH, SEND};
use vmbus_core::devices::nvsp::{self, NvspMessage};
use vmbus_core::devices::rndis::{self, Messages, RndisMessage, ndis, ppi};
use vmbus_core::memory::GuestMemory;

fn check_parsers(data: &[u8]) {
    for m in Messages::new(data) {
        let Ok(m) = m else { break };
        if let Ok((msg, len)) = rndis::parse(m) {
            assert_eq!(len, m.len());
            if let RndisMessage::Packet(p) = msg {
                let base = m.as_ptr() as usize;
                let start = p.data.as_ptr() as usize - base;
                assert!(start >= 8 + rndis::PACKET_BODY_SIZE && start + p.data.len() <= m.len());
                assert!(ppi::validate_chain(p.ppi).is_ok());
                let _ = p.info();
            }
        }
    }
    let _ = ndis::parse_offload_params(data);
    let _ = ndis::parse_rss_params(data).map(|r| r.entries().count());
    if let Ok(c) = ndis::parse_config_parameter(data) {
        let _ = c.mac_address();
    }
}

fuzz_target!(|data: &[u8]| {
    check_parsers(data);
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    if bytes.is_empty() {
        return;
    }
    let mut fz = Fz::new();
    fz.bring_up();
    let section_size = 6144usize;
    let body = |index: u32, size: u32| {
        NvspMessage::SendRndisPacket(nvsp::SendRndisPacket {
            channel_type: u32::from(mode >> 7),
            send_buffer_section_index: index,
            send_buffer_section_size: size,
        })
        .to_bytes(40)
    };
    match mode % 3 {
        0 => {
            // All in section 1.
            let n = bytes.len().min(section_size);
            let _ = fz
                .mem
                .write_at(SEND.1 * 4096 + section_size as u64, &bytes[..n]);
            fz.inband(&body(1, n as u32), true);
        }
        1 => {
            // All GPA direct, starting mid-page.
            let off = u32::from(mode) * 8 % 4096;
            let _ = fz.mem.write_at(SCRATCH * 4096 + u64::from(off), bytes);
            fz.gpa(
                &body(nvsp::INVALID_SECTION_INDEX, 0),
                &[(off, bytes.len() as u32, SCRATCH)],
            );
        }
        _ => {
            // Partial copy: the first part in section 0, the rest GPA direct.
            let split = (usize::from(mode) * 7) % bytes.len().min(section_size);
            let (a, b) = bytes.split_at(split);
            let _ = fz.mem.write_at(SEND.1 * 4096, a);
            if b.is_empty() {
                fz.inband(&body(0, a.len() as u32), true);
            } else {
                let _ = fz.mem.write_at(SCRATCH * 4096, b);
                fz.gpa(&body(0, a.len() as u32), &[(0, b.len() as u32, SCRATCH)]);
            }
        }
    }
    fz.step();
    // Frames the loopback backend reflected come back through the receive path.
    fz.step();
    fz.step();
});
