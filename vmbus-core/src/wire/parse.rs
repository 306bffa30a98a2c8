//! Parsing and serializing whole channel messages.
//!
//! [`ChannelMessage::parse`] is total: any byte slice gives a message or a [`WireError`], never a
//! panic. It checks exactly what Linux checks before it dispatches a message
//! (`vmbus_on_msg_dpc`): the type is known, the length is at most 240 bytes and at least the
//! type's minimum ([`MessageType::min_len`]). Bytes beyond what a message needs are ignored (some
//! guests pad every message to 240 bytes). Whether a message is allowed in the current state or
//! version, and whether the 6.0 tails should be honoured, is the state machine's decision.
#![warn(clippy::arithmetic_side_effects, clippy::indexing_slicing)]

use alloc::vec::Vec;
use core::fmt;
use core::mem::size_of;

use zerocopy::{FromBytes, IntoBytes};

use super::guid::Guid;
use super::messages::*;
use super::msgtype::{MessageType, WireMessage};
use super::version::FeatureFlags;

/// Why a channel message could not be parsed or serialized.
#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Longer than a SynIC message payload (Linux drops these).
    #[error("channel message of {len} bytes exceeds the {max}-byte SynIC message payload")]
    TooLong {
        /// Length of the message.
        len: usize,
        /// [`MAX_MESSAGE_SIZE`].
        max: usize,
    },
    /// Too short to hold the 4-byte `msgtype`.
    #[error("channel message of {len} bytes is too short to hold its 4-byte msgtype")]
    NoMessageType {
        /// Length of the message.
        len: usize,
    },
    /// `msgtype` is 0, 18–20 (Linux placeholders) or ≥ 25 (Linux drops these).
    #[error("unknown channel message type {msgtype}")]
    UnknownMessageType {
        /// The raw `msgtype`.
        msgtype: u32,
    },
    /// Shorter than the type's minimum.
    #[error("{msgtype} truncated at field `{field}`: {len} bytes, need at least {min}")]
    Truncated {
        /// The message type.
        msgtype: MessageType,
        /// First field that is cut off.
        field: &'static str,
        /// Length of the message.
        len: usize,
        /// Minimum length for this type.
        min: usize,
    },
    /// Serializing: a variable-length field does not fit in one message.
    #[error(
        "{msgtype} field `{field}`: {count} u64 words need a {needed}-byte message, more than {max}"
    )]
    TooManyWords {
        /// The message type.
        msgtype: MessageType,
        /// The variable-length field.
        field: &'static str,
        /// Number of words.
        count: usize,
        /// Message size they would need.
        needed: usize,
        /// [`MAX_MESSAGE_SIZE`].
        max: usize,
    },
    /// Serializing: the caller's buffer is too small.
    #[error("{msgtype} needs {need} bytes, output buffer has {have}")]
    BufferTooSmall {
        /// The message type.
        msgtype: MessageType,
        /// Encoded length.
        need: usize,
        /// Buffer length.
        have: usize,
    },
}

/// A run of little-endian u64 words borrowed from a message (GPADL range words and PFNs). Its
/// byte length is always a multiple of 8.
#[derive(Copy, Clone, Default, PartialEq, Eq, Hash)]
pub struct GpadlWords<'a>(&'a [u8]);

