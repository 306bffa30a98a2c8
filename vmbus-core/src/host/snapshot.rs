//! Saving and restoring the host's bus state (quick migration, VSP reconnect).
//!
//! The snapshot holds the negotiated connection, every channel with its state, complete and
//! in-progress GPADLs and deferred teardowns. Ring positions need nothing here: they live in the
//! rings' control pages in guest memory. The byte form is a small versioned little-endian encoding;
//! decoding validates every count against the bytes present and every cross-reference before a
//! server is built from it.
#![warn(clippy::arithmetic_side_effects, clippy::indexing_slicing)]

use super::server::{Channel, Connection, Server};
use super::{ChannelState, ServerConfig};
use crate::device::DeviceDescription;
use crate::gpadl::{Gpadl, GpadlBuilder, GpadlRange, RamRanges};
use crate::savestate::{StateReader, StateWriter, Truncated};
use crate::wire::{Guid, USER_DEFINED_SIZE, Version};
use alloc::collections::VecDeque;
use alloc::vec::Vec;

const MAGIC: [u8; 4] = *b"VMBS";
const FORMAT: u32 = 1;

/// A saved channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelSnapshot {
    pub relid: u32,
    pub desc: DeviceDescription,
    pub subchannel_index: u16,
    pub primary: u32,
    pub state: ChannelState,
    pub openid: u32,
    pub user_data: [u8; USER_DEFINED_SIZE],
    pub downstream_offset: u32,
}

/// Everything [`Server`] needs to carry on where it stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerSnapshot {
    /// `(version, vp, sint, offers_requested)` when connected.
    pub connection: Option<(Version, u32, u8, bool)>,
    pub channels: Vec<ChannelSnapshot>,
    pub gpadls: Vec<Gpadl>,
    /// In-progress GPADLs: `(relid, handle, rangecount, expected words, words so far)`.
    pub building: Vec<(u32, u32, u16, usize, Vec<u64>)>,
    pub tearing_down: Vec<u32>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    #[error("not a VMBus server snapshot")]
    BadMagic,
    #[error("snapshot format {0} is not supported")]
    BadFormat(u32),
    #[error("snapshot truncated")]
    Truncated,
    #[error("snapshot field `{0}` is invalid")]
    Invalid(&'static str),
}

impl Server {
    /// The bus state, for [`Server::restore`].
    pub fn save(&self) -> ServerSnapshot {
        ServerSnapshot {
            connection: self
                .conn
                .map(|c| (c.version, c.vp, c.sint, c.offers_requested)),
            channels: self
                .channels
                .iter()
                .map(|(&relid, c)| ChannelSnapshot {
                    relid,
                    desc: c.desc.clone(),
                    subchannel_index: c.subchannel_index,
                    primary: c.primary,
                    state: c.state,
                    openid: c.openid,
                    user_data: c.user_data,
                    downstream_offset: c.downstream_offset,
                })
                .collect(),
            gpadls: self.gpadls.values().cloned().collect(),
            building: self
                .building
                .values()
                .map(|b| {
                    let (rangecount, expected, words) = b.parts();
                    (b.relid, b.handle, rangecount, expected, words.to_vec())
                })
                .collect(),
            tearing_down: self.tearing_down.iter().copied().collect(),
        }
    }

