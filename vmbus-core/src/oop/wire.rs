//! Messages of the VMM ↔ VSP protocol and their byte form.
//!
//! Every message is one `SOCK_SEQPACKET` datagram: a 16-byte header `{magic "VSP1", type u32,
//! length u32 (whole message), reserved u32}` then a type-specific body, little-endian. File
//! descriptors travel as `SCM_RIGHTS` on the message that needs them, in the order the body lists
//! them. Decoding is total: any bytes give a message or a [`ProtocolError`].
#![warn(clippy::arithmetic_side_effects, clippy::indexing_slicing)]

use crate::wire::USER_DEFINED_SIZE;
use alloc::vec::Vec;

/// Protocol version spoken by this crate.
pub const PROTOCOL_VERSION: u32 = 1;
/// Feature bit: the VSP takes [`Message::SignalTarget`].
pub const FEATURE_SIGNAL_TARGET: u64 = 1;
/// Feature bits this crate speaks (unknown bits are masked off by the handshake).
pub const FEATURES: u64 = FEATURE_SIGNAL_TARGET;
/// Largest message: a ring GPADL of 8190 pages plus headers fits.
pub const MAX_MESSAGE: usize = 80 * 1024;
/// Most memory regions in a table.
pub const MAX_REGIONS: usize = 64;
/// Most pages in one channel's ring GPADL (the GPADL limit of one range).
pub const MAX_RING_PAGES: usize = 8190;

const MAGIC: [u8; 4] = *b"VSP1";

/// One guest RAM region: `size` bytes of guest physical space from `gpa`, backed by `size` bytes of
/// the region's fd from `fd_offset`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Region {
    pub gpa: u64,
    pub size: u64,
    pub fd_offset: u64,
}

/// A channel the guest opened, as the VMM hands it to the VSP (with two eventfds: kick, call).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelOpen {
    pub relid: u32,
    pub subchannel_index: u16,
    pub target_vp: u32,
    pub connection_id: u32,
    pub downstream_offset: u32,
    pub user_data: [u8; USER_DEFINED_SIZE],
    pub ring_pages: Vec<u64>,
}

/// A GPADL as the VSP receives it: `ranges` of `(byte_offset, byte_count, pfn count)` over `pfns`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpadlInfo {
    pub relid: u32,
    pub handle: u32,
    pub ranges: Vec<(u32, u32, u32)>,
    pub pfns: Vec<u64>,
}

/// Most ranges in one GPADL message.
pub const MAX_GPADL_RANGES: usize = 64;

/// A protocol message. Which side may send which is checked by the endpoints, not here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Both directions, first message: version and feature bits.
    Hello { version: u32, features: u64 },
    /// VMM → VSP: the guest memory table; one fd per region.
    SetMemory { regions: Vec<Region> },
    /// VMM → VSP: open a channel; fds: kick (guest → VSP), call (VSP → guest).
    Open(ChannelOpen),
    /// VMM → VSP: stop using a channel's rings (guest close, rescind, reset).
    Close { relid: u32 },
    /// VMM → VSP: the channel's interrupt moved.
    Retarget { relid: u32, target_vp: u32 },
    /// VMM → VSP: a complete GPADL of a channel the VSP serves (devices such as netvsp map buffers
    /// the guest describes by GPADL handle).
    Gpadl(GpadlInfo),
    /// VMM → VSP: the guest tore a GPADL down; stop using it before replying.
    GpadlRevoke { handle: u32 },
    /// VMM → VSP: send the device state.
    Save,
    /// VMM → VSP: take this device state (before re-opening channels).
    Restore { state: Vec<u8> },
    /// VSP → VMM: offer sub-channels of the primary.
    OfferSubchannels { count: u16 },
    /// Either direction: the answer to a request, `status` 0 = success.
    Reply {
        request: u32,
        relid: u32,
        status: u32,
    },
    /// VSP → VMM: answer to [`Message::Save`].
    State { state: Vec<u8> },
    /// VMM → VSP: the in-flight request journal (one memfd of `size` bytes) that outlives VSP
    /// processes; sent right after [`Message::SetMemory`].
    Inflight { size: u64 },
    /// VMM → VSP ([`FEATURE_SIGNAL_TARGET`]): set the channel's event flag — `(gpa of the 32-bit
    /// word, bit)` — before writing *call*, or `None`: only write *call*.
    SignalTarget {
        relid: u32,
        target: Option<(u64, u32)>,
    },
}