impl<'a> GpadlWords<'a> {
    /// Words from a slice of u64s (for building messages).
    pub fn from_u64s(words: &'a [u64]) -> GpadlWords<'a> {
        GpadlWords(words.as_bytes())
    }

    /// The longest run of whole words at the start of `bytes`; a trailing partial word is dropped.
    pub fn from_bytes_truncating(bytes: &'a [u8]) -> GpadlWords<'a> {
        let whole = bytes.len() & !7;
        GpadlWords(bytes.get(..whole).unwrap_or_default())
    }

    /// Number of words.
    pub const fn len(&self) -> usize {
        self.0.len() / 8
    }

    /// True if there are no words.
    pub const fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Word `i`.
    pub fn get(&self, i: usize) -> Option<u64> {
        let start = i.checked_mul(8)?;
        let chunk = self.0.get(start..start.checked_add(8)?)?;
        <[u8; 8]>::try_from(chunk).ok().map(u64::from_le_bytes)
    }

    /// The words in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = u64> + 'a {
        self.0.chunks_exact(8).map(|c| {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            u64::from_le_bytes(b)
        })
    }

    /// The first `n` words (all of them if there are fewer).
    pub fn take(&self, n: usize) -> GpadlWords<'a> {
        let bytes = n.saturating_mul(8).min(self.0.len());
        GpadlWords(self.0.get(..bytes).unwrap_or_default())
    }

    /// The wire bytes.
    pub const fn as_bytes(&self) -> &'a [u8] {
        self.0
    }

    /// Copies the words out.
    pub fn to_vec(&self) -> Vec<u64> {
        self.iter().collect()
    }
}

impl fmt::Debug for GpadlWords<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Hex(u64);
        impl fmt::Debug for Hex {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
        f.debug_list().entries(self.iter().map(Hex)).finish()
    }
}

/// One parsed channel message. Fixed parts are copied out of the input; GPADL words borrow it.
///
/// Optional tails (`ext`, `client_id`, `supported_features`, `monitor_pages`, `silo_id`) are
/// `Some` when the message is long enough to hold them; honour them only when the negotiated
/// version / features say they exist (a padded older message has garbage there).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ChannelMessage<'a> {
    /// OFFERCHANNEL.
    OfferChannel(OfferChannel),
    /// RESCIND_CHANNELOFFER.
    RescindChannelOffer(RescindChannelOffer),
    /// REQUESTOFFERS.
    RequestOffers(RequestOffers),
    /// ALLOFFERS_DELIVERED (missing padding bytes read as 0).
    AllOffersDelivered(AllOffersDelivered),
    /// OPENCHANNEL, with the 6.0 extension if present.
    OpenChannel {
        /// The 0x94-byte message.
        msg: OpenChannel,
        /// Bytes 0x94..0x9C.
        ext: Option<OpenChannelExt>,
    },
    /// OPENCHANNEL_RESULT.
    OpenChannelResult(OpenChannelResult),
    /// CLOSECHANNEL.
    CloseChannel(CloseChannel),
    /// GPADL_HEADER with its range words.
    GpadlHeader {
        /// The fixed 0x14 bytes.
        msg: GpadlHeader,
        /// Range words in this message: the whole words after 0x14, at most
        /// `range_buflen / 8` of them (the rest is padding). The first word of each range is a
        /// [`GpaRange`], then its PFNs.
        words: GpadlWords<'a>,
    },
    /// GPADL_BODY with its words.
    GpadlBody {
        /// The fixed 0x10 bytes.
        msg: GpadlBody,
        /// All whole words after 0x10 (the GPADL assembler clamps them to what the header's
        /// `range_buflen` still expects).
        words: GpadlWords<'a>,
    },
    /// GPADL_CREATED.
    GpadlCreated(GpadlCreated),
    /// GPADL_TEARDOWN.
    GpadlTeardown(GpadlTeardown),
    /// GPADL_TORNDOWN.
    GpadlTorndown(GpadlTorndown),
    /// RELID_RELEASED.
    RelidReleased(RelidReleased),
    /// INITIATE_CONTACT, with the 6.0 client id if present.
    InitiateContact {
        /// The 0x28-byte message.
        msg: InitiateContact,
        /// Bytes 0x28..0x38 (valid with [`FeatureFlags::CLIENT_ID`]).
        client_id: Option<Guid>,
    },
    /// VERSION_RESPONSE, with the 6.0 tails if present.
    VersionResponse {
        /// The 0x10-byte message.
        msg: VersionResponse,
        /// Bytes 0x10..0x14.
        supported_features: Option<FeatureFlags>,
        /// Bytes 0x14..0x28 (valid with [`FeatureFlags::SERVER_SPECIFIED_MONITOR_PAGES`]).
        /// Serializing `Some` here with `supported_features: None` writes features 0.
        monitor_pages: Option<ServerMonitorPages>,
    },
    /// UNLOAD.
    Unload(Unload),
    /// UNLOAD_RESPONSE (missing padding bytes read as 0).
    UnloadResponse(UnloadResponse),
    /// TL_CONNECT_REQUEST, with the silo id if present.
    TlConnectRequest {
        /// The 0x28-byte message.
        msg: TlConnectRequest,
        /// Bytes 0x28..0x38 (5.2+, OpenVMM).
        silo_id: Option<Guid>,
    },
    /// MODIFYCHANNEL.
    ModifyChannel(ModifyChannel),
    /// TL_CONNECT_RESULT.
    TlConnectResult(TlConnectResult),
    /// MODIFYCHANNEL_RESPONSE.
    ModifyChannelResponse(ModifyChannelResponse),
}

