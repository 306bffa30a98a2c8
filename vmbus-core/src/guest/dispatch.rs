//! Host→guest messages: [`Client::handle_message`] and one handler per message type, each
//! mirroring its Linux `channel_message_table` handler (drivers/hv/channel_mgmt.c).
//!
//! Every handler validates first and mutates last, so a refused message leaves the client as it
//! was.

use crate::wire::{
    ChannelMessage, Direction, GpadlCreated, GpadlTorndown, MESSAGE_CONNECTION_ID, MessageType,
    ModifyChannelResponse, OfferChannel, OpenChannelResult, RescindChannelOffer, VersionResponse,
};

use super::snapshot::{ChannelRecord, ConnectionState};
use super::{
    ChannelState, Client, ClientError, ClientEvent, GpadlState, MAX_PENDING_EVENTS, MAX_RELIDS,
    OfferInfo, STATUS_CHANNEL_RESCINDED,
};

impl Client {
    /// Handles one host message: the SynIC message payload (`payload_size` bytes) from the
    /// message slot. On error nothing changed; log it and go on (Linux drops such messages).
    pub fn handle_message(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        let msg = ChannelMessage::parse(bytes)?;
        let msgtype = msg.msgtype();
        if self.events.len() >= MAX_PENDING_EVENTS {
            return Err(ClientError::EventQueueFull {
                msgtype,
                pending: self.events.len(),
            });
        }
        if msgtype.direction() != Direction::HostToGuest {
            return Err(self.unexpected(msgtype));
        }
        match msg {
            ChannelMessage::VersionResponse { msg, .. } => self.on_version_response(&msg),
            // Linux has no handler for TL_CONNECT_RESULT and drops it in any state.
            ChannelMessage::TlConnectResult(_) => {
                tracing::debug!("vmbus: ignoring CHANNELMSG_TL_CONNECT_RESULT");
                Ok(())
            }
            ChannelMessage::UnloadResponse(_) => self.on_unload_response(),
            // The rest needs a connection. While unloading, replies still arrive and are handled
            // (Linux keeps processing messages until UNLOAD_RESPONSE).
            _ if self.conn.version().is_none() => Err(self.unexpected(msgtype)),
            ChannelMessage::OfferChannel(m) => self.on_offer(&m),
            ChannelMessage::RescindChannelOffer(m) => self.on_rescind(&m),
            ChannelMessage::AllOffersDelivered(_) => {
                self.events.push_back(ClientEvent::AllOffersDelivered);
                Ok(())
            }
            ChannelMessage::OpenChannelResult(m) => self.on_open_result(&m),
            ChannelMessage::GpadlCreated(m) => self.on_gpadl_created(&m),
            ChannelMessage::GpadlTorndown(m) => self.on_gpadl_torndown(&m),
            ChannelMessage::ModifyChannelResponse(m) => self.on_modify_response(&m),
            // Guest→host types were refused above.
            _ => Err(self.unexpected(msgtype)),
        }
    }

    fn unexpected(&self, msgtype: MessageType) -> ClientError {
        ClientError::UnexpectedMessage {
            msgtype,
            state: self.conn.name(),
        }
    }

    fn channel_for(&self, msgtype: MessageType, relid: u32) -> Result<&ChannelRecord, ClientError> {
        self.channels
            .get(&relid)
            .ok_or(ClientError::UnknownRelid { msgtype, relid })
    }

    /// `vmbus_onversion_response` + the tail of `vmbus_negotiate_version`.
    fn on_version_response(&mut self, m: &VersionResponse) -> Result<(), ClientError> {
        let ConnectionState::Connecting { index, .. } = self.conn else {
            return Err(self.unexpected(MessageType::VersionResponse));
        };
        let Some(version) = self.config.versions.get(index).copied() else {
            return Err(self.unexpected(MessageType::VersionResponse));
        };
        if m.version_supported == 0 {
            tracing::debug!(%version, "vmbus: version refused");
            return self.next_version();
        }
        // Linux ignores `connection_state`; it reads `msg_conn_id` only from 5.0.
        let msg_conn_id = if version.uses_response_connection_id() {
            m.msg_conn_id
        } else {
            MESSAGE_CONNECTION_ID
        };
        tracing::info!(%version, msg_conn_id, "vmbus: connected");
        self.conn = ConnectionState::Connected {
            version,
            msg_conn_id,
        };
        self.offers_requested = false;
        self.events.push_back(ClientEvent::Connected {
            version,
            msg_conn_id,
        });
        Ok(())
    }

