//! The vstor protocol (storvsc ↔ storvsp), byte-exact with Linux `drivers/scsi/storvsc_drv.c`.
//!
//! Every vstor packet is a 12-byte header `{operation, flags, status}` followed by a 52-byte union:
//! a SCSI request block ([`VmscsiRequest`]), [`ChannelProperties`], a [`ProtocolVersionBody`], an
//! FC WWN packet or a sub-channel count. Pre-Win8 protocol versions (WIN6, WIN7) drop the last 16
//! bytes of the SCSI request ("size delta") and use an 18-byte sense buffer instead of 20.
//!
//! Linux declares the structs `__packed`, so they are `#[repr(C, packed)]` here; read fields by
//! value. Both ends use this module: the host's [`parse_guest_packet`] and the guest's
//! [`parse_host_packet`] are total (any bytes give `Ok` or a typed [`VstorError`], never a panic),
//! and zero-fill packets shorter than 64 bytes, as OpenVMM and Hyper-V do.
#![warn(clippy::arithmetic_side_effects, clippy::indexing_slicing)]

use core::mem::size_of;
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Size of [`VstorHeader`].
pub const HEADER_SIZE: usize = 12;
/// Size of the payload union (`buffer[0x34]`).
pub const UNION_SIZE: usize = 0x34;
/// Size of a whole vstor packet with the Win8 layout (what Linux 6.1 always sends).
pub const PACKET_SIZE: usize = HEADER_SIZE + UNION_SIZE;
/// Bytes the pre-Win8 layout lacks (`sizeof(struct vmscsi_win8_extension)`).
pub const SIZE_DELTA: usize = 16;
/// Whole vstor packet with the pre-Win8 layout.
pub const PRE_WIN8_PACKET_SIZE: usize = PACKET_SIZE - SIZE_DELTA;
/// `sizeof(struct vmscsi_request)`, Win8 layout (the value of its `length` field).
pub const VMSCSI_REQUEST_SIZE: usize = 0x34;
/// `vmscsi_request` without the Win8 extension.
pub const PRE_WIN8_VMSCSI_REQUEST_SIZE: usize = VMSCSI_REQUEST_SIZE - SIZE_DELTA;
/// Sense bytes the union holds from Win8 on (`POST_WIN7_STORVSC_SENSE_BUFFER_SIZE`).
pub const SENSE_BUFFER_SIZE: usize = 0x14;
/// Sense bytes before Win8 (`PRE_WIN8_STORVSC_SENSE_BUFFER_SIZE`).
pub const PRE_WIN8_SENSE_BUFFER_SIZE: usize = 0x12;
/// Longest CDB the request carries (`STORVSC_MAX_CMD_LEN`).
pub const MAX_CDB_LEN: usize = 0x10;
/// Packet `flags` bit: the sender wants a completion (`REQUEST_COMPLETION_FLAG`).
pub const FLAG_REQUEST_COMPLETION: u32 = 0x1;

/// Transaction id Linux uses for every init-phase operation (`VMBUS_RQST_INIT`).
pub const LINUX_INIT_TRANS_ID: u64 = u64::MAX - 2;
/// Transaction id of Linux's RESET_BUS (`VMBUS_RQST_RESET`).
pub const LINUX_RESET_TRANS_ID: u64 = u64::MAX - 3;

/// vstor protocol versions (`major << 8 | minor`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u16)]
pub enum ProtocolVersion {
    /// 2.0, pre-Win8 layout.
    Win6 = 0x0200,
    /// 4.2, pre-Win8 layout.
    Win7 = 0x0402,
    /// 5.1: full layout, multi-channel.
    Win8 = 0x0501,
    /// 6.0 (OpenVMM "Blue").
    Win8_1 = 0x0600,
    /// 6.2 (OpenVMM "Threshold"); Linux tries it first.
    Win10 = 0x0602,
}

impl ProtocolVersion {
    /// Every version, oldest first.
    pub const ALL: [ProtocolVersion; 5] = [
        ProtocolVersion::Win6,
        ProtocolVersion::Win7,
        ProtocolVersion::Win8,
        ProtocolVersion::Win8_1,
        ProtocolVersion::Win10,
    ];

