//! The 16-byte GUID as VMBus puts it on the wire.
//!
//! VMBus (like every Windows/Hyper-V interface and Linux `guid_t`/`GUID_INIT`) stores a GUID in
//! Microsoft "mixed-endian" order: `data1` u32 little-endian, `data2` u16 LE, `data3` u16 LE, then
//! `data4` as 8 bytes in the order they are written. So `ba6163d9-04a1-4d29-b605-72e2ffb1dc7f` is
//! `d9 63 61 ba a1 04 29 4d b6 05 72 e2 ff b1 dc 7f` on the wire (reference §3.5; writing the RFC
//! 4122 big-endian bytes instead is pitfall #26: no driver binds).

use core::fmt;
use core::str::FromStr;

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// A GUID in VMBus wire layout (Microsoft `GUID`, Linux `guid_t`).
///
/// The fields are native integers; on the little-endian targets this crate supports (see the
/// `compile_error!` in `lib.rs`) their in-memory bytes are exactly the wire bytes, so the struct
/// can be embedded in wire messages and read/written with zerocopy.
#[repr(C)]
#[derive(
    Copy,
    Clone,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Default,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
)]
pub struct Guid {
    /// First group (8 hex digits), stored little-endian.
    pub data1: u32,
    /// Second group (4 hex digits), stored little-endian.
    pub data2: u16,
    /// Third group (4 hex digits), stored little-endian.
    pub data3: u16,
    /// Fourth and fifth groups (4 + 12 hex digits), stored in written order.
    pub data4: [u8; 8],
}

/// Why a GUID string did not parse.
#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GuidParseError {
    /// Not 36 characters (or 38 with surrounding braces).
    #[error("GUID string has {len} bytes; expected 36, or 38 with braces")]
    InvalidLength {
        /// Length of the input in bytes.
        len: usize,
    },
    /// A `-` was expected at this byte index.
    #[error("GUID string: expected '-' at byte {index}")]
    ExpectedHyphen {
        /// Byte index into the input.
        index: usize,
    },
    /// A non-hex-digit character at this byte index.
    #[error("GUID string: invalid hex digit at byte {index}")]
    InvalidDigit {
        /// Byte index into the input.
        index: usize,
    },
}

impl Guid {
    /// The all-zero GUID.
    pub const ZERO: Guid = Guid {
        data1: 0,
        data2: 0,
        data3: 0,
        data4: [0; 8],
    };

    /// Builds a GUID from the 128-bit number its canonical string spells, e.g.
    /// `Guid::from_u128(0xba6163d9_04a1_4d29_b605_72e2ffb1dc7f)` for
    /// `ba6163d9-04a1-4d29-b605-72e2ffb1dc7f`.
    pub const fn from_u128(v: u128) -> Guid {
        let tail = (v as u64).to_be_bytes();
        Guid {
            data1: (v >> 96) as u32,
            data2: (v >> 80) as u16,
            data3: (v >> 64) as u16,
            data4: tail,
        }
    }

    /// The 128-bit number the canonical string spells (inverse of [`Guid::from_u128`]).
    pub const fn to_u128(&self) -> u128 {
        ((self.data1 as u128) << 96)
            | ((self.data2 as u128) << 80)
            | ((self.data3 as u128) << 64)
            | (u64::from_be_bytes(self.data4) as u128)
    }