/// A serialized message: up to [`MAX_MESSAGE_SIZE`] bytes, no allocation.
#[derive(Copy, Clone, PartialEq, Eq)]
pub struct MessageBuf {
    buf: [u8; MAX_MESSAGE_SIZE],
    len: usize,
}

impl MessageBuf {
    /// The message bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or_default()
    }

    /// Length in bytes (the SynIC `payload_size`).
    pub const fn len(&self) -> usize {
        self.len
    }

    /// Never true for a serialized message (kept for API symmetry).
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl core::ops::Deref for MessageBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl fmt::Debug for MessageBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageBuf({:02x?})", self.as_bytes())
    }
}

/// Copies the start of `bytes` into a zeroed `T` (shorter input leaves the rest zero).
fn read_zero_extended<T: FromBytes + IntoBytes>(bytes: &[u8]) -> T {
    let mut v = T::new_zeroed();
    for (d, s) in v.as_mut_bytes().iter_mut().zip(bytes) {
        *d = *s;
    }
    v
}

/// A `T` at byte `offset`, if the input holds all of it.
fn read_at<T: FromBytes>(bytes: &[u8], offset: usize) -> Option<T> {
    let rest = bytes.get(offset..)?;
    T::read_from_prefix(rest).ok().map(|(v, _)| v)
}

