//! Fuzzes the VMBus channel-message parser (`vmbus_core::wire::ChannelMessage::parse`) with
//! arbitrary SynIC payloads, as a hostile guest (or host) could post them.
//!
//! Properties checked (the harness itself never panics otherwise):
//! - `parse` never panics, on any length (including > 240 bytes and < 4 bytes);
//! - a parsed message always serializes, its encoded length is `encoded_len()`, the bytes are a
//!   prefix of the input whenever the input was at least that long (nothing invented, padding
//!   dropped), and they parse back to the same message;
//! - GPADL word lists never exceed the message or the header's `range_buflen`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vmbus_core::wire::{ChannelMessage, GpaRange, Guid, MAX_MESSAGE_SIZE, WireError};

fuzz_target!(|data: &[u8]| {
    match ChannelMessage::parse(data) {
        Ok(msg) => {
            assert!(data.len() <= MAX_MESSAGE_SIZE);
            assert!(data.len() >= msg.msgtype().min_len());
            let out = msg.to_bytes().expect("a parsed message always serializes");
            assert_eq!(out.len(), msg.encoded_len());
            if out.len() <= data.len() {
                assert_eq!(out.as_bytes(), &data[..out.len()]);
            }
            assert_eq!(ChannelMessage::parse(&out), Ok(msg));
            match msg {
                ChannelMessage::GpadlHeader { msg, words } => {
                    assert!(words.len() * 8 <= usize::from(msg.range_buflen));
                    assert!(0x14 + words.len() * 8 <= data.len());
                    if let Some(w) = words.get(0) {
                        let _ = GpaRange::from_word(w).pfn_count();
                    }
                    assert_eq!(words.iter().count(), words.len());
                }
                ChannelMessage::GpadlBody { words, .. } => {
                    assert!(0x10 + words.len() * 8 <= data.len());
                }
                _ => {}
            }
        }
        Err(WireError::TooLong { len, .. }) => assert!(len > MAX_MESSAGE_SIZE),
        Err(WireError::NoMessageType { len }) => assert!(len < 4),
        Err(WireError::Truncated {
            msgtype, len, min, ..
        }) => {
            assert_eq!(min, msgtype.min_len());
            assert!(len < min);
        }
        Err(WireError::UnknownMessageType { .. }) => {}
        Err(e) => panic!("parse returned a serializer error: {e:?}"),
    }
    if let Ok(s) = core::str::from_utf8(data) {
        if let Ok(g) = Guid::parse(s) {
            assert_eq!(g.to_string().parse::<Guid>(), Ok(g));
        }
    }
});
