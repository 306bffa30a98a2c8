//! virtio-net control queue commands (virtio 1.2 §5.1.6.5): a pure-bytes parser (fuzzed) and the
//! receive filter state the commands build, mapped onto a switch port's packet filter.
//!
//! A command is `class u8, command u8, data…` in the device-readable part of a chain and an `ack u8`
//! in the device-writable part. Everything here works on bytes copied out of guest memory once.

use thiserror::Error;

use crate::switch::{MacAddr, filter};

/// `VIRTIO_NET_CTRL_RX`.
pub const CLASS_RX: u8 = 0;
/// `VIRTIO_NET_CTRL_MAC`.
pub const CLASS_MAC: u8 = 1;
/// `VIRTIO_NET_CTRL_VLAN`.
pub const CLASS_VLAN: u8 = 2;
/// `VIRTIO_NET_CTRL_ANNOUNCE`.
pub const CLASS_ANNOUNCE: u8 = 3;
/// `VIRTIO_NET_CTRL_MQ`.
pub const CLASS_MQ: u8 = 4;

/// `VIRTIO_NET_CTRL_RX_*` commands (each carries one `u8` on/off).
pub const RX_PROMISC: u8 = 0;
/// All multicast.
pub const RX_ALLMULTI: u8 = 1;
/// All unicast (`CTRL_RX_EXTRA`).
pub const RX_ALLUNI: u8 = 2;
/// No multicast (`CTRL_RX_EXTRA`).
pub const RX_NOMULTI: u8 = 3;
/// No unicast (`CTRL_RX_EXTRA`).
pub const RX_NOUNI: u8 = 4;
/// No broadcast (`CTRL_RX_EXTRA`).
pub const RX_NOBCAST: u8 = 5;
/// `VIRTIO_NET_CTRL_MAC_TABLE_SET`.
pub const MAC_TABLE_SET: u8 = 0;
/// `VIRTIO_NET_CTRL_MAC_ADDR_SET`.
pub const MAC_ADDR_SET: u8 = 1;
/// `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`.
pub const MQ_VQ_PAIRS_SET: u8 = 0;

/// `ack` values.
pub const VIRTIO_NET_OK: u8 = 0;
/// Command refused.
pub const VIRTIO_NET_ERR: u8 = 1;

/// Largest MAC table accepted per list (the spec sets no bound; Linux sends at most what fits
/// one page, and anything past this falls back to promiscuous / all-multicast anyway).
pub const MAX_TABLE_ENTRIES: usize = 1024;
/// Largest command payload read from a chain.
pub const MAX_CTRL_LEN: usize = 2 + 2 * (4 + MAX_TABLE_ENTRIES * 6);

/// A decoded command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CtrlCommand {
    /// One of the `RX_*` switches.
    RxMode {
        /// Which (`RX_PROMISC` …).
        cmd: u8,
        /// On or off.
        on: bool,
    },
    /// Unicast and multicast filter tables.
    MacTable {
        /// Extra unicast addresses.
        unicast: Vec<MacAddr>,
        /// Multicast addresses.
        multicast: Vec<MacAddr>,
    },
    /// New primary MAC.
    MacAddr(MacAddr),
    /// Number of queue pairs to use.
    VqPairs(u16),
}

/// Why a command was refused (answered `VIRTIO_NET_ERR`).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CtrlError {
    /// Fewer than 2 bytes of class/command.
    #[error("control command shorter than its 2-byte header")]
    Truncated,
    /// Class or command not supported (or its feature not negotiated).
    #[error("unsupported control command class {class} cmd {cmd}")]
    Unsupported {
        /// Class byte.
        class: u8,
        /// Command byte.
        cmd: u8,
    },
    /// The payload does not have the command's layout.
    #[error("malformed control command class {class} cmd {cmd}: {why}")]
    Malformed {
        /// Class byte.
        class: u8,
        /// Command byte.
        cmd: u8,
        /// What is wrong.
        why: &'static str,
    },
}

/// Which control features the driver negotiated (commands outside them are refused).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtrlFeatures {
    /// `VIRTIO_NET_F_CTRL_RX`.
    pub rx: bool,
    /// `VIRTIO_NET_F_CTRL_RX_EXTRA`.
    pub rx_extra: bool,
    /// `VIRTIO_NET_F_CTRL_MAC_ADDR`.
    pub mac_addr: bool,
    /// `VIRTIO_NET_F_MQ`.
    pub mq: bool,
}

fn read_table(class: u8, cmd: u8, data: &[u8]) -> Result<(Vec<MacAddr>, &[u8]), CtrlError> {
    let bad = |why| CtrlError::Malformed { class, cmd, why };
    let (n, rest) = data
        .split_first_chunk::<4>()
        .ok_or(bad("MAC table without its entry count"))?;
    let n = u32::from_le_bytes(*n) as usize;
    if n > MAX_TABLE_ENTRIES {
        return Err(bad("MAC table too long"));
    }
    let bytes = n * 6;
    if rest.len() < bytes {
        return Err(bad("MAC table shorter than its entry count"));
    }
    let (tbl, rest) = rest.split_at(bytes);
    let macs = tbl
        .chunks_exact(6)
        .map(|c| {
            let mut m = [0u8; 6];
            m.copy_from_slice(c);
            m
        })
        .collect();
    Ok((macs, rest))
}