    /// Builds a GUID from its 16 wire bytes (Microsoft mixed-endian order).
    pub const fn from_wire_bytes(b: [u8; 16]) -> Guid {
        Guid {
            data1: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            data2: u16::from_le_bytes([b[4], b[5]]),
            data3: u16::from_le_bytes([b[6], b[7]]),
            data4: [b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]],
        }
    }

    /// The 16 wire bytes (Microsoft mixed-endian order).
    pub const fn to_wire_bytes(&self) -> [u8; 16] {
        let a = self.data1.to_le_bytes();
        let b = self.data2.to_le_bytes();
        let c = self.data3.to_le_bytes();
        let d = self.data4;
        [
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5],
            d[6], d[7],
        ]
    }

    /// Parses the canonical form `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (either case, optionally in
    /// braces). Usable in `const` items; [`crate::guid!`] wraps it for literals.
    pub const fn parse(s: &str) -> Result<Guid, GuidParseError> {
        let b = s.as_bytes();
        let start = if b.len() == 38 && b[0] == b'{' && b[37] == b'}' {
            1
        } else if b.len() == 36 {
            0
        } else {
            return Err(GuidParseError::InvalidLength { len: b.len() });
        };
        let mut value: u128 = 0;
        let mut i = 0;
        while i < 36 {
            let index = start + i;
            let c = b[index];
            if i == 8 || i == 13 || i == 18 || i == 23 {
                if c != b'-' {
                    return Err(GuidParseError::ExpectedHyphen { index });
                }
            } else {
                let digit = match c {
                    b'0'..=b'9' => c - b'0',
                    b'a'..=b'f' => c - b'a' + 10,
                    b'A'..=b'F' => c - b'A' + 10,
                    _ => return Err(GuidParseError::InvalidDigit { index }),
                };
                value = (value << 4) | digit as u128;
            }
            i += 1;
        }
        Ok(Guid::from_u128(value))
    }
}

/// A [`Guid`] constant from its canonical string, checked at compile time:
/// `const SCSI: Guid = vmbus_core::guid!("ba6163d9-04a1-4d29-b605-72e2ffb1dc7f");`.
#[macro_export]
macro_rules! guid {
    ($s:literal) => {
        const {
            match $crate::wire::Guid::parse($s) {
                Ok(g) => g,
                Err(_) => panic!("invalid GUID literal"),
            }
        }
    };
}

impl FromStr for Guid {
    type Err = GuidParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Guid::parse(s)
    }
}

impl fmt::Display for Guid {
    /// Canonical lower-case form, `ba6163d9-04a1-4d29-b605-72e2ffb1dc7f` (as Linux `%pUl`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.data4;
        write!(
            f,
            "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
            self.data1, self.data2, self.data3, d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]
        )
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Device class ("interface type") GUIDs, as Linux `include/linux/hyperv.h` defines them
/// (`HV_*_GUID`). The offer's `if_type` carries one of these.
pub mod class {
    use super::Guid;

