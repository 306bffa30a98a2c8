//! The NVSP half of the bring-up (Linux `netvsc_connect_vsp`, `netvsc_init_buf`,
//! `rndis_set_subchannel`) and the dispatch of host completions.

use super::control::Step;
use super::{
    BufferKind, DriverState, MIN_SECTION_SIZE, Netvsc, NetvscError, NetvscEvent, Queue, TxSlot,
};
use alloc::vec::Vec;
use vmbus_core::devices::nvsp::{self, NvspMessage, msg_type, status, version};
use vmbus_core::memory::GuestMemory;

/// Where the bring-up is.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(super) enum Phase {
    Created,
    /// INIT for `versions[index]` sent as transaction `trans`.
    Init {
        index: usize,
        trans: u64,
    },
    /// Waiting for the embedder's receive-buffer GPADL.
    RecvGpadl,
    RecvBuf {
        trans: u64,
    },
    SendGpadl,
    SendBuf {
        trans: u64,
    },
    /// An RNDIS step is in flight (its request id is in `rndis_pending`).
    Rndis(Step),
    Subchannels {
        trans: u64,
        asked: u16,
    },
    OpeningSubchannels {
        granted: u16,
        opened: u16,
    },
    Ready,
    Failed,
    Halted,
}

/// Smallest completion payload Linux accepts per NVSP type (`netvsc_send_completion`).
fn min_completion_len(ty: u32) -> usize {
    match ty {
        msg_type::INIT_COMPLETE | msg_type::SEND_RECEIVE_BUFFER_COMPLETE => 28,
        msg_type::SEND_SEND_BUFFER_COMPLETE | msg_type::SUBCHANNEL => 12,
        _ => 8,
    }
}

impl<M: GuestMemory> Netvsc<M> {
    /// Starts the bring-up on the (open) primary channel: NVSP INIT with the first version.
    pub fn start(&mut self) -> Result<(), NetvscError> {
        if self.state != DriverState::Created {
            return Err(NetvscError::WrongState("start: already started"));
        }
        self.state = DriverState::Initializing;
        self.send_init(0);
        Ok(())
    }

    fn send_init(&mut self, index: usize) {
        let Some(&v) = self.cfg.nvsp_versions.get(index) else {
            let e = self.fail(NetvscError::NoVersion);
            tracing::warn!(error = %e, "netvsc: bring-up failed");
            return;
        };
        let trans = self.send_nvsp(
            NvspMessage::Init(nvsp::Init {
                min_protocol_version: v,
                max_protocol_version: v,
            }),
            true,
        );
        self.phase = Phase::Init { index, trans };
    }

    /// The embedder established the GPADL asked for by [`NetvscEvent::CreateGpadl`].
    pub fn gpadl_created(&mut self, buffer: BufferKind, handle: u32) -> Result<(), NetvscError> {
        let id = match (self.phase, buffer) {
            (Phase::RecvGpadl, BufferKind::Receive) => {
                self.recv_gpadl = Some(handle);
                nvsp::LINUX_RECEIVE_BUFFER_ID
            }
            (Phase::SendGpadl, BufferKind::Send) => {
                self.send_gpadl = Some(handle);
                nvsp::LINUX_SEND_BUFFER_ID
            }
            _ => return Err(NetvscError::WrongState("gpadl_created: no GPADL wanted")),
        };
        let body = nvsp::SendBuffer {
            gpadl_handle: handle,
            id,
        };
        let msg = match buffer {
            BufferKind::Receive => NvspMessage::SendReceiveBuffer(body),
            BufferKind::Send => NvspMessage::SendSendBuffer(body),
        };
        let trans = self.send_nvsp(msg, true);
        self.phase = match buffer {
            BufferKind::Receive => Phase::RecvBuf { trans },
            BufferKind::Send => Phase::SendBuf { trans },
        };
        Ok(())
    }

    /// The embedder could not establish a GPADL (or open a sub-channel): the bring-up fails.
    pub fn abort(&mut self, why: &'static str) {
        let _ = self.fail(NetvscError::Unexpected(why));
    }

    /// Sub-channel `index` (1..) is open; its ring is queue `index`.
    pub fn subchannel_opened(&mut self, index: u16) -> Result<(), NetvscError> {
        let Phase::OpeningSubchannels { granted, opened } = self.phase else {
            return Err(NetvscError::WrongState(
                "subchannel_opened: no sub-channels wanted",
            ));
        };
        if index == 0 || index > granted {
            return Err(NetvscError::WrongState(
                "subchannel_opened: index not granted",
            ));
        }
        let opened = opened.saturating_add(1);
        if self.queues.len() <= usize::from(index) {
            self.queues
                .resize_with(usize::from(index) + 1, Queue::default);
        }
        if opened < granted {
            self.phase = Phase::OpeningSubchannels { granted, opened };
            return Ok(());
        }
        // Every granted sub-channel is open (Linux waits for `open_chn == num_chn`).
        self.queues
            .resize_with(usize::from(granted) + 1, Queue::default);
        self.info.channels = granted.saturating_add(1);
        self.rndis_step(Step::RssDisable);
        Ok(())
    }

