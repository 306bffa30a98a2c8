//! VMBus protocol versions, what each one changes on the wire, and the 6.0 feature flags.
//!
//! A version is `major << 16 | minor` on the wire (INITIATE_CONTACT `vmbus_version_requested`).
//! Names follow Linux `include/linux/hyperv.h` (`VERSION_WS2008` … `VERSION_WIN10_V5_3`, and
//! `VERSION_WIN10_V6_0` from the 2025 confidential-VMBus series); OpenVMM's names are in the docs.

use core::fmt;

/// Guest→host connection id for channel messages before 5.0, and the one Linux uses for all
/// messages when the host's VERSION_RESPONSE says so (`VMBUS_MESSAGE_CONNECTION_ID`).
pub const MESSAGE_CONNECTION_ID: u32 = 1;
/// Legacy shared event connection (interrupt-page signalling, `VMBUS_EVENT_CONNECTION_ID`).
pub const EVENT_CONNECTION_ID: u32 = 2;
/// Legacy monitor connection (`VMBUS_MONITOR_CONNECTION_ID`; unused by Linux).
pub const MONITOR_CONNECTION_ID: u32 = 3;
/// Connection id of INITIATE_CONTACT for versions ≥ 5.0 (`VMBUS_MESSAGE_CONNECTION_ID_4`).
pub const MESSAGE_CONNECTION_ID_4: u32 = 4;
/// SINT used for channel messages and events (`VMBUS_MESSAGE_SINT`); the `msg_sint` Linux sends.
pub const MESSAGE_SINT: u8 = 2;

/// A VMBus protocol version Linux or OpenVMM knows, in ascending order (so `<`/`>=` compare
/// versions).
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Version {
    /// 0.13, Windows Server 2008 (`VERSION_WS2008`; OpenVMM `V1`).
    Ws2008 = 0x0000_000D,
    /// 1.1, Windows 7 / WS2008 R2 (`VERSION_WIN7`).
    Win7 = 0x0001_0001,
    /// 2.4, Windows 8 / WS2012 (`VERSION_WIN8`).
    Win8 = 0x0002_0004,
    /// 3.0, Windows 8.1 / WS2012 R2 (`VERSION_WIN8_1`).
    Win8_1 = 0x0003_0000,
    /// 4.0, Windows 10 (`VERSION_WIN10`).
    Win10 = 0x0004_0000,
    /// 4.1, Windows 10 RS3 (`VERSION_WIN10_V4_1`; OpenVMM `Win10Rs3_0`).
    Win10V4_1 = 0x0004_0001,
    /// 5.0, newer Windows 10 (`VERSION_WIN10_V5`; OpenVMM `Win10Rs3_1`).
    Win10V5 = 0x0005_0000,
    /// 5.1, Windows 10 RS4 (`VERSION_WIN10_V5_1`; OpenVMM `Win10Rs4`).
    Win10V5_1 = 0x0005_0001,
    /// 5.2, Windows Server 2019 / RS5 (`VERSION_WIN10_V5_2`; OpenVMM `Win10Rs5`).
    Win10V5_2 = 0x0005_0002,
    /// 5.3, Windows Server 2022 (`VERSION_WIN10_V5_3`; OpenVMM `Iron`).
    Win10V5_3 = 0x0005_0003,
    /// 6.0 (`VERSION_WIN10_V6_0` in the Linux confidential-VMBus series; OpenVMM `Copper`).
    Win10V6_0 = 0x0006_0000,
}

impl Version {
    /// Every known version, oldest first.
    pub const ALL: [Version; 11] = [
        Version::Ws2008,
        Version::Win7,
        Version::Win8,
        Version::Win8_1,
        Version::Win10,
        Version::Win10V4_1,
        Version::Win10V5,
        Version::Win10V5_1,
        Version::Win10V5_2,
        Version::Win10V5_3,
        Version::Win10V6_0,
    ];