    /// A server continuing from `snap`. Pending actions are not part of a snapshot: save between
    /// [`Server::poll_action`] drains. Open channels must be handed to their devices again
    /// ([`Server::open_info`]).
    pub fn restore(
        config: ServerConfig,
        ram: RamRanges,
        snap: ServerSnapshot,
    ) -> Result<Self, SnapshotError> {
        let mut s = Server::new(config, ram);
        if let Some((version, vp, sint, offers_requested)) = snap.connection {
            if vp >= s.config.vp_count {
                return Err(SnapshotError::Invalid("connection vp"));
            }
            s.conn = Some(Connection {
                version,
                vp,
                sint,
                offers_requested,
            });
        }
        for g in snap.gpadls {
            let ok = g.ranges.iter().all(|r| {
                r.first_pfn
                    .checked_add(r.pfn_count)
                    .is_some_and(|end| end <= g.pfns.len())
            });
            if !ok || g.handle == 0 || s.gpadls.insert(g.handle, g).is_some() {
                return Err(SnapshotError::Invalid("gpadl"));
            }
        }
        for (relid, handle, rangecount, expected, words) in snap.building {
            let b = GpadlBuilder::from_parts(relid, handle, rangecount, expected, words)
                .ok_or(SnapshotError::Invalid("gpadl in progress"))?;
            if s.gpadls.contains_key(&handle) || s.building.insert(handle, b).is_some() {
                return Err(SnapshotError::Invalid("gpadl in progress"));
            }
        }
        for c in snap.channels {
            if c.relid == 0 || c.relid > s.config.max_relid {
                return Err(SnapshotError::Invalid("relid"));
            }
            let channel = Channel {
                desc: c.desc,
                subchannel_index: c.subchannel_index,
                primary: c.primary,
                state: c.state,
                openid: c.openid,
                user_data: c.user_data,
                downstream_offset: c.downstream_offset,
            };
            if s.channels.insert(c.relid, channel).is_some() {
                return Err(SnapshotError::Invalid("duplicate relid"));
            }
        }
        for (&relid, c) in &s.channels {
            if !s.channels.contains_key(&c.primary)
                || (c.subchannel_index == 0) != (c.primary == relid)
            {
                return Err(SnapshotError::Invalid("channel primary"));
            }
            if let ChannelState::Opening { gpadl, target_vp }
            | ChannelState::Open { gpadl, target_vp } = c.state
            {
                let ring_ok = s
                    .gpadls
                    .get(&gpadl)
                    .is_some_and(|g| g.relid == relid && g.as_ring_pages().is_some());
                if !ring_ok || target_vp >= s.config.vp_count {
                    return Err(SnapshotError::Invalid("open channel ring"));
                }
            }
            if s.conn.is_none() && c.state != ChannelState::Pending {
                return Err(SnapshotError::Invalid("channel state while disconnected"));
            }
        }
        for h in snap.tearing_down {
            if !s.gpadls.contains_key(&h) {
                return Err(SnapshotError::Invalid("tearing down"));
            }
            s.tearing_down.insert(h);
        }
        s.actions = VecDeque::new();
        Ok(s)
    }
}

