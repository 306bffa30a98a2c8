//! The 256-byte SynIC message (`HV_MESSAGE`, TLFS; Linux `struct hv_message`) and the owned,
//! validated copies the ports hand out.

use core::fmt;
use core::ops::Deref;

use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

/// Slot free (`HVMSG_NONE`).
pub const HVMSG_NONE: u32 = 0;
/// The message type VMBus channel messages travel as (both directions).
pub const HVMSG_CHANNEL_MESSAGE: u32 = 1;
/// Synthetic timer expiry (`HVMSG_TIMER_EXPIRED`); shares the SINT 2 slot when STIMER is used.
pub const HVMSG_TIMER_EXPIRED: u32 = 0x8000_0010;
/// `message_flags` bit 0: the host has more messages queued for this SINT; write EOM after freeing.
pub const MESSAGE_FLAG_PENDING: u8 = 0x01;
/// Payload bytes of one message (`HV_MESSAGE_PAYLOAD_BYTE_COUNT`).
pub const MAX_PAYLOAD: usize = 240;
/// Size of one message and of one message-page slot.
pub const HV_MESSAGE_SIZE: usize = 256;

/// `HV_MESSAGE_HEADER`: 16 bytes.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct HvMessageHeader {
    /// 0x00: message type; [`HVMSG_NONE`] = slot free.
    pub message_type: u32,
    /// 0x04: payload bytes used (≤ 240).
    pub payload_size: u8,
    /// 0x05: flags; bit 0 = [`MESSAGE_FLAG_PENDING`].
    pub message_flags: u8,
    /// 0x06: reserved.
    pub reserved: u16,
    /// 0x08: sender / port id (Linux ignores it; OpenVMM and this crate write 0).
    pub sender: u64,
}

/// `HV_MESSAGE`: header + 240-byte payload = 256 bytes, one message-page slot.
#[repr(C)]
#[derive(Copy, Clone, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct HvMessage {
    pub header: HvMessageHeader,
    pub payload: [u8; MAX_PAYLOAD],
}

impl HvMessage {
    /// A message of `message_type` carrying `payload`; `None` if the payload exceeds 240 bytes.
    pub fn new(message_type: u32, payload: &[u8]) -> Option<HvMessage> {
        let size = u8::try_from(payload.len())
            .ok()
            .filter(|&n| n as usize <= MAX_PAYLOAD)?;
        let mut msg = HvMessage::new_zeroed();
        msg.header.message_type = message_type;
        msg.header.payload_size = size;
        msg.payload[..payload.len()].copy_from_slice(payload);
        Some(msg)
    }

    /// The used part of the payload; `None` if `payload_size` exceeds 240.
    pub fn payload_bytes(&self) -> Option<&[u8]> {
        self.payload.get(..self.header.payload_size as usize)
    }

    /// Whether the pending flag is set.
    pub fn pending(&self) -> bool {
        self.header.message_flags & MESSAGE_FLAG_PENDING != 0
    }
}

impl fmt::Debug for HvMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = (self.header.payload_size as usize).min(MAX_PAYLOAD);
        f.debug_struct("HvMessage")
            .field("header", &self.header)
            .field("payload", &&self.payload[..shown])
            .finish()
    }
}

/// What is wrong with a message a guest found in its slot (after copying it out).
#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("SynIC message of type {message_type:#x} claims {size} payload bytes (max 240)")]
    PayloadSize { message_type: u32, size: u8 },
    #[error("message slot of SINT {sint} kept changing while being read")]
    Unstable { sint: u8 },
}

/// An owned payload of at most 240 bytes; dereferences to the used bytes.
#[derive(Copy, Clone, PartialEq, Eq)]
pub struct Payload {
    len: u8,
    data: [u8; MAX_PAYLOAD],
}

impl Payload {
    /// A copy of `bytes`; `None` if longer than 240.
    pub fn new(bytes: &[u8]) -> Option<Payload> {
        let len = u8::try_from(bytes.len())
            .ok()
            .filter(|&n| n as usize <= MAX_PAYLOAD)?;
        let mut data = [0u8; MAX_PAYLOAD];
        data[..bytes.len()].copy_from_slice(bytes);
        Some(Payload { len, data })
    }

    /// The used bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.data[..self.len as usize]
    }
}

impl Deref for Payload {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

/// A message a guest took from its message page: validated copy.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct SynicMessage {
    /// [`HVMSG_CHANNEL_MESSAGE`] for VMBus; anything non-zero the host wrote.
    pub message_type: u32,
    /// The header's sender / port id.
    pub sender: u64,
    pub payload: Payload,
}

impl SynicMessage {
    /// Validates a private copy of a slot.
    pub fn from_slot(msg: &HvMessage) -> Result<SynicMessage, MessageError> {
        let bad = MessageError::PayloadSize {
            message_type: msg.header.message_type,
            size: msg.header.payload_size,
        };
        let bytes = msg.payload_bytes().ok_or(bad)?;
        Ok(SynicMessage {
            message_type: msg.header.message_type,
            sender: msg.header.sender,
            payload: Payload::new(bytes).ok_or(bad)?,
        })
    }
}

/// A message the guest posted with `HvPostMessage`, as the host receives it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PostedMessage {
    /// The connection id (24 bits), a registered message port.
    pub connection_id: u32,
    /// 8..=240 bytes.
    pub payload: Payload,
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn layout_matches_tlfs() {
        assert_eq!(size_of::<HvMessageHeader>(), 16);
        assert_eq!(offset_of!(HvMessageHeader, message_type), 0x00);
        assert_eq!(offset_of!(HvMessageHeader, payload_size), 0x04);
        assert_eq!(offset_of!(HvMessageHeader, message_flags), 0x05);
        assert_eq!(offset_of!(HvMessageHeader, reserved), 0x06);
        assert_eq!(offset_of!(HvMessageHeader, sender), 0x08);
        assert_eq!(size_of::<HvMessage>(), HV_MESSAGE_SIZE);
        assert_eq!(offset_of!(HvMessage, payload), 0x10);
    }

    #[test]
    fn bytes_are_the_wire_bytes() {
        let mut m = HvMessage::new(HVMSG_CHANNEL_MESSAGE, &[0xAA, 0xBB]).unwrap();
        m.header.message_flags = MESSAGE_FLAG_PENDING;
        m.header.sender = 0x1122_3344_5566_7788;
        let b = m.as_bytes();
        assert_eq!(&b[..4], &[1, 0, 0, 0]);
        assert_eq!(b[4], 2);
        assert_eq!(b[5], 1);
        assert_eq!(&b[8..16], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&b[16..18], &[0xAA, 0xBB]);
        assert!(m.pending());
        assert_eq!(m.payload_bytes(), Some(&[0xAA, 0xBB][..]));
    }

    #[test]
    fn sizes_are_bounded() {
        assert!(HvMessage::new(1, &[0u8; 240]).is_some());
        assert!(HvMessage::new(1, &[0u8; 241]).is_none());
        assert!(Payload::new(&[0u8; 241]).is_none());
        let mut m = HvMessage::new(1, &[7u8; 10]).unwrap();
        m.header.payload_size = 241;
        assert_eq!(m.payload_bytes(), None);
        assert_eq!(
            SynicMessage::from_slot(&m),
            Err(MessageError::PayloadSize {
                message_type: 1,
                size: 241
            })
        );
        m.header.payload_size = 240;
        let s = SynicMessage::from_slot(&m).unwrap();
        assert_eq!(s.payload.len(), 240);
        assert_eq!(&s.payload[..10], &[7u8; 10]);
    }
}