    /// Synthetic NIC (`HV_NIC_GUID`, hv_netvsc).
    pub const NETWORK: Guid = Guid::from_u128(0xf8615163_df3e_46c5_913f_f2d2f965ed0e);
    /// IDE storage accelerator (`HV_IDE_GUID`, hv_storvsc).
    pub const IDE: Guid = Guid::from_u128(0x32412632_86cb_44a2_9b5c_50d1417354f5);
    /// Synthetic SCSI storage (`HV_SCSI_GUID`, hv_storvsc).
    pub const SCSI: Guid = Guid::from_u128(0xba6163d9_04a1_4d29_b605_72e2ffb1dc7f);
    /// Shutdown integration component (`HV_SHUTDOWN_GUID`, hv_utils).
    pub const SHUTDOWN: Guid = Guid::from_u128(0x0e0b6031_5213_4934_818b_38d90ced39db);
    /// Time synchronisation IC (`HV_TS_GUID`, hv_utils).
    pub const TIMESYNC: Guid = Guid::from_u128(0x9527e630_d0ae_497b_adce_e80ab0175caf);
    /// Heartbeat IC (`HV_HEART_BEAT_GUID`, hv_utils).
    pub const HEARTBEAT: Guid = Guid::from_u128(0x57164f39_9115_4e78_ab55_382f3bd5422d);
    /// Key-value pair exchange IC (`HV_KVP_GUID`, hv_utils).
    pub const KVP: Guid = Guid::from_u128(0xa9a0f4e7_5a45_4d96_b827_8a841e8c03e6);
    /// Volume shadow copy (backup) IC (`HV_VSS_GUID`, hv_utils).
    pub const VSS: Guid = Guid::from_u128(0x35fa2e29_ea23_4236_96ae_3a6ebacba440);
    /// Guest file copy IC (`HV_FCOPY_GUID`).
    pub const FCOPY: Guid = Guid::from_u128(0x34d14be3_dee4_41c8_9ae7_6b174977c192);
    /// Dynamic memory / balloon (`HV_DM_GUID`, hv_balloon).
    pub const DYNAMIC_MEMORY: Guid = Guid::from_u128(0x525074dc_8985_46e2_8057_a307dc18a502);
    /// Synthetic mouse (`HV_MOUSE_GUID`, hid-hyperv).
    pub const MOUSE: Guid = Guid::from_u128(0xcfa8b69e_5b4a_4cc0_b98b_8ba1a1f3f95a);
    /// Synthetic keyboard (`HV_KBD_GUID`, hyperv-keyboard).
    pub const KEYBOARD: Guid = Guid::from_u128(0xf912ad6d_2b17_48ea_bd65_f927a61c7684);
    /// Synthetic video (`HV_SYNTHVID_GUID`, hyperv_fb / hyperv_drm).
    pub const SYNTHVID: Guid = Guid::from_u128(0xda0a7802_e377_4aac_8e77_0558eb1073f8);
    /// Synthetic Fibre Channel (`HV_SYNTHFC_GUID`).
    pub const SYNTHFC: Guid = Guid::from_u128(0x2f9bcc4a_0069_4af3_b76b_6fd0be528cda);
    /// NetworkDirect / guest RDMA (`HV_ND_GUID`).
    pub const NETWORK_DIRECT: Guid = Guid::from_u128(0x8c2eaf3d_32a7_4b09_ab99_bd1f1c86b501);
    /// PCI Express pass-through / vPCI (`HV_PCIE_GUID`, pci-hyperv).
    pub const PCIE: Guid = Guid::from_u128(0x44c4f61d_4444_4400_9d52_802e27ede19f);
    /// Automatic VM activation 1 (`HV_AVMA1_GUID`; Linux ignores the offer).
    pub const AVMA1: Guid = Guid::from_u128(0xf8e65716_3cb3_4a06_9a60_1889c5cccab5);
    /// Automatic VM activation 2 (`HV_AVMA2_GUID`; Linux ignores the offer).
    pub const AVMA2: Guid = Guid::from_u128(0x3375baf4_9e15_4b30_b765_67acb10d607b);
    /// Remote desktop virtualization (`HV_RDV_GUID`; Linux ignores the offer).
    pub const RDV: Guid = Guid::from_u128(0x276aacf4_ac15_426c_98dd_7521ad3f01fe);
    /// Initial machine configuration (`HV_IMC_GUID`; Windows guests only).
    pub const IMC: Guid = Guid::from_u128(0xc376c1c3_d276_48d2_90a9_c04748072c60);

    /// Every class above with Linux's short name, for logs and tables.
    pub const ALL: [(Guid, &str); 20] = [
        (NETWORK, "network"),
        (IDE, "ide"),
        (SCSI, "scsi"),
        (SHUTDOWN, "shutdown"),
        (TIMESYNC, "timesync"),
        (HEARTBEAT, "heartbeat"),
        (KVP, "kvp"),
        (VSS, "vss"),
        (FCOPY, "fcopy"),
        (DYNAMIC_MEMORY, "dynamic-memory"),
        (MOUSE, "mouse"),
        (KEYBOARD, "keyboard"),
        (SYNTHVID, "synthvid"),
        (SYNTHFC, "synthfc"),
        (NETWORK_DIRECT, "network-direct"),
        (PCIE, "pcie"),
        (AVMA1, "avma1"),
        (AVMA2, "avma2"),
        (RDV, "rdv"),
        (IMC, "imc"),
    ];

