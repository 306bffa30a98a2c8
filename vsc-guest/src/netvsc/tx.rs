//! Guest → host frames (Linux `netvsc_xmit`, `netvsc_send`, `netvsc_copy_to_send_buf`).
//!
//! Each frame becomes an RNDIS_PACKET with its per-packet info (hash, 802.1Q, LSO v2 or checksum,
//! in Linux's order). If header + frame + alignment fit a send section it is copied there, and
//! frames sent with `more = true` are batched into the same section (each padded to the host's
//! packet alignment, at most `max_packets_per_message` per section) until a frame without `more`
//! or [`Netvsc::flush`] sends the section. Otherwise it goes GPA direct from a bounce slot: one page
//! buffer per page of the RNDIS header, then of the frame, at most 32.

use super::{
    DriverState, MAX_PAGE_BUFFERS, Netvsc, OutKind, OutPacket, PAGE_SIZE, PageBuffer, SendError,
    TxSlot,
};
use alloc::vec::Vec;
use vmbus_core::devices::nvsp::{self, NvspMessage};
use vmbus_core::devices::rndis::{self, ppi};
use vmbus_core::memory::GuestMemory;

/// Checksum offload request (the transmit form of the TCP/IP checksum PPI).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct TxChecksum {
    pub ipv4: bool,
    pub ipv6: bool,
    pub tcp: bool,
    pub udp: bool,
    pub ip_header: bool,
    /// Offset of the TCP/UDP header from the frame start.
    pub transport_offset: u16,
}

/// LSO v2 request: the host segments the frame into `mss`-byte TCP segments.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct LsoInfo {
    pub mss: u32,
    /// Offset of the TCP header from the frame start.
    pub tcp_offset: u16,
    pub ipv6: bool,
}

/// Offload metadata of one frame.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct TxMeta {
    pub csum: Option<TxChecksum>,
    pub lso: Option<LsoInfo>,
    /// 802.1Q tag control information (PCP, DEI, VID) to insert.
    pub vlan_tci: Option<u16>,
    /// Flow hash (Linux sends it when there is more than one queue).
    pub hash: Option<u32>,
}

impl TxMeta {
    /// The PPIs Linux would attach, in its order.
    pub fn ppis(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Some(h) = self.hash {
            ppi::write(&mut out, ppi::ty::NBL_HASH_VALUE, false, &h.to_le_bytes());
        }
        if let Some(tci) = self.vlan_tci {
            let v = ppi::Ieee8021qInfo::from_tci(tci).0;
            ppi::write(&mut out, ppi::ty::IEEE_8021Q, false, &v.to_le_bytes());
        }
        if let Some(l) = self.lso {
            let v = ppi::LsoV2Info::new(l.mss, l.tcp_offset, l.ipv6).0;
            ppi::write(&mut out, ppi::ty::TCP_LARGE_SEND, false, &v.to_le_bytes());
        } else if let Some(c) = self.csum {
            let mut bits = 0;
            for (on, bit) in [
                (c.ipv4, ppi::TxChecksumInfo::IS_IPV4),
                (c.ipv6, ppi::TxChecksumInfo::IS_IPV6),
                (c.tcp, ppi::TxChecksumInfo::TCP_CHECKSUM),
                (c.udp, ppi::TxChecksumInfo::UDP_CHECKSUM),
                (c.ip_header, ppi::TxChecksumInfo::IP_HEADER_CHECKSUM),
            ] {
                if on {
                    bits |= bit;
                }
            }
            let v = ppi::TxChecksumInfo(bits)
                .with_transport_offset(c.transport_offset)
                .0;
            ppi::write(&mut out, ppi::ty::TCPIP_CHECKSUM, false, &v.to_le_bytes());
        }
        out
    }
}

/// Splits `len` bytes at `gpa` into page buffers (each inside one page).
fn page_buffers(out: &mut Vec<PageBuffer>, gpa: u64, len: u64) {
    let mut at = gpa;
    let end = gpa.saturating_add(len);
    while at < end {
        let in_page = at % PAGE_SIZE;
        let n = (PAGE_SIZE - in_page).min(end - at);
        out.push(PageBuffer {
            pfn: at / PAGE_SIZE,
            offset: in_page as u32,
            len: n as u32,
        });
        at += n;
    }
}

fn rndis_send(section: u32, size: u32) -> Vec<u8> {
    NvspMessage::SendRndisPacket(nvsp::SendRndisPacket {
        channel_type: nvsp::CHANNEL_TYPE_DATA,
        send_buffer_section_index: section,
        send_buffer_section_size: size,
    })
    .to_bytes(nvsp::MESSAGE_SIZE_V61)
}