/// Decodes one command (`buf` = the device-readable bytes of the chain).
pub fn parse(buf: &[u8], feat: CtrlFeatures) -> Result<CtrlCommand, CtrlError> {
    let [class, cmd, data @ ..] = buf else {
        return Err(CtrlError::Truncated);
    };
    let (class, cmd) = (*class, *cmd);
    let unsupported = CtrlError::Unsupported { class, cmd };
    let bad = |why| CtrlError::Malformed { class, cmd, why };
    match class {
        CLASS_RX if feat.rx => {
            let allowed = match cmd {
                RX_PROMISC | RX_ALLMULTI => true,
                RX_ALLUNI | RX_NOMULTI | RX_NOUNI | RX_NOBCAST => feat.rx_extra,
                _ => false,
            };
            if !allowed {
                return Err(unsupported);
            }
            match data {
                [v] => Ok(CtrlCommand::RxMode { cmd, on: *v != 0 }),
                _ => Err(bad("RX mode command needs exactly one byte")),
            }
        }
        CLASS_MAC if cmd == MAC_TABLE_SET && feat.rx => {
            let (unicast, rest) = read_table(class, cmd, data)?;
            let (multicast, rest) = read_table(class, cmd, rest)?;
            if !rest.is_empty() {
                return Err(bad("trailing bytes after the MAC tables"));
            }
            Ok(CtrlCommand::MacTable { unicast, multicast })
        }
        CLASS_MAC if cmd == MAC_ADDR_SET && feat.mac_addr => {
            let mac: MacAddr = data
                .try_into()
                .map_err(|_| bad("MAC_ADDR_SET needs exactly 6 bytes"))?;
            if crate::switch::is_multicast(&mac) || mac == [0; 6] {
                return Err(bad("MAC_ADDR_SET with a group or zero address"));
            }
            Ok(CtrlCommand::MacAddr(mac))
        }
        CLASS_MQ if cmd == MQ_VQ_PAIRS_SET && feat.mq => {
            let n: [u8; 2] = data
                .try_into()
                .map_err(|_| bad("VQ_PAIRS_SET needs exactly 2 bytes"))?;
            Ok(CtrlCommand::VqPairs(u16::from_le_bytes(n)))
        }
        _ => Err(unsupported),
    }
}

/// The receive filter the driver asked for. It starts like a NIC whose driver said nothing yet:
/// own unicast, broadcast and all multicast (QEMU starts promiscuous; Linux sends its RX mode and
/// MAC tables on open, and VMMs that answer the control queue themselves never forward them, so
/// the default must not cut IPv6 neighbour discovery).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RxFilter {
    /// Promiscuous.
    pub promisc: bool,
    /// All multicast.
    pub allmulti: bool,
    /// All unicast.
    pub alluni: bool,
    /// No multicast.
    pub nomulti: bool,
    /// No unicast.
    pub nouni: bool,
    /// No broadcast.
    pub nobcast: bool,
    /// Extra unicast addresses (MAC_TABLE_SET).
    pub unicast: Vec<MacAddr>,
    /// Multicast addresses (MAC_TABLE_SET).
    pub multicast: Vec<MacAddr>,
}

impl Default for RxFilter {
    fn default() -> Self {
        Self {
            promisc: false,
            allmulti: true,
            alluni: false,
            nomulti: false,
            nouni: false,
            nobcast: false,
            unicast: Vec::new(),
            multicast: Vec::new(),
        }
    }
}

impl RxFilter {
    /// Applies an RX-mode switch. Unknown commands are refused by [`parse`] before this.
    pub fn set_mode(&mut self, cmd: u8, on: bool) {
        match cmd {
            RX_PROMISC => self.promisc = on,
            RX_ALLMULTI => self.allmulti = on,
            RX_ALLUNI => self.alluni = on,
            RX_NOMULTI => self.nomulti = on,
            RX_NOUNI => self.nouni = on,
            RX_NOBCAST => self.nobcast = on,
            _ => {}
        }
    }

