//! SCSI sense data (fixed and descriptor formats) decoded the way Linux `scsi_normalize_sense` does,
//! and the typed I/O errors a completed request turns into.
#![warn(clippy::arithmetic_side_effects, clippy::indexing_slicing)]

/// Sense keys (SPC-4 table 48).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum SenseKey {
    NoSense,
    RecoveredError,
    NotReady,
    MediumError,
    HardwareError,
    IllegalRequest,
    UnitAttention,
    DataProtect,
    BlankCheck,
    VendorSpecific,
    CopyAborted,
    AbortedCommand,
    Reserved,
    VolumeOverflow,
    Miscompare,
    Completed,
}

impl SenseKey {
    /// The key in the low nibble of `v` (every nibble value is a key).
    pub const fn from_nibble(v: u8) -> Self {
        match v & 0x0F {
            0x0 => SenseKey::NoSense,
            0x1 => SenseKey::RecoveredError,
            0x2 => SenseKey::NotReady,
            0x3 => SenseKey::MediumError,
            0x4 => SenseKey::HardwareError,
            0x5 => SenseKey::IllegalRequest,
            0x6 => SenseKey::UnitAttention,
            0x7 => SenseKey::DataProtect,
            0x8 => SenseKey::BlankCheck,
            0x9 => SenseKey::VendorSpecific,
            0xA => SenseKey::CopyAborted,
            0xB => SenseKey::AbortedCommand,
            0xC => SenseKey::Reserved,
            0xD => SenseKey::VolumeOverflow,
            0xE => SenseKey::Miscompare,
            _ => SenseKey::Completed,
        }
    }
}

/// Decoded sense data.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Sense {
    pub key: SenseKey,
    /// Additional sense code.
    pub asc: u8,
    /// Additional sense code qualifier.
    pub ascq: u8,
    /// Response code 0x72/0x73 (descriptor format) rather than 0x70/0x71 (fixed).
    pub descriptor_format: bool,
    /// Deferred error (0x71/0x73) rather than current (0x70/0x72).
    pub deferred: bool,
    /// The INFORMATION field of fixed-format sense when its VALID bit is set (e.g. the failing LBA).
    pub information: Option<u32>,
}

impl Sense {
    /// A current, fixed-format sense with no information field.
    pub const fn new(key: SenseKey, asc: u8, ascq: u8) -> Self {
        Sense {
            key,
            asc,
            ascq,
            descriptor_format: false,
            deferred: false,
            information: None,
        }
    }
}

/// Why sense bytes could not be decoded.
#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SenseError {
    #[error("sense data is empty")]
    Empty,
    #[error("sense response code {0:#04x} is neither fixed (0x70/0x71) nor descriptor (0x72/0x73)")]
    ResponseCode(u8),
}

/// Decodes sense bytes as Linux `scsi_normalize_sense` does: fixed format reads the key at byte 2
/// and ASC/ASCQ at 12/13 (bounded by the additional length at byte 7), descriptor format at bytes
/// 1..=3; fields the data is too short for read as 0.
pub fn parse_sense(bytes: &[u8]) -> Result<Sense, SenseError> {
    let first = *bytes.first().ok_or(SenseError::Empty)?;
    let code = first & 0x7F;
    let at = |i: usize, len: usize| if i < len { bytes.get(i).copied() } else { None };
    match code {
        0x70 | 0x71 => {
            let mut len = bytes.len();
            if let Some(add) = at(7, len) {
                len = len.min(usize::from(add).saturating_add(8));
            }
            let valid = first & 0x80 != 0;
            let information = match (valid, bytes.get(3..7)) {
                (true, Some(&[a, b, c, d])) if len >= 7 => Some(u32::from_be_bytes([a, b, c, d])),
                _ => None,
            };
            Ok(Sense {
                key: SenseKey::from_nibble(at(2, len).unwrap_or(0)),
                asc: at(12, len).unwrap_or(0),
                ascq: at(13, len).unwrap_or(0),
                descriptor_format: false,
                deferred: code == 0x71,
                information,
            })
        }
        0x72 | 0x73 => {
            let len = bytes.len();
            Ok(Sense {
                key: SenseKey::from_nibble(at(1, len).unwrap_or(0)),
                asc: at(2, len).unwrap_or(0),
                ascq: at(3, len).unwrap_or(0),
                descriptor_format: true,
                deferred: code == 0x73,
                information: None,
            })
        }
        _ => Err(SenseError::ResponseCode(first)),
    }
}

