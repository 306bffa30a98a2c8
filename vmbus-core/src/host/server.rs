//! [`Server`]: message handling and channel/GPADL bookkeeping.

use super::{
    ChannelState, FAILURE_STATUS, HostAction, HostError, ServerConfig, device_offer_flags,
};
use crate::device::{DeviceDescription, OpenChannelInfo};
use crate::gpadl::{Gpadl, GpadlBuilder, GpadlError, GuestRam};
use crate::wire::{
    AllOffersDelivered, ChannelMessage, Direction, FeatureFlags, InitiateContact,
    MESSAGE_CONNECTION_ID, MESSAGE_CONNECTION_ID_4, MESSAGE_SINT, MONITOR_ID_NONE, MessageType,
    ModifyChannelResponse, OfferChannel, OpenChannel, OpenChannelResult, RescindChannelOffer,
    STATUS_SUCCESS, TlConnectResult, UnloadResponse, Version, VersionResponse, connection_state,
};
use alloc::collections::{BTreeMap, BTreeSet, VecDeque};

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Channel {
    pub desc: DeviceDescription,
    pub subchannel_index: u16,
    /// The primary's relid (its own for a primary).
    pub primary: u32,
    pub state: ChannelState,
    /// `openid` of the pending OPENCHANNEL (echoed in the result).
    pub openid: u32,
    pub user_data: [u8; crate::wire::USER_DEFINED_SIZE],
    /// Page offset of the host→guest ring in the ring GPADL (from OPENCHANNEL).
    pub downstream_offset: u32,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(super) struct Connection {
    pub version: Version,
    /// Where host messages go.
    pub vp: u32,
    pub sint: u8,
    pub offers_requested: bool,
}

/// The VMBus host state machine. See the module docs.
#[derive(Clone, Debug)]
pub struct Server {
    pub(super) config: ServerConfig,
    pub(super) ram: crate::gpadl::RamRanges,
    pub(super) conn: Option<Connection>,
    pub(super) channels: BTreeMap<u32, Channel>,
    pub(super) gpadls: BTreeMap<u32, Gpadl>,
    pub(super) building: BTreeMap<u32, GpadlBuilder>,
    /// Complete GPADLs the guest tore down while an open ring still used them.
    pub(super) tearing_down: BTreeSet<u32>,
    pub(super) actions: VecDeque<HostAction>,
}

/// The event connection id of a channel: OpenVMM's `relid | sint << 12` (VTL 0).
pub fn channel_connection_id(relid: u32) -> u32 {
    relid | (u32::from(MESSAGE_SINT) << 12)
}

impl Server {
    /// A disconnected server over guest RAM `ram`.
    pub fn new(config: ServerConfig, ram: crate::gpadl::RamRanges) -> Self {
        Server {
            config,
            ram,
            conn: None,
            channels: BTreeMap::new(),
            gpadls: BTreeMap::new(),
            building: BTreeMap::new(),
            tearing_down: BTreeSet::new(),
            actions: VecDeque::new(),
        }
    }

    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// The negotiated version, when connected.
    pub fn version(&self) -> Option<Version> {
        self.conn.map(|c| c.version)
    }

    pub fn channel_state(&self, relid: u32) -> Option<ChannelState> {
        self.channels.get(&relid).map(|c| c.state)
    }

    /// Relids of the channels of the device whose primary is `primary`, primary first.
    pub fn device_channels(&self, primary: u32) -> impl Iterator<Item = u32> + '_ {
        self.channels
            .iter()
            .filter(move |(_, c)| c.primary == primary)
            .map(|(&r, _)| r)
    }

    /// A complete GPADL.
    pub fn gpadl(&self, handle: u32) -> Option<&Gpadl> {
        self.gpadls.get(&handle)
    }

    /// The next thing to do, in order.
    pub fn poll_action(&mut self) -> Option<HostAction> {
        self.actions.pop_front()
    }

    /// Adds a device's primary channel and returns its relid. Offered at once if the guest already
    /// asked for offers (hot add), otherwise with the next REQUESTOFFERS.
    pub fn add_device(&mut self, desc: DeviceDescription) -> Result<u32, HostError> {
        let relid = self.free_relid()?;
        self.channels.insert(
            relid,
            Channel {
                desc,
                subchannel_index: 0,
                primary: relid,
                state: ChannelState::Pending,
                openid: 0,
                user_data: [0; crate::wire::USER_DEFINED_SIZE],
                downstream_offset: 0,
            },
        );
        if self.conn.is_some_and(|c| c.offers_requested) {
            self.send_offer(relid);
        }
        Ok(relid)
    }

    /// Offers up to `count` more sub-channels of an open primary (the device protocol asked for
    /// them). Returns the new relids.
    pub fn add_subchannels(&mut self, primary: u32, count: u16) -> alloc::vec::Vec<u32> {
        let mut out = alloc::vec::Vec::new();
        let Some(p) = self.channels.get(&primary) else {
            return out;
        };
        if !matches!(p.state, ChannelState::Open { .. }) || p.subchannel_index != 0 {
            return out;
        }
        let desc = p.desc.clone();
        let existing = self.device_channels(primary).count().saturating_sub(1);
        let room = usize::from(desc.max_subchannels).saturating_sub(existing);
        for i in 0..usize::from(count).min(room) {
            let Ok(relid) = self.free_relid() else { break };
            let index = u16::try_from(existing + i + 1).unwrap_or(u16::MAX);
            self.channels.insert(
                relid,
                Channel {
                    desc: desc.clone(),
                    subchannel_index: index,
                    primary,
                    state: ChannelState::Pending,
                    openid: 0,
                    user_data: [0; crate::wire::USER_DEFINED_SIZE],
                    downstream_offset: 0,
                },
            );
            self.send_offer(relid);
            out.push(relid);
        }
        out
    }

    /// Removes a channel (hot remove). A primary takes its sub-channels with it. Open channels are
    /// closed first; the relid is reused only after the guest's RELID_RELEASED.
    pub fn rescind(&mut self, relid: u32) {
        let Some(ch) = self.channels.get(&relid) else {
            return;
        };
        if ch.subchannel_index == 0 {
            let subs: alloc::vec::Vec<u32> = self
                .device_channels(relid)
                .filter(|&r| r != relid)
                .collect();
            for sub in subs {
                self.rescind_one(sub);
            }
        }
        self.rescind_one(relid);
    }

    fn rescind_one(&mut self, relid: u32) {
        let Some(state) = self.channel_state(relid) else {
            return;
        };
        match state {
            ChannelState::Pending => {
                self.channels.remove(&relid);
                return;
            }
            ChannelState::Rescinded => return,
            ChannelState::Opening { gpadl, .. } | ChannelState::Open { gpadl, .. } => {
                self.actions.push_back(HostAction::Close { relid });
                self.release_ring_gpadl(gpadl);
            }
            ChannelState::Offered => {}
        }
        self.set_state(relid, ChannelState::Rescinded);
        self.send(ChannelMessage::RescindChannelOffer(RescindChannelOffer {
            child_relid: relid,
            ..Default::default()
        }));
    }

    /// The device finished (or failed) opening a channel handed out with [`HostAction::Open`].
    pub fn complete_open(&mut self, relid: u32, ok: bool) -> Result<(), HostError> {
        let Some(ChannelState::Opening { gpadl, target_vp }) = self.channel_state(relid) else {
            return Err(HostError::BadOpen {
                relid,
                reason: "no open in progress",
            });
        };
        let openid = self.channels.get(&relid).map_or(0, |c| c.openid);
        let status = if ok {
            self.set_state(relid, ChannelState::Open { gpadl, target_vp });
            STATUS_SUCCESS
        } else {
            self.set_state(relid, ChannelState::Offered);
            self.release_ring_gpadl(gpadl);
            FAILURE_STATUS
        };
        self.send(ChannelMessage::OpenChannelResult(OpenChannelResult {
            child_relid: relid,
            openid,
            status,
            ..Default::default()
        }));
        if ok {
            Ok(())
        } else {
            Err(HostError::DeviceRefused { relid })
        }
    }

    /// What a device needs to serve an open channel (e.g. to hand channels back after a restore).
    pub fn open_info(&self, relid: u32) -> Option<OpenChannelInfo> {
        let ch = self.channels.get(&relid)?;
        let (ChannelState::Open { gpadl, target_vp } | ChannelState::Opening { gpadl, target_vp }) =
            ch.state
        else {
            return None;
        };
        let g = self.gpadls.get(&gpadl)?;
        Some(OpenChannelInfo {
            relid,
            subchannel_index: ch.subchannel_index,
            ring_pages: g.as_ring_pages()?.to_vec(),
            downstream_offset: ch.downstream_offset,
            target_vp,
            connection_id: channel_connection_id(relid),
            user_data: ch.user_data,
        })
    }

    /// Handles one message the guest posted to `connection_id`.
    pub fn handle_message(&mut self, connection_id: u32, bytes: &[u8]) -> Result<(), HostError> {
        let result = self.dispatch(connection_id, bytes);
        if let Err(e) = &result {
            tracing::debug!(error = %e, "vmbus host: guest message refused");
        }
        result
    }

    fn dispatch(&mut self, connection_id: u32, bytes: &[u8]) -> Result<(), HostError> {
        let msg = ChannelMessage::parse(bytes)?;
        let msgtype = msg.msgtype();
        if msgtype.direction() == Direction::HostToGuest {
            return Err(HostError::WrongDirection { msgtype });
        }
        if let ChannelMessage::InitiateContact { msg, .. } = msg {
            return self.initiate_contact(connection_id, &msg);
        }
        let Some(conn) = self.conn else {
            return Err(HostError::WrongState {
                msgtype,
                state: "disconnected",
            });
        };
        if connection_id != MESSAGE_CONNECTION_ID && connection_id != MESSAGE_CONNECTION_ID_4 {
            return Err(HostError::WrongConnectionId {
                msgtype,
                connection_id,
                expected: MESSAGE_CONNECTION_ID,
            });
        }
        if conn.version < msgtype.min_version() {
            return Err(HostError::VersionTooOld {
                msgtype,
                needs: msgtype.min_version(),
                version: conn.version,
            });
        }
        match msg {
            ChannelMessage::RequestOffers(_) => self.request_offers(),
            ChannelMessage::GpadlHeader { msg, words } => {
                let (relid, handle) = (msg.child_relid, msg.gpadl);
                let result = self.gpadl_header(&msg, words);
                self.answer_gpadl(relid, handle, result)
            }
            ChannelMessage::GpadlBody { msg, words } => {
                let handle = msg.gpadl;
                let Some(b) = self.building.get_mut(&handle) else {
                    return Err(GpadlError::UnknownHandle(handle).into());
                };
                b.append(words);
                let relid = b.relid;
                let result = self.try_finish_gpadl(handle);
                self.answer_gpadl(relid, handle, result)
            }
            ChannelMessage::GpadlTeardown(m) => self.gpadl_teardown(m.child_relid, m.gpadl),
            ChannelMessage::OpenChannel { msg, .. } => self.open_channel(&msg),
            ChannelMessage::CloseChannel(m) => self.close_channel(m.child_relid),
            ChannelMessage::RelidReleased(m) => self.relid_released(m.child_relid),
            ChannelMessage::ModifyChannel(m) => self.modify_channel(m.child_relid, m.target_vp),
            ChannelMessage::Unload(_) => {
                self.reset();
                if conn.version.has_unload_response() {
                    self.send_to(
                        conn.vp,
                        conn.sint,
                        ChannelMessage::UnloadResponse(UnloadResponse::default()),
                    );
                }
                Ok(())
            }
            ChannelMessage::TlConnectRequest { msg, .. } => {
                // No hv_sock services here: refuse the connection.
                if conn.version.has_modify_channel() {
                    self.send(ChannelMessage::TlConnectResult(TlConnectResult {
                        endpoint_id: msg.guest_endpoint_id,
                        service_id: msg.host_service_id,
                        status: FAILURE_STATUS,
                        ..Default::default()
                    }));
                }
                Ok(())
            }
            _ => Err(HostError::WrongDirection { msgtype }),
        }
    }

    fn initiate_contact(
        &mut self,
        connection_id: u32,
        msg: &InitiateContact,
    ) -> Result<(), HostError> {
        if self.conn.is_some() {
            // A new INITIATE_CONTACT (kexec, kdump, a new guest session) is an implicit UNLOAD.
            self.reset();
        }
        let requested = msg.version();
        let vp = match requested {
            Some(v) if v.honors_target_vcpu() && msg.target_vcpu < self.config.vp_count => {
                msg.target_vcpu
            }
            _ => 0,
        };
        let sint = match requested {
            Some(v) if v.has_msg_sint() => msg.msg_sint,
            _ => MESSAGE_SINT,
        };
        let verdict = self.check_contact(connection_id, msg);
        let accepted = verdict.is_ok();
        let mut resp = VersionResponse {
            version_supported: u8::from(accepted),
            connection_state: if accepted {
                connection_state::SUCCESSFUL
            } else {
                connection_state::FAILED_UNKNOWN_FAILURE
            },
            ..Default::default()
        };
        if let (true, Some(v)) = (accepted, requested) {
            if v.uses_response_connection_id() {
                resp.msg_conn_id = MESSAGE_CONNECTION_ID;
            }
            self.conn = Some(Connection {
                version: v,
                vp,
                sint: if v.has_msg_sint() { sint } else { MESSAGE_SINT },
                offers_requested: false,
            });
        }
        // A refused request with a nonsensical SINT is answered on the VMBus SINT.
        let reply_sint = if accepted || sint == MESSAGE_SINT {
            sint
        } else {
            MESSAGE_SINT
        };
        self.send_to(
            vp,
            reply_sint,
            ChannelMessage::VersionResponse {
                msg: resp,
                // 6.0 appends the host's feature flags; none of the optional 6.0 features here.
                supported_features: match requested {
                    Some(v) if accepted && v.has_feature_flags() => Some(FeatureFlags(0)),
                    _ => None,
                },
                monitor_pages: None,
            },
        );
        verdict
    }

    fn check_contact(&self, connection_id: u32, msg: &InitiateContact) -> Result<(), HostError> {
        let Some(v) = msg.version() else {
            return Err(HostError::ContactRefused("unknown version"));
        };
        if !self.config.versions.contains(&v) {
            return Err(HostError::ContactRefused("version not supported"));
        }
        if connection_id != v.initiate_contact_connection_id() {
            return Err(HostError::WrongConnectionId {
                msgtype: MessageType::InitiateContact,
                connection_id,
                expected: v.initiate_contact_connection_id(),
            });
        }
        if v.honors_target_vcpu() && msg.target_vcpu >= self.config.vp_count {
            return Err(HostError::BadVp {
                vp: msg.target_vcpu,
                vp_count: self.config.vp_count,
            });
        }
        if v.has_msg_sint() && msg.msg_sint != MESSAGE_SINT {
            return Err(HostError::ContactRefused("msg_sint must be 2"));
        }
        if v.has_msg_vtl() && msg.msg_vtl != 0 {
            return Err(HostError::ContactRefused("msg_vtl must be 0"));
        }
        let page_ok = |gpa: u64| gpa.is_multiple_of(4096) && self.ram.contains_pages(gpa / 4096, 1);
        if v.has_interrupt_page() && msg.interrupt_page() != 0 && !page_ok(msg.interrupt_page()) {
            return Err(HostError::ContactRefused(
                "interrupt page outside guest RAM",
            ));
        }
        let (m1, m2) = (msg.monitor_page1, msg.monitor_page2);
        match (m1, m2) {
            (0, 0) => {}
            (a, b) if a != 0 && b != 0 && page_ok(a) && page_ok(b) => {}
            _ => {
                return Err(HostError::ContactRefused(
                    "monitor pages: both or neither, in RAM",
                ));
            }
        }
        Ok(())
    }

    fn request_offers(&mut self) -> Result<(), HostError> {
        let Some(conn) = self.conn.as_mut() else {
            return Err(HostError::WrongState {
                msgtype: MessageType::RequestOffers,
                state: "disconnected",
            });
        };
        if conn.offers_requested {
            return Err(HostError::WrongState {
                msgtype: MessageType::RequestOffers,
                state: "offers already requested",
            });
        }
        conn.offers_requested = true;
        let pending: alloc::vec::Vec<u32> = self
            .channels
            .iter()
            .filter(|(_, c)| c.state == ChannelState::Pending && c.subchannel_index == 0)
            .map(|(&r, _)| r)
            .collect();
        for relid in pending {
            self.send_offer(relid);
        }
        self.send(ChannelMessage::AllOffersDelivered(
            AllOffersDelivered::default(),
        ));
        Ok(())
    }

    fn send_offer(&mut self, relid: u32) {
        let Some(ch) = self.channels.get_mut(&relid) else {
            return;
        };
        ch.state = ChannelState::Offered;
        let mut offer = OfferChannel {
            if_type: ch.desc.class,
            if_instance: ch.desc.instance,
            chn_flags: device_offer_flags(&ch.desc),
            mmio_megabytes: ch.desc.mmio_megabytes,
            user_defined: ch.desc.user_defined,
            sub_channel_index: ch.subchannel_index,
            child_relid: relid,
            monitor_id: MONITOR_ID_NONE,
            connection_id: channel_connection_id(relid),
            ..Default::default()
        };
        if let Some(mode) = ch.desc.pipe_mode {
            offer.set_pipe_mode(mode);
        }
        offer.set_monitor_allocated(false);
        offer.set_dedicated_interrupt(true);
        self.send(ChannelMessage::OfferChannel(offer));
    }

    fn open_channel(&mut self, msg: &OpenChannel) -> Result<(), HostError> {
        let relid = msg.child_relid;
        let check = self.check_open(msg);
        match check {
            Ok(info) => {
                if let Some(ch) = self.channels.get_mut(&relid) {
                    ch.openid = msg.openid;
                    ch.user_data = msg.userdata;
                    ch.downstream_offset = msg.downstream_ringbuffer_pageoffset;
                    ch.state = ChannelState::Opening {
                        gpadl: msg.ringbuffer_gpadlhandle,
                        target_vp: msg.target_vp,
                    };
                }
                self.actions.push_back(HostAction::Open(info));
                Ok(())
            }
            // Hyper-V ignores OPENCHANNEL for a rescinded channel; the guest is woken by the rescind.
            Err(
                e @ HostError::ChannelState {
                    state: ChannelState::Rescinded,
                    ..
                },
            ) => Err(e),
            Err(e) => {
                self.send(ChannelMessage::OpenChannelResult(OpenChannelResult {
                    child_relid: relid,
                    openid: msg.openid,
                    status: FAILURE_STATUS,
                    ..Default::default()
                }));
                Err(e)
            }
        }
    }

    fn check_open(&self, msg: &OpenChannel) -> Result<OpenChannelInfo, HostError> {
        let relid = msg.child_relid;
        let bad = |reason| HostError::BadOpen { relid, reason };
        let ch = self.channels.get(&relid).ok_or(HostError::UnknownRelid {
            msgtype: MessageType::OpenChannel,
            relid,
        })?;
        if ch.state != ChannelState::Offered {
            return Err(HostError::ChannelState {
                msgtype: MessageType::OpenChannel,
                relid,
                state: ch.state,
            });
        }
        let handle = msg.ringbuffer_gpadlhandle;
        let g = self
            .gpadls
            .get(&handle)
            .ok_or(bad("ring GPADL unknown or incomplete"))?;
        if g.relid != relid {
            return Err(bad("ring GPADL belongs to another channel"));
        }
        if self.tearing_down.contains(&handle) || self.gpadl_in_use(handle) {
            return Err(bad("ring GPADL is being torn down or already in use"));
        }
        let pages = g
            .as_ring_pages()
            .ok_or(bad("ring GPADL is not one whole-page range"))?;
        let offset = msg.downstream_ringbuffer_pageoffset;
        let n = pages.len() as u64;
        if u64::from(offset) < 2 || n.saturating_sub(u64::from(offset)) < 2 {
            return Err(bad("each ring needs a control page and a data page"));
        }
        if msg.target_vp >= self.config.vp_count {
            return Err(HostError::BadVp {
                vp: msg.target_vp,
                vp_count: self.config.vp_count,
            });
        }
        Ok(OpenChannelInfo {
            relid,
            subchannel_index: ch.subchannel_index,
            ring_pages: pages.to_vec(),
            downstream_offset: offset,
            target_vp: msg.target_vp,
            connection_id: channel_connection_id(relid),
            user_data: msg.userdata,
        })
    }

    fn close_channel(&mut self, relid: u32) -> Result<(), HostError> {
        let state = self.channel_state(relid).ok_or(HostError::UnknownRelid {
            msgtype: MessageType::CloseChannel,
            relid,
        })?;
        match state {
            ChannelState::Opening { gpadl, .. } | ChannelState::Open { gpadl, .. } => {
                self.actions.push_back(HostAction::Close { relid });
                self.set_state(relid, ChannelState::Offered);
                self.release_ring_gpadl(gpadl);
                Ok(())
            }
            // Linux closes a rescinded channel that was open; the host already stopped it.
            ChannelState::Rescinded => Ok(()),
            state => Err(HostError::ChannelState {
                msgtype: MessageType::CloseChannel,
                relid,
                state,
            }),
        }
    }

    fn relid_released(&mut self, relid: u32) -> Result<(), HostError> {
        match self.channel_state(relid) {
            Some(ChannelState::Rescinded) => {
                self.channels.remove(&relid);
                // Linux sends no GPADL_TEARDOWN for a rescinded channel: free its GPADLs here.
                self.gpadls.retain(|_, g| g.relid != relid);
                self.building.retain(|_, b| b.relid != relid);
                let gpadls = &self.gpadls;
                self.tearing_down.retain(|h| gpadls.contains_key(h));
                Ok(())
            }
            Some(state) => Err(HostError::ChannelState {
                msgtype: MessageType::RelidReleased,
                relid,
                state,
            }),
            None => Err(HostError::UnknownRelid {
                msgtype: MessageType::RelidReleased,
                relid,
            }),
        }
    }

    fn modify_channel(&mut self, relid: u32, target_vp: u32) -> Result<(), HostError> {
        let result = match self.channel_state(relid) {
            Some(ChannelState::Open { gpadl, .. }) if target_vp < self.config.vp_count => {
                self.set_state(relid, ChannelState::Open { gpadl, target_vp });
                self.actions
                    .push_back(HostAction::Retarget { relid, target_vp });
                Ok(())
            }
            Some(ChannelState::Open { .. }) => Err(HostError::BadVp {
                vp: target_vp,
                vp_count: self.config.vp_count,
            }),
            Some(state) => Err(HostError::ChannelState {
                msgtype: MessageType::ModifyChannel,
                relid,
                state,
            }),
            None => Err(HostError::UnknownRelid {
                msgtype: MessageType::ModifyChannel,
                relid,
            }),
        };
        if self
            .conn
            .is_some_and(|c| c.version.has_modify_channel_response())
        {
            self.send(ChannelMessage::ModifyChannelResponse(
                ModifyChannelResponse {
                    child_relid: relid,
                    status: if result.is_ok() {
                        STATUS_SUCCESS
                    } else {
                        FAILURE_STATUS
                    },
                    ..Default::default()
                },
            ));
        }
        result
    }

    /// Drops the connection: closes every channel, forgets GPADLs and sub-channels, keeps the
    /// registered devices for the next connection.
    fn reset(&mut self) {
        let relids: alloc::vec::Vec<u32> = self.channels.keys().copied().collect();
        for relid in relids {
            let Some(ch) = self.channels.get(&relid) else {
                continue;
            };
            if matches!(
                ch.state,
                ChannelState::Opening { .. } | ChannelState::Open { .. }
            ) {
                self.actions.push_back(HostAction::Close { relid });
            }
            if ch.subchannel_index != 0 || ch.state == ChannelState::Rescinded {
                self.channels.remove(&relid);
            } else {
                self.set_state(relid, ChannelState::Pending);
            }
        }
        self.gpadls.clear();
        self.building.clear();
        self.tearing_down.clear();
        self.conn = None;
        self.actions.push_back(HostAction::Reset);
    }

    pub(super) fn set_state(&mut self, relid: u32, state: ChannelState) {
        if let Some(ch) = self.channels.get_mut(&relid) {
            ch.state = state;
        }
    }

    pub(super) fn free_relid(&self) -> Result<u32, HostError> {
        (1..=self.config.max_relid)
            .find(|r| !self.channels.contains_key(r))
            .ok_or(HostError::NoRelid)
    }

    pub(super) fn send(&mut self, msg: ChannelMessage<'_>) {
        let (vp, sint) = self.conn.map_or((0, MESSAGE_SINT), |c| (c.vp, c.sint));
        self.send_to(vp, sint, msg);
    }

    pub(super) fn send_to(&mut self, vp: u32, sint: u8, msg: ChannelMessage<'_>) {
        match msg.to_bytes() {
            Ok(msg) => self.actions.push_back(HostAction::Send { vp, sint, msg }),
            Err(e) => tracing::error!(error = %e, "vmbus host: cannot encode a host message"),
        }
    }
}
