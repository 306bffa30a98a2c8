//! Ring errors. A peer-caused error breaks the ring: every later call returns [`RingError::Broken`].

/// Which rule a packet in the ring broke.
#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PacketFault {
    #[error("fewer bytes published ({available}) than a descriptor and trailer need")]
    Truncated { available: u32 },
    #[error("unknown packet type {0:#x}")]
    UnknownType(u16),
    #[error("undefined flag bits {0:#x}")]
    BadFlags(u16),
    #[error("offset8 {offset8} is below 2 or beyond len8 {len8}")]
    BadOffset { offset8: u16, len8: u16 },
    #[error("packet of {len} bytes (+8 trailer) overruns the {available} bytes published")]
    Overrun { len: u32, available: u32 },
    #[error("type-specific header of {len} bytes is too short for its {needed} bytes of ranges")]
    HeaderOverrun { len: u32, needed: u64 },
    #[error("GPA-direct packet with no ranges")]
    NoRanges,
    #[error(
        "GPA range {index}: byte_offset {byte_offset:#x} / byte_count {byte_count:#x} not allowed"
    )]
    BadRange {
        index: u32,
        byte_offset: u32,
        byte_count: u32,
    },
}

/// Errors of the ring halves. Everything but [`RingError::Broken`] names what the peer did.
#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error(
        "peer published {field} {value:#x}, outside or misaligned in a {size:#x}-byte data area"
    )]
    BadIndex {
        field: &'static str,
        value: u32,
        size: u32,
    },
    #[error("corrupt packet at data offset {offset:#x}: {fault}")]
    BadPacket { offset: u32, fault: PacketFault },
    #[error("ring data area of {0:#x} bytes is not a non-zero multiple of 8 below 2 GiB")]
    BadSize(u32),
    #[error("ring is broken by an earlier error and refuses further use")]
    Broken,
}

/// Errors returned to a local writer. Only [`WriteError::Ring`] means the peer misbehaved.
#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    #[error("ring full: packet needs {needed} bytes, {free} free (one word always stays free)")]
    Full { needed: u32, free: u32 },
    #[error("packet of {len} bytes can never fit (largest for this ring: {max})")]
    TooLarge { len: usize, max: usize },
    #[error("type-specific header length {0} is not a multiple of 8")]
    UnalignedHeader(usize),
    #[error(transparent)]
    Ring(#[from] RingError),
}

/// Payload accessor misuse by the local consumer (never the peer's fault).
#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("payload read of {len} bytes at {offset} exceeds the {payload_len}-byte payload")]
pub struct PayloadBounds {
    pub offset: usize,
    pub len: usize,
    pub payload_len: usize,
}
