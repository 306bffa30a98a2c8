//! Moves a [`Netvsc`]'s packets through one channel's pair of rings (`no_std`): queued
//! [`super::OutPacket`]s into the guest→host ring, host packets from the host→guest ring into
//! [`Netvsc::handle_packet`]. Signalling stays with the caller: each call says whether the host
//! must be signalled (decided by the ring halves exactly as Linux decides).

use super::{HostPacket, Netvsc, NetvscError};
use alloc::vec::Vec;
use ringbuf::{HeaderInfo, OutgoingPacket, RingError, RingMem, RingReader, RingWriter, WriteError};
use vmbus_core::memory::GuestMemory;

/// Largest host packet payload copied out: Linux netvsc's whole-packet limit (4624 bytes).
pub const MAX_HOST_PAYLOAD: usize = 4624;

/// Outcome of [`NetChannel::transmit`].
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct TxOutcome {
    pub written: usize,
    /// Signal the host (empty→non-empty and not masked).
    pub signal: bool,
    /// Packets are still queued because the ring is full: wait for the host to free space.
    pub blocked: bool,
}

/// Outcome of [`NetChannel::receive`].
#[derive(Debug, Default)]
pub struct RxOutcome {
    pub packets: usize,
    /// Signal the host (it waits for ring space we just freed).
    pub signal: bool,
    /// Host packets the driver refused (counted in its stats too).
    pub refused: Vec<NetvscError>,
}

/// Why moving packets failed: the ring itself is broken (a peer-corrupted ring stays broken).
#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error("packet cannot be written: {0}")]
    Write(WriteError),
}

/// One open channel's rings.
pub struct NetChannel<R: RingMem> {
    index: u16,
    out: RingWriter<R>,
    inp: RingReader<R>,
    buf: Vec<u8>,
}

impl<R: RingMem> NetChannel<R> {
    /// `outgoing` is the guest→host ring, `incoming` the host→guest ring, both initialised
    /// (`ringbuf::init_control`) before OPENCHANNEL.
    pub fn new(index: u16, outgoing: R, incoming: R) -> Result<Self, RingError> {
        Ok(NetChannel {
            index,
            out: RingWriter::new(outgoing)?,
            inp: RingReader::new(incoming)?,
            buf: Vec::new(),
        })
    }

    pub fn index(&self) -> u16 {
        self.index
    }

    /// Writes as many queued packets as fit, published as one batch.
    pub fn transmit<M: GuestMemory>(
        &mut self,
        drv: &mut Netvsc<M>,
    ) -> Result<TxOutcome, ChannelError> {
        let mut outcome = TxOutcome::default();
        let mut footprint = None;
        {
            let mut batch = self.out.batch();
            while let Some(pkt) = drv.peek_transmit(self.index) {
                let headers = pkt.header_bytes();
                let parts: [&[u8]; 1] = [&pkt.payload];
                let o = OutgoingPacket {
                    packet_type: pkt.packet_type(),
                    completion_requested: pkt.completion_requested,
                    trans_id: pkt.trans_id,
                    headers: &headers,
                    payload: &parts,
                };
                match batch.write(&o) {
                    Ok(()) => {
                        drv.pop_transmit(self.index);
                        outcome.written += 1;
                    }
                    Err(WriteError::Full { needed, .. }) => {
                        outcome.blocked = true;
                        footprint = Some(needed);
                        break;
                    }
                    Err(WriteError::Ring(e)) => return Err(e.into()),
                    Err(e) => {
                        // A packet this ring can never carry: drop it rather than stall.
                        drv.pop_transmit(self.index);
                        return Err(ChannelError::Write(e));
                    }
                }
            }
            outcome.signal = batch.commit()?;
        }
        match footprint {
            // Ask the host to signal when the next packet fits (pending_send_sz).
            Some(f) => {
                if self.out.request_space(f)? {
                    outcome.blocked = false;
                }
            }
            None => self.out.clear_space_request(),
        }
        Ok(outcome)
    }

    /// Reads up to `max` host packets into the driver and publishes the freed space.
    pub fn receive<M: GuestMemory>(
        &mut self,
        drv: &mut Netvsc<M>,
        max: usize,
    ) -> Result<RxOutcome, ChannelError> {
        let mut outcome = RxOutcome::default();
        let mut ranges: Vec<(u32, u32)> = Vec::new();
        while outcome.packets < max {
            let Some(pkt) = self.inp.peek()? else {
                break;
            };
            let info = *pkt.info();
            ranges.clear();
            let set_id = match info.header {
                HeaderInfo::TransferPages { set_id, .. } => {
                    ranges.extend(
                        pkt.transfer_ranges()
                            .unwrap_or_default()
                            .iter()
                            .map(|r| (r.byte_offset.get(), r.byte_count.get())),
                    );
                    Some(set_id)
                }
                _ => None,
            };
            let n = info.payload_len().min(MAX_HOST_PAYLOAD);
            self.buf.clear();
            self.buf.resize(n, 0);
            let copied = pkt.copy_payload(0, &mut self.buf).is_ok();
            pkt.consume();
            outcome.packets += 1;
            if !copied {
                continue;
            }
            let host = HostPacket {
                packet_type: info.packet_type,
                trans_id: info.trans_id,
                completion_requested: info.completion_requested,
                transfer: set_id.map(|s| (s, ranges.as_slice())),
                payload: &self.buf,
            };
            if let Err(e) = drv.handle_packet(self.index, &host) {
                outcome.refused.push(e);
            }
        }
        outcome.signal = self.inp.commit()?;
        Ok(outcome)
    }

    /// Re-arms host→guest signalling before sleeping; `Ok(true)` = data arrived meanwhile, read
    /// again instead of sleeping.
    pub fn arm(&mut self) -> Result<bool, RingError> {
        self.inp.unmask_interrupts()
    }

    /// Asks the host not to signal (while the guest polls).
    pub fn disarm(&self) {
        self.inp.mask_interrupts();
    }

    /// Whether unread host packets are waiting.
    pub fn has_input(&mut self) -> Result<bool, RingError> {
        Ok(self.inp.available()? != 0)
    }
}
