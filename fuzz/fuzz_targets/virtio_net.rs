//! Fuzzes the vhost-user-net parsers a hostile driver feeds: the virtio-net header of transmitted
//! frames (`vsp_net::vhost_user::hdr::parse_tx`) and control-queue commands
//! (`vsp_net::vhost_user::ctrl::parse`) with the receive-filter mapping they drive.
//!
//! Input: byte 0 picks the parser, bytes 1..9 are the negotiated features, the rest is what the
//! device copied out of the descriptor chain. Properties (beyond "never panics"):
//! - an accepted frame is the input minus the header, at least an Ethernet header long and at most
//!   `MAX_FRAME`; a partial checksum lies inside it; offloads were negotiated;
//! - an accepted MAC table never holds more than `MAX_TABLE_ENTRIES` per list and used exactly
//!   the input bytes; commands outside the negotiated features are refused.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vsp_net::tap::{Checksum, GsoKind};
use vsp_net::vhost_user::config::feat;
use vsp_net::vhost_user::ctrl::{self, CtrlCommand, CtrlFeatures, RxFilter};
use vsp_net::vhost_user::hdr::{self, MAX_FRAME};

fuzz_target!(|data: &[u8]| {
    let [sel, f0, f1, f2, f3, f4, f5, f6, f7, rest @ ..] = data else {
        return;
    };
    let acked = u64::from_le_bytes([*f0, *f1, *f2, *f3, *f4, *f5, *f6, *f7]);
    if sel & 1 == 0 {
        if let Ok((meta, frame)) = hdr::parse_tx(rest, acked) {
            let hl = hdr::hdr_len(acked);
            assert_eq!(frame.len() + hl, rest.len());
            assert!(frame.len() >= 14 && frame.len() <= MAX_FRAME);
            if let Checksum::Partial { start, offset } = meta.csum {
                assert!(acked & feat::CSUM != 0);
                assert!(usize::from(start) + usize::from(offset) + 2 <= frame.len());
            }
            if let Some(g) = meta.gso {
                assert!(g.mss > 0);
                let need = match g.kind {
                    GsoKind::TcpV4 => feat::HOST_TSO4,
                    GsoKind::TcpV6 => feat::HOST_TSO6,
                    GsoKind::UdpL4 => panic!("USO accepted without being offered"),
                };
                assert!(acked & need != 0);
            }
        }
        return;
    }
    let f = CtrlFeatures {
        rx: acked & feat::CTRL_RX != 0,
        rx_extra: acked & feat::CTRL_RX_EXTRA != 0,
        mac_addr: acked & feat::CTRL_MAC_ADDR != 0,
        mq: acked & feat::MQ != 0,
    };
    let Ok(cmd) = ctrl::parse(rest, f) else {
        return;
    };
    let mut filter = RxFilter::default();
    match cmd {
        CtrlCommand::RxMode { cmd, on } => {
            assert!(f.rx && cmd <= ctrl::RX_NOBCAST);
            assert!(cmd <= ctrl::RX_ALLMULTI || f.rx_extra);
            filter.set_mode(cmd, on);
        }
        CtrlCommand::MacTable { unicast, multicast } => {
            assert!(f.rx);
            assert!(unicast.len() <= ctrl::MAX_TABLE_ENTRIES);
            assert!(multicast.len() <= ctrl::MAX_TABLE_ENTRIES);
            assert_eq!(rest.len(), 2 + 8 + 6 * (unicast.len() + multicast.len()));
            filter.unicast = unicast;
            filter.multicast = multicast;
        }
        CtrlCommand::MacAddr(mac) => {
            assert!(f.mac_addr && mac[0] & 1 == 0 && mac != [0; 6]);
        }
        CtrlCommand::VqPairs(_) => assert!(f.mq && rest.len() == 4),
    }
    let (bits, list) = filter.packet_filter(32);
    assert!(list.len() <= 32);
    assert!(list.is_empty() || bits & vsp_net::switch::filter::MULTICAST != 0);
});
