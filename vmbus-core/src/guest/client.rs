//! [`Client`]: construction, queries and the guest-initiated operations.

use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec::Vec;

use crate::wire::{
    ChannelMessage, CloseChannel, GpaRange, GpadlBody, GpadlHeader, GpadlTeardown, GpadlWords,
    InitiateContact, MessageBuf, MessageType, ModifyChannel, OpenChannel, RelidReleased,
    RequestOffers, Unload, Version,
};

use super::snapshot::{ChannelRecord, ConnectionState, GpadlRecord};
use super::{
    ChannelState, ClientConfig, ClientError, ClientEvent, GPADL_BODY_MAX_PFNS,
    GPADL_HEADER_MAX_PFNS, GPADL_MAX_PAGES, GpadlState, OfferInfo, OpenParams, PAGE_SIZE,
    POST_RETRY_LIMIT, Post, hv_status,
};

/// The guest side of the VMBus control protocol (see the [module docs](super)).
#[derive(Clone, Debug)]
pub struct Client {
    pub(super) config: ClientConfig,
    pub(super) conn: ConnectionState,
    pub(super) channels: BTreeMap<u32, ChannelRecord>,
    pub(super) gpadls: BTreeMap<u32, GpadlRecord>,
    pub(super) next_gpadl_handle: u32,
    pub(super) offers_requested: bool,
    pub(super) posts: VecDeque<Post>,
    pub(super) events: VecDeque<ClientEvent>,
}

/// Serializes a message the client built itself.
pub(super) fn build(msg: ChannelMessage<'_>) -> Result<MessageBuf, ClientError> {
    msg.to_bytes().map_err(ClientError::Build)
}

fn is_initiate_contact(p: &Post) -> bool {
    p.msg.as_bytes().get(..4) == Some(&MessageType::InitiateContact.raw().to_le_bytes()[..])
}