    /// `vmbus_unload_response`: the connection is gone with every channel and GPADL.
    fn on_unload_response(&mut self) -> Result<(), ClientError> {
        if !matches!(self.conn, ConnectionState::Unloading { .. }) {
            return Err(self.unexpected(MessageType::UnloadResponse));
        }
        self.channels.clear();
        self.gpadls.clear();
        self.offers_requested = false;
        // Anything still queued belonged to the old connection.
        self.posts.clear();
        self.conn = ConnectionState::Disconnected;
        self.events.push_back(ClientEvent::Unloaded);
        Ok(())
    }

    /// `vmbus_onoffer` / `vmbus_process_offer`.
    fn on_offer(&mut self, m: &OfferChannel) -> Result<(), ClientError> {
        const MT: MessageType = MessageType::OfferChannel;
        let version = self.conn.version().ok_or(self.unexpected(MT))?;
        let offer = OfferInfo::from_wire(m, version);
        let relid = offer.relid;
        if relid >= MAX_RELIDS {
            return Err(ClientError::RelidOutOfRange {
                msgtype: MT,
                relid,
                max: MAX_RELIDS,
            });
        }
        if self.channels.contains_key(&relid) {
            return Err(ClientError::DuplicateRelid { msgtype: MT, relid });
        }
        let primary = if offer.is_subchannel() {
            // A sub-channel belongs to the primary with the same class and instance GUID (a
            // real primary first); without one, Linux registers it as a device of its own.
            let matches = |c: &&ChannelRecord| {
                c.primary.is_none()
                    && c.offer.class_id == offer.class_id
                    && c.offer.instance_id == offer.instance_id
            };
            self.channels
                .values()
                .filter(matches)
                .find(|c| !c.offer.is_subchannel())
                .or_else(|| self.channels.values().find(matches))
                .map(|c| c.offer.relid)
        } else {
            // A second primary with the instance GUID of a known one is dropped.
            if let Some(existing) = self
                .channels
                .values()
                .find(|c| !c.offer.is_subchannel() && c.offer.instance_id == offer.instance_id)
            {
                return Err(ClientError::DuplicateOffer {
                    msgtype: MT,
                    relid,
                    existing: existing.offer.relid,
                    instance: offer.instance_id,
                });
            }
            None
        };
        tracing::debug!(relid, class = %offer.class_id, instance = %offer.instance_id,
            index = offer.sub_channel_index, "vmbus: offer");
        self.channels.insert(
            relid,
            ChannelRecord {
                offer,
                state: ChannelState::Offered,
                primary,
                ring_gpadl: None,
                target_vp: None,
                modify_pending: None,
            },
        );
        self.events.push_back(ClientEvent::Offer(offer));
        Ok(())
    }

    /// `vmbus_onoffer_rescind` + `vmbus_rescind_cleanup`: whatever the channel waits for fails
    /// (Linux wakes the waiter, which sees `channel->rescind`), then the driver is told.
    fn on_rescind(&mut self, m: &RescindChannelOffer) -> Result<(), ClientError> {
        const MT: MessageType = MessageType::RescindChannelOffer;
        let relid = m.child_relid;
        let ch = self.channel_for(MT, relid)?;
        let (state, modify_pending) = (ch.state, ch.modify_pending);
        let next = match state {
            ChannelState::Offered | ChannelState::Closed | ChannelState::Opening => {
                ChannelState::Rescinded
            }
            ChannelState::Open => ChannelState::RescindedOpen,
            ChannelState::Rescinded | ChannelState::RescindedOpen => {
                return Err(ClientError::ChannelWrongState {
                    msgtype: MT,
                    relid,
                    state,
                });
            }
        };
        tracing::debug!(relid, ?state, "vmbus: rescind");
        if state == ChannelState::Opening {
            self.events.push_back(ClientEvent::OpenResult {
                relid,
                status: STATUS_CHANNEL_RESCINDED,
            });
        }
        if modify_pending.is_some() {
            self.events.push_back(ClientEvent::ModifyResult {
                relid,
                status: STATUS_CHANNEL_RESCINDED,
            });
        }
        // GPADLs waiting for the host are abandoned: no GPADL_TEARDOWN is sent for a rescinded
        // channel and a late GPADL_CREATED/TORNDOWN is refused as unknown.
        let events = &mut self.events;
        self.gpadls.retain(|&handle, g| {
            if g.relid != relid {
                return true;
            }
            match g.state {
                GpadlState::Created => true,
                GpadlState::Creating => {
                    events.push_back(ClientEvent::GpadlCreated {
                        relid,
                        handle,
                        status: STATUS_CHANNEL_RESCINDED,
                    });
                    false
                }
                GpadlState::TearingDown => {
                    events.push_back(ClientEvent::GpadlTorndown { handle });
                    false
                }
            }
        });
        if let Some(ch) = self.channels.get_mut(&relid) {
            ch.state = next;
            ch.modify_pending = None;
            if next == ChannelState::Rescinded {
                ch.ring_gpadl = None;
                ch.target_vp = None;
            }
        }
        self.events.push_back(ClientEvent::Rescinded { relid });
        Ok(())
    }