    /// The versions Linux offers in INITIATE_CONTACT, in the order it tries them
    /// (`vmbus_versions[]` in drivers/hv/connection.c, Linux 6.1 through current mainline without
    /// the confidential-VMBus series). WS2008 and WIN7 are no longer offered.
    pub const LINUX_NEGOTIATION_ORDER: [Version; 8] = [
        Version::Win10V5_3,
        Version::Win10V5_2,
        Version::Win10V5_1,
        Version::Win10V5,
        Version::Win10V4_1,
        Version::Win10,
        Version::Win8_1,
        Version::Win8,
    ];

    /// The order with the 2025 confidential-VMBus series applied (6.0 tried first; the release
    /// that carries it is unverified, see the reference §4.1).
    pub const LINUX_CONFIDENTIAL_NEGOTIATION_ORDER: [Version; 9] = [
        Version::Win10V6_0,
        Version::Win10V5_3,
        Version::Win10V5_2,
        Version::Win10V5_1,
        Version::Win10V5,
        Version::Win10V4_1,
        Version::Win10,
        Version::Win8_1,
        Version::Win8,
    ];

    /// Lowest version Linux accepts in an isolated (confidential) guest.
    pub const LINUX_ISOLATION_MIN: Version = Version::Win10V5_2;

    /// `major << 16 | minor`, the wire value.
    pub const fn raw(self) -> u32 {
        self as u32
    }

    /// The major number.
    pub const fn major(self) -> u16 {
        (self.raw() >> 16) as u16
    }

    /// The minor number.
    pub const fn minor(self) -> u16 {
        self.raw() as u16
    }

    /// The known version with this wire value.
    pub const fn from_raw(raw: u32) -> Option<Version> {
        let mut i = 0;
        while i < Version::ALL.len() {
            if Version::ALL[i] as u32 == raw {
                return Some(Version::ALL[i]);
            }
            i += 1;
        }
        None
    }

    /// Connection id the guest posts INITIATE_CONTACT to: 4 from 5.0 on, else 1. A host that does
    /// not serve id 4 refuses 5.x implicitly (HvPostMessage fails with INVALID_CONNECTION_ID and
    /// Linux moves on to the next version).
    pub const fn initiate_contact_connection_id(self) -> u32 {
        if self.raw() >= Version::Win10V5.raw() {
            MESSAGE_CONNECTION_ID_4
        } else {
            MESSAGE_CONNECTION_ID
        }
    }

    /// From 5.0 the guest sends every later message to VERSION_RESPONSE `msg_conn_id`; before, it
    /// keeps using [`MESSAGE_CONNECTION_ID`] and ignores that field.
    pub const fn uses_response_connection_id(self) -> bool {
        self.raw() >= Version::Win10V5.raw()
    }

    /// INITIATE_CONTACT bytes 0x10..0x18 hold the legacy interrupt page GPA (before 5.0).
    pub const fn has_interrupt_page(self) -> bool {
        self.raw() < Version::Win10V5.raw()
    }

    /// INITIATE_CONTACT byte 0x10 is `msg_sint`, the SINT host→guest messages go to (5.0+).
    pub const fn has_msg_sint(self) -> bool {
        self.raw() >= Version::Win10V5.raw()
    }

    /// INITIATE_CONTACT byte 0x11 is `msg_vtl` (5.1+).
    pub const fn has_msg_vtl(self) -> bool {
        self.raw() >= Version::Win10V5_1.raw()
    }

    /// INITIATE_CONTACT 0x14 / VERSION_RESPONSE 0x10 carry [`FeatureFlags`] (6.0+); also the
    /// OPENCHANNEL extension, client id, and confidential offer flags depend on them.
    pub const fn has_feature_flags(self) -> bool {
        self.raw() >= Version::Win10V6_0.raw()
    }

    /// The host honours INITIATE_CONTACT `target_vcpu` for its messages (3.0+; before, VP 0).
    pub const fn honors_target_vcpu(self) -> bool {
        self.raw() >= Version::Win8_1.raw()
    }