/// What was wrong with a message from the peer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("message of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("bad magic")]
    BadMagic,
    #[error("header says {header} bytes, datagram has {actual}")]
    LengthMismatch { header: u32, actual: usize },
    #[error("message of {0} bytes exceeds the limit")]
    TooLong(usize),
    #[error("unknown message type {0}")]
    UnknownType(u32),
    #[error("message type {msgtype}: body truncated")]
    Truncated { msgtype: u32 },
    #[error("message type {msgtype}: {count} entries exceed the limit of {max}")]
    TooMany {
        msgtype: u32,
        count: u64,
        max: usize,
    },
    #[error("message type {msgtype}: {extra} trailing bytes")]
    Trailing { msgtype: u32, extra: usize },
    #[error("expected {expected} file descriptors, got {got}")]
    FdCount { expected: usize, got: usize },
    #[error("unexpected {0} in this state")]
    Unexpected(&'static str),
    #[error("peer speaks protocol version {0}")]
    Version(u32),
    #[error("invalid {0}")]
    Invalid(&'static str),
}

/// Message type codes (also the `request` field of a [`Message::Reply`]).
pub mod ty {
    pub const HELLO: u32 = 1;
    pub const SET_MEMORY: u32 = 2;
    pub const OPEN: u32 = 3;
    pub const CLOSE: u32 = 4;
    pub const RETARGET: u32 = 5;
    pub const SAVE: u32 = 6;
    pub const RESTORE: u32 = 7;
    pub const OFFER_SUBCHANNELS: u32 = 8;
    pub const REPLY: u32 = 9;
    pub const STATE: u32 = 10;
    pub const GPADL: u32 = 11;
    pub const GPADL_REVOKE: u32 = 12;
    pub const INFLIGHT: u32 = 13;
    pub const SIGNAL_TARGET: u32 = 14;
}

impl Message {
    fn type_code(&self) -> u32 {
        match self {
            Message::Hello { .. } => ty::HELLO,
            Message::SetMemory { .. } => ty::SET_MEMORY,
            Message::Open(_) => ty::OPEN,
            Message::Close { .. } => ty::CLOSE,
            Message::Retarget { .. } => ty::RETARGET,
            Message::Gpadl(_) => ty::GPADL,
            Message::GpadlRevoke { .. } => ty::GPADL_REVOKE,
            Message::Save => ty::SAVE,
            Message::Restore { .. } => ty::RESTORE,
            Message::OfferSubchannels { .. } => ty::OFFER_SUBCHANNELS,
            Message::Reply { .. } => ty::REPLY,
            Message::State { .. } => ty::STATE,
            Message::Inflight { .. } => ty::INFLIGHT,
            Message::SignalTarget { .. } => ty::SIGNAL_TARGET,
        }
    }

    /// File descriptors that must accompany this message.
    pub fn fd_count(&self) -> usize {
        match self {
            Message::SetMemory { regions } => regions.len(),
            Message::Open(_) => 2,
            Message::Inflight { .. } => 1,
            _ => 0,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64);
        b.extend_from_slice(&MAGIC);
        put32(&mut b, self.type_code());
        put32(&mut b, 0);
        put32(&mut b, 0);
        match self {
            Message::Hello { version, features } => {
                put32(&mut b, *version);
                put64(&mut b, *features);
            }
            Message::SetMemory { regions } => {
                put32(&mut b, regions.len() as u32);
                for r in regions {
                    put64(&mut b, r.gpa);
                    put64(&mut b, r.size);
                    put64(&mut b, r.fd_offset);
                }
            }
            Message::Open(o) => {
                put32(&mut b, o.relid);
                put32(&mut b, u32::from(o.subchannel_index));
                put32(&mut b, o.target_vp);
                put32(&mut b, o.connection_id);
                put32(&mut b, o.downstream_offset);
                b.extend_from_slice(&o.user_data);
                put32(&mut b, o.ring_pages.len() as u32);
                for p in &o.ring_pages {
                    put64(&mut b, *p);
                }
            }
            Message::Close { relid } => put32(&mut b, *relid),
            Message::Retarget { relid, target_vp } => {
                put32(&mut b, *relid);
                put32(&mut b, *target_vp);
            }
            Message::SignalTarget { relid, target } => {
                put32(&mut b, *relid);
                let (on, gpa, bit) = target.map_or((0, 0, 0), |(g, b)| (1, g, b));
                put32(&mut b, on);
                put64(&mut b, gpa);
                put32(&mut b, bit);
            }
            Message::Gpadl(g) => {
                put32(&mut b, g.relid);
                put32(&mut b, g.handle);
                put32(&mut b, g.ranges.len() as u32);
                for (offset, count, n) in &g.ranges {
                    put32(&mut b, *offset);
                    put32(&mut b, *count);
                    put32(&mut b, *n);
                }
                put32(&mut b, g.pfns.len() as u32);
                for p in &g.pfns {
                    put64(&mut b, *p);
                }
            }
            Message::GpadlRevoke { handle } => put32(&mut b, *handle),
            Message::Inflight { size } => put64(&mut b, *size),
            Message::Save => {}
            Message::Restore { state } | Message::State { state } => {
                put32(&mut b, state.len() as u32);
                b.extend_from_slice(state);
            }
            Message::OfferSubchannels { count } => put32(&mut b, u32::from(*count)),
            Message::Reply {
                request,
                relid,
                status,
            } => {
                put32(&mut b, *request);
                put32(&mut b, *relid);
                put32(&mut b, *status);
            }
        }
        let len = (b.len() as u32).to_le_bytes();
        if let Some(slot) = b.get_mut(8..12) {
            slot.copy_from_slice(&len);
        }
        b
    }

    pub fn decode(bytes: &[u8]) -> Result<Message, ProtocolError> {
        if bytes.len() > MAX_MESSAGE {
            return Err(ProtocolError::TooLong(bytes.len()));
        }
        let mut r = Cursor {
            b: bytes,
            msgtype: 0,
        };
        let magic = r
            .take::<4>()
            .map_err(|_| ProtocolError::Short(bytes.len()))?;
        if magic != MAGIC {
            return Err(ProtocolError::BadMagic);
        }
        let msgtype = r.u32().map_err(|_| ProtocolError::Short(bytes.len()))?;
        let len = r.u32().map_err(|_| ProtocolError::Short(bytes.len()))?;
        r.u32().map_err(|_| ProtocolError::Short(bytes.len()))?;
        if len as usize != bytes.len() {
            return Err(ProtocolError::LengthMismatch {
                header: len,
                actual: bytes.len(),
            });
        }
        r.msgtype = msgtype;
        let msg = match msgtype {
            ty::HELLO => Message::Hello {
                version: r.u32()?,
                features: r.u64()?,
            },
            ty::SET_MEMORY => {
                let n = r.count(MAX_REGIONS, 24)?;
                let mut regions = Vec::with_capacity(n);
                for _ in 0..n {
                    regions.push(Region {
                        gpa: r.u64()?,
                        size: r.u64()?,
                        fd_offset: r.u64()?,
                    });
                }
                Message::SetMemory { regions }
            }
            ty::OPEN => {
                let relid = r.u32()?;
                let subchannel_index = u16::try_from(r.u32()?)
                    .map_err(|_| ProtocolError::Invalid("subchannel index"))?;
                let target_vp = r.u32()?;
                let connection_id = r.u32()?;
                let downstream_offset = r.u32()?;
                let user_data = r.take::<USER_DEFINED_SIZE>()?;
                let n = r.count(MAX_RING_PAGES, 8)?;
                let ring_pages = (0..n).map(|_| r.u64()).collect::<Result<Vec<_>, _>>()?;
                Message::Open(ChannelOpen {
                    relid,
                    subchannel_index,
                    target_vp,
                    connection_id,
                    downstream_offset,
                    user_data,
                    ring_pages,
                })
            }
            ty::CLOSE => Message::Close { relid: r.u32()? },
            ty::RETARGET => Message::Retarget {
                relid: r.u32()?,
                target_vp: r.u32()?,
            },
            ty::SIGNAL_TARGET => {
                let relid = r.u32()?;
                let (on, gpa, bit) = (r.u32()?, r.u64()?, r.u32()?);
                let target = match (on, gpa, bit) {
                    (0, 0, 0) => None,
                    (1, g, b) if b < 32 => Some((g, b)),
                    _ => return Err(ProtocolError::Invalid("signal target")),
                };
                Message::SignalTarget { relid, target }
            }
            ty::GPADL => {
                let relid = r.u32()?;
                let handle = r.u32()?;
                let nr = r.count(MAX_GPADL_RANGES, 12)?;
                let mut ranges = Vec::with_capacity(nr);
                for _ in 0..nr {
                    ranges.push((r.u32()?, r.u32()?, r.u32()?));
                }
                let np = r.count(MAX_RING_PAGES, 8)?;
                let pfns = (0..np).map(|_| r.u64()).collect::<Result<Vec<_>, _>>()?;
                Message::Gpadl(GpadlInfo {
                    relid,
                    handle,
                    ranges,
                    pfns,
                })
            }
            ty::GPADL_REVOKE => Message::GpadlRevoke { handle: r.u32()? },
            ty::INFLIGHT => Message::Inflight { size: r.u64()? },
            ty::SAVE => Message::Save,
            ty::RESTORE | ty::STATE => {
                let n = r.count(MAX_MESSAGE, 1)?;
                let state = r.bytes(n)?.to_vec();
                if msgtype == ty::RESTORE {
                    Message::Restore { state }
                } else {
                    Message::State { state }
                }
            }
            ty::OFFER_SUBCHANNELS => Message::OfferSubchannels {
                count: u16::try_from(r.u32()?)
                    .map_err(|_| ProtocolError::Invalid("subchannel count"))?,
            },
            ty::REPLY => Message::Reply {
                request: r.u32()?,
                relid: r.u32()?,
                status: r.u32()?,
            },
            other => return Err(ProtocolError::UnknownType(other)),
        };
        if !r.b.is_empty() {
            return Err(ProtocolError::Trailing {
                msgtype,
                extra: r.b.len(),
            });
        }
        Ok(msg)
    }
}

fn put32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}