    /// The order Linux 6.1 queries versions in (`protocol_version[]`); it gives up after the last.
    pub const LINUX_ORDER: [ProtocolVersion; 3] = [
        ProtocolVersion::Win10,
        ProtocolVersion::Win8_1,
        ProtocolVersion::Win8,
    ];

    /// The order older Linux (and the FreeBSD/illumos ports) query in (`vmstor_protocols[]`).
    pub const LEGACY_ORDER: [ProtocolVersion; 5] = [
        ProtocolVersion::Win10,
        ProtocolVersion::Win8_1,
        ProtocolVersion::Win8,
        ProtocolVersion::Win7,
        ProtocolVersion::Win6,
    ];

    /// The version with this wire value, if it is one.
    pub const fn from_wire(v: u16) -> Option<Self> {
        Some(match v {
            0x0200 => ProtocolVersion::Win6,
            0x0402 => ProtocolVersion::Win7,
            0x0501 => ProtocolVersion::Win8,
            0x0600 => ProtocolVersion::Win8_1,
            0x0602 => ProtocolVersion::Win10,
            _ => return None,
        })
    }

    /// Wire value (`major_minor`).
    pub const fn raw(self) -> u16 {
        self as u16
    }

    pub const fn major(self) -> u8 {
        (self.raw() >> 8) as u8
    }

    pub const fn minor(self) -> u8 {
        self.raw() as u8
    }

    /// Whether requests carry the Win8 extension (queue tag, SRB flags, timeout).
    pub const fn has_win8_extension(self) -> bool {
        self.raw() >= ProtocolVersion::Win8.raw()
    }

    /// Bytes Linux's old `vmscsi_size_delta` subtracted at this version (0 or 16).
    pub const fn size_delta(self) -> usize {
        if self.has_win8_extension() {
            0
        } else {
            SIZE_DELTA
        }
    }

    /// Whole vstor packet at this version (64 or 48).
    pub const fn packet_size(self) -> usize {
        if self.has_win8_extension() {
            PACKET_SIZE
        } else {
            PRE_WIN8_PACKET_SIZE
        }
    }

    /// `vmscsi_request` size at this version (`0x34` or `0x24`).
    pub const fn request_size(self) -> usize {
        if self.has_win8_extension() {
            VMSCSI_REQUEST_SIZE
        } else {
            PRE_WIN8_VMSCSI_REQUEST_SIZE
        }
    }

    /// Sense buffer size at this version (20 or 18).
    pub const fn sense_buffer_size(self) -> usize {
        if self.has_win8_extension() {
            SENSE_BUFFER_SIZE
        } else {
            PRE_WIN8_SENSE_BUFFER_SIZE
        }
    }

    /// Whether sub-channels exist at this version (Win8 and later).
    pub const fn supports_multichannel(self) -> bool {
        self.has_win8_extension()
    }
}

impl core::fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}.{}", self.major(), self.minor())
    }
}

/// `enum vstor_packet_operation`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Operation {
    CompleteIo = 1,
    RemoveDevice = 2,
    ExecuteSrb = 3,
    ResetLun = 4,
    ResetAdapter = 5,
    ResetBus = 6,
    BeginInitialization = 7,
    EndInitialization = 8,
    QueryProtocolVersion = 9,
    QueryProperties = 10,
    EnumerateBus = 11,
    FcHbaData = 12,
    CreateSubChannels = 13,
    /// Defined by OpenVMM only; Linux ignores it.
    EventNotification = 14,
}

impl Operation {
    pub const fn from_wire(v: u32) -> Option<Self> {
        Some(match v {
            1 => Operation::CompleteIo,
            2 => Operation::RemoveDevice,
            3 => Operation::ExecuteSrb,
            4 => Operation::ResetLun,
            5 => Operation::ResetAdapter,
            6 => Operation::ResetBus,
            7 => Operation::BeginInitialization,
            8 => Operation::EndInitialization,
            9 => Operation::QueryProtocolVersion,
            10 => Operation::QueryProperties,
            11 => Operation::EnumerateBus,
            12 => Operation::FcHbaData,
            13 => Operation::CreateSubChannels,
            14 => Operation::EventNotification,
            _ => return None,
        })
    }