    /// Offer fields "dedicated interrupt" and "connection id" are valid (1.1+); Linux ignores
    /// them on 0.13.
    pub const fn offer_has_connection_id(self) -> bool {
        self.raw() >= Version::Win7.raw()
    }

    /// UNLOAD is answered with UNLOAD_RESPONSE (1.1+).
    pub const fn has_unload_response(self) -> bool {
        self.raw() >= Version::Win7.raw()
    }

    /// Linux sends UNLOAD (kexec, crash, hibernate, rmmod) only from 3.0 ("pre-WS2012R2 hosts
    /// don't support reconnect").
    pub const fn linux_sends_unload(self) -> bool {
        self.raw() >= Version::Win8_1.raw()
    }

    /// Per-channel OPENCHANNEL `target_vp`, host→guest channel signals through the SynIC event
    /// flags page (bit `relid`) instead of the shared interrupt page, and sub-channels (2.4+).
    pub const fn has_per_channel_interrupts(self) -> bool {
        self.raw() >= Version::Win8.raw()
    }

    /// TL_CONNECT_REQUEST (hv_sock connect) exists (4.0+).
    pub const fn has_tl_connect(self) -> bool {
        self.raw() >= Version::Win10.raw()
    }

    /// MODIFYCHANNEL and TL_CONNECT_RESULT exist (4.1+).
    pub const fn has_modify_channel(self) -> bool {
        self.raw() >= Version::Win10V4_1.raw()
    }

    /// TL_CONNECT_REQUEST may carry a silo id (5.2+, OpenVMM; Linux never sends it).
    pub const fn has_tl_connect_silo_id(self) -> bool {
        self.raw() >= Version::Win10V5_2.raw()
    }

    /// The host must answer MODIFYCHANNEL with MODIFYCHANNEL_RESPONSE (5.3+; Linux waits for it).
    pub const fn has_modify_channel_response(self) -> bool {
        self.raw() >= Version::Win10V5_3.raw()
    }

    /// Confidential offer flags (0x2/0x4) are meaningful (6.0+ and only with
    /// [`FeatureFlags::CONFIDENTIAL_CHANNELS`] negotiated; the Linux series drops such offers
    /// below 6.0).
    pub const fn has_confidential_channels(self) -> bool {
        self.raw() >= Version::Win10V6_0.raw()
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major(), self.minor())
    }
}

impl From<Version> for u32 {
    fn from(v: Version) -> u32 {
        v.raw()
    }
}

/// 6.0 feature flags: INITIATE_CONTACT `feature_flags` (requested) and VERSION_RESPONSE
/// `supported_features` (granted). Bit values from OpenVMM `vmbus_core::protocol::FeatureFlags`
/// and Linux (`VMBUS_FEATURE_FLAG_CONFIDENTIAL_CHANNELS`).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct FeatureFlags(pub u32);

impl FeatureFlags {
    /// No features.
    pub const NONE: FeatureFlags = FeatureFlags(0);
    /// The guest picks the channel's connection id and event flag in OPENCHANNEL.
    pub const GUEST_SPECIFIED_SIGNAL_PARAMETERS: FeatureFlags = FeatureFlags(0x1);
    /// OPENCHANNEL `flags` bit 0 (redirect interrupt) is supported.
    pub const CHANNEL_INTERRUPT_REDIRECTION: FeatureFlags = FeatureFlags(0x2);
    /// MODIFY_CONNECTION / _RESPONSE messages (25/26) are supported.
    pub const MODIFY_CONNECTION: FeatureFlags = FeatureFlags(0x4);
    /// INITIATE_CONTACT carries a client id GUID at 0x28.
    pub const CLIENT_ID: FeatureFlags = FeatureFlags(0x8);
    /// Confidential ring buffer / external memory offer flags are supported.
    pub const CONFIDENTIAL_CHANNELS: FeatureFlags = FeatureFlags(0x10);
    /// PAUSE / PAUSE_RESPONSE / RESUME messages (27–29) are supported.
    pub const PAUSE_RESUME: FeatureFlags = FeatureFlags(0x20);
    /// The server provides the monitor pages (VERSION_RESPONSE 0x18/0x20).
    pub const SERVER_SPECIFIED_MONITOR_PAGES: FeatureFlags = FeatureFlags(0x40);

