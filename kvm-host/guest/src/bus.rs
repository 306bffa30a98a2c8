//! The VMBus driver: vmbus-core's guest `Client` over HvPostMessage and the SINT 2 message slot.

use alloc::collections::VecDeque;
use core::sync::atomic::Ordering;

use vmbus_core::guest::{Client, ClientConfig, ClientEvent, hv_status};

use crate::arch::{self, SINT_COUNT};
use crate::hv;

/// How often a post answered "insufficient buffers" is retried.
const POST_RETRIES: u32 = 1000;

pub struct Bus {
    pub client: Client,
    events: VecDeque<ClientEvent>,
    /// Messages posted / received, posts retried.
    pub posted: u32,
    pub received: u32,
    pub retried: u32,
    pub refused: u32,
}

impl Bus {
    pub fn new() -> Bus {
        Bus {
            client: Client::new(ClientConfig::default()),
            events: VecDeque::new(),
            posted: 0,
            received: 0,
            retried: 0,
            refused: 0,
        }
    }

    /// Posts everything the client queued and feeds it every host message waiting in the slot.
    pub fn pump(&mut self) {
        while let Some(p) = self.client.poll_post() {
            let mut tries = 0;
            loop {
                let st = hv::post_message(p.connection_id, &p.msg) as u16;
                if st == hv_status::SUCCESS {
                    self.posted += 1;
                    break;
                }
                let transient =
                    st == hv_status::INSUFFICIENT_BUFFERS || st == hv_status::INSUFFICIENT_MEMORY;
                if transient && tries < POST_RETRIES {
                    tries += 1;
                    self.retried += 1;
                    core::hint::spin_loop();
                    continue;
                }
                // Only INITIATE_CONTACT failures change the client (it tries the next version).
                let _ = self.client.post_failed(st);
                break;
            }
        }
        while let Some(m) = hv::take_message() {
            self.received += 1;
            if m.message_type != 1 {
                continue;
            }
            if self.client.handle_message(&m.payload[..m.len]).is_err() {
                self.refused += 1;
            }
        }
        while let Some(e) = self.client.poll_event() {
            self.events.push_back(e);
        }
    }

    /// Waits (halting between SynIC interrupts) for the first event `want` accepts, and returns it.
    /// Other events stay queued.
    pub fn wait(&mut self, mut want: impl FnMut(&ClientEvent) -> bool) -> ClientEvent {
        loop {
            let seen = SINT_COUNT.load(Ordering::SeqCst);
            self.pump();
            if let Some(i) = self.events.iter().position(&mut want)
                && let Some(e) = self.events.remove(i)
            {
                return e;
            }
            arch::wait_sint(seen);
        }
    }
}