/// How a SCSI request failed, as the driver's user sees it. Sense-carrying failures are split by
/// what a block layer does about them (retry, give up, rescan).
#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IoError {
    // ---- CHECK CONDITION with valid sense ----
    #[error("no medium (NOT READY, asc 0x3A/{ascq:#04x})")]
    NoMedium { ascq: u8 },
    #[error("not ready (asc {asc:#04x}/{ascq:#04x})")]
    NotReady { asc: u8, ascq: u8 },
    #[error("LBA out of range (ILLEGAL REQUEST 0x21/0x00)")]
    LbaOutOfRange,
    #[error("invalid command operation code (ILLEGAL REQUEST 0x20/0x00)")]
    InvalidOpcode,
    #[error("invalid field in CDB (ILLEGAL REQUEST 0x24/0x00)")]
    InvalidFieldInCdb,
    #[error("invalid field in parameter list (ILLEGAL REQUEST 0x26/{ascq:#04x})")]
    InvalidFieldInParameterList { ascq: u8 },
    #[error("illegal request (asc {asc:#04x}/{ascq:#04x})")]
    IllegalRequest { asc: u8, ascq: u8 },
    #[error("capacity data has changed (UNIT ATTENTION 0x2A/0x09): re-read the capacity and retry")]
    CapacityChanged,
    #[error("unit attention (asc {asc:#04x}/{ascq:#04x}): retry")]
    UnitAttention { asc: u8, ascq: u8 },
    #[error("write protected (DATA PROTECT asc {asc:#04x}/{ascq:#04x})")]
    WriteProtected { asc: u8, ascq: u8 },
    #[error("medium error (asc {asc:#04x}/{ascq:#04x}, information {information:?})")]
    MediumError {
        asc: u8,
        ascq: u8,
        information: Option<u32>,
    },
    #[error("hardware error (asc {asc:#04x}/{ascq:#04x})")]
    HardwareError { asc: u8, ascq: u8 },
    #[error("aborted command (asc {asc:#04x}/{ascq:#04x}): retry")]
    AbortedCommand { asc: u8, ascq: u8 },
    #[error("sense {0:?}")]
    OtherSense(Sense),
    #[error("CHECK CONDITION with sense that does not decode: {0}")]
    BadSense(SenseError),
    #[error("CHECK CONDITION without sense (SRB status {srb_status:#04x})")]
    CheckConditionNoSense { srb_status: u8 },
    // ---- SCSI status other than GOOD / CHECK CONDITION ----
    #[error("device busy (SCSI status {scsi_status:#04x}): retry")]
    Busy { scsi_status: u8 },
    #[error("reservation conflict")]
    ReservationConflict,
    // ---- SRB (adapter) status ----
    #[error("no such LUN (SRB status INVALID_LUN)")]
    InvalidLun,
    #[error(
        "host failed the request: SRB status {srb_status:#04x}, SCSI status {scsi_status:#04x}, NTSTATUS {nt_status:#010x}"
    )]
    Host {
        srb_status: u8,
        scsi_status: u8,
        nt_status: u32,
    },
    // ---- driver-side ----
    #[error("request was cancelled: its channel went away")]
    Cancelled,
}

impl IoError {
    /// The typed error for CHECK CONDITION with this sense.
    pub fn from_sense(s: Sense) -> IoError {
        let (asc, ascq) = (s.asc, s.ascq);
        match s.key {
            SenseKey::NotReady if asc == 0x3A => IoError::NoMedium { ascq },
            SenseKey::NotReady => IoError::NotReady { asc, ascq },
            SenseKey::IllegalRequest => match (asc, ascq) {
                (0x21, 0x00) => IoError::LbaOutOfRange,
                (0x20, 0x00) => IoError::InvalidOpcode,
                (0x24, 0x00) => IoError::InvalidFieldInCdb,
                (0x26, _) => IoError::InvalidFieldInParameterList { ascq },
                _ => IoError::IllegalRequest { asc, ascq },
            },
            SenseKey::UnitAttention if (asc, ascq) == (0x2A, 0x09) => IoError::CapacityChanged,
            SenseKey::UnitAttention => IoError::UnitAttention { asc, ascq },
            SenseKey::DataProtect => IoError::WriteProtected { asc, ascq },
            SenseKey::MediumError => IoError::MediumError {
                asc,
                ascq,
                information: s.information,
            },
            SenseKey::HardwareError => IoError::HardwareError { asc, ascq },
            SenseKey::AbortedCommand => IoError::AbortedCommand { asc, ascq },
            _ => IoError::OtherSense(s),
        }
    }

