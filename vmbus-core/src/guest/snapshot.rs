//! The client's state as plain data: per-channel and per-GPADL records, the connection state,
//! [`ClientSnapshot`] for save/restore, and the invariants a state must satisfy.

use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec::Vec;

use crate::wire::{MESSAGE_CONNECTION_ID, Version};

use super::{
    ChannelState, Client, ClientConfig, ClientError, ClientEvent, GpadlState, MAX_RELIDS,
    OfferInfo, Post,
};

/// Where the connection to the host is.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum ConnectionState {
    /// Not connected (initially, after all versions were refused, after UNLOAD_RESPONSE).
    Disconnected,
    /// INITIATE_CONTACT for `config.versions[index]` sent, waiting for VERSION_RESPONSE.
    Connecting {
        /// Index into [`ClientConfig::versions`].
        index: usize,
        /// Transient post failures of this INITIATE_CONTACT so far.
        retries: u8,
    },
    /// Connected.
    Connected {
        /// Negotiated version.
        version: Version,
        /// Connection id all messages go to.
        msg_conn_id: u32,
    },
    /// UNLOAD sent, waiting for UNLOAD_RESPONSE.
    Unloading {
        /// Negotiated version.
        version: Version,
        /// Connection id all messages go to.
        msg_conn_id: u32,
    },
}

impl ConnectionState {
    /// Short name for errors and logs.
    pub const fn name(&self) -> &'static str {
        match self {
            ConnectionState::Disconnected => "disconnected",
            ConnectionState::Connecting { .. } => "connecting",
            ConnectionState::Connected { .. } => "connected",
            ConnectionState::Unloading { .. } => "unloading",
        }
    }

    /// The negotiated version, when connected or unloading.
    pub const fn version(&self) -> Option<Version> {
        match self {
            ConnectionState::Connected { version, .. }
            | ConnectionState::Unloading { version, .. } => Some(*version),
            _ => None,
        }
    }

    /// The connection id messages go to, when connected or unloading.
    pub const fn msg_conn_id(&self) -> Option<u32> {
        match self {
            ConnectionState::Connected { msg_conn_id, .. }
            | ConnectionState::Unloading { msg_conn_id, .. } => Some(*msg_conn_id),
            _ => None,
        }
    }
}

/// Everything the client knows about one offered channel.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ChannelRecord {
    /// The offer.
    pub offer: OfferInfo,
    /// Lifecycle state.
    pub state: ChannelState,
    /// For a sub-channel: its primary's relid (`None` for primaries, for a sub-channel whose
    /// primary was not offered — Linux then treats it as a device of its own — and after the
    /// primary's relid was released).
    pub primary: Option<u32>,
    /// Ring GPADL while opening or open.
    pub ring_gpadl: Option<u32>,
    /// Interrupt VP while opening or open (from OPENCHANNEL, then MODIFYCHANNEL).
    pub target_vp: Option<u32>,
    /// Target VP of a MODIFYCHANNEL waiting for MODIFYCHANNEL_RESPONSE (≥ 5.3).
    pub modify_pending: Option<u32>,
}

/// Everything the client knows about one GPADL.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct GpadlRecord {
    /// The handle.
    pub handle: u32,
    /// The channel it was created on.
    pub relid: u32,
    /// Pages it describes.
    pub page_count: u32,
    /// Lifecycle state.
    pub state: GpadlState,
}

/// The whole client state as plain data ([`Client::save`], [`Client::restore`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientSnapshot {
    /// The configuration.
    pub config: ClientConfig,
    /// Connection state (negotiated version and message connection id when connected).
    pub connection: ConnectionState,
    /// Channels by ascending relid.
    pub channels: Vec<ChannelRecord>,
    /// GPADLs by ascending handle.
    pub gpadls: Vec<GpadlRecord>,
    /// Next GPADL handle to try.
    pub next_gpadl_handle: u32,
    /// REQUESTOFFERS was sent on this connection.
    pub offers_requested: bool,
    /// Posts not yet taken with [`Client::poll_post`].
    pub pending_posts: Vec<Post>,
    /// Events not yet taken with [`Client::poll_event`].
    pub pending_events: Vec<ClientEvent>,
}

impl Client {
    /// The whole state.
    pub fn save(&self) -> ClientSnapshot {
        ClientSnapshot {
            config: self.config.clone(),
            connection: self.conn,
            channels: self.channels.values().copied().collect(),
            gpadls: self.gpadls.values().copied().collect(),
            next_gpadl_handle: self.next_gpadl_handle,
            offers_requested: self.offers_requested,
            pending_posts: self.posts.iter().copied().collect(),
            pending_events: self.events.iter().copied().collect(),
        }
    }