    pub const fn raw(self) -> u32 {
        self as u32
    }

    /// Whether a guest may send it (the others flow host → guest only).
    pub const fn is_guest_request(self) -> bool {
        !matches!(
            self,
            Operation::CompleteIo
                | Operation::RemoveDevice
                | Operation::EnumerateBus
                | Operation::EventNotification
        )
    }
}

/// NTSTATUS values carried in the header's `status` (what OpenVMM returns).
pub mod status {
    pub const SUCCESS: u32 = 0;
    pub const BUFFER_OVERFLOW: u32 = 0x8000_0005;
    pub const DEVICE_BUSY: u32 = 0x8000_0011;
    pub const UNSUCCESSFUL: u32 = 0xC000_0001;
    pub const INVALID_PARAMETER: u32 = 0xC000_000D;
    pub const INVALID_DEVICE_REQUEST: u32 = 0xC000_0010;
    pub const REVISION_MISMATCH: u32 = 0xC000_0059;
    pub const DEVICE_NOT_CONNECTED: u32 = 0xC000_009D;
    pub const IO_TIMEOUT: u32 = 0xC000_00B5;
    pub const DEVICE_DOES_NOT_EXIST: u32 = 0xC000_00C0;
    pub const CANCELLED: u32 = 0xC000_0120;
    pub const INVALID_DEVICE_STATE: u32 = 0xC000_0184;
    pub const IO_DEVICE_ERROR: u32 = 0xC000_0185;
}

/// SRB status byte: low 6 bits status, plus [`srb_status::QUEUE_FROZEN`] and
/// [`srb_status::AUTOSENSE_VALID`].
pub mod srb_status {
    pub const PENDING: u8 = 0x00;
    pub const SUCCESS: u8 = 0x01;
    pub const ABORTED: u8 = 0x02;
    pub const ERROR: u8 = 0x04;
    pub const BUSY: u8 = 0x05;
    pub const INVALID_REQUEST: u8 = 0x06;
    pub const NO_DEVICE: u8 = 0x08;
    pub const TIMEOUT: u8 = 0x09;
    pub const SELECTION_TIMEOUT: u8 = 0x0A;
    pub const COMMAND_TIMEOUT: u8 = 0x0B;
    pub const BAD_SRB_BLOCK_LENGTH: u8 = 0x15;
    pub const REQUEST_FLUSHED: u8 = 0x16;
    pub const BAD_FUNCTION: u8 = 0x22;
    pub const DATA_OVERRUN: u8 = 0x12;
    pub const NO_HBA: u8 = 0x11;
    pub const INVALID_LUN: u8 = 0x20;
    pub const INVALID_TARGET_ID: u8 = 0x21;
    pub const QUEUE_FROZEN: u8 = 0x40;
    pub const AUTOSENSE_VALID: u8 = 0x80;
    /// The status without the two flag bits (`SRB_STATUS()`).
    pub const fn code(byte: u8) -> u8 {
        byte & 0x3F
    }
}

/// SAM status codes in `scsi_status`.
pub mod scsi_status {
    pub const GOOD: u8 = 0x00;
    pub const CHECK_CONDITION: u8 = 0x02;
    pub const BUSY: u8 = 0x08;
    pub const RESERVATION_CONFLICT: u8 = 0x18;
    pub const TASK_SET_FULL: u8 = 0x28;
}

/// `srb_flags` bits (`SRB_FLAGS_*`).
pub mod srb_flags {
    pub const QUEUE_ACTION_ENABLE: u32 = 0x0000_0002;
    pub const DISABLE_DISCONNECT: u32 = 0x0000_0004;
    pub const DISABLE_SYNCH_TRANSFER: u32 = 0x0000_0008;
    pub const BYPASS_FROZEN_QUEUE: u32 = 0x0000_0010;
    pub const DISABLE_AUTOSENSE: u32 = 0x0000_0020;
    pub const DATA_IN: u32 = 0x0000_0040;
    pub const DATA_OUT: u32 = 0x0000_0080;
    pub const NO_QUEUE_FREEZE: u32 = 0x0000_0100;
    pub const ADAPTER_CACHE_ENABLE: u32 = 0x0000_0200;
    pub const FREE_SENSE_BUFFER: u32 = 0x0000_0400;
    pub const D3_PROCESSING: u32 = 0x0000_0800;
}

