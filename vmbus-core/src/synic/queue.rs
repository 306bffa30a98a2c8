//! The host's per-(VP, SINT) message FIFOs in front of a guest's message page (§6.3: "Host, per
//! (VP, SINT), FIFO queue"). Shared by every host implementation, the KVM one included: call
//! [`VpMessageQueues::post`] to send and [`VpMessageQueues::on_eom`] when the guest writes EOM (and
//! when SIMP / SINT / SCONTROL change), and raise the SINT interrupt whenever they report a delivery.

use alloc::collections::VecDeque;

use super::message::HvMessage;
use super::page::{Delivery, PageMem, SlotWriter};
use super::{SINT_COUNT, Sint, SynicError};

/// Result of [`VpMessageQueues::post`].
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PostOutcome {
    /// Whether this message is in its slot now or waits in the queue.
    pub delivery: Delivery,
    /// At least one message (this one or an earlier queued one) was written: raise the interrupt.
    pub interrupt: bool,
}

/// Messages waiting for the sixteen slots of one VP's message page.
#[derive(Debug)]
pub struct VpMessageQueues {
    vp: u32,
    depth: usize,
    queues: [VecDeque<HvMessage>; SINT_COUNT],
}

impl VpMessageQueues {
    /// Queues for VP `vp`, each holding at most `depth` messages besides the one in the slot.
    pub fn new(vp: u32, depth: usize) -> Self {
        VpMessageQueues {
            vp,
            depth,
            queues: core::array::from_fn(|_| VecDeque::new()),
        }
    }

    /// Messages waiting (not in a slot) for `sint`.
    pub fn queued(&self, sint: Sint) -> usize {
        self.queues[sint.index()].len()
    }

    /// Messages waiting for any SINT.
    pub fn total_queued(&self) -> usize {
        self.queues.iter().map(VecDeque::len).sum()
    }

    /// Sends `msg` to `sint`: straight into a free slot when nothing is queued before it, otherwise
    /// behind the queued ones (order is never broken). A busy slot gets its pending flag set.
    pub fn post<M: PageMem>(
        &mut self,
        slots: &SlotWriter<M>,
        sint: Sint,
        msg: HvMessage,
    ) -> Result<PostOutcome, SynicError> {
        let q = &mut self.queues[sint.index()];
        if q.is_empty() {
            return match slots.deliver(sint, &msg, false)? {
                Delivery::Delivered => Ok(PostOutcome {
                    delivery: Delivery::Delivered,
                    interrupt: true,
                }),
                Delivery::SlotBusy => {
                    q.push_back(msg);
                    Ok(PostOutcome {
                        delivery: Delivery::SlotBusy,
                        interrupt: false,
                    })
                }
            };
        }
        // Validate before queueing so the pump never meets a message the slot refuses.
        if msg.header.message_type == super::HVMSG_NONE {
            return Err(SynicError::NoneMessageType);
        }
        if msg.header.payload_size as usize > super::MAX_PAYLOAD {
            return Err(SynicError::PayloadTooLarge(
                msg.header.payload_size as usize,
            ));
        }
        if q.len() >= self.depth {
            return Err(SynicError::QueueFull {
                vp: self.vp,
                sint: sint.get(),
                depth: self.depth,
            });
        }
        q.push_back(msg);
        let delivered = Self::pump(q, slots, sint);
        Ok(PostOutcome {
            delivery: if q.is_empty() {
                Delivery::Delivered
            } else {
                Delivery::SlotBusy
            },
            interrupt: delivered > 0,
        })
    }

    /// Offers the head of each non-empty queue to its slot again (the guest wrote EOM). Returns how
    /// many messages were delivered; raise the interrupt if any.
    pub fn on_eom<M: PageMem>(&mut self, slots: &SlotWriter<M>) -> usize {
        let mut delivered = 0;
        for sint in Sint::all() {
            let q = &mut self.queues[sint.index()];
            if !q.is_empty() {
                delivered += Self::pump(q, slots, sint);
            }
        }
        delivered
    }