    /// The raw bits.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// True if every bit of `other` is set in `self`.
    pub const fn contains(self, other: FeatureFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Bits set in both.
    pub const fn intersection(self, other: FeatureFlags) -> FeatureFlags {
        FeatureFlags(self.0 & other.0)
    }

    /// Bits set in either.
    pub const fn union(self, other: FeatureFlags) -> FeatureFlags {
        FeatureFlags(self.0 | other.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn wire_values_match_linux() {
        // include/linux/hyperv.h: VERSION_X = (major << 16) | minor
        let linux = [
            (Version::Ws2008, 0, 13),
            (Version::Win7, 1, 1),
            (Version::Win8, 2, 4),
            (Version::Win8_1, 3, 0),
            (Version::Win10, 4, 0),
            (Version::Win10V4_1, 4, 1),
            (Version::Win10V5, 5, 0),
            (Version::Win10V5_1, 5, 1),
            (Version::Win10V5_2, 5, 2),
            (Version::Win10V5_3, 5, 3),
            (Version::Win10V6_0, 6, 0),
        ];
        for (v, major, minor) in linux {
            assert_eq!(v.raw(), (major << 16) | minor);
            assert_eq!((u32::from(v.major()), u32::from(v.minor())), (major, minor));
            assert_eq!(Version::from_raw(v.raw()), Some(v));
        }
        assert_eq!(Version::from_raw(0x0005_0004), None);
        assert_eq!(Version::Win10V5_3.to_string(), "5.3");
    }

    #[test]
    fn ord_follows_wire_value() {
        for w in Version::ALL.windows(2) {
            assert!(w[0] < w[1]);
            assert!(w[0].raw() < w[1].raw());
        }
        for w in Version::LINUX_NEGOTIATION_ORDER.windows(2) {
            assert!(w[0] > w[1], "Linux tries newest first");
        }
        assert_eq!(
            Version::LINUX_CONFIDENTIAL_NEGOTIATION_ORDER[1..],
            Version::LINUX_NEGOTIATION_ORDER
        );
    }

    #[test]
    fn per_version_rules() {
        assert_eq!(Version::Win10V4_1.initiate_contact_connection_id(), 1);
        assert_eq!(Version::Win10V5.initiate_contact_connection_id(), 4);
        assert!(Version::Win10.has_interrupt_page() && !Version::Win10.has_msg_sint());
        assert!(Version::Win10V5.has_msg_sint() && !Version::Win10V5.has_msg_vtl());
        assert!(Version::Win10V5_1.has_msg_vtl());
        assert!(!Version::Win10V5_3.has_feature_flags() && Version::Win10V6_0.has_feature_flags());
        assert!(!Version::Win10V5_2.has_modify_channel_response());
        assert!(Version::Win10V5_3.has_modify_channel_response());
        assert!(!Version::Win10.has_modify_channel() && Version::Win10V4_1.has_modify_channel());
        assert!(!Version::Win8.linux_sends_unload() && Version::Win8_1.linux_sends_unload());
        assert!(
            !Version::Ws2008.offer_has_connection_id() && Version::Win7.offer_has_connection_id()
        );
        assert!(
            !Version::Win7.has_per_channel_interrupts()
                && Version::Win8.has_per_channel_interrupts()
        );
    }

    #[test]
    fn feature_flags() {
        let f = FeatureFlags::CLIENT_ID.union(FeatureFlags::CONFIDENTIAL_CHANNELS);
        assert_eq!(f.bits(), 0x18);
        assert!(f.contains(FeatureFlags::CLIENT_ID));
        assert!(!f.contains(FeatureFlags::PAUSE_RESUME));
        assert_eq!(
            f.intersection(FeatureFlags::CLIENT_ID),
            FeatureFlags::CLIENT_ID
        );
    }
}
