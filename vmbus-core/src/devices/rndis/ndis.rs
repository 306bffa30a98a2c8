//! NDIS structures carried in OID information buffers, byte-exact with Linux `hyperv_net.h`:
//! task-offload capabilities and parameters, RSS capabilities and parameters, RNDIS configuration
//! parameters, and the parsers a host needs to validate what a guest SETs.
#![warn(clippy::arithmetic_side_effects, clippy::indexing_slicing)]

use super::wire;
use core::mem::size_of;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// `ndis_object_header.type` values.
pub mod object_type {
    pub const DEFAULT: u8 = 0x80;
    pub const RSS_CAPABILITIES: u8 = 0x88;
    pub const RSS_PARAMETERS: u8 = 0x89;
    pub const OFFLOAD: u8 = 0xA7;
    pub const OFFLOAD_ENCAPSULATION: u8 = 0xA8;
}

wire!(
    /// `struct ndis_object_header`.
    ObjectHeader { ty: u8, revision: u8, size: u16 }
);

/// Encapsulation value "802.3" in the offload structures.
pub const ENCAP_802_3: u32 = 2;

/// Checksum capability bits (`NDIS_TXCSUM_CAP_*` / `NDIS_RXCSUM_CAP_*`).
pub mod csum_cap {
    pub const IP4_OPTIONS: u32 = 0x001;
    pub const TCP4_OPTIONS: u32 = 0x004;
    pub const TCP4: u32 = 0x010;
    pub const UDP4: u32 = 0x040;
    pub const IP4: u32 = 0x100;
    pub const IP6_EXTENSIONS: u32 = 0x001;
    pub const TCP6_OPTIONS: u32 = 0x004;
    pub const TCP6: u32 = 0x010;
    pub const UDP6: u32 = 0x040;
}

/// LSO v2 IPv6 option bits (`NDIS_LSOV2_CAP_*`).
pub mod lsov2_cap {
    pub const IP6_EXTENSIONS: u32 = 0x001;
    pub const TCP6_OPTIONS: u32 = 0x004;
}

wire!(
    /// `struct ndis_csum_offload`.
    CsumOffload {
        ip4_tx_encap: u32,
        ip4_tx_csum: u32,
        ip4_rx_encap: u32,
        ip4_rx_csum: u32,
        ip6_tx_encap: u32,
        ip6_tx_csum: u32,
        ip6_rx_encap: u32,
        ip6_rx_csum: u32,
    }
);
wire!(
    /// `struct ndis_lsov1_offload`.
    LsoV1Offload { encap: u32, max_size: u32, min_segments: u32, options: u32 }
);
wire!(
    /// `struct ndis_ipsecv1_offload`.
    IpsecV1Offload { encap: u32, ah_esp: u32, transport_tunnel: u32, ip4_options: u32, flags: u32, ip4_ah: u32, ip4_esp: u32 }
);
wire!(
    /// `struct ndis_lsov2_offload`.
    LsoV2Offload {
        ip4_encap: u32,
        ip4_max_size: u32,
        ip4_min_segments: u32,
        ip6_encap: u32,
        ip6_max_size: u32,
        ip6_min_segments: u32,
        ip6_options: u32,
    }
);
wire!(
    /// `struct ndis_ipsecv2_offload` (32 bytes; one pad byte after the eleven flags).
    IpsecV2Offload {
        encap: u32,
        ip6: u8,
        ip4_options: u8,
        ip6_extensions: u8,
        ah: u8,
        esp: u8,
        ah_esp: u8,
        transport: u8,
        tunnel: u8,
        transport_tunnel: u8,
        lso: u8,
        extended_sequence: u8,
        pad: u8,
        udp_esp: u32,
        auth: u32,
        crypto: u32,
        sa_caps: u32,
    }
);
wire!(
    /// `struct ndis_rsc_offload`.
    RscOffload { ip4: u8, ip6: u8 }
);
wire!(
    /// `struct ndis_encap_offload`.
    EncapOffload { flags: u32, max_header_size: u32 }
);
wire!(
    /// `struct ndis_offload` (header type 0xA7): 112 bytes = revision 1, 144 = 2, 156 = 3.
    Offload {
        header: ObjectHeader,
        csum: CsumOffload,
        lsov1: LsoV1Offload,
        ipsecv1: IpsecV1Offload,
        lsov2: LsoV2Offload,
        flags: u32,
        ipsecv2: IpsecV2Offload,
        rsc: RscOffload,
        pad: u16,
        encap_gre: EncapOffload,
    }
);