    /// The switch port packet filter ([`filter`] bits) and multicast list for this state. The
    /// switch filters on the port's own MAC only, so extra unicast addresses (or "all unicast")
    /// open the port promiscuously: over-delivery is allowed by the spec, losing frames is not.
    /// A multicast table longer than the switch keeps becomes all-multicast for the same reason.
    pub fn packet_filter(&self, max_multicast: usize) -> (u32, Vec<MacAddr>) {
        if self.promisc {
            return (filter::PROMISCUOUS, Vec::new());
        }
        let mut f = 0;
        if !self.nouni {
            f |= filter::DIRECTED;
        }
        if !self.nobcast {
            f |= filter::BROADCAST;
        }
        let mut list = Vec::new();
        if !self.nomulti {
            if self.allmulti || self.multicast.len() > max_multicast {
                f |= filter::ALL_MULTICAST;
            } else if !self.multicast.is_empty() {
                f |= filter::MULTICAST;
                list = self.multicast.clone();
            }
        }
        if self.alluni || (!self.nouni && !self.unicast.is_empty()) {
            f |= filter::PROMISCUOUS;
        }
        (f, list)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: CtrlFeatures = CtrlFeatures {
        rx: true,
        rx_extra: true,
        mac_addr: true,
        mq: true,
    };

    #[test]
    fn parses_commands() {
        assert_eq!(
            parse(&[CLASS_RX, RX_PROMISC, 1], ALL),
            Ok(CtrlCommand::RxMode {
                cmd: RX_PROMISC,
                on: true
            })
        );
        assert_eq!(
            parse(&[CLASS_MQ, MQ_VQ_PAIRS_SET, 2, 0], ALL),
            Ok(CtrlCommand::VqPairs(2))
        );
        let mut t = vec![CLASS_MAC, MAC_TABLE_SET];
        t.extend_from_slice(&1u32.to_le_bytes());
        t.extend_from_slice(&[2, 0, 0, 0, 0, 9]);
        t.extend_from_slice(&2u32.to_le_bytes());
        t.extend_from_slice(&[1, 0, 0x5e, 0, 0, 1, 0x33, 0x33, 0, 0, 0, 1]);
        assert_eq!(
            parse(&t, ALL),
            Ok(CtrlCommand::MacTable {
                unicast: vec![[2, 0, 0, 0, 0, 9]],
                multicast: vec![[1, 0, 0x5e, 0, 0, 1], [0x33, 0x33, 0, 0, 0, 1]],
            })
        );
        assert_eq!(
            parse(&[CLASS_MAC, MAC_ADDR_SET, 2, 1, 2, 3, 4, 5], ALL),
            Ok(CtrlCommand::MacAddr([2, 1, 2, 3, 4, 5]))
        );
    }

    #[test]
    fn refuses_malformed_and_unnegotiated() {
        assert_eq!(parse(&[CLASS_RX], ALL), Err(CtrlError::Truncated));
        assert!(matches!(
            parse(&[CLASS_RX, RX_PROMISC], ALL),
            Err(CtrlError::Malformed { .. })
        ));
        assert!(matches!(
            parse(&[CLASS_RX, RX_PROMISC, 1, 1], ALL),
            Err(CtrlError::Malformed { .. })
        ));
        let no_extra = CtrlFeatures {
            rx_extra: false,
            ..ALL
        };
        assert!(matches!(
            parse(&[CLASS_RX, RX_NOBCAST, 1], no_extra),
            Err(CtrlError::Unsupported { .. })
        ));
        // Entry count larger than the data, and beyond the bound.
        let mut t = vec![CLASS_MAC, MAC_TABLE_SET];
        t.extend_from_slice(&3u32.to_le_bytes());
        t.extend_from_slice(&[0; 12]);
        assert!(matches!(parse(&t, ALL), Err(CtrlError::Malformed { .. })));
        let mut t = vec![CLASS_MAC, MAC_TABLE_SET];
        t.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(parse(&t, ALL), Err(CtrlError::Malformed { .. })));
        assert!(matches!(
            parse(&[CLASS_MAC, MAC_ADDR_SET, 1, 0, 0, 0, 0, 1], ALL),
            Err(CtrlError::Malformed { .. })
        ));
        assert!(matches!(
            parse(&[CLASS_VLAN, 0, 1, 0], ALL),
            Err(CtrlError::Unsupported { .. })
        ));
    }

    #[test]
    fn filter_mapping() {
        let mut f = RxFilter::default();
        assert_eq!(
            f.packet_filter(32),
            (
                filter::DIRECTED | filter::BROADCAST | filter::ALL_MULTICAST,
                vec![]
            )
        );
        f.set_mode(RX_ALLMULTI, false);
        assert_eq!(
            f.packet_filter(32),
            (filter::DIRECTED | filter::BROADCAST, vec![])
        );
        f.multicast = vec![[1, 0, 0x5e, 0, 0, 1]];
        assert_eq!(
            f.packet_filter(32),
            (
                filter::DIRECTED | filter::BROADCAST | filter::MULTICAST,
                vec![[1, 0, 0x5e, 0, 0, 1]]
            )
        );
        assert_eq!(
            f.packet_filter(0).0,
            filter::DIRECTED | filter::BROADCAST | filter::ALL_MULTICAST
        );
        f.set_mode(RX_NOBCAST, true);
        f.set_mode(RX_NOMULTI, true);
        assert_eq!(f.packet_filter(32), (filter::DIRECTED, vec![]));
        f.set_mode(RX_PROMISC, true);
        assert_eq!(f.packet_filter(32).0, filter::PROMISCUOUS);
    }
}