    /// A client in the saved state. The snapshot is checked against the invariants the client
    /// keeps ([`ClientError::InvalidSnapshot`] names the first one broken).
    pub fn restore(snapshot: ClientSnapshot) -> Result<Client, ClientError> {
        let mut channels = BTreeMap::new();
        for c in snapshot.channels {
            if channels.insert(c.offer.relid, c).is_some() {
                return Err(ClientError::InvalidSnapshot("two channels with one relid"));
            }
        }
        let mut gpadls = BTreeMap::new();
        for g in snapshot.gpadls {
            if gpadls.insert(g.handle, g).is_some() {
                return Err(ClientError::InvalidSnapshot("two GPADLs with one handle"));
            }
        }
        let client = Client {
            config: snapshot.config,
            conn: snapshot.connection,
            channels,
            gpadls,
            next_gpadl_handle: snapshot.next_gpadl_handle,
            offers_requested: snapshot.offers_requested,
            posts: VecDeque::from(snapshot.pending_posts),
            events: VecDeque::from(snapshot.pending_events),
        };
        client
            .check_invariants()
            .map_err(ClientError::InvalidSnapshot)?;
        Ok(client)
    }

    /// Checks the invariants the client keeps after every call; the first broken one is named.
    /// (Public so drivers and tests can assert it; restore relies on it.)
    pub fn check_invariants(&self) -> Result<(), &'static str> {
        match self.conn {
            ConnectionState::Disconnected | ConnectionState::Connecting { .. } => {
                if !self.channels.is_empty() || !self.gpadls.is_empty() {
                    return Err("channels or GPADLs while not connected");
                }
                if self.offers_requested {
                    return Err("offers requested while not connected");
                }
                if let ConnectionState::Connecting { index, .. } = self.conn
                    && index >= self.config.versions.len()
                {
                    return Err("connecting with a version index out of range");
                }
            }
            ConnectionState::Connected {
                version,
                msg_conn_id,
            }
            | ConnectionState::Unloading {
                version,
                msg_conn_id,
            } => {
                if !version.uses_response_connection_id() && msg_conn_id != MESSAGE_CONNECTION_ID {
                    return Err("message connection id other than 1 below 5.0");
                }
            }
        }
        if self.channels.len() > MAX_RELIDS as usize {
            return Err("more channels than relids");
        }
        for (&relid, c) in &self.channels {
            if c.offer.relid != relid || relid >= MAX_RELIDS {
                return Err("channel relid mismatch or out of range");
            }
            if let Some(p) = c.primary {
                let Some(pc) = self.channels.get(&p) else {
                    return Err("sub-channel's primary missing");
                };
                if p == relid
                    || pc.primary.is_some()
                    || !c.offer.is_subchannel()
                    || pc.offer.class_id != c.offer.class_id
                    || pc.offer.instance_id != c.offer.instance_id
                {
                    return Err("sub-channel's primary is not a matching primary");
                }
            }
            if c.state.uses_ring() != c.ring_gpadl.is_some() {
                return Err("ring GPADL set exactly while opening or open");
            }
            if c.state.uses_ring() != c.target_vp.is_some() {
                return Err("target VP set exactly while opening or open");
            }
            if let Some(h) = c.ring_gpadl {
                match self.gpadls.get(&h) {
                    Some(g) if g.relid == relid && g.state == GpadlState::Created => {}
                    _ => return Err("ring GPADL is not a created GPADL of the channel"),
                }
            }
            if c.modify_pending.is_some() && c.state.is_rescinded() {
                return Err("MODIFYCHANNEL pending on a rescinded channel");
            }
            if c.offer.sub_channel_index == 0 && c.primary.is_none() {
                let dup = self.channels.values().any(|o| {
                    o.offer.relid != relid
                        && o.primary.is_none()
                        && o.offer.sub_channel_index == 0
                        && o.offer.instance_id == c.offer.instance_id
                });
                if dup {
                    return Err("two primaries with one instance GUID");
                }
            }
        }
        for (&handle, g) in &self.gpadls {
            if g.handle != handle || handle == 0 || g.page_count == 0 {
                return Err("GPADL handle mismatch, handle 0 or no pages");
            }
            let Some(c) = self.channels.get(&g.relid) else {
                return Err("GPADL of an unknown channel");
            };
            if c.state.is_rescinded() && g.state != GpadlState::Created {
                return Err("GPADL waiting for the host on a rescinded channel");
            }
        }
        Ok(())
    }
}