/// `NDIS_OFFLOAD_SIZE_6_0` (revision 1).
pub const OFFLOAD_SIZE_REV1: usize = 112;
/// `NDIS_OFFLOAD_SIZE_6_1` (revision 2).
pub const OFFLOAD_SIZE_REV2: usize = 144;
/// `sizeof(struct ndis_offload)` (revision 3).
pub const OFFLOAD_SIZE_REV3: usize = 156;

/// Offload-parameter values (`NDIS_OFFLOAD_PARAMETERS_*`).
pub mod offload_param {
    pub const NO_CHANGE: u8 = 0;
    /// Checksums.
    pub const TX_RX_DISABLED: u8 = 1;
    pub const TX_ENABLED_RX_DISABLED: u8 = 2;
    pub const RX_ENABLED_TX_DISABLED: u8 = 3;
    pub const TX_RX_ENABLED: u8 = 4;
    /// LSO and RSC.
    pub const DISABLED: u8 = 1;
    pub const ENABLED: u8 = 2;
}

wire!(
    /// `struct ndis_offload_params` (header type 0x80, revision 3; 28 bytes for NVSP >= 5, 22 for
    /// <= 4). One pad byte before `flags`, two at the end.
    OffloadParams {
        header: ObjectHeader,
        ip4_csum: u8,
        tcp4_csum: u8,
        udp4_csum: u8,
        tcp6_csum: u8,
        udp6_csum: u8,
        lsov1: u8,
        ipsecv1: u8,
        lsov2_ip4: u8,
        lsov2_ip6: u8,
        tcp_connection_ip4: u8,
        tcp_connection_ip6: u8,
        pad: u8,
        flags: u32,
        ipsecv2: u8,
        ipsecv2_ip4: u8,
        rsc_ip4: u8,
        rsc_ip6: u8,
        encapsulated_packet_task_offload: u8,
        encapsulation_types: u8,
        pad2: u16,
    }
);

/// Offload-parameter size Linux sends for NVSP <= 4 (`VERSION_4_OFFLOAD_SIZE`).
pub const OFFLOAD_PARAMS_SIZE_V4: usize = 22;
/// Smallest offload-parameter object accepted (revision 1: up to and including `flags`).
pub const OFFLOAD_PARAMS_MIN_SIZE: usize = 20;

wire!(
    /// `struct ndis_recv_scale_cap` (18 bytes, packed).
    RecvScaleCapabilities {
        header: ObjectHeader,
        capabilities: u32,
        num_interrupt_messages: u32,
        num_receive_queues: u32,
        num_indirection_entries: u16,
    }
);

/// RSS capability bits (`NDIS_RSS_CAPS_*`).
pub mod rss_caps {
    pub const MESSAGE_SIGNALED_INTERRUPTS: u32 = 0x0100_0000;
    pub const CLASSIFICATION_AT_ISR: u32 = 0x0200_0000;
    pub const CLASSIFICATION_AT_DPC: u32 = 0x0400_0000;
    pub const USING_MSI_X: u32 = 0x0800_0000;
    pub const RSS_AVAILABLE_ON_PORTS: u32 = 0x1000_0000;
    pub const SUPPORTS_MSI_X: u32 = 0x2000_0000;
    pub const HASH_TYPE_TCP_IPV4: u32 = 0x0000_0100;
    pub const HASH_TYPE_TCP_IPV6: u32 = 0x0000_0200;
    pub const HASH_TYPE_TCP_IPV6_EX: u32 = 0x0000_0400;
}

wire!(
    /// `struct ndis_recv_scale_param` (40 bytes; natural alignment in Linux, so two pad words).
    RecvScaleParameters {
        header: ObjectHeader,
        flags: u16,
        base_cpu_number: u16,
        hash_info: u32,
        indirection_table_size: u16,
        pad1: u16,
        indirection_table_offset: u32,
        hash_key_size: u16,
        pad2: u16,
        hash_key_offset: u32,
        processor_masks_offset: u32,
        num_processor_masks: u32,
        processor_masks_entry_size: u32,
    }
);