    /// Drops every queued message (partition reset, SIMP disabled for good).
    pub fn clear(&mut self) {
        self.queues.iter_mut().for_each(VecDeque::clear);
    }

    /// Delivers from the head while the slot takes messages. Normally at most one goes in (the slot
    /// is busy again right after), but a guest consuming concurrently can take more.
    fn pump<M: PageMem>(q: &mut VecDeque<HvMessage>, slots: &SlotWriter<M>, sint: Sint) -> usize {
        let mut delivered = 0;
        while let Some(head) = q.front() {
            let more = q.len() > 1;
            match slots.deliver(sint, head, more) {
                Ok(Delivery::Delivered) => {
                    q.pop_front();
                    delivered += 1;
                }
                Ok(Delivery::SlotBusy) => break,
                Err(e) => {
                    // Unreachable: messages are validated before they are queued.
                    tracing::error!(error = %e, "dropping undeliverable SynIC message");
                    q.pop_front();
                }
            }
        }
        delivered
    }
}

#[cfg(test)]
mod tests {
    use super::super::message::HVMSG_CHANNEL_MESSAGE;
    use super::super::page::{HeapPage, SlotReader};
    use super::*;

    fn m(seq: u32) -> HvMessage {
        HvMessage::new(HVMSG_CHANNEL_MESSAGE, &seq.to_le_bytes()).unwrap()
    }

    fn seq(t: super::super::page::Taken) -> u32 {
        let p = t.message.unwrap().payload;
        u32::from_le_bytes([p[0], p[1], p[2], p[3]])
    }

    #[test]
    fn fifo_with_pending_and_eom() {
        let page = HeapPage::new();
        let w = SlotWriter::new(&page);
        let r = SlotReader::new(&page);
        let mut q = VpMessageQueues::new(0, 8);
        let s = Sint::VMBUS;
        let o = q.post(&w, s, m(0)).unwrap();
        assert_eq!(o.delivery, Delivery::Delivered);
        assert!(o.interrupt);
        for i in 1..=8 {
            let o = q.post(&w, s, m(i)).unwrap();
            assert_eq!(o.delivery, Delivery::SlotBusy);
            assert!(!o.interrupt);
        }
        assert_eq!(q.queued(s), 8);
        assert!(matches!(
            q.post(&w, s, m(99)),
            Err(SynicError::QueueFull {
                vp: 0,
                sint: 2,
                depth: 8
            })
        ));
        for i in 0..=8 {
            let t = r.take(s).unwrap();
            assert_eq!(seq(t), i);
            assert_eq!(t.eom_needed, i < 8, "pending while more are queued");
            assert!(r.take(s).is_none(), "nothing until EOM");
            if t.eom_needed {
                assert_eq!(q.on_eom(&w), 1);
            }
        }
        assert_eq!(q.total_queued(), 0);
        assert_eq!(q.on_eom(&w), 0, "a spurious EOM is harmless");
    }

    #[test]
    fn freed_without_eom_still_keeps_order() {
        // The guest freed the slot but has not written EOM yet when the host posts again: the queued
        // head goes first.
        let page = HeapPage::new();
        let w = SlotWriter::new(&page);
        let r = SlotReader::new(&page);
        let mut q = VpMessageQueues::new(3, 4);
        let s = Sint::new(7).unwrap();
        q.post(&w, s, m(0)).unwrap();
        q.post(&w, s, m(1)).unwrap();
        assert_eq!(seq(r.take(s).unwrap()), 0);
        let o = q.post(&w, s, m(2)).unwrap();
        assert_eq!(o.delivery, Delivery::SlotBusy);
        assert!(o.interrupt, "message 1 went into the freed slot");
        assert_eq!(seq(r.take(s).unwrap()), 1);
        q.on_eom(&w);
        assert_eq!(seq(r.take(s).unwrap()), 2);
    }
}