impl ServerSnapshot {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = StateWriter::new();
        w.bytes(&MAGIC);
        w.u32(FORMAT);
        match self.connection {
            None => w.u8(0),
            Some((v, vp, sint, req)) => {
                w.u8(1);
                w.u32(v.raw());
                w.u32(vp);
                w.u8(sint);
                w.u8(u8::from(req));
            }
        }
        w.len(self.channels.len());
        for c in &self.channels {
            w.u32(c.relid);
            w.bytes(&c.desc.class.to_wire_bytes());
            w.bytes(&c.desc.instance.to_wire_bytes());
            match c.desc.pipe_mode {
                None => w.u8(0),
                Some(m) => {
                    w.u8(1);
                    w.u32(m);
                }
            }
            w.u16(c.desc.mmio_megabytes);
            w.u16(c.desc.max_subchannels);
            w.bytes(&c.desc.user_defined);
            w.u16(c.subchannel_index);
            w.u32(c.primary);
            let (tag, gpadl, vp) = match c.state {
                ChannelState::Pending => (0, 0, 0),
                ChannelState::Offered => (1, 0, 0),
                ChannelState::Opening { gpadl, target_vp } => (2, gpadl, target_vp),
                ChannelState::Open { gpadl, target_vp } => (3, gpadl, target_vp),
                ChannelState::Rescinded => (4, 0, 0),
            };
            w.u8(tag);
            w.u32(gpadl);
            w.u32(vp);
            w.u32(c.openid);
            w.bytes(&c.user_data);
            w.u32(c.downstream_offset);
        }
        w.len(self.gpadls.len());
        for g in &self.gpadls {
            w.u32(g.handle);
            w.u32(g.relid);
            w.len(g.ranges.len());
            for r in &g.ranges {
                w.u32(r.byte_offset);
                w.u32(r.byte_count);
                w.len(r.first_pfn);
                w.len(r.pfn_count);
            }
            w.len(g.pfns.len());
            g.pfns.iter().for_each(|&p| w.u64(p));
        }
        w.len(self.building.len());
        for (relid, handle, rangecount, expected, words) in &self.building {
            w.u32(*relid);
            w.u32(*handle);
            w.u16(*rangecount);
            w.len(*expected);
            w.len(words.len());
            words.iter().for_each(|&x| w.u64(x));
        }
        w.len(self.tearing_down.len());
        self.tearing_down.iter().for_each(|&h| w.u32(h));
        w.into_bytes()
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SnapshotError> {
        let mut r = StateReader::new(bytes);
        if r.take::<4>()? != MAGIC {
            return Err(SnapshotError::BadMagic);
        }
        let format = r.u32()?;
        if format != FORMAT {
            return Err(SnapshotError::BadFormat(format));
        }
        let connection = match r.u8()? {
            0 => None,
            1 => {
                let v = Version::from_raw(r.u32()?).ok_or(SnapshotError::Invalid("version"))?;
                Some((v, r.u32()?, r.u8()?, r.u8()? != 0))
            }
            _ => return Err(SnapshotError::Invalid("connection")),
        };
        let n = r.count(16)?;
        let mut channels = Vec::with_capacity(n);
        for _ in 0..n {
            let relid = r.u32()?;
            let class = Guid::from_wire_bytes(r.take::<16>()?);
            let instance = Guid::from_wire_bytes(r.take::<16>()?);
            let pipe_mode = match r.u8()? {
                0 => None,
                1 => Some(r.u32()?),
                _ => return Err(SnapshotError::Invalid("pipe mode")),
            };
            let mmio_megabytes = r.u16()?;
            let max_subchannels = r.u16()?;
            let user_defined = r.take::<USER_DEFINED_SIZE>()?;
            let subchannel_index = r.u16()?;
            let primary = r.u32()?;
            let (tag, gpadl, target_vp) = (r.u8()?, r.u32()?, r.u32()?);
            let state = match tag {
                0 => ChannelState::Pending,
                1 => ChannelState::Offered,
                2 => ChannelState::Opening { gpadl, target_vp },
                3 => ChannelState::Open { gpadl, target_vp },
                4 => ChannelState::Rescinded,
                _ => return Err(SnapshotError::Invalid("channel state")),
            };
            channels.push(ChannelSnapshot {
                relid,
                desc: DeviceDescription {
                    class,
                    instance,
                    pipe_mode,
                    mmio_megabytes,
                    max_subchannels,
                    user_defined,
                },
                subchannel_index,
                primary,
                state,
                openid: r.u32()?,
                user_data: r.take::<USER_DEFINED_SIZE>()?,
                downstream_offset: r.u32()?,
            });
        }
        let n = r.count(16)?;
        let mut gpadls = Vec::with_capacity(n);
        for _ in 0..n {
            let handle = r.u32()?;
            let relid = r.u32()?;
            let nr = r.count(16)?;
            let mut ranges = Vec::with_capacity(nr);
            for _ in 0..nr {
                ranges.push(GpadlRange {
                    byte_offset: r.u32()?,
                    byte_count: r.u32()?,
                    first_pfn: len(&mut r)?,
                    pfn_count: len(&mut r)?,
                });
            }
            let np = r.count(8)?;
            let pfns = (0..np).map(|_| r.u64()).collect::<Result<Vec<_>, _>>()?;
            gpadls.push(Gpadl {
                handle,
                relid,
                ranges,
                pfns,
            });
        }
        let n = r.count(14)?;
        let mut building = Vec::with_capacity(n);
        for _ in 0..n {
            let (relid, handle, rangecount, expected) =
                (r.u32()?, r.u32()?, r.u16()?, len(&mut r)?);
            let nw = r.count(8)?;
            let words = (0..nw).map(|_| r.u64()).collect::<Result<Vec<_>, _>>()?;
            building.push((relid, handle, rangecount, expected, words));
        }
        let n = r.count(4)?;
        let tearing_down = (0..n).map(|_| r.u32()).collect::<Result<Vec<_>, _>>()?;
        Ok(ServerSnapshot {
            connection,
            channels,
            gpadls,
            building,
            tearing_down,
        })
    }
}

impl From<Truncated> for SnapshotError {
    fn from(_: Truncated) -> Self {
        SnapshotError::Truncated
    }
}

/// A length field that must fit this host's `usize`.
fn len(r: &mut StateReader<'_>) -> Result<usize, SnapshotError> {
    r.len()?.ok_or(SnapshotError::Invalid("length"))
}