impl Client {
    /// A disconnected client.
    pub fn new(config: ClientConfig) -> Self {
        let next_gpadl_handle = config.first_gpadl_handle;
        Client {
            config,
            conn: ConnectionState::Disconnected,
            channels: BTreeMap::new(),
            gpadls: BTreeMap::new(),
            next_gpadl_handle,
            offers_requested: false,
            posts: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    // ---- queries -----------------------------------------------------------------------------

    /// The configuration.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// The connection state.
    pub fn connection_state(&self) -> ConnectionState {
        self.conn
    }

    /// The negotiated version (connected or unloading).
    pub fn version(&self) -> Option<Version> {
        self.conn.version()
    }

    /// The connection id messages are posted to (connected or unloading).
    pub fn msg_conn_id(&self) -> Option<u32> {
        self.conn.msg_conn_id()
    }

    /// Every offered channel's offer, by ascending relid (rescinded ones until released).
    pub fn offers(&self) -> impl Iterator<Item = &OfferInfo> {
        self.channels.values().map(|c| &c.offer)
    }

    /// The offer of `relid`.
    pub fn offer(&self, relid: u32) -> Option<&OfferInfo> {
        self.channels.get(&relid).map(|c| &c.offer)
    }

    /// The state of channel `relid`.
    pub fn channel_state(&self, relid: u32) -> Option<ChannelState> {
        self.channels.get(&relid).map(|c| c.state)
    }

    /// Everything known about channel `relid`.
    pub fn channel(&self, relid: u32) -> Option<&ChannelRecord> {
        self.channels.get(&relid)
    }

    /// The primary of sub-channel `relid` (`None` for primaries and unknown relids).
    pub fn primary_of(&self, relid: u32) -> Option<u32> {
        self.channels.get(&relid).and_then(|c| c.primary)
    }

    /// The sub-channels of `primary`, by ascending relid.
    pub fn subchannels(&self, primary: u32) -> impl Iterator<Item = u32> + '_ {
        self.channels
            .values()
            .filter(move |c| c.primary == Some(primary))
            .map(|c| c.offer.relid)
    }

    /// The GPADL `handle`.
    pub fn gpadl(&self, handle: u32) -> Option<&GpadlRecord> {
        self.gpadls.get(&handle)
    }

    /// Every GPADL, by ascending handle.
    pub fn gpadls(&self) -> impl Iterator<Item = &GpadlRecord> {
        self.gpadls.values()
    }

    /// Posts not yet taken.
    pub fn pending_posts(&self) -> usize {
        self.posts.len()
    }

    /// Events not yet taken.
    pub fn pending_events(&self) -> usize {
        self.events.len()
    }

    /// The next message to post, oldest first.
    pub fn poll_post(&mut self) -> Option<Post> {
        self.posts.pop_front()
    }

    /// The next event, oldest first.
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    // ---- connection --------------------------------------------------------------------------

    /// INITIATE_CONTACT for `version`, filled in as Linux `vmbus_negotiate_version` does.
    fn initiate_contact(&self, version: Version) -> Result<Post, ClientError> {
        let mut m = InitiateContact {
            vmbus_version_requested: version.raw(),
            target_vcpu: self.config.target_vcpu,
            ..InitiateContact::default()
        };
        if version.has_msg_sint() {
            m.msg_sint = self.config.msg_sint;
            m.msg_vtl = self.config.msg_vtl;
        } else {
            m.set_interrupt_page(self.config.interrupt_page);
        }
        let (page1, page2) = self.config.monitor_pages.unwrap_or((0, 0));
        m.monitor_page1 = page1;
        m.monitor_page2 = page2;
        Ok(Post {
            connection_id: version.initiate_contact_connection_id(),
            msg: build(ChannelMessage::InitiateContact {
                msg: m,
                client_id: None,
            })?,
        })
    }

    /// Starts version negotiation with the first configured version.
    pub fn connect(&mut self) -> Result<(), ClientError> {
        if self.conn != ConnectionState::Disconnected {
            return Err(self.wrong_state("connect"));
        }
        let version = self
            .config
            .versions
            .first()
            .copied()
            .ok_or(ClientError::NoVersions)?;
        let post = self.initiate_contact(version)?;
        tracing::debug!(%version, "vmbus: INITIATE_CONTACT");
        self.conn = ConnectionState::Connecting {
            index: 0,
            retries: 0,
        };
        self.posts.push_back(post);
        Ok(())
    }

    /// Tries the version after the current one, or gives up (Linux `vmbus_connect`'s loop).
    pub(super) fn next_version(&mut self) -> Result<(), ClientError> {
        let ConnectionState::Connecting { index, .. } = self.conn else {
            return Err(self.wrong_state("next version"));
        };
        let next = index.saturating_add(1);
        match self.config.versions.get(next).copied() {
            Some(version) => {
                let post = self.initiate_contact(version)?;
                tracing::debug!(%version, "vmbus: INITIATE_CONTACT");
                self.posts.retain(|p| !is_initiate_contact(p));
                self.conn = ConnectionState::Connecting {
                    index: next,
                    retries: 0,
                };
                self.posts.push_back(post);
            }
            None => {
                tracing::warn!("vmbus: unable to connect to host: every version refused");
                self.posts.retain(|p| !is_initiate_contact(p));
                self.conn = ConnectionState::Disconnected;
                self.events.push_back(ClientEvent::ConnectFailed);
            }
        }
        Ok(())
    }

    /// The post of the INITIATE_CONTACT failed with hypercall status `status`. Transient
    /// failures (`INSUFFICIENT_MEMORY`, `INSUFFICIENT_BUFFERS`) re-queue it up to
    /// [`POST_RETRY_LIMIT`] times (the caller decides the back-off); any other status
    /// (`INVALID_CONNECTION_ID`: the host does not serve connection id 4) moves on to the next
    /// version, as Linux does.
    pub fn post_failed(&mut self, status: u16) -> Result<(), ClientError> {
        if status == hv_status::SUCCESS {
            return Err(ClientError::NotAFailure { status });
        }
        let ConnectionState::Connecting { index, retries } = self.conn else {
            return Err(self.wrong_state("post_failed"));
        };
        let transient = matches!(
            status,
            hv_status::INSUFFICIENT_MEMORY | hv_status::INSUFFICIENT_BUFFERS
        );
        if transient && retries < POST_RETRY_LIMIT {
            let Some(version) = self.config.versions.get(index).copied() else {
                return Err(self.wrong_state("post_failed"));
            };
            let post = self.initiate_contact(version)?;
            self.posts.retain(|p| !is_initiate_contact(p));
            self.posts.push_back(post);
            self.conn = ConnectionState::Connecting {
                index,
                retries: retries.saturating_add(1),
            };
            return Ok(());
        }
        tracing::debug!(status, "vmbus: INITIATE_CONTACT post failed, next version");
        self.next_version()
    }

    pub(super) fn wrong_state(&self, op: &'static str) -> ClientError {
        ClientError::WrongState {
            op,
            state: self.conn.name(),
        }
    }

    /// Version and message connection id, if connected (not unloading).
    fn connected(&self, op: &'static str) -> Result<(Version, u32), ClientError> {
        match self.conn {
            ConnectionState::Connected {
                version,
                msg_conn_id,
            } => Ok((version, msg_conn_id)),
            _ => Err(self.wrong_state(op)),
        }
    }

    /// Posts REQUESTOFFERS (once per connection).
    pub fn request_offers(&mut self) -> Result<(), ClientError> {
        let (_, conn) = self.connected("request_offers")?;
        if self.offers_requested {
            return Err(ClientError::OffersAlreadyRequested);
        }
        let msg = build(ChannelMessage::RequestOffers(RequestOffers::default()))?;
        self.offers_requested = true;
        self.posts.push_back(Post {
            connection_id: conn,
            msg,
        });
        Ok(())
    }

    /// Posts UNLOAD (Linux `vmbus_initiate_unload`; only from 3.0, older hosts cannot reconnect).
    /// [`ClientEvent::Unloaded`] follows UNLOAD_RESPONSE.
    pub fn unload(&mut self) -> Result<(), ClientError> {
        let (version, conn) = self.connected("unload")?;
        if !version.linux_sends_unload() {
            return Err(ClientError::VersionTooOld {
                op: "unload",
                version,
                required: Version::Win8_1,
            });
        }
        let msg = build(ChannelMessage::Unload(Unload::default()))?;
        self.conn = ConnectionState::Unloading {
            version,
            msg_conn_id: conn,
        };
        self.posts.push_back(Post {
            connection_id: conn,
            msg,
        });
        Ok(())
    }

    // ---- GPADLs ------------------------------------------------------------------------------

    /// The GPADL_HEADER and GPADL_BODY messages Linux `create_gpadl_header` builds for one
    /// range of `pfns` pages at byte offset 0.
    pub fn gpadl_messages(
        relid: u32,
        handle: u32,
        pfns: &[u64],
    ) -> Result<Vec<MessageBuf>, ClientError> {
        if pfns.is_empty() {
            return Err(ClientError::EmptyGpadl { relid });
        }
        let count = pfns.len();
        if count > GPADL_MAX_PAGES {
            return Err(ClientError::TooManyPfns {
                relid,
                count,
                max: GPADL_MAX_PAGES,
            });
        }
        // count ≤ 8190: both fit (8 + 8 × 8190 = 65528; 8190 × 4096 < 2^32).
        let range_buflen =
            u16::try_from(count.saturating_mul(8).saturating_add(8)).map_err(|_| {
                ClientError::TooManyPfns {
                    relid,
                    count,
                    max: GPADL_MAX_PAGES,
                }
            })?;
        let byte_count = u32::try_from(count)
            .ok()
            .and_then(|c| c.checked_mul(PAGE_SIZE))
            .ok_or(ClientError::TooManyPfns {
                relid,
                count,
                max: GPADL_MAX_PAGES,
            })?;
        let (head, rest) = pfns.split_at(count.min(GPADL_HEADER_MAX_PFNS));
        let mut words = Vec::with_capacity(head.len().saturating_add(1));
        words.push(
            GpaRange {
                byte_count,
                byte_offset: 0,
            }
            .to_word(),
        );
        words.extend_from_slice(head);
        let mut out =
            Vec::with_capacity(rest.len().div_ceil(GPADL_BODY_MAX_PFNS).saturating_add(1));
        out.push(build(ChannelMessage::GpadlHeader {
            msg: GpadlHeader {
                child_relid: relid,
                gpadl: handle,
                range_buflen,
                rangecount: 1,
                ..GpadlHeader::default()
            },
            words: GpadlWords::from_u64s(&words),
        })?);
        for chunk in rest.chunks(GPADL_BODY_MAX_PFNS) {
            out.push(build(ChannelMessage::GpadlBody {
                msg: GpadlBody {
                    msgnumber: 0,
                    gpadl: handle,
                    ..GpadlBody::default()
                },
                words: GpadlWords::from_u64s(chunk),
            })?);
        }
        Ok(out)
    }

    /// A free handle at or after `next_gpadl_handle`, never 0.
    fn free_handle(&self) -> Result<u32, ClientError> {
        let mut h = self.next_gpadl_handle;
        for _ in 0..self.gpadls.len().saturating_add(2) {
            if h != 0 && !self.gpadls.contains_key(&h) {
                return Ok(h);
            }
            h = h.wrapping_add(1);
        }
        Err(ClientError::GpadlHandlesExhausted)
    }

    /// Describes `pfns` (one page each, in order) as a GPADL on channel `relid` and queues its
    /// messages; [`ClientEvent::GpadlCreated`] follows. Returns the handle.
    pub fn create_gpadl(&mut self, relid: u32, pfns: &[u64]) -> Result<u32, ClientError> {
        let (_, conn) = self.connected("create_gpadl")?;
        let ch = self.channels.get(&relid).ok_or(ClientError::UnknownRelid {
            msgtype: MessageType::GpadlHeader,
            relid,
        })?;
        if ch.state.is_rescinded() {
            return Err(ClientError::ChannelWrongState {
                msgtype: MessageType::GpadlHeader,
                relid,
                state: ch.state,
            });
        }
        let handle = self.free_handle()?;
        let msgs = Self::gpadl_messages(relid, handle, pfns)?;
        // gpadl_messages checked the count against GPADL_MAX_PAGES.
        let page_count = u32::try_from(pfns.len()).map_err(|_| ClientError::TooManyPfns {
            relid,
            count: pfns.len(),
            max: GPADL_MAX_PAGES,
        })?;
        self.next_gpadl_handle = handle.wrapping_add(1);
        self.gpadls.insert(
            handle,
            GpadlRecord {
                handle,
                relid,
                page_count,
                state: GpadlState::Creating,
            },
        );
        self.posts.extend(msgs.into_iter().map(|msg| Post {
            connection_id: conn,
            msg,
        }));
        Ok(handle)
    }

    /// Tears down a created GPADL: GPADL_TEARDOWN, then [`ClientEvent::GpadlTorndown`]. On a
    /// rescinded channel nothing is sent (as Linux) and the GPADL is gone at once.
    pub fn teardown_gpadl(&mut self, relid: u32, handle: u32) -> Result<(), ClientError> {
        const MT: MessageType = MessageType::GpadlTeardown;
        let (_, conn) = self.connected("teardown_gpadl")?;
        let g = self.gpadls.get(&handle).ok_or(ClientError::UnknownGpadl {
            msgtype: MT,
            handle,
        })?;
        if g.relid != relid {
            return Err(ClientError::GpadlRelidMismatch {
                msgtype: MT,
                handle,
                relid,
                owner: g.relid,
            });
        }
        if g.state != GpadlState::Created {
            return Err(ClientError::GpadlWrongState {
                msgtype: MT,
                handle,
                state: g.state,
            });
        }
        let ch = self
            .channels
            .get(&relid)
            .ok_or(ClientError::UnknownRelid { msgtype: MT, relid })?;
        if ch.ring_gpadl == Some(handle) {
            return Err(ClientError::GpadlInUse { handle, relid });
        }
        if ch.state.is_rescinded() {
            self.gpadls.remove(&handle);
            self.events.push_back(ClientEvent::GpadlTorndown { handle });
            return Ok(());
        }
        let msg = build(ChannelMessage::GpadlTeardown(GpadlTeardown {
            child_relid: relid,
            gpadl: handle,
            ..GpadlTeardown::default()
        }))?;
        if let Some(g) = self.gpadls.get_mut(&handle) {
            g.state = GpadlState::TearingDown;
        }
        self.posts.push_back(Post {
            connection_id: conn,
            msg,
        });
        Ok(())
    }

    // ---- channels ----------------------------------------------------------------------------

    /// Opens channel `relid` on a created GPADL of it: OPENCHANNEL with `openid` = relid, then
    /// [`ClientEvent::OpenResult`].
    pub fn open_channel(&mut self, relid: u32, params: OpenParams) -> Result<(), ClientError> {
        const MT: MessageType = MessageType::OpenChannel;
        let (_, conn) = self.connected("open_channel")?;
        let ch = self
            .channels
            .get(&relid)
            .ok_or(ClientError::UnknownRelid { msgtype: MT, relid })?;
        if !matches!(ch.state, ChannelState::Offered | ChannelState::Closed) {
            return Err(ClientError::ChannelWrongState {
                msgtype: MT,
                relid,
                state: ch.state,
            });
        }
        let handle = params.ring_gpadl;
        let g = self.gpadls.get(&handle).ok_or(ClientError::UnknownGpadl {
            msgtype: MT,
            handle,
        })?;
        if g.relid != relid {
            return Err(ClientError::GpadlRelidMismatch {
                msgtype: MT,
                handle,
                relid,
                owner: g.relid,
            });
        }
        if g.state != GpadlState::Created {
            return Err(ClientError::GpadlWrongState {
                msgtype: MT,
                handle,
                state: g.state,
            });
        }
        let offset = params.downstream_offset_pages;
        if offset == 0 || offset >= g.page_count {
            return Err(ClientError::BadRingOffset {
                relid,
                offset,
                pages: g.page_count,
            });
        }
        let msg = build(ChannelMessage::OpenChannel {
            msg: OpenChannel {
                child_relid: relid,
                openid: relid,
                ringbuffer_gpadlhandle: handle,
                target_vp: params.target_vp,
                downstream_ringbuffer_pageoffset: offset,
                userdata: params.user_data,
                ..OpenChannel::default()
            },
            ext: None,
        })?;
        if let Some(ch) = self.channels.get_mut(&relid) {
            ch.state = ChannelState::Opening;
            ch.ring_gpadl = Some(handle);
            ch.target_vp = Some(params.target_vp);
        }
        self.posts.push_back(Post {
            connection_id: conn,
            msg,
        });
        Ok(())
    }

    /// Closes an open channel (also a rescinded one, as Linux): CLOSECHANNEL, which nothing
    /// answers. The ring GPADL stays; tear it down next.
    pub fn close_channel(&mut self, relid: u32) -> Result<(), ClientError> {
        const MT: MessageType = MessageType::CloseChannel;
        let (_, conn) = self.connected("close_channel")?;
        let ch = self
            .channels
            .get(&relid)
            .ok_or(ClientError::UnknownRelid { msgtype: MT, relid })?;
        let next = match ch.state {
            ChannelState::Open => ChannelState::Closed,
            ChannelState::RescindedOpen => ChannelState::Rescinded,
            state => {
                return Err(ClientError::ChannelWrongState {
                    msgtype: MT,
                    relid,
                    state,
                });
            }
        };
        let msg = build(ChannelMessage::CloseChannel(CloseChannel {
            child_relid: relid,
            ..CloseChannel::default()
        }))?;
        if let Some(ch) = self.channels.get_mut(&relid) {
            ch.state = next;
            ch.ring_gpadl = None;
            ch.target_vp = None;
        }
        self.posts.push_back(Post {
            connection_id: conn,
            msg,
        });
        Ok(())
    }

    /// RELID_RELEASED for a rescinded channel that is not open (close it first): the channel,
    /// its GPADLs and its link to sub-channels are forgotten; the host may reuse the relid.
    pub fn release_relid(&mut self, relid: u32) -> Result<(), ClientError> {
        const MT: MessageType = MessageType::RelidReleased;
        let (_, conn) = self.connected("release_relid")?;
        let ch = self
            .channels
            .get(&relid)
            .ok_or(ClientError::UnknownRelid { msgtype: MT, relid })?;
        if ch.state != ChannelState::Rescinded {
            return Err(ClientError::ChannelWrongState {
                msgtype: MT,
                relid,
                state: ch.state,
            });
        }
        let msg = build(ChannelMessage::RelidReleased(RelidReleased {
            child_relid: relid,
            ..RelidReleased::default()
        }))?;
        self.channels.remove(&relid);
        self.gpadls.retain(|_, g| g.relid != relid);
        for c in self.channels.values_mut() {
            if c.primary == Some(relid) {
                c.primary = None;
            }
        }
        self.posts.push_back(Post {
            connection_id: conn,
            msg,
        });
        Ok(())
    }

    /// Moves an open channel's interrupts to `target_vp` (MODIFYCHANNEL, from 4.1). From 5.3 the
    /// host answers and [`ClientEvent::ModifyResult`] follows the answer; below, no answer exists
    /// and the event (status 0) is queued at once.
    pub fn modify_channel(&mut self, relid: u32, target_vp: u32) -> Result<(), ClientError> {
        const MT: MessageType = MessageType::ModifyChannel;
        let (version, conn) = self.connected("modify_channel")?;
        if !version.has_modify_channel() {
            return Err(ClientError::VersionTooOld {
                op: "modify_channel",
                version,
                required: Version::Win10V4_1,
            });
        }
        let ch = self
            .channels
            .get(&relid)
            .ok_or(ClientError::UnknownRelid { msgtype: MT, relid })?;
        if ch.state != ChannelState::Open {
            return Err(ClientError::ChannelWrongState {
                msgtype: MT,
                relid,
                state: ch.state,
            });
        }
        if ch.modify_pending.is_some() {
            return Err(ClientError::ModifyMismatch {
                msgtype: MT,
                relid,
                what: "a MODIFYCHANNEL is already waiting for its response",
            });
        }
        let msg = build(ChannelMessage::ModifyChannel(ModifyChannel {
            child_relid: relid,
            target_vp,
            ..ModifyChannel::default()
        }))?;
        let acked = version.has_modify_channel_response();
        if let Some(ch) = self.channels.get_mut(&relid) {
            if acked {
                ch.modify_pending = Some(target_vp);
            } else {
                ch.target_vp = Some(target_vp);
            }
        }
        self.posts.push_back(Post {
            connection_id: conn,
            msg,
        });
        if !acked {
            self.events
                .push_back(ClientEvent::ModifyResult { relid, status: 0 });
        }
        Ok(())
    }
}