/// Channel-property flag bits.
pub mod property_flags {
    /// `STORAGE_CHANNEL_SUPPORTS_MULTI_CHANNEL`: the guest may ask for sub-channels.
    pub const SUPPORTS_MULTI_CHANNEL: u32 = 0x1;
    /// `STORAGE_CHANNEL_REMOVABLE_FLAG` (other uses of the same bit value).
    pub const REMOVABLE: u32 = 0x1;
    /// `STORAGE_CHANNEL_EMULATED_IDE_FLAG`.
    pub const EMULATED_IDE: u32 = 0x2;
}

/// Linux's `queue_tag` for tagged requests (`SP_UNTAGGED`) and `queue_action` (simple tag).
pub const QUEUE_TAG_UNTAGGED: u8 = 0xFF;
pub const QUEUE_ACTION_SIMPLE_TAG: u8 = 0x20;

/// `data_in` byte of a request (`enum storvsc_request_type`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DataDirection {
    /// `WRITE_TYPE`: data flows guest → device; the host may only read guest memory.
    Write = 0,
    /// `READ_TYPE`: data flows device → guest.
    Read = 1,
    /// `UNKNOWN_TYPE`: no data (Linux), direction unspecified.
    Unknown = 2,
}

impl DataDirection {
    pub const fn from_wire(v: u8) -> Option<Self> {
        match v {
            0 => Some(DataDirection::Write),
            1 => Some(DataDirection::Read),
            2 => Some(DataDirection::Unknown),
            _ => None,
        }
    }

    /// Whether the host may write the guest's buffer (`data_in` 1 and 2, as OpenVMM allows).
    pub const fn device_may_write(self) -> bool {
        !matches!(self, DataDirection::Write)
    }
}

/// The packet header (`operation`, `flags`, `status`).
#[repr(C, packed)]
#[derive(
    Copy,
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
pub struct VstorHeader {
    pub operation: u32,
    pub flags: u32,
    pub status: u32,
}

/// `struct vmscsi_request` (Win8 layout; the pre-Win8 request is its first 36 bytes).
#[repr(C, packed)]
#[derive(
    Copy,
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
pub struct VmscsiRequest {
    pub length: u16,
    pub srb_status: u8,
    pub scsi_status: u8,
    pub port_number: u8,
    pub path_id: u8,
    pub target_id: u8,
    pub lun: u8,
    pub cdb_length: u8,
    pub sense_info_length: u8,
    pub data_in: u8,
    /// "properties" in OpenVMM.
    pub reserved: u8,
    pub data_transfer_length: u32,
    /// The CDB (16 bytes used) on the way in, sense data on the way out.
    pub cdb_or_sense: [u8; SENSE_BUFFER_SIZE],
    // Win8 extension.
    pub reserve: u16,
    pub queue_tag: u8,
    pub queue_action: u8,
    pub srb_flags: u32,
    pub time_out_value: u32,
    pub queue_sort_key: u32,
}

impl VmscsiRequest {
    /// The CDB bytes (always all 16; never index by the guest's `cdb_length`).
    pub fn cdb(&self) -> [u8; MAX_CDB_LEN] {
        let mut cdb = [0u8; MAX_CDB_LEN];
        let src = self.cdb_or_sense;
        cdb.copy_from_slice(src.get(..MAX_CDB_LEN).unwrap_or(&[0; MAX_CDB_LEN]));
        cdb
    }

    /// Places up to 20 sense bytes in the union; returns how many were stored.
    pub fn set_sense(&mut self, sense: &[u8]) -> usize {
        let n = sense.len().min(SENSE_BUFFER_SIZE);
        let mut buf = [0u8; SENSE_BUFFER_SIZE];
        if let (Some(dst), Some(src)) = (buf.get_mut(..n), sense.get(..n)) {
            dst.copy_from_slice(src);
        }
        self.cdb_or_sense = buf;
        n
    }
}

