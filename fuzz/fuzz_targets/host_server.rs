//! Fuzzes the VMBus host state machine (`vmbus_core::host::Server`) with arbitrary guest message
//! streams interleaved with VMM requests (hot add, rescind, finishing opens, sub-channels).
//!
//! Each run starts from a connected bus with two offered devices (so the input reaches GPADLs,
//! opens and teardowns quickly), then reads records `[op, len, bytes...]`. After every step:
//! - the server's invariants hold (`check_invariants`);
//! - every message it sends parses;
//! - its snapshot round-trips through bytes and restores to the same state.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vmbus_core::device::DeviceDescription;
use vmbus_core::gpadl::RamRanges;
use vmbus_core::host::{HostAction, Server, ServerConfig, ServerSnapshot};
use vmbus_core::wire::{ChannelMessage, Guid, InitiateContact, RequestOffers, Version, class};

fn post(s: &mut Server, conn: u32, msg: ChannelMessage<'_>) {
    let bytes = msg.to_bytes().expect("fixed messages encode");
    let _ = s.handle_message(conn, &bytes);
}

fn device(n: u128) -> DeviceDescription {
    let mut d = DeviceDescription::new(class::SCSI, Guid::from_u128(n));
    d.max_subchannels = 3;
    d
}

fuzz_target!(|data: &[u8]| {
    let config = ServerConfig {
        vp_count: 2,
        ..ServerConfig::default()
    };
    let ram = RamRanges(vec![(0, 0x400)]);
    let mut s = Server::new(config.clone(), ram.clone());
    s.add_device(device(1)).expect("relid");
    s.add_device(device(2)).expect("relid");
    let contact = InitiateContact {
        vmbus_version_requested: Version::Win10V5_3.raw(),
        msg_sint: 2,
        ..Default::default()
    };
    post(
        &mut s,
        4,
        ChannelMessage::InitiateContact {
            msg: contact,
            client_id: None,
        },
    );
    post(
        &mut s,
        1,
        ChannelMessage::RequestOffers(RequestOffers::default()),
    );

    let mut rest = data;
    let mut steps = 0;
    while let [op, len, tail @ ..] = rest {
        steps += 1;
        if steps > 200 {
            break;
        }
        let n = usize::from(*len).min(tail.len());
        let (payload, after) = tail.split_at(n);
        rest = after;
        let arg = payload.first().copied().unwrap_or(0);
        match op % 10 {
            0..=5 => {
                let conn = [1, 1, 1, 4, 7, 0][usize::from(op % 10)];
                let _ = s.handle_message(conn, payload);
            }
            6 => {
                let _ = s.add_device(device(u128::from(arg) + 10));
            }
            7 => s.rescind(u32::from(arg % 8)),
            8 => {
                let _ = s.complete_open(u32::from(arg % 8), arg & 0x80 == 0);
            }
            _ => {
                s.add_subchannels(u32::from(arg % 8), u16::from(arg >> 6));
            }
        }
        if let Err(e) = s.check_invariants() {
            panic!("invariant broken: {e}");
        }
        while let Some(action) = s.poll_action() {
            if let HostAction::Send { msg, .. } = action {
                assert!(
                    ChannelMessage::parse(&msg).is_ok(),
                    "host sent an unparsable message"
                );
            }
        }
        let snap = s.save();
        let back = ServerSnapshot::from_bytes(&snap.to_bytes()).expect("snapshot decodes");
        assert_eq!(back, snap);
        let restored =
            Server::restore(config.clone(), ram.clone(), back).expect("snapshot restores");
        assert_eq!(restored.save(), snap);
    }
});
