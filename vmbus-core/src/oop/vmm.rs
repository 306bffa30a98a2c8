//! The VMM side of a VSP connection: requests with validated replies. A VSP that answers with
//! anything but the expected reply is cut off (the caller drops the client and restarts the VSP).

use super::socket::{Connection, RecvError};
use super::wire::{ChannelOpen, FEATURES, Message, PROTOCOL_VERSION, ProtocolError, Region, ty};
use crate::device::OpenChannelInfo;
use std::os::fd::BorrowedFd;
use std::time::Duration;

/// Why a request to the VSP failed.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("VSP connection: {0}")]
    Recv(#[from] RecvError),
    #[error("send to VSP: {0}")]
    Send(#[from] std::io::Error),
    #[error("VSP violated the protocol: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("VSP refused request {request} for relid {relid}: status {status}")]
    Refused {
        request: u32,
        relid: u32,
        status: u32,
    },
}

/// A connected, handshaken VSP.
#[derive(Debug)]
pub struct VspClient {
    conn: Connection,
    timeout: Option<Duration>,
    /// Sub-channel offers the VSP asked for and the VMM has not handled yet.
    subchannel_requests: Vec<u16>,
    /// Feature bits both sides speak.
    features: u64,
}

impl VspClient {
    /// Handshakes over `conn`. `timeout` bounds every wait for a reply (a hung VSP is a dead VSP).
    pub fn connect(conn: Connection, timeout: Option<Duration>) -> Result<Self, VmmError> {
        conn.send(
            &Message::Hello {
                version: PROTOCOL_VERSION,
                features: FEATURES,
            },
            &[],
        )?;
        let (msg, _) = conn.recv(timeout)?;
        match msg {
            Message::Hello {
                version: PROTOCOL_VERSION,
                features,
            } => Ok(VspClient {
                conn,
                timeout,
                subchannel_requests: Vec::new(),
                features: features & FEATURES,
            }),
            Message::Hello { version, .. } => Err(ProtocolError::Version(version).into()),
            _ => Err(ProtocolError::Unexpected("message before Hello").into()),
        }
    }

    /// Reads what the VSP sent on its own since the last exchange (sub-channel requests: netvsp
    /// asks from its worker thread, between VMM requests), without waiting.
    pub fn poll_requests(&mut self) -> Result<(), VmmError> {
        loop {
            match self.conn.recv(Some(Duration::ZERO)) {
                Ok((Message::OfferSubchannels { count }, _)) => {
                    self.note_subchannel_request(count)?
                }
                Ok(_) => {
                    return Err(
                        ProtocolError::Unexpected("unsolicited message from the VSP").into(),
                    );
                }
                Err(RecvError::TimedOut) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Sub-channel counts the VSP has requested since the last call.
    pub fn take_subchannel_requests(&mut self) -> Vec<u16> {
        std::mem::take(&mut self.subchannel_requests)
    }

    /// Waits for the reply to `request` about `relid`, noting VSP-initiated requests on the way.
    fn wait_reply(&mut self, request: u32, relid: u32) -> Result<(), VmmError> {
        loop {
            let (msg, _) = self.conn.recv(self.timeout)?;
            match msg {
                Message::OfferSubchannels { count } => self.note_subchannel_request(count)?,
                Message::Reply {
                    request: r,
                    relid: id,
                    status,
                } if r == request && id == relid => {
                    return if status == 0 {
                        Ok(())
                    } else {
                        Err(VmmError::Refused {
                            request,
                            relid,
                            status,
                        })
                    };
                }
                _ => return Err(ProtocolError::Unexpected("reply to another request").into()),
            }
        }
    }

    fn note_subchannel_request(&mut self, count: u16) -> Result<(), VmmError> {
        if self.subchannel_requests.len() >= 64 {
            return Err(ProtocolError::Invalid("sub-channel request flood").into());
        }
        self.subchannel_requests.push(count);
        self.conn.send(
            &Message::Reply {
                request: ty::OFFER_SUBCHANNELS,
                relid: 0,
                status: 0,
            },
            &[],
        )?;
        Ok(())
    }

    /// Sends the guest memory table (one fd per region).
    pub fn set_memory(&mut self, regions: &[(Region, BorrowedFd<'_>)]) -> Result<(), VmmError> {
        let table: Vec<Region> = regions.iter().map(|(r, _)| *r).collect();
        let fds: Vec<BorrowedFd<'_>> = regions.iter().map(|(_, f)| *f).collect();
        self.conn
            .send(&Message::SetMemory { regions: table }, &fds)?;
        self.wait_reply(ty::SET_MEMORY, 0)
    }

    /// Sends the in-flight journal (`size` bytes of `fd`); call right after [`Self::set_memory`].
    pub fn set_inflight(&mut self, size: u64, fd: BorrowedFd<'_>) -> Result<(), VmmError> {
        self.conn.send(&Message::Inflight { size }, &[fd])?;
        self.wait_reply(ty::INFLIGHT, 0)
    }

    /// Hands an open channel to the VSP with its kick (guest → VSP) and call (VSP → guest) eventfds.
    pub fn open(
        &mut self,
        info: &OpenChannelInfo,
        kick: BorrowedFd<'_>,
        call: BorrowedFd<'_>,
    ) -> Result<(), VmmError> {
        let msg = Message::Open(ChannelOpen {
            relid: info.relid,
            subchannel_index: info.subchannel_index,
            target_vp: info.target_vp,
            connection_id: info.connection_id,
            downstream_offset: info.downstream_offset,
            user_data: info.user_data,
            ring_pages: info.ring_pages.clone(),
        });
        self.conn.send(&msg, &[kick, call])?;
        self.wait_reply(ty::OPEN, info.relid)
    }

    /// Forwards a complete GPADL of one of the VSP's channels (replied by handle).
    pub fn add_gpadl(&mut self, g: &crate::gpadl::Gpadl) -> Result<(), VmmError> {
        let info = super::wire::GpadlInfo {
            relid: g.relid,
            handle: g.handle,
            ranges: g
                .ranges
                .iter()
                .map(|r| (r.byte_offset, r.byte_count, r.pfn_count as u32))
                .collect(),
            pfns: g.pfns.clone(),
        };
        self.conn.send(&Message::Gpadl(info), &[])?;
        self.wait_reply(ty::GPADL, g.handle)
    }

    /// Revokes a forwarded GPADL; when this returns the VSP no longer uses its pages.
    pub fn remove_gpadl(&mut self, handle: u32) -> Result<(), VmmError> {
        self.conn.send(&Message::GpadlRevoke { handle }, &[])?;
        self.wait_reply(ty::GPADL_REVOKE, handle)
    }

    pub fn close(&mut self, relid: u32) -> Result<(), VmmError> {
        self.conn.send(&Message::Close { relid }, &[])?;
        self.wait_reply(ty::CLOSE, relid)
    }

    pub fn retarget(&mut self, relid: u32, target_vp: u32) -> Result<(), VmmError> {
        Ok(self
            .conn
            .send(&Message::Retarget { relid, target_vp }, &[])?)
    }

    /// Feature bits both sides speak.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Where the VSP sets the channel's event flag before writing *call* (`None`: it only writes
    /// *call*). `Ok(false)`: the VSP does not speak [`super::wire::FEATURE_SIGNAL_TARGET`].
    pub fn signal_target(
        &mut self,
        relid: u32,
        target: Option<(u64, u32)>,
    ) -> Result<bool, VmmError> {
        if self.features & super::wire::FEATURE_SIGNAL_TARGET == 0 {
            return Ok(false);
        }
        self.conn
            .send(&Message::SignalTarget { relid, target }, &[])?;
        self.wait_reply(ty::SIGNAL_TARGET, relid)?;
        Ok(true)
    }

    pub fn save(&mut self) -> Result<Vec<u8>, VmmError> {
        self.conn.send(&Message::Save, &[])?;
        loop {
            let (msg, _) = self.conn.recv(self.timeout)?;
            match msg {
                Message::State { state } => return Ok(state),
                Message::OfferSubchannels { count } => self.note_subchannel_request(count)?,
                _ => return Err(ProtocolError::Unexpected("reply to Save").into()),
            }
        }
    }

    pub fn restore(&mut self, state: &[u8]) -> Result<(), VmmError> {
        self.conn.send(
            &Message::Restore {
                state: state.to_vec(),
            },
            &[],
        )?;
        self.wait_reply(ty::RESTORE, 0)
    }
}