/// `struct vmstorage_channel_properties` (24 bytes).
#[repr(C, packed)]
#[derive(
    Copy,
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
pub struct ChannelProperties {
    pub reserved: u32,
    /// Most sub-channels the guest may request.
    pub max_channel_cnt: u16,
    pub reserved1: u16,
    /// [`property_flags`].
    pub flags: u32,
    /// Largest transfer per request; non-zero, a multiple of 4096.
    pub max_transfer_bytes: u32,
    pub reserved2: u64,
}

/// `struct vmstorage_protocol_version` (4 bytes).
#[repr(C, packed)]
#[derive(
    Copy,
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
pub struct ProtocolVersionBody {
    pub major_minor: u16,
    /// Windows build revision; Linux sends 0.
    pub revision: u16,
}

/// `struct hv_fc_wwn_packet` (36 bytes, the layout after Linux commit 83d1e8b9).
#[repr(C, packed)]
#[derive(
    Copy,
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
pub struct FcWwnPacket {
    pub primary_active: u8,
    pub reserved: [u8; 3],
    pub primary_port_wwn: [u8; 8],
    pub primary_node_wwn: [u8; 8],
    pub secondary_port_wwn: [u8; 8],
    pub secondary_node_wwn: [u8; 8],
}

/// A whole vstor packet: header plus the 52-byte union as raw bytes.
#[repr(C, packed)]
#[derive(
    Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
pub struct VstorPacket {
    pub header: VstorHeader,
    pub body: [u8; UNION_SIZE],
}

impl Default for VstorPacket {
    fn default() -> Self {
        VstorPacket::new_zeroed()
    }
}

impl VstorPacket {
    /// A packet with `operation`, `flags` and `status`, zero union.
    pub fn new(operation: Operation, flags: u32, status: u32) -> Self {
        let mut p = VstorPacket::new_zeroed();
        p.header = VstorHeader {
            operation: operation.raw(),
            flags,
            status,
        };
        p
    }

    /// The first `min(len, 64)` bytes of `bytes`, the rest zero; `None` below the 12-byte header.
    pub fn from_prefix_zero_filled(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < HEADER_SIZE {
            return None;
        }
        let mut p = VstorPacket::new_zeroed();
        let n = bytes.len().min(PACKET_SIZE);
        p.as_mut_bytes()
            .get_mut(..n)?
            .copy_from_slice(bytes.get(..n)?);
        Some(p)
    }

    fn union_as<T: FromBytes>(&self) -> T {
        let body = self.body;
        // Every union member is at most UNION_SIZE bytes, so the prefix read cannot fail; the
        // fallback keeps this total anyway.
        T::read_from_prefix(body.as_slice()).map_or_else(|_| T::new_zeroed(), |(v, _)| v)
    }

    fn set_union<T: IntoBytes + Immutable>(&mut self, v: &T) {
        let mut body = [0u8; UNION_SIZE];
        let src = v.as_bytes();
        if let Some(dst) = body.get_mut(..src.len()) {
            dst.copy_from_slice(src);
        }
        self.body = body;
    }

    pub fn srb(&self) -> VmscsiRequest {
        self.union_as()
    }

    pub fn set_srb(&mut self, srb: &VmscsiRequest) {
        self.set_union(srb)
    }

    pub fn properties(&self) -> ChannelProperties {
        self.union_as()
    }

    pub fn set_properties(&mut self, p: &ChannelProperties) {
        self.set_union(p)
    }

    pub fn version(&self) -> ProtocolVersionBody {
        self.union_as()
    }

    pub fn set_version(&mut self, v: &ProtocolVersionBody) {
        self.set_union(v)
    }

    pub fn wwn(&self) -> FcWwnPacket {
        self.union_as()
    }

    pub fn sub_channel_count(&self) -> u16 {
        self.union_as()
    }

    pub fn set_sub_channel_count(&mut self, n: u16) {
        self.set_union(&n)
    }

    /// The first `len` bytes to send (64 for Win8 and later or Linux 6.1, 48 pre-Win8).
    pub fn wire_bytes(&self, len: usize) -> &[u8] {
        let all = self.as_bytes();
        all.get(..len.min(PACKET_SIZE)).unwrap_or(all)
    }
}