/// RSS parameter flags (`NDIS_RSS_PARAM_FLAG_*`).
pub mod rss_flags {
    pub const BASE_CPU_UNCHANGED: u16 = 0x0001;
    pub const HASH_INFO_UNCHANGED: u16 = 0x0002;
    pub const ITABLE_UNCHANGED: u16 = 0x0004;
    pub const HASH_KEY_UNCHANGED: u16 = 0x0008;
    pub const DISABLE_RSS: u16 = 0x0010;
}

/// RSS hash-info bits (`NDIS_HASH_*`).
pub mod hash_info {
    pub const FUNCTION_TOEPLITZ: u32 = 0x0000_0001;
    pub const FUNCTION_MASK: u32 = 0x0000_00FF;
    pub const IPV4: u32 = 0x0000_0100;
    pub const TCP_IPV4: u32 = 0x0000_0200;
    pub const IPV6: u32 = 0x0000_0400;
    pub const IPV6_EX: u32 = 0x0000_0800;
    pub const TCP_IPV6: u32 = 0x0000_1000;
    pub const TCP_IPV6_EX: u32 = 0x0000_2000;
    pub const UDP_IPV4: u32 = 0x0000_4000;
    pub const UDP_IPV6: u32 = 0x0000_8000;
    /// What Linux sets.
    pub const LINUX: u32 = FUNCTION_TOEPLITZ | IPV4 | TCP_IPV4 | IPV6 | TCP_IPV6;
}

/// Size of an RSS hash key (`NETVSC_HASH_KEYLEN`).
pub const RSS_KEY_SIZE: usize = 40;
/// Most indirection-table entries accepted (`ITAB_NUM_MAX`).
pub const RSS_MAX_TABLE_ENTRIES: usize = 256;
/// Entries advertised / Linux's default (`ITAB_NUM`).
pub const RSS_DEFAULT_TABLE_ENTRIES: u16 = 128;
/// Linux's default Toeplitz key.
pub const LINUX_RSS_KEY: [u8; RSS_KEY_SIZE] = [
    0x6d, 0x5a, 0x56, 0xda, 0x25, 0x5b, 0x0e, 0xc2, 0x41, 0x67, 0x25, 0x3d, 0x43, 0xa3, 0x8f, 0xb0,
    0xd0, 0xca, 0x2b, 0xcb, 0xae, 0x7b, 0x30, 0xb4, 0x77, 0xcb, 0x2d, 0xa3, 0x80, 0x30, 0xf2, 0x0c,
    0x6a, 0x42, 0xb7, 0x3b, 0xbe, 0xac, 0x01, 0xfa,
];

wire!(
    /// `struct rndis_config_parameter_info`; offsets count from this struct's start.
    ConfigParameterInfo {
        name_offset: u32,
        name_length: u32,
        param_type: u32,
        value_offset: u32,
        value_length: u32,
    }
);

/// `parameter_type` values.
pub const CONFIG_PARAM_TYPE_INTEGER: u32 = 0;
pub const CONFIG_PARAM_TYPE_STRING: u32 = 2;

wire!(
    /// One half of `NDIS_OFFLOAD_ENCAPSULATION`.
    EncapsulationSetting { enabled: u32, encapsulation_type: u32, header_size: u32 }
);
wire!(
    /// `NDIS_OFFLOAD_ENCAPSULATION` (header type 0xA8, revision 1, 28 bytes).
    OffloadEncapsulation { header: ObjectHeader, ipv4: EncapsulationSetting, ipv6: EncapsulationSetting }
);

/// Why an OID information buffer is refused (maps to RNDIS INVALID_DATA / INVALID_LENGTH).
#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NdisError {
    #[error("information buffer of {len} bytes, needs {needed}")]
    TooShort { len: usize, needed: usize },
    #[error("NDIS object header type {ty:#x} revision {revision} size {size} not accepted")]
    BadHeader { ty: u8, revision: u8, size: u16 },
    #[error("{field} = {value} out of range")]
    BadValue { field: &'static str, value: u32 },
    #[error("{field}: offset {offset} + length {len} outside the {total}-byte buffer")]
    OutOfBounds {
        field: &'static str,
        offset: u32,
        len: u32,
        total: usize,
    },
}