    /// After the RSS capabilities: ask for sub-channels if more than one queue is wanted and
    /// possible, else go on to the packet filter.
    pub(super) fn after_rss_caps(&mut self) {
        let want = u32::from(self.cfg.queues).min(self.info.rss_queues).min(64);
        if self.info.nvsp_version >= version::V5 && self.info.rss_queues >= 2 && want > 1 {
            let asked = u16::try_from(want - 1).unwrap_or(0);
            let trans = self.send_nvsp(
                NvspMessage::SubchannelRequest(nvsp::SubchannelRequest {
                    operation: nvsp::SUBCHANNEL_ALLOCATE,
                    num_subchannels: u32::from(asked),
                }),
                true,
            );
            self.phase = Phase::Subchannels { trans, asked };
        } else {
            self.rndis_step(Step::PacketFilter);
        }
    }

    /// The bring-up is complete.
    pub(super) fn become_ready(&mut self) {
        self.phase = Phase::Ready;
        self.state = DriverState::Ready;
        if self.info.channels == 0 {
            self.info.channels = 1;
        }
        self.event(NetvscEvent::Ready);
    }

    /// A completion packet from the host.
    pub(super) fn handle_completion(
        &mut self,
        trans_id: u64,
        payload: &[u8],
    ) -> Result<(), NetvscError> {
        if payload.is_empty() {
            // SWITCH_DATA_PATH's empty completion; nothing is waiting for one.
            return Ok(());
        }
        let ty = nvsp::peek_type(payload)?;
        let needed = min_completion_len(ty);
        if payload.len() < needed {
            return Err(NetvscError::ShortCompletion {
                msg_type: ty,
                len: payload.len(),
                needed,
            });
        }
        let msg = NvspMessage::parse(payload, nvsp::Direction::HostToGuest)?;
        match msg {
            NvspMessage::SendRndisPacketComplete(c) => self.send_completed(trans_id, c.status),
            NvspMessage::InitComplete(c) => {
                let Phase::Init { index, trans } = self.phase else {
                    return Err(NetvscError::Unexpected("INIT_COMPLETE"));
                };
                self.expect(trans, trans_id)?;
                if c.status != status::SUCCESS {
                    self.send_init(index + 1);
                    return Ok(());
                }
                let v = self.cfg.nvsp_versions.get(index).copied().unwrap_or(0);
                self.info.nvsp_version = v;
                self.after_init(v);
                Ok(())
            }
            NvspMessage::SendReceiveBufferComplete(c) => {
                let Phase::RecvBuf { trans } = self.phase else {
                    return Err(NetvscError::Unexpected("SEND_RECV_BUF_COMPLETE"));
                };
                self.expect(trans, trans_id)?;
                self.receive_buffer_complete(c)
            }
            NvspMessage::SendSendBufferComplete(c) => {
                let Phase::SendBuf { trans } = self.phase else {
                    return Err(NetvscError::Unexpected("SEND_SEND_BUF_COMPLETE"));
                };
                self.expect(trans, trans_id)?;
                self.send_buffer_complete(c.status, c.section_size)
            }
            NvspMessage::SubchannelComplete(c) => {
                let Phase::Subchannels { trans, asked } = self.phase else {
                    return Err(NetvscError::Unexpected("SUBCHANNEL completion"));
                };
                self.expect(trans, trans_id)?;
                if c.status != status::SUCCESS {
                    return Err(self.fail(NetvscError::HostStatus {
                        what: "SUBCHANNEL",
                        status: c.status,
                    }));
                }
                let granted = c.num_subchannels;
                if granted > u32::from(asked) {
                    return Err(self.fail(NetvscError::BadSubchannels {
                        granted,
                        asked: u32::from(asked),
                    }));
                }
                let granted = granted as u16;
                if granted == 0 {
                    self.info.channels = 1;
                    self.rndis_step(Step::PacketFilter);
                } else {
                    self.phase = Phase::OpeningSubchannels { granted, opened: 0 };
                    self.event(NetvscEvent::OpenSubchannels { count: granted });
                }
                Ok(())
            }
            other => Err(NetvscError::UnexpectedNvsp(other.msg_type())),
        }
    }

    fn expect(&mut self, want: u64, got: u64) -> Result<(), NetvscError> {
        if want == got {
            Ok(())
        } else {
            Err(NetvscError::UnknownTransaction(got))
        }
    }