/// What is wrong with a vstor packet.
#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VstorError {
    #[error("vstor packet of {len} bytes is shorter than the 12-byte header")]
    TooShort { len: usize },
    #[error("unknown vstor operation {operation}")]
    UnknownOperation { operation: u32 },
    #[error("vstor operation {operation:?} cannot come from this side")]
    WrongDirection { operation: Operation },
    #[error("vstor completion of {len} bytes is shorter than the {min} the request needs")]
    ShortCompletion { len: usize, min: usize },
}

/// A request from the guest, parsed from a private, zero-filled copy.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct GuestPacket {
    pub operation: Operation,
    pub flags: u32,
    /// Payload bytes the guest actually sent (incl. its ring padding).
    pub len: usize,
    pub body: GuestRequest,
}

/// The operation-specific part of a [`GuestPacket`].
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum GuestRequest {
    /// EXECUTE_SRB. A request shorter than `0x34` has its missing tail zero-filled.
    ExecuteSrb(VmscsiRequest),
    /// RESET_LUN with its path/target/lun in the SRB fields.
    ResetLun(VmscsiRequest),
    ResetAdapter,
    ResetBus {
        path_id: u8,
    },
    BeginInitialization,
    EndInitialization,
    QueryProtocolVersion(ProtocolVersionBody),
    QueryProperties,
    FcHbaData,
    CreateSubChannels {
        count: u16,
    },
}

/// Parses a packet a guest sent (host side).
pub fn parse_guest_packet(bytes: &[u8]) -> Result<GuestPacket, VstorError> {
    let p = VstorPacket::from_prefix_zero_filled(bytes)
        .ok_or(VstorError::TooShort { len: bytes.len() })?;
    let raw = p.header.operation;
    let operation =
        Operation::from_wire(raw).ok_or(VstorError::UnknownOperation { operation: raw })?;
    let body = match operation {
        Operation::ExecuteSrb => GuestRequest::ExecuteSrb(p.srb()),
        Operation::ResetLun => GuestRequest::ResetLun(p.srb()),
        Operation::ResetAdapter => GuestRequest::ResetAdapter,
        Operation::ResetBus => GuestRequest::ResetBus {
            path_id: p.srb().path_id,
        },
        Operation::BeginInitialization => GuestRequest::BeginInitialization,
        Operation::EndInitialization => GuestRequest::EndInitialization,
        Operation::QueryProtocolVersion => GuestRequest::QueryProtocolVersion(p.version()),
        Operation::QueryProperties => GuestRequest::QueryProperties,
        Operation::FcHbaData => GuestRequest::FcHbaData,
        Operation::CreateSubChannels => GuestRequest::CreateSubChannels {
            count: p.sub_channel_count(),
        },
        Operation::CompleteIo
        | Operation::RemoveDevice
        | Operation::EnumerateBus
        | Operation::EventNotification => return Err(VstorError::WrongDirection { operation }),
    };
    Ok(GuestPacket {
        operation,
        flags: p.header.flags,
        len: bytes.len(),
        body,
    })
}

/// A packet from the host, as a guest driver sees it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum HostPacket {
    /// COMPLETE_IO: `status` and the echoed union (interpret by what the request was).
    Completion(VstorPacket),
    /// ENUMERATE_BUS: rescan.
    EnumerateBus,
    /// REMOVE_DEVICE: rescan (Linux treats it like ENUMERATE_BUS).
    RemoveDevice,
    /// FCHBA_DATA (FC only).
    FcHbaData(FcWwnPacket),
    /// EVENT_NOTIFICATION (OpenVMM); Linux ignores it.
    EventNotification,
}

