//! Moves a controller's packets through one channel's pair of rings (no_std): queued
//! [`OutPacket`]s into the guest→host ring, host packets from the host→guest ring into
//! [`Storvsc::handle_packet`]. Signalling stays with the caller: each call says whether the host
//! must be signalled (the ring halves decide exactly as Linux does).

use super::driver::{Storvsc, StorvscError};
use alloc::collections::VecDeque;
use alloc::vec::Vec;
use ringbuf::layout::ControlWord;
use ringbuf::sync::Ordering;
use ringbuf::{RingError, RingMem, RingReader, RingWriter, WriteError};

/// Outcome of [`RingChannel::transmit`].
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct TxOutcome {
    pub written: usize,
    /// Signal the host (the ring went from empty to non-empty and it did not mask interrupts).
    pub signal: bool,
    /// Packets are still queued because the ring is full: wait for the host to free space.
    pub blocked: bool,
}

/// Outcome of [`RingChannel::receive`].
#[derive(Default, Debug)]
pub struct RxOutcome {
    pub packets: usize,
    /// Signal the host (it waits for ring space we just freed).
    pub signal: bool,
    /// Host packets the driver refused (already counted in its stats).
    pub refused: Vec<StorvscError>,
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
pub struct RingChannel<M: RingMem> {
    index: u16,
    out: RingWriter<M>,
    inp: RingReader<M>,
    buf: Vec<u8>,
    /// Bytes written to the outgoing ring since the channel was opened.
    written: u64,
    /// With position tracking: `(trans_id, written after it)` of packets sent, oldest first.
    sent: Option<VecDeque<(u64, u64)>>,
}

impl<M: RingMem> RingChannel<M> {
    /// `outgoing` is the guest→host ring, `incoming` the host→guest ring, both initialised
    /// (`ringbuf::init_control`) before OPENCHANNEL.
    pub fn new(index: u16, outgoing: M, incoming: M) -> Result<Self, RingError> {
        Ok(RingChannel {
            index,
            out: RingWriter::new(outgoing)?,
            inp: RingReader::new(incoming)?,
            buf: Vec::new(),
            written: 0,
            sent: None,
        })
    }

    /// Remembers where each request sits in the outgoing ring, so that after a VSP restart
    /// [`Self::lost_requests`] can tell which ones the dead VSP had taken.
    pub fn track_positions(&mut self) {
        self.sent.get_or_insert_with(VecDeque::new);
    }

    /// Bytes of the outgoing ring the VSP has consumed since the channel was opened (from its
    /// published `read_index`).
    pub fn consumed(&self) -> u64 {
        let size = self.out.data_len();
        let r = self
            .out
            .mem()
            .control(ControlWord::ReadIndex)
            .load(Ordering::Acquire);
        let w = self.out.write_index();
        let unread = if r > size {
            // A corrupt index: count everything as unread (nothing is then resent).
            u64::from(size)
        } else if w >= r {
            u64::from(w - r)
        } else {
            u64::from(size - (r - w))
        };
        self.written.saturating_sub(unread)
    }

    /// Requests still in flight that the VSP took from the ring: after the VSP died (and before
    /// it restarts), these are the ones it may never answer. Requests it had not taken are
    /// still in the ring for its successor. Needs [`Self::track_positions`].
    pub fn lost_requests(&self, drv: &Storvsc) -> Vec<u64> {
        let consumed = self.consumed();
        self.sent.as_ref().map_or_else(Vec::new, |s| {
            s.iter()
                .filter(|(id, end)| *end <= consumed && drv.is_pending(*id))
                .map(|(id, _)| *id)
                .collect()
        })
    }

    pub fn index(&self) -> u16 {
        self.index
    }

    pub fn writer(&mut self) -> &mut RingWriter<M> {
        &mut self.out
    }

    pub fn reader(&mut self) -> &mut RingReader<M> {
        &mut self.inp
    }

    /// Writes as many queued packets as fit, publishing them as one batch.
    pub fn transmit(&mut self, drv: &mut Storvsc) -> Result<TxOutcome, ChannelError> {
        let mut outcome = TxOutcome::default();
        let mut batch = self.out.batch();
        while let Some(pkt) = drv.peek_transmit(self.index) {
            let id = pkt.trans_id;
            match pkt.with_outgoing(|o| batch.write(o).and_then(|()| o.footprint())) {
                Ok(footprint) => {
                    drv.pop_transmit(self.index);
                    outcome.written += 1;
                    self.written = self.written.saturating_add(u64::from(footprint));
                    if let Some(s) = self.sent.as_mut() {
                        s.push_back((id, self.written));
                    }
                }
                Err(WriteError::Full { .. }) => {
                    outcome.blocked = true;
                    break;
                }
                Err(WriteError::Ring(e)) => return Err(e.into()),
                Err(e) => return Err(ChannelError::Write(e)),
            }
        }
        outcome.signal = batch.commit()?;
        if let Some(s) = self.sent.as_mut()
            && s.len() > 2 * drv.in_flight() + 64
        {
            s.retain(|(id, _)| drv.is_pending(*id));
        }
        if outcome.blocked {
            // Ask the host to signal when the next packet fits (pending_send_sz), unless it
            // already does.
            if let Some(pkt) = drv.peek_transmit(self.index) {
                let footprint = pkt
                    .with_outgoing(|o| o.footprint())
                    .map_err(ChannelError::Write)?;
                if self.out.request_space(footprint)? {
                    outcome.blocked = false;
                }
            }
        } else {
            self.out.clear_space_request();
        }
        Ok(outcome)
    }

    /// Reads up to `max` host packets into the driver and publishes the freed space.
    pub fn receive(&mut self, drv: &mut Storvsc, max: usize) -> Result<RxOutcome, ChannelError> {
        let mut outcome = RxOutcome::default();
        while outcome.packets < max {
            let Some(pkt) = self.inp.peek()? else {
                break;
            };
            let info = *pkt.info();
            // Anything larger than a vstor packet is refused by the driver; copy just enough to
            // say so without trusting the length further.
            let n = info
                .payload_len()
                .min(vmbus_core::devices::vstor::PACKET_SIZE + 8);
            self.buf.clear();
            self.buf.resize(n, 0);
            let copied = pkt.copy_payload(0, &mut self.buf);
            pkt.consume();
            outcome.packets += 1;
            if copied.is_err() {
                continue;
            }
            let payload = if info.payload_len() > n {
                // Keep the "too long" signal: pass one byte more than allowed.
                self.buf.as_slice()
            } else {
                self.buf.get(..info.payload_len()).unwrap_or(&[])
            };
            if let Err(e) = drv.handle_packet(self.index, info.packet_type, info.trans_id, payload)
            {
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
}