    /// INIT succeeded with `v`: NDIS config (v ≥ 2), NDIS version, then the receive buffer.
    fn after_init(&mut self, v: u32) {
        if v >= version::V2 {
            let mut caps = nvsp::capability::IEEE8021Q;
            if v >= version::V5 {
                caps |= nvsp::capability::SRIOV | nvsp::capability::TEAMING;
            }
            if v >= version::V61 {
                caps |= nvsp::capability::RSC;
            }
            self.send_nvsp(
                NvspMessage::SendNdisConfig(nvsp::SendNdisConfig {
                    mtu: self.cfg.mtu.saturating_add(14),
                    reserved: 0,
                    capabilities: caps,
                }),
                false,
            );
        }
        let ndis: u32 = if v <= version::V4 {
            0x0006_0001
        } else {
            0x0006_001E
        };
        self.send_nvsp(
            NvspMessage::SendNdisVersion(nvsp::SendNdisVersion {
                ndis_major_version: ndis >> 16,
                ndis_minor_version: ndis & 0xFFFF,
            }),
            false,
        );
        self.phase = Phase::RecvGpadl;
        let pfns = self.recv_pfns();
        self.event(NetvscEvent::CreateGpadl {
            buffer: BufferKind::Receive,
            pfns,
        });
    }

    /// The receive buffer's pages (capped at 15 MiB for NVSP ≤ 2, as Linux).
    fn recv_pfns(&self) -> Vec<u64> {
        let mut r = self.cfg.recv_buffer;
        if self.info.nvsp_version <= version::V2 {
            r.len = r.len.min(15 * 1024 * 1024);
        }
        r.pfns()
    }

    pub(super) fn recv_buffer_len(&self) -> u64 {
        self.recv_pfns().len() as u64 * super::PAGE_SIZE
    }

    fn receive_buffer_complete(
        &mut self,
        c: nvsp::SendReceiveBufferComplete,
    ) -> Result<(), NetvscError> {
        if c.status != status::SUCCESS {
            return Err(self.fail(NetvscError::HostStatus {
                what: "SEND_RECV_BUF",
                status: c.status,
            }));
        }
        let s = c.section;
        let (offset, size, count) = (s.offset, s.sub_allocation_size, s.num_sub_allocations);
        let why = if c.num_sections != 1 {
            Some("section count is not 1")
        } else if offset != 0 {
            Some("section offset is not 0")
        } else if size < MIN_SECTION_SIZE {
            Some("sub-allocation size below 68")
        } else if u64::from(size) * u64::from(count) > self.recv_buffer_len() {
            Some("sub-allocations overflow the buffer")
        } else {
            None
        };
        if let Some(why) = why {
            return Err(self.fail(NetvscError::BadReceiveBuffer(why)));
        }
        self.info.recv_section_size = size;
        self.info.recv_section_count = count;
        self.phase = Phase::SendGpadl;
        let pfns = self.cfg.send_buffer.pfns();
        self.event(NetvscEvent::CreateGpadl {
            buffer: BufferKind::Send,
            pfns,
        });
        Ok(())
    }

    fn send_buffer_complete(&mut self, st: u32, section_size: u32) -> Result<(), NetvscError> {
        if st != status::SUCCESS {
            return Err(self.fail(NetvscError::HostStatus {
                what: "SEND_SEND_BUF",
                status: st,
            }));
        }
        if section_size < MIN_SECTION_SIZE {
            return Err(self.fail(NetvscError::BadSendSection(section_size)));
        }
        let count =
            u32::try_from(self.cfg.send_buffer.len / u64::from(section_size)).unwrap_or(u32::MAX);
        self.info.send_section_size = section_size;
        self.info.send_section_count = count;
        self.free_sections = (0..count).rev().collect();
        self.rndis_step(Step::Initialize);
        Ok(())
    }

    /// A send-path completion (SEND_RNDIS_PKT_COMPLETE): frees what the transaction held.
    fn send_completed(&mut self, trans_id: u64, st: u32) -> Result<(), NetvscError> {
        let slot = self
            .tx_pending
            .remove(&trans_id)
            .ok_or(NetvscError::UnknownTransaction(trans_id))?;
        if st != status::SUCCESS {
            self.stats.tx_failed = self.stats.tx_failed.saturating_add(match slot {
                TxSlot::Section { frames, .. } => u64::from(frames),
                _ => 1,
            });
        }
        match slot {
            TxSlot::Section { index, .. } => self.free_sections.push(index),
            TxSlot::Bounce(i) => self.free_bounce.push(i),
            TxSlot::Control(i) => self.free_control.push(i),
        }
        Ok(())
    }
}