/// Parses a packet from the host (guest side). As Linux does, a completion (non-zero transaction id)
/// must be at least `min_completion` bytes (64 for Linux 6.1; the request size for older guests);
/// unsolicited messages only need the operation.
pub fn parse_host_packet(bytes: &[u8], min_completion: usize) -> Result<HostPacket, VstorError> {
    if bytes.len() < size_of::<u32>() {
        return Err(VstorError::TooShort { len: bytes.len() });
    }
    let mut padded = [0u8; PACKET_SIZE];
    let n = bytes.len().min(PACKET_SIZE);
    if let (Some(dst), Some(src)) = (padded.get_mut(..n), bytes.get(..n)) {
        dst.copy_from_slice(src);
    }
    let p = VstorPacket::read_from_bytes(padded.as_slice())
        .map_err(|_| VstorError::TooShort { len: bytes.len() })?;
    let raw = p.header.operation;
    let operation =
        Operation::from_wire(raw).ok_or(VstorError::UnknownOperation { operation: raw })?;
    match operation {
        Operation::CompleteIo => {
            if bytes.len() < min_completion {
                return Err(VstorError::ShortCompletion {
                    len: bytes.len(),
                    min: min_completion,
                });
            }
            Ok(HostPacket::Completion(p))
        }
        Operation::EnumerateBus => Ok(HostPacket::EnumerateBus),
        Operation::RemoveDevice => Ok(HostPacket::RemoveDevice),
        Operation::FcHbaData => Ok(HostPacket::FcHbaData(p.wwn())),
        Operation::EventNotification => Ok(HostPacket::EventNotification),
        _ => Err(VstorError::WrongDirection { operation }),
    }
}

/// Payload length of a completion the host sends, per the reference's sizing rules: the negotiated
/// version's packet size once known, otherwise the request's own length (at least the header,
/// at most 64; Linux 6.1 sends 64 during init and needs 64 back).
pub fn completion_len(version: Option<ProtocolVersion>, request_len: usize) -> usize {
    match version {
        Some(v) => v.packet_size(),
        None => request_len.clamp(HEADER_SIZE, PACKET_SIZE),
    }
}

/// The completion for an SRB: the request's path/target/lun echoed, the given statuses, sense in
/// the union (at most 20 bytes), everything else as OpenVMM fills it.
pub fn srb_completion(
    request: &VmscsiRequest,
    nt_status: u32,
    srb_status: u8,
    scsi_status: u8,
    data_transfer_length: u32,
    sense: &[u8],
) -> VstorPacket {
    let mut srb = VmscsiRequest {
        length: VMSCSI_REQUEST_SIZE as u16,
        srb_status,
        scsi_status,
        port_number: request.port_number,
        path_id: request.path_id,
        target_id: request.target_id,
        lun: request.lun,
        cdb_length: MAX_CDB_LEN as u8,
        data_in: request.data_in,
        data_transfer_length,
        ..VmscsiRequest::default()
    };
    // set_sense stores at most 20 bytes, so the count fits a u8.
    srb.sense_info_length = srb.set_sense(sense) as u8;
    let mut p = VstorPacket::new(Operation::CompleteIo, 0, nt_status);
    p.set_srb(&srb);
    p
}

/// NTSTATUS for a completed SRB, mapped from its SRB status as OpenVMM maps it.
pub const fn nt_status_for_srb(srb: u8) -> u32 {
    match srb_status::code(srb) {
        srb_status::SUCCESS => status::SUCCESS,
        srb_status::BUSY => status::DEVICE_BUSY,
        srb_status::INVALID_LUN
        | srb_status::INVALID_TARGET_ID
        | srb_status::NO_DEVICE
        | srb_status::NO_HBA => status::DEVICE_DOES_NOT_EXIST,
        srb_status::TIMEOUT | srb_status::COMMAND_TIMEOUT => status::IO_TIMEOUT,
        srb_status::SELECTION_TIMEOUT => status::DEVICE_NOT_CONNECTED,
        srb_status::BAD_FUNCTION | srb_status::BAD_SRB_BLOCK_LENGTH => {
            status::INVALID_DEVICE_REQUEST
        }
        srb_status::DATA_OVERRUN => status::BUFFER_OVERFLOW,
        srb_status::REQUEST_FLUSHED => status::UNSUCCESSFUL,
        srb_status::ABORTED => status::CANCELLED,
        _ => status::IO_DEVICE_ERROR,
    }
}

#[cfg(test)]
#[path = "vstor_tests.rs"]
mod tests;
