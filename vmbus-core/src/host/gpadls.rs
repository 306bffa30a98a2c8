//! [`Server`]'s GPADL bookkeeping (header/body reassembly, creation replies, teardown deferred
//! while a ring uses the GPADL) and its invariant checker.

use super::server::Server;
use super::{ChannelState, FAILURE_STATUS, HostError};
use crate::gpadl::{Gpadl, GpadlBuilder, GpadlError};
use crate::wire::{ChannelMessage, GpadlCreated, GpadlTorndown, MessageType, STATUS_SUCCESS};

impl Server {
    /// Checks the server's internal consistency (used by tests and fuzzing): every open ring's GPADL
    /// exists and belongs to its channel, deferred teardowns name live GPADLs, sub-channels have a
    /// primary, nothing but pending channels exists while disconnected.
    pub fn check_invariants(&self) -> Result<(), &'static str> {
        for (&relid, c) in &self.channels {
            if relid == 0 || relid > self.config.max_relid {
                return Err("relid out of range");
            }
            if self
                .channels
                .get(&c.primary)
                .is_none_or(|p| p.subchannel_index != 0)
            {
                return Err("channel without a primary");
            }
            if let ChannelState::Opening { gpadl, target_vp }
            | ChannelState::Open { gpadl, target_vp } = c.state
            {
                if self.gpadls.get(&gpadl).is_none_or(|g| g.relid != relid) {
                    return Err("open channel without its ring GPADL");
                }
                if target_vp >= self.config.vp_count {
                    return Err("open channel targets a missing VP");
                }
            }
            if self.conn.is_none() && c.state != ChannelState::Pending {
                return Err("channel state while disconnected");
            }
        }
        if !self
            .tearing_down
            .iter()
            .all(|h| self.gpadls.contains_key(h) && self.gpadl_in_use(*h))
        {
            return Err("deferred teardown of a GPADL not in use");
        }
        if self.gpadls.keys().any(|h| self.building.contains_key(h)) {
            return Err("GPADL both complete and in progress");
        }
        if self.gpadls.len() + self.building.len() > self.config.gpadl_limits.max_gpadls {
            return Err("too many GPADLs");
        }
        Ok(())
    }

    pub(super) fn gpadl_header(
        &mut self,
        msg: &crate::wire::GpadlHeader,
        words: crate::wire::GpadlWords<'_>,
    ) -> Result<Option<Gpadl>, HostError> {
        let (relid, handle) = (msg.child_relid, msg.gpadl);
        match self.channel_state(relid) {
            None | Some(ChannelState::Pending) => {
                return Err(HostError::UnknownRelid {
                    msgtype: MessageType::GpadlHeader,
                    relid,
                });
            }
            Some(state @ ChannelState::Rescinded) => {
                return Err(HostError::ChannelState {
                    msgtype: MessageType::GpadlHeader,
                    relid,
                    state,
                });
            }
            Some(_) => {}
        }
        if self.gpadls.contains_key(&handle) || self.building.contains_key(&handle) {
            return Err(GpadlError::DuplicateHandle(handle).into());
        }
        let count = self.gpadls.len() + self.building.len();
        if count >= self.config.gpadl_limits.max_gpadls {
            return Err(GpadlError::TooManyGpadls(count).into());
        }
        let b = GpadlBuilder::start(
            relid,
            handle,
            msg.range_buflen,
            msg.rangecount,
            words,
            &self.config.gpadl_limits,
        )?;
        self.building.insert(handle, b);
        self.try_finish_gpadl(handle)
    }

    pub(super) fn try_finish_gpadl(&mut self, handle: u32) -> Result<Option<Gpadl>, HostError> {
        if !self.building.get(&handle).is_some_and(|b| b.is_complete()) {
            return Ok(None);
        }
        let Some(b) = self.building.remove(&handle) else {
            return Ok(None);
        };
        let g = b.finish(&self.config.gpadl_limits, &self.ram)?;
        Ok(Some(g))
    }

    /// Sends GPADL_CREATED once a GPADL completed or failed (nothing while words are missing).
    pub(super) fn answer_gpadl(
        &mut self,
        relid: u32,
        handle: u32,
        result: Result<Option<Gpadl>, HostError>,
    ) -> Result<(), HostError> {
        let status = match &result {
            Ok(None) => return Ok(()),
            Ok(Some(_)) => STATUS_SUCCESS,
            // A duplicate handle must not disturb the GPADL that owns it; a rescinded channel's
            // GPADL is abandoned by Linux, so no answer is expected.
            Err(HostError::ChannelState { .. }) => return result.map(|_| ()),
            Err(_) => FAILURE_STATUS,
        };
        self.send(ChannelMessage::GpadlCreated(GpadlCreated {
            child_relid: relid,
            gpadl: handle,
            creation_status: status,
            ..Default::default()
        }));
        let g = result?;
        if let Some(g) = g {
            self.gpadls.insert(handle, g);
        }
        Ok(())
    }

    pub(super) fn gpadl_teardown(&mut self, relid: u32, handle: u32) -> Result<(), HostError> {
        let Some(g) = self.gpadls.get(&handle) else {
            return Err(GpadlError::UnknownHandle(handle).into());
        };
        if g.relid != relid {
            return Err(HostError::GpadlOwner {
                handle,
                owner: g.relid,
                relid,
            });
        }
        if self.tearing_down.contains(&handle) {
            return Err(GpadlError::UnknownHandle(handle).into());
        }
        if self.gpadl_in_use(handle) {
            // TORNDOWN only once the ring using it is closed.
            self.tearing_down.insert(handle);
            return Ok(());
        }
        self.gpadls.remove(&handle);
        self.send(ChannelMessage::GpadlTorndown(GpadlTorndown {
            gpadl: handle,
            ..Default::default()
        }));
        Ok(())
    }

    pub(super) fn gpadl_in_use(&self, handle: u32) -> bool {
        self.channels.values().any(|c| {
            matches!(c.state,
                ChannelState::Opening { gpadl, .. } | ChannelState::Open { gpadl, .. } if gpadl == handle)
        })
    }

    /// A ring stopped using `handle`: finish a teardown that waited for it.
    pub(super) fn release_ring_gpadl(&mut self, handle: u32) {
        if self.tearing_down.remove(&handle) {
            self.gpadls.remove(&handle);
            self.send(ChannelMessage::GpadlTorndown(GpadlTorndown {
                gpadl: handle,
                ..Default::default()
            }));
        }
    }
}