struct Cursor<'a> {
    b: &'a [u8],
    msgtype: u32,
}

impl<'a> Cursor<'a> {
    fn truncated(&self) -> ProtocolError {
        ProtocolError::Truncated {
            msgtype: self.msgtype,
        }
    }
    fn take<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        let (head, rest) = self
            .b
            .split_first_chunk::<N>()
            .ok_or_else(|| self.truncated())?;
        self.b = rest;
        Ok(*head)
    }
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if n > self.b.len() {
            return Err(self.truncated());
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }
    fn u32(&mut self) -> Result<u32, ProtocolError> {
        self.take().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Result<u64, ProtocolError> {
        self.take().map(u64::from_le_bytes)
    }
    /// An entry count, bounded by `max` and by the bytes present.
    fn count(&mut self, max: usize, entry: usize) -> Result<usize, ProtocolError> {
        let n = self.u32()?;
        let count = n as usize;
        if count > max {
            return Err(ProtocolError::TooMany {
                msgtype: self.msgtype,
                count: u64::from(n),
                max,
            });
        }
        if count
            .checked_mul(entry)
            .is_none_or(|need| need > self.b.len())
        {
            return Err(self.truncated());
        }
        Ok(count)
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<Message> {
        alloc::vec![
            Message::Hello {
                version: 1,
                features: 7
            },
            Message::SetMemory {
                regions: alloc::vec![
                    Region {
                        gpa: 0,
                        size: 1 << 30,
                        fd_offset: 0
                    },
                    Region {
                        gpa: 1 << 32,
                        size: 4096,
                        fd_offset: 8192
                    }
                ],
            },
            Message::Open(ChannelOpen {
                relid: 5,
                subchannel_index: 2,
                target_vp: 1,
                connection_id: 0x2005,
                downstream_offset: 32,
                user_data: [9; USER_DEFINED_SIZE],
                ring_pages: (100..164).collect(),
            }),
            Message::Close { relid: 5 },
            Message::Retarget {
                relid: 5,
                target_vp: 3
            },
            Message::Gpadl(GpadlInfo {
                relid: 5,
                handle: 0xE1E10,
                ranges: alloc::vec![(0, 8192, 2), (100, 10, 1)],
                pfns: alloc::vec![7, 8, 9],
            }),
            Message::GpadlRevoke { handle: 0xE1E10 },
            Message::Save,
            Message::Restore {
                state: alloc::vec![1, 2, 3]
            },
            Message::OfferSubchannels { count: 4 },
            Message::Reply {
                request: 3,
                relid: 5,
                status: 0
            },
            Message::State {
                state: alloc::vec![]
            },
            Message::Inflight { size: 65536 },
            Message::SignalTarget {
                relid: 5,
                target: Some((0x7_0104, 5))
            },
            Message::SignalTarget {
                relid: 5,
                target: None
            },
        ]
    }

    #[test]
    fn round_trips_and_layout() {
        for m in samples() {
            let b = m.encode();
            assert_eq!(&b[..4], b"VSP1");
            assert_eq!(
                u32::from_le_bytes(b[8..12].try_into().unwrap()) as usize,
                b.len()
            );
            assert_eq!(Message::decode(&b), Ok(m));
        }
        // Hello is header + u32 + u64.
        assert_eq!(
            Message::Hello {
                version: 1,
                features: 0
            }
            .encode()
            .len(),
            28
        );
    }

    #[test]
    fn refuses_malformed() {
        let open = samples()[2].encode();
        assert_eq!(Message::decode(&open[..10]), Err(ProtocolError::Short(10)));
        let mut cut = open[..open.len() - 8].to_vec();
        let n = cut.len() as u32;
        cut[8..12].copy_from_slice(&n.to_le_bytes());
        assert_eq!(
            Message::decode(&cut),
            Err(ProtocolError::Truncated { msgtype: 3 })
        );
        let mut bad = open.clone();
        bad[0] = b'X';
        assert_eq!(Message::decode(&bad), Err(ProtocolError::BadMagic));
        let mut huge = open.clone();
        let at = 16 + 20 + USER_DEFINED_SIZE;
        huge[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Message::decode(&huge),
            Err(ProtocolError::TooMany { .. })
        ));
        let mut extra = samples()[3].encode();
        extra.push(0);
        let n = extra.len() as u32;
        extra[8..12].copy_from_slice(&n.to_le_bytes());
        assert!(matches!(
            Message::decode(&extra),
            Err(ProtocolError::Trailing { .. })
        ));
    }

    #[test]
    fn inflight_layout() {
        let m = Message::Inflight { size: 1 << 16 };
        assert_eq!(m.fd_count(), 1);
        let b = m.encode();
        assert_eq!(u32::from_le_bytes(b[4..8].try_into().unwrap()), 13);
        assert_eq!(b.len(), 24);
        let mut cut = b[..20].to_vec();
        cut[8..12].copy_from_slice(&20u32.to_le_bytes());
        assert_eq!(
            Message::decode(&cut),
            Err(ProtocolError::Truncated { msgtype: 13 })
        );
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
            let _ = Message::decode(&bytes);
        }

        #[test]
        fn decode_of_valid_header_never_panics(ty in 0u32..15, body in prop::collection::vec(any::<u8>(), 0..300)) {
            let mut b = b"VSP1".to_vec();
            b.extend_from_slice(&ty.to_le_bytes());
            b.extend_from_slice(&((16 + body.len()) as u32).to_le_bytes());
            b.extend_from_slice(&[0; 4]);
            b.extend_from_slice(&body);
            if let Ok(m) = Message::decode(&b) {
                prop_assert_eq!(Message::decode(&m.encode()), Ok(m));
            }
        }
    }
}