impl<'a> ChannelMessage<'a> {
    /// Parses one channel message (the SynIC payload, `payload_size` bytes).
    pub fn parse(bytes: &'a [u8]) -> Result<ChannelMessage<'a>, WireError> {
        let len = bytes.len();
        if len > MAX_MESSAGE_SIZE {
            return Err(WireError::TooLong {
                len,
                max: MAX_MESSAGE_SIZE,
            });
        }
        let Some((raw, _)) = bytes.split_first_chunk::<4>() else {
            return Err(WireError::NoMessageType { len });
        };
        let raw = u32::from_le_bytes(*raw);
        let msgtype =
            MessageType::from_raw(raw).ok_or(WireError::UnknownMessageType { msgtype: raw })?;
        let min = msgtype.min_len();
        if len < min {
            return Err(WireError::Truncated {
                msgtype,
                field: msgtype.field_cut_at(len),
                len,
                min,
            });
        }
        let b = bytes;
        Ok(match msgtype {
            MessageType::OfferChannel => ChannelMessage::OfferChannel(read_zero_extended(b)),
            MessageType::RescindChannelOffer => {
                ChannelMessage::RescindChannelOffer(read_zero_extended(b))
            }
            MessageType::RequestOffers => ChannelMessage::RequestOffers(read_zero_extended(b)),
            MessageType::AllOffersDelivered => {
                ChannelMessage::AllOffersDelivered(read_zero_extended(b))
            }
            MessageType::OpenChannel => ChannelMessage::OpenChannel {
                msg: read_zero_extended(b),
                ext: read_at(b, OpenChannel::SIZE),
            },
            MessageType::OpenChannelResult => {
                ChannelMessage::OpenChannelResult(read_zero_extended(b))
            }
            MessageType::CloseChannel => ChannelMessage::CloseChannel(read_zero_extended(b)),
            MessageType::GpadlHeader => {
                let msg: GpadlHeader = read_zero_extended(b);
                let declared = usize::from(msg.range_buflen) / 8;
                let all = GpadlWords::from_bytes_truncating(
                    b.get(GpadlHeader::SIZE..).unwrap_or_default(),
                );
                ChannelMessage::GpadlHeader {
                    msg,
                    words: all.take(declared),
                }
            }
            MessageType::GpadlBody => ChannelMessage::GpadlBody {
                msg: read_zero_extended(b),
                words: GpadlWords::from_bytes_truncating(
                    b.get(GpadlBody::SIZE..).unwrap_or_default(),
                ),
            },
            MessageType::GpadlCreated => ChannelMessage::GpadlCreated(read_zero_extended(b)),
            MessageType::GpadlTeardown => ChannelMessage::GpadlTeardown(read_zero_extended(b)),
            MessageType::GpadlTorndown => ChannelMessage::GpadlTorndown(read_zero_extended(b)),
            MessageType::RelidReleased => ChannelMessage::RelidReleased(read_zero_extended(b)),
            MessageType::InitiateContact => ChannelMessage::InitiateContact {
                msg: read_zero_extended(b),
                client_id: read_at(b, InitiateContact::SIZE),
            },
            MessageType::VersionResponse => {
                let features = read_at::<u32>(b, VersionResponse::SIZE);
                ChannelMessage::VersionResponse {
                    msg: read_zero_extended(b),
                    supported_features: features.map(FeatureFlags),
                    monitor_pages: read_at(b, VERSION_RESPONSE_PAGES_OFFSET),
                }
            }
            MessageType::Unload => ChannelMessage::Unload(read_zero_extended(b)),
            MessageType::UnloadResponse => ChannelMessage::UnloadResponse(read_zero_extended(b)),
            MessageType::TlConnectRequest => ChannelMessage::TlConnectRequest {
                msg: read_zero_extended(b),
                silo_id: read_at(b, TlConnectRequest::SIZE),
            },
            MessageType::ModifyChannel => ChannelMessage::ModifyChannel(read_zero_extended(b)),
            MessageType::TlConnectResult => ChannelMessage::TlConnectResult(read_zero_extended(b)),
            MessageType::ModifyChannelResponse => {
                ChannelMessage::ModifyChannelResponse(read_zero_extended(b))
            }
        })
    }

    /// The message type.
    pub const fn msgtype(&self) -> MessageType {
        match self {
            ChannelMessage::OfferChannel(_) => MessageType::OfferChannel,
            ChannelMessage::RescindChannelOffer(_) => MessageType::RescindChannelOffer,
            ChannelMessage::RequestOffers(_) => MessageType::RequestOffers,
            ChannelMessage::AllOffersDelivered(_) => MessageType::AllOffersDelivered,
            ChannelMessage::OpenChannel { .. } => MessageType::OpenChannel,
            ChannelMessage::OpenChannelResult(_) => MessageType::OpenChannelResult,
            ChannelMessage::CloseChannel(_) => MessageType::CloseChannel,
            ChannelMessage::GpadlHeader { .. } => MessageType::GpadlHeader,
            ChannelMessage::GpadlBody { .. } => MessageType::GpadlBody,
            ChannelMessage::GpadlCreated(_) => MessageType::GpadlCreated,
            ChannelMessage::GpadlTeardown(_) => MessageType::GpadlTeardown,
            ChannelMessage::GpadlTorndown(_) => MessageType::GpadlTorndown,
            ChannelMessage::RelidReleased(_) => MessageType::RelidReleased,
            ChannelMessage::InitiateContact { .. } => MessageType::InitiateContact,
            ChannelMessage::VersionResponse { .. } => MessageType::VersionResponse,
            ChannelMessage::Unload(_) => MessageType::Unload,
            ChannelMessage::UnloadResponse(_) => MessageType::UnloadResponse,
            ChannelMessage::TlConnectRequest { .. } => MessageType::TlConnectRequest,
            ChannelMessage::ModifyChannel(_) => MessageType::ModifyChannel,
            ChannelMessage::TlConnectResult(_) => MessageType::TlConnectResult,
            ChannelMessage::ModifyChannelResponse(_) => MessageType::ModifyChannelResponse,
        }
    }

    /// Writes the message into `out` and returns its length. The header's `msgtype` is written
    /// from the variant (whatever the struct's header says); its `padding` is copied.
    pub fn write_to(&self, out: &mut [u8]) -> Result<usize, WireError> {
        let msgtype = self.msgtype();
        match self {
            ChannelMessage::GpadlHeader { words, .. } => {
                check_words(msgtype, "range", GpadlHeader::SIZE, words)?
            }
            ChannelMessage::GpadlBody { words, .. } => {
                check_words(msgtype, "pfn", GpadlBody::SIZE, words)?
            }
            _ => {}
        }
        let need = self.encoded_len();
        if out.len() < need {
            return Err(WireError::BufferTooSmall {
                msgtype,
                need,
                have: out.len(),
            });
        }
        let mut w = Writer {
            out,
            pos: 0,
            msgtype,
        };
        match self {
            ChannelMessage::OfferChannel(m) => w.put(m.as_bytes())?,
            ChannelMessage::RescindChannelOffer(m) => w.put(m.as_bytes())?,
            ChannelMessage::RequestOffers(m) => w.put(m.as_bytes())?,
            ChannelMessage::AllOffersDelivered(m) => w.put(m.as_bytes())?,
            ChannelMessage::OpenChannel { msg, ext } => {
                w.put(msg.as_bytes())?;
                if let Some(ext) = ext {
                    w.put(ext.as_bytes())?;
                }
            }
            ChannelMessage::OpenChannelResult(m) => w.put(m.as_bytes())?,
            ChannelMessage::CloseChannel(m) => w.put(m.as_bytes())?,
            ChannelMessage::GpadlHeader { msg, words } => {
                w.put(msg.as_bytes())?;
                w.put(words.as_bytes())?;
            }
            ChannelMessage::GpadlBody { msg, words } => {
                w.put(msg.as_bytes())?;
                w.put(words.as_bytes())?;
            }
            ChannelMessage::GpadlCreated(m) => w.put(m.as_bytes())?,
            ChannelMessage::GpadlTeardown(m) => w.put(m.as_bytes())?,
            ChannelMessage::GpadlTorndown(m) => w.put(m.as_bytes())?,
            ChannelMessage::RelidReleased(m) => w.put(m.as_bytes())?,
            ChannelMessage::InitiateContact { msg, client_id } => {
                w.put(msg.as_bytes())?;
                if let Some(id) = client_id {
                    w.put(id.as_bytes())?;
                }
            }
            ChannelMessage::VersionResponse {
                msg,
                supported_features,
                monitor_pages,
            } => {
                w.put(msg.as_bytes())?;
                if supported_features.is_some() || monitor_pages.is_some() {
                    w.put(&supported_features.unwrap_or_default().bits().to_le_bytes())?;
                }
                if let Some(p) = monitor_pages {
                    w.put(p.as_bytes())?;
                }
            }
            ChannelMessage::Unload(m) => w.put(m.as_bytes())?,
            ChannelMessage::UnloadResponse(m) => w.put(m.as_bytes())?,
            ChannelMessage::TlConnectRequest { msg, silo_id } => {
                w.put(msg.as_bytes())?;
                if let Some(id) = silo_id {
                    w.put(id.as_bytes())?;
                }
            }
            ChannelMessage::ModifyChannel(m) => w.put(m.as_bytes())?,
            ChannelMessage::TlConnectResult(m) => w.put(m.as_bytes())?,
            ChannelMessage::ModifyChannelResponse(m) => w.put(m.as_bytes())?,
        }
        let len = w.pos;
        if let Some(t) = w.out.get_mut(..4) {
            t.copy_from_slice(&msgtype.raw().to_le_bytes());
        }
        Ok(len)
    }

    /// Length of the serialized message (may exceed [`MAX_MESSAGE_SIZE`] for over-long GPADL
    /// word lists, which [`ChannelMessage::write_to`] refuses).
    pub fn encoded_len(&self) -> usize {
        let fixed = self.msgtype().struct_size();
        let tail = match self {
            ChannelMessage::OpenChannel { ext, .. } => {
                ext.map_or(0, |_| size_of::<OpenChannelExt>())
            }
            ChannelMessage::GpadlHeader { words, .. } | ChannelMessage::GpadlBody { words, .. } => {
                words.as_bytes().len()
            }
            ChannelMessage::InitiateContact { client_id, .. } => {
                client_id.map_or(0, |_| size_of::<Guid>())
            }
            ChannelMessage::VersionResponse {
                supported_features,
                monitor_pages,
                ..
            } => match (supported_features, monitor_pages) {
                (_, Some(_)) => VERSION_RESPONSE_TAIL_LEN,
                (Some(_), None) => size_of::<u32>(),
                (None, None) => 0,
            },
            ChannelMessage::TlConnectRequest { silo_id, .. } => {
                silo_id.map_or(0, |_| size_of::<Guid>())
            }
            _ => 0,
        };
        fixed.saturating_add(tail)
    }

    /// The serialized message.
    pub fn to_bytes(&self) -> Result<MessageBuf, WireError> {
        let mut buf = [0u8; MAX_MESSAGE_SIZE];
        let len = self.write_to(&mut buf)?;
        Ok(MessageBuf { buf, len })
    }

    /// The serialized message in a `Vec`.
    pub fn to_vec(&self) -> Result<Vec<u8>, WireError> {
        self.to_bytes().map(|b| b.as_bytes().to_vec())
    }
}

/// VERSION_RESPONSE: where [`ServerMonitorPages`] starts (after `supported_features`).
const VERSION_RESPONSE_PAGES_OFFSET: usize = VersionResponse::SIZE + size_of::<u32>();
/// VERSION_RESPONSE: bytes after the 0x10-byte struct when both 6.0 tails are present.
const VERSION_RESPONSE_TAIL_LEN: usize = size_of::<u32>() + size_of::<ServerMonitorPages>();

fn check_words(
    msgtype: MessageType,
    field: &'static str,
    fixed: usize,
    words: &GpadlWords<'_>,
) -> Result<(), WireError> {
    let needed = fixed.saturating_add(words.as_bytes().len());
    if needed > MAX_MESSAGE_SIZE {
        return Err(WireError::TooManyWords {
            msgtype,
            field,
            count: words.len(),
            needed,
            max: MAX_MESSAGE_SIZE,
        });
    }
    Ok(())
}

struct Writer<'o> {
    out: &'o mut [u8],
    pos: usize,
    msgtype: MessageType,
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) -> Result<(), WireError> {
        let end = self.pos.saturating_add(bytes.len());
        let have = self.out.len();
        let dst = self
            .out
            .get_mut(self.pos..end)
            .ok_or(WireError::BufferTooSmall {
                msgtype: self.msgtype,
                need: end,
                have,
            })?;
        dst.copy_from_slice(bytes);
        self.pos = end;
        Ok(())
    }
}