impl<M: GuestMemory> Netvsc<M> {
    /// Sends one frame on queue `q`. With `more`, the frame may wait in a partly filled send
    /// section for the next one (call [`Self::flush`] when the burst ends).
    pub fn send(
        &mut self,
        q: u16,
        frame: &[u8],
        meta: &TxMeta,
        more: bool,
    ) -> Result<(), SendError> {
        if self.state != DriverState::Ready {
            return Err(SendError::NotReady);
        }
        let queue = self
            .queues
            .get(usize::from(q))
            .ok_or(SendError::NoQueue(q))?;
        if frame.is_empty() {
            return Err(SendError::Empty);
        }
        if queue.out.len() >= self.cfg.tx_queue_limit {
            return Err(SendError::Busy);
        }
        let mut header = rndis::packet_header(frame.len(), &meta.ppis());
        let total = header.len() + frame.len();
        let size = self.info.send_section_size as usize;
        let align = self.info.packet_alignment.max(1) as usize;
        let small = self
            .cfg
            .copy_threshold
            .is_none_or(|t| frame.len() <= t as usize);
        if small && total + align < size {
            // Batch into the open section, or start a new one.
            let fits = queue.batch.is_some_and(|b| {
                b.count < self.info.max_packets_per_message && b.len as usize + total + align < size
            });
            if !fits {
                self.flush(q);
            }
            let (section, offset, count) = match self.queues[usize::from(q)].batch {
                Some(b) if fits => (b.section, b.len as usize, b.count),
                _ => match self.free_sections.pop() {
                    Some(s) => (s, 0, 0),
                    None => return self.send_gpa(q, &header, frame),
                },
            };
            let pad = if more {
                (align - total % align) % align
            } else {
                0
            };
            let msg_len = (total + pad) as u32;
            header[4..8].copy_from_slice(&msg_len.to_le_bytes());
            let gpa = self.cfg.send_buffer.gpa + section as u64 * size as u64 + offset as u64;
            let written = self
                .mem
                .write_at(gpa, &header)
                .and_then(|()| self.mem.write_at(gpa + header.len() as u64, frame))
                .and_then(|()| self.mem.write_at(gpa + total as u64, &[0u8; 64][..pad]));
            if let Err(e) = written {
                if count == 0 {
                    self.free_sections.push(section);
                }
                return Err(e.into());
            }
            self.queues[usize::from(q)].batch = Some(super::Batch {
                section,
                len: (offset + total + pad) as u32,
                count: count + 1,
            });
            self.stats.tx_section += 1;
            self.count_tx(frame.len());
            if !more {
                self.flush(q);
            }
            Ok(())
        } else {
            self.flush(q);
            self.send_gpa(q, &header, frame)
        }
    }

    fn count_tx(&mut self, len: usize) {
        self.stats.tx_frames += 1;
        self.stats.tx_bytes += len as u64;
    }

    /// Sends the open send section of queue `q`, if any.
    pub fn flush(&mut self, q: u16) {
        let Some(b) = self
            .queues
            .get_mut(usize::from(q))
            .and_then(|qu| qu.batch.take())
        else {
            return;
        };
        let trans_id = self.trans_id();
        self.tx_pending.insert(
            trans_id,
            TxSlot::Section {
                index: b.section,
                frames: b.count,
            },
        );
        if b.count > 1 {
            self.stats.tx_batches += 1;
        }
        self.queue_packet(
            q,
            OutPacket {
                kind: OutKind::InBand,
                trans_id,
                completion_requested: true,
                payload: rndis_send(b.section, b.len),
            },
        );
    }

    /// A frame GPA direct from a bounce slot.
    fn send_gpa(&mut self, q: u16, header: &[u8], frame: &[u8]) -> Result<(), SendError> {
        let Some(area) = self.cfg.bounce_area else {
            return Err(SendError::TooLarge {
                len: frame.len(),
                max: self.info.send_section_size as usize,
            });
        };
        let slot_size = self.cfg.bounce_slot_size as usize;
        let total = header.len() + frame.len();
        if total > slot_size {
            return Err(SendError::TooLarge {
                len: frame.len(),
                max: slot_size.saturating_sub(header.len()),
            });
        }
        let mut ranges = Vec::with_capacity(MAX_PAGE_BUFFERS);
        let slot = self.free_bounce.pop().ok_or(SendError::Busy)?;
        let gpa = area.gpa + u64::from(slot) * slot_size as u64;
        page_buffers(&mut ranges, gpa, header.len() as u64);
        page_buffers(&mut ranges, gpa + header.len() as u64, frame.len() as u64);
        if ranges.len() > MAX_PAGE_BUFFERS {
            self.free_bounce.push(slot);
            return Err(SendError::TooLarge {
                len: frame.len(),
                max: (MAX_PAGE_BUFFERS - 2) * PAGE_SIZE as usize,
            });
        }
        let written = self
            .mem
            .write_at(gpa, header)
            .and_then(|()| self.mem.write_at(gpa + header.len() as u64, frame));
        if let Err(e) = written {
            self.free_bounce.push(slot);
            return Err(e.into());
        }
        let trans_id = self.trans_id();
        self.tx_pending.insert(trans_id, TxSlot::Bounce(slot));
        self.stats.tx_gpa_direct += 1;
        self.count_tx(frame.len());
        self.queue_packet(
            q,
            OutPacket {
                kind: OutKind::GpaDirect(ranges),
                trans_id,
                completion_requested: true,
                payload: rndis_send(nvsp::INVALID_SECTION_INDEX, 0),
            },
        );
        Ok(())
    }
}