    /// Linux's short name for a class GUID, if it is one of [`ALL`].
    pub fn name(guid: &Guid) -> Option<&'static str> {
        ALL.iter().find(|(g, _)| g == guid).map(|(_, n)| *n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    /// Linux `GUID_INIT(a, b, c, d0..d7)` (include/linux/uuid.h): the byte array it produces.
    #[allow(clippy::too_many_arguments)]
    const fn linux_guid_init(
        a: u32,
        b: u16,
        c: u16,
        d0: u8,
        d1: u8,
        d2: u8,
        d3: u8,
        d4: u8,
        d5: u8,
        d6: u8,
        d7: u8,
    ) -> [u8; 16] {
        [
            (a & 0xff) as u8,
            ((a >> 8) & 0xff) as u8,
            ((a >> 16) & 0xff) as u8,
            ((a >> 24) & 0xff) as u8,
            (b & 0xff) as u8,
            ((b >> 8) & 0xff) as u8,
            (c & 0xff) as u8,
            ((c >> 8) & 0xff) as u8,
            d0,
            d1,
            d2,
            d3,
            d4,
            d5,
            d6,
            d7,
        ]
    }

    #[test]
    fn storvsc_guid_bytes_match_linux_guid_init() {
        // HV_SCSI_GUID = GUID_INIT(0xba6163d9, 0x04a1, 0x4d29, 0xb6, 0x05, 0x72, 0xe2, 0xff, 0xb1, 0xdc, 0x7f)
        let linux = linux_guid_init(
            0xba6163d9, 0x04a1, 0x4d29, 0xb6, 0x05, 0x72, 0xe2, 0xff, 0xb1, 0xdc, 0x7f,
        );
        assert_eq!(class::SCSI.as_bytes(), &linux);
        assert_eq!(class::SCSI.to_wire_bytes(), linux);
        // Reference §3.5 spells the same bytes out.
        assert_eq!(
            linux,
            [
                0xd9, 0x63, 0x61, 0xba, 0xa1, 0x04, 0x29, 0x4d, 0xb6, 0x05, 0x72, 0xe2, 0xff, 0xb1,
                0xdc, 0x7f
            ]
        );
        // HV_NIC_GUID
        let nic = linux_guid_init(
            0xf8615163, 0xdf3e, 0x46c5, 0x91, 0x3f, 0xf2, 0xd2, 0xf9, 0x65, 0xed, 0x0e,
        );
        assert_eq!(class::NETWORK.as_bytes(), &nic);
        // HV_TS_GUID
        let ts = linux_guid_init(
            0x9527e630, 0xd0ae, 0x497b, 0xad, 0xce, 0xe8, 0x0a, 0xb0, 0x17, 0x5c, 0xaf,
        );
        assert_eq!(class::TIMESYNC.as_bytes(), &ts);
    }

    #[test]
    fn macro_parse_u128_and_display_agree() {
        const SCSI: Guid = crate::guid!("ba6163d9-04a1-4d29-b605-72e2ffb1dc7f");
        assert_eq!(SCSI, class::SCSI);
        assert_eq!(
            class::SCSI.to_string(),
            "ba6163d9-04a1-4d29-b605-72e2ffb1dc7f"
        );
        assert_eq!(
            crate::guid!("{F8615163-DF3E-46C5-913F-F2D2F965ED0E}"),
            class::NETWORK
        );
        for (g, _) in class::ALL {
            assert_eq!(g.to_string().parse::<Guid>(), Ok(g));
            assert_eq!(Guid::from_u128(g.to_u128()), g);
            assert_eq!(Guid::from_wire_bytes(g.to_wire_bytes()), g);
            assert_eq!(Guid::read_from_bytes(&g.to_wire_bytes()), Ok(g));
        }
        assert_eq!(class::name(&class::KVP), Some("kvp"));
        assert_eq!(class::name(&Guid::ZERO), None);
    }

    #[test]
    fn parse_errors() {
        assert_eq!(
            Guid::parse(""),
            Err(GuidParseError::InvalidLength { len: 0 })
        );
        assert_eq!(
            Guid::parse("ba6163d9x04a1-4d29-b605-72e2ffb1dc7f"),
            Err(GuidParseError::ExpectedHyphen { index: 8 })
        );
        assert_eq!(
            Guid::parse("ba6163d9-04a1-4d29-b605-72e2ffb1dc7g"),
            Err(GuidParseError::InvalidDigit { index: 35 })
        );
        assert_eq!(
            Guid::parse("{ba6163d9-04a1-4d29-b605-72e2ffb1dc7f]"),
            Err(GuidParseError::InvalidLength { len: 38 })
        );
    }

    #[test]
    fn class_guids_are_distinct() {
        for (i, (a, _)) in class::ALL.iter().enumerate() {
            for (b, _) in class::ALL.iter().skip(i + 1) {
                assert_ne!(a, b);
            }
        }
    }
}