/// Reads a header-led object of which only the first `object size` bytes are present (the rest
/// reads as zero).
fn object<T: FromBytes + IntoBytes>(info: &[u8], size: usize) -> T {
    let mut v = T::new_zeroed();
    let n = size.min(size_of::<T>()).min(info.len());
    if let (Some(dst), Some(src)) = (v.as_mut_bytes().get_mut(..n), info.get(..n)) {
        dst.copy_from_slice(src);
    }
    v
}

fn header(info: &[u8]) -> Result<ObjectHeader, NdisError> {
    ObjectHeader::read_from_prefix(info)
        .map(|(h, _)| h)
        .map_err(|_| NdisError::TooShort {
            len: info.len(),
            needed: size_of::<ObjectHeader>(),
        })
}

/// Validates a TCP_OFFLOAD_PARAMETERS set: header type 0x80, revision 1..=3, size between the
/// revision-1 size and the buffer, every field in its range. Missing tail fields read as 0.
pub fn parse_offload_params(info: &[u8]) -> Result<OffloadParams, NdisError> {
    let h = header(info)?;
    let size = h.size as usize;
    if h.ty != object_type::DEFAULT
        || !(1..=3).contains(&h.revision)
        || size < OFFLOAD_PARAMS_MIN_SIZE
        || size > info.len()
    {
        return Err(NdisError::BadHeader {
            ty: h.ty,
            revision: h.revision,
            size: h.size,
        });
    }
    let p: OffloadParams = object(info, size);
    let check = |field, v: u8, max: u8| {
        if v > max {
            Err(NdisError::BadValue {
                field,
                value: u32::from(v),
            })
        } else {
            Ok(())
        }
    };
    use offload_param::*;
    check("ip4_csum", p.ip4_csum, TX_RX_ENABLED)?;
    check("tcp4_csum", p.tcp4_csum, TX_RX_ENABLED)?;
    check("udp4_csum", p.udp4_csum, TX_RX_ENABLED)?;
    check("tcp6_csum", p.tcp6_csum, TX_RX_ENABLED)?;
    check("udp6_csum", p.udp6_csum, TX_RX_ENABLED)?;
    check("lsov1", p.lsov1, ENABLED)?;
    check("lsov2_ip4", p.lsov2_ip4, ENABLED)?;
    check("lsov2_ip6", p.lsov2_ip6, ENABLED)?;
    check("rsc_ip4", p.rsc_ip4, ENABLED)?;
    check("rsc_ip6", p.rsc_ip6, ENABLED)?;
    Ok(p)
}

/// A validated GEN_RECEIVE_SCALE_PARAMETERS set.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct RssParams<'a> {
    pub params: RecvScaleParameters,
    /// Raw little-endian `u32` queue numbers (`None` when unchanged or disabling).
    pub table: Option<&'a [u8]>,
    /// The 40-byte key (`None` when unchanged or disabling).
    pub key: Option<&'a [u8]>,
}

impl RssParams<'_> {
    pub fn disable(&self) -> bool {
        self.params.flags & rss_flags::DISABLE_RSS != 0
    }

    /// The indirection-table entries.
    pub fn entries(&self) -> impl Iterator<Item = u32> + '_ {
        self.table
            .unwrap_or_default()
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap_or([0; 4])))
    }
}

fn area<'a>(
    info: &'a [u8],
    field: &'static str,
    offset: u32,
    len: u32,
    min: usize,
) -> Result<&'a [u8], NdisError> {
    let err = NdisError::OutOfBounds {
        field,
        offset,
        len,
        total: info.len(),
    };
    let start = offset as usize;
    if start < min {
        return Err(err);
    }
    info.get(start..start.checked_add(len as usize).ok_or(err)?)
        .ok_or(err)
}