    /// `vmbus_onopen_result`: matched by relid and open id.
    fn on_open_result(&mut self, m: &OpenChannelResult) -> Result<(), ClientError> {
        const MT: MessageType = MessageType::OpenChannelResult;
        let (relid, openid, status) = (m.child_relid, m.openid, m.status);
        let ch = self.channel_for(MT, relid)?;
        if ch.state != ChannelState::Opening {
            return Err(ClientError::ChannelWrongState {
                msgtype: MT,
                relid,
                state: ch.state,
            });
        }
        if openid != relid {
            return Err(ClientError::OpenIdMismatch {
                msgtype: MT,
                relid,
                openid,
            });
        }
        if let Some(ch) = self.channels.get_mut(&relid) {
            if status == 0 {
                ch.state = ChannelState::Open;
            } else {
                // Linux: -EAGAIN, back to the offered state; the driver tears the ring down.
                ch.state = ChannelState::Offered;
                ch.ring_gpadl = None;
                ch.target_vp = None;
            }
        }
        self.events
            .push_back(ClientEvent::OpenResult { relid, status });
        Ok(())
    }

    /// `vmbus_ongpadl_created`: matched by relid and handle.
    fn on_gpadl_created(&mut self, m: &GpadlCreated) -> Result<(), ClientError> {
        const MT: MessageType = MessageType::GpadlCreated;
        let (relid, handle, status) = (m.child_relid, m.gpadl, m.creation_status);
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
        if g.state != GpadlState::Creating {
            return Err(ClientError::GpadlWrongState {
                msgtype: MT,
                handle,
                state: g.state,
            });
        }
        if status == 0 {
            if let Some(g) = self.gpadls.get_mut(&handle) {
                g.state = GpadlState::Created;
            }
        } else {
            // Linux: -EDQUOT; the GPADL never existed for the host.
            self.gpadls.remove(&handle);
        }
        self.events.push_back(ClientEvent::GpadlCreated {
            relid,
            handle,
            status,
        });
        Ok(())
    }

    /// `vmbus_ongpadl_torndown`: matched by handle.
    fn on_gpadl_torndown(&mut self, m: &GpadlTorndown) -> Result<(), ClientError> {
        const MT: MessageType = MessageType::GpadlTorndown;
        let handle = m.gpadl;
        let g = self.gpadls.get(&handle).ok_or(ClientError::UnknownGpadl {
            msgtype: MT,
            handle,
        })?;
        if g.state != GpadlState::TearingDown {
            return Err(ClientError::GpadlWrongState {
                msgtype: MT,
                handle,
                state: g.state,
            });
        }
        self.gpadls.remove(&handle);
        self.events.push_back(ClientEvent::GpadlTorndown { handle });
        Ok(())
    }

    /// `vmbus_onmodifychannel_response`: matched by relid.
    fn on_modify_response(&mut self, m: &ModifyChannelResponse) -> Result<(), ClientError> {
        const MT: MessageType = MessageType::ModifyChannelResponse;
        let (relid, status) = (m.child_relid, m.status);
        let ch = self.channel_for(MT, relid)?;
        let Some(target_vp) = ch.modify_pending else {
            return Err(ClientError::ModifyMismatch {
                msgtype: MT,
                relid,
                what: "no MODIFYCHANNEL is waiting for a response",
            });
        };
        if let Some(ch) = self.channels.get_mut(&relid) {
            ch.modify_pending = None;
            if status == 0 && ch.state.uses_ring() {
                ch.target_vp = Some(target_vp);
            }
        }
        self.events
            .push_back(ClientEvent::ModifyResult { relid, status });
        Ok(())
    }
}