    /// Whether retrying the same request may succeed (what Linux's mid-layer retries).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            IoError::UnitAttention { .. }
                | IoError::CapacityChanged
                | IoError::AbortedCommand { .. }
                | IoError::Busy { .. }
        )
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn fixed_format() {
        let mut b = [0u8; 18];
        b[0] = 0xF0; // valid + current fixed
        b[2] = 0x03;
        b[3..7].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        b[7] = 10;
        b[12] = 0x11;
        b[13] = 0x00;
        let s = parse_sense(&b).unwrap();
        assert_eq!(s.key, SenseKey::MediumError);
        assert_eq!((s.asc, s.ascq), (0x11, 0));
        assert_eq!(s.information, Some(0x1234_5678));
        assert!(!s.descriptor_format && !s.deferred);
        assert_eq!(
            IoError::from_sense(s),
            IoError::MediumError {
                asc: 0x11,
                ascq: 0,
                information: Some(0x1234_5678)
            }
        );
    }

    #[test]
    fn fixed_format_bounded_by_additional_length() {
        // additional length 4 → only 12 bytes count: ASC/ASCQ read as 0.
        let mut b = [0u8; 18];
        b[0] = 0x70;
        b[2] = 0x05;
        b[7] = 4;
        b[12] = 0x24;
        let s = parse_sense(&b).unwrap();
        assert_eq!((s.key, s.asc, s.ascq), (SenseKey::IllegalRequest, 0, 0));
        // Truncated buffers never panic.
        assert_eq!(parse_sense(&[0x70]).unwrap().key, SenseKey::NoSense);
        assert_eq!(
            parse_sense(&[0x70, 0, 6]).unwrap().key,
            SenseKey::UnitAttention
        );
    }

    #[test]
    fn descriptor_format() {
        let s = parse_sense(&[0x72, 0x06, 0x2A, 0x09, 0, 0, 0, 0]).unwrap();
        assert!(s.descriptor_format);
        assert_eq!(IoError::from_sense(s), IoError::CapacityChanged);
        let s = parse_sense(&[0x73, 0x02]).unwrap();
        assert!(s.deferred);
        assert_eq!(
            IoError::from_sense(s),
            IoError::NotReady { asc: 0, ascq: 0 }
        );
    }

    #[test]
    fn bad_response_codes() {
        assert_eq!(parse_sense(&[]), Err(SenseError::Empty));
        assert_eq!(parse_sense(&[0x00; 18]), Err(SenseError::ResponseCode(0)));
        assert_eq!(
            parse_sense(&[0x7F; 18]),
            Err(SenseError::ResponseCode(0x7F))
        );
    }

    #[test]
    fn typed_mapping() {
        let e = |k, a, q| IoError::from_sense(Sense::new(k, a, q));
        assert_eq!(
            e(SenseKey::NotReady, 0x3A, 0x01),
            IoError::NoMedium { ascq: 1 }
        );
        assert_eq!(e(SenseKey::IllegalRequest, 0x21, 0), IoError::LbaOutOfRange);
        assert_eq!(e(SenseKey::IllegalRequest, 0x20, 0), IoError::InvalidOpcode);
        assert_eq!(
            e(SenseKey::IllegalRequest, 0x24, 0),
            IoError::InvalidFieldInCdb
        );
        assert_eq!(
            e(SenseKey::IllegalRequest, 0x26, 2),
            IoError::InvalidFieldInParameterList { ascq: 2 }
        );
        assert_eq!(
            e(SenseKey::DataProtect, 0x27, 0),
            IoError::WriteProtected { asc: 0x27, ascq: 0 }
        );
        assert!(e(SenseKey::UnitAttention, 0x29, 0).is_retryable());
        assert!(!e(SenseKey::HardwareError, 0x44, 0).is_retryable());
        assert!(matches!(
            e(SenseKey::Miscompare, 0x1D, 0),
            IoError::OtherSense(_)
        ));
    }
}