/// Validates a GEN_RECEIVE_SCALE_PARAMETERS set: header type 0x89, revision 1..=2, size 40 or
/// more; unless disabling, a table of 4..=1024 bytes (a multiple of 4) and a 40-byte key, each
/// inside the buffer and not overlapping the fixed part. Queue numbers are the device's to check.
pub fn parse_rss_params(info: &[u8]) -> Result<RssParams<'_>, NdisError> {
    let h = header(info)?;
    let fixed = size_of::<RecvScaleParameters>();
    if h.ty != object_type::RSS_PARAMETERS
        || !(1..=2).contains(&h.revision)
        || (h.size as usize) < fixed
        || info.len() < fixed
    {
        return Err(NdisError::BadHeader {
            ty: h.ty,
            revision: h.revision,
            size: h.size,
        });
    }
    let p: RecvScaleParameters = object(info, fixed);
    let flags = p.flags;
    let disable = flags & rss_flags::DISABLE_RSS != 0;
    let mut out = RssParams {
        params: p,
        table: None,
        key: None,
    };
    if disable {
        return Ok(out);
    }
    if flags & rss_flags::ITABLE_UNCHANGED == 0 {
        let size = p.indirection_table_size;
        if size == 0 || !size.is_multiple_of(4) || size as usize > RSS_MAX_TABLE_ENTRIES * 4 {
            return Err(NdisError::BadValue {
                field: "indirection_table_size",
                value: u32::from(size),
            });
        }
        out.table = Some(area(
            info,
            "indirection_table",
            p.indirection_table_offset,
            u32::from(size),
            fixed,
        )?);
    }
    if flags & rss_flags::HASH_KEY_UNCHANGED == 0 {
        let size = p.hash_key_size;
        if size as usize != RSS_KEY_SIZE {
            return Err(NdisError::BadValue {
                field: "hash_key_size",
                value: u32::from(size),
            });
        }
        out.key = Some(area(
            info,
            "hash_key",
            p.hash_key_offset,
            u32::from(size),
            fixed,
        )?);
    }
    if flags & rss_flags::HASH_INFO_UNCHANGED == 0 {
        let hi = p.hash_info;
        if hi & hash_info::FUNCTION_MASK != hash_info::FUNCTION_TOEPLITZ {
            return Err(NdisError::BadValue {
                field: "hash_info",
                value: hi,
            });
        }
    }
    Ok(out)
}

/// A validated GEN_RNDIS_CONFIG_PARAMETER set.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ConfigParameter<'a> {
    pub param_type: u32,
    /// UTF-16LE name bytes.
    pub name: &'a [u8],
    /// Value bytes (UTF-16LE for strings).
    pub value: &'a [u8],
}

impl ConfigParameter<'_> {
    /// Whether the name equals `ascii` (UTF-16LE, case-insensitive as NDIS keywords are).
    pub fn name_is(&self, ascii: &str) -> bool {
        self.name.len() == ascii.len().saturating_mul(2)
            && self.name.chunks_exact(2).zip(ascii.bytes()).all(|(c, a)| {
                c.get(1) == Some(&0) && c.first().is_some_and(|b| b.eq_ignore_ascii_case(&a))
            })
    }

    /// The "NetworkAddress" value as a MAC: 12 hex digits in UTF-16LE.
    pub fn mac_address(&self) -> Option<[u8; 6]> {
        if self.param_type != CONFIG_PARAM_TYPE_STRING || self.value.len() != 24 {
            return None;
        }
        let mut mac = [0u8; 6];
        let mut digits = self.value.chunks_exact(2).map(|c| match c {
            [lo, 0] => (*lo as char).to_digit(16),
            _ => None,
        });
        for b in &mut mac {
            let hi = digits.next()??;
            let lo = digits.next()??;
            *b = u8::try_from(hi.checked_mul(16)?.checked_add(lo)?).ok()?;
        }
        Some(mac)
    }
}

/// Validates a GEN_RNDIS_CONFIG_PARAMETER set: name and value inside the buffer, after the fixed
/// part, even-length name.
pub fn parse_config_parameter(info: &[u8]) -> Result<ConfigParameter<'_>, NdisError> {
    let fixed = size_of::<ConfigParameterInfo>();
    let (c, _) = ConfigParameterInfo::read_from_prefix(info).map_err(|_| NdisError::TooShort {
        len: info.len(),
        needed: fixed,
    })?;
    let name = area(info, "parameter_name", c.name_offset, c.name_length, fixed)?;
    if name.is_empty() || name.len() % 2 != 0 {
        return Err(NdisError::BadValue {
            field: "parameter_name_length",
            value: c.name_length,
        });
    }
    let value = area(
        info,
        "parameter_value",
        c.value_offset,
        c.value_length,
        fixed,
    )?;
    Ok(ConfigParameter {
        param_type: c.param_type,
        name,
        value,
    })
}
