//! The guest→host inbox: posted messages (bounded FIFO; full ⇒ `HV_STATUS_INSUFFICIENT_BUFFERS`)
//! and signalled event ports (coalescing set), read by the host through [`HostInbox`].

use std::collections::{HashSet, VecDeque};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use vmbus_core::synic::{HostInbox, Payload, PostedMessage, SynicError};

use super::{PortStatus, Synic, lock};

#[derive(Debug, Default)]
struct State {
    messages: VecDeque<PostedMessage>,
    events: Vec<u32>,
    pending_events: HashSet<u32>,
    /// Something arrived since the last `wait` returned.
    rung: bool,
}

#[derive(Debug)]
pub(super) struct Inbox {
    depth: usize,
    state: Mutex<State>,
    cv: Condvar,
}

impl Inbox {
    pub(super) fn new(depth: usize) -> Inbox {
        Inbox {
            depth: depth.max(1),
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
        }
    }

    pub(super) fn post(&self, connection_id: u32, payload: &[u8]) -> Result<(), PortStatus> {
        let payload = Payload::new(payload).ok_or(PortStatus::InvalidParameter)?;
        let mut st = lock(&self.state);
        if st.messages.len() >= self.depth {
            return Err(PortStatus::InsufficientBuffers);
        }
        st.messages.push_back(PostedMessage {
            connection_id,
            payload,
        });
        st.rung = true;
        self.cv.notify_all();
        Ok(())
    }

    pub(super) fn signal(&self, connection_id: u32) {
        let mut st = lock(&self.state);
        if st.pending_events.insert(connection_id) {
            st.events.push(connection_id);
            st.rung = true;
            self.cv.notify_all();
        }
    }
}

impl HostInbox for Synic {
    fn recv_message(&self) -> Result<Option<PostedMessage>, SynicError> {
        Ok(lock(&self.inbox.state).messages.pop_front())
    }

    fn take_events(&self, f: &mut dyn FnMut(u32)) -> Result<usize, SynicError> {
        let events = {
            let mut st = lock(&self.inbox.state);
            st.pending_events.clear();
            std::mem::take(&mut st.events)
        };
        events.iter().for_each(|&id| f(id));
        Ok(events.len())
    }

    /// Sleeps until the guest posts or signals (EOMs are handled on the vCPU thread and never wake
    /// this), or `timeout` passes (`Ok(false)`).
    fn wait(&self, timeout: Option<Duration>) -> Result<bool, SynicError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut st = lock(&self.inbox.state);
        loop {
            if st.rung || !st.messages.is_empty() || !st.events.is_empty() {
                st.rung = false;
                return Ok(true);
            }
            let wait = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => left,
                    _ => return Ok(false),
                },
                None => Duration::from_secs(3600),
            };
            st = self
                .inbox
                .cv
                .wait_timeout(st, wait)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}
