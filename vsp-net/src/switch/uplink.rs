//! A TAP attached to a switch port: one thread moves frames both ways, sleeping in `poll` on the
//! TAP descriptor, the port's notification eventfd and a stop eventfd.
//!
//! Frames keep their offload metadata end to end (TAP super-frames and partial checksums cross
//! the switch untouched), unless [`UplinkOptions`] asks to segment or complete checksums before
//! writing to the TAP.

use std::io;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use tracing::{debug, warn};

use super::PortHandle;
use crate::tap::{EventFd, Tap, TapError, sys};

/// How the pump treats frames going to the TAP.
#[derive(Clone, Copy, Debug)]
pub struct UplinkOptions {
    /// Segment super-frames in software instead of handing them to the kernel.
    pub segment_gso: bool,
    /// Complete pending checksums in software.
    pub complete_csum: bool,
    /// Frames moved per direction before checking the other one.
    pub budget: usize,
}

impl Default for UplinkOptions {
    fn default() -> Self {
        Self {
            segment_gso: false,
            complete_csum: false,
            budget: 64,
        }
    }
}

/// Counters of the pump itself (the TAP and the port keep their own).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UplinkStats {
    /// Frames read from the TAP and given to the switch.
    pub to_switch: u64,
    /// Frames written to the TAP.
    pub to_tap: u64,
    /// Frames the TAP refused (counted, dropped).
    pub tap_errors: u64,
}

/// The pump thread; stops (and joins) on [`TapUplink::stop`] or drop.
#[derive(Debug)]
pub struct TapUplink {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<(Tap, PortHandle, UplinkStats)>>,
}

impl TapUplink {
    /// Starts moving frames between `tap` and `port`.
    pub fn spawn(tap: Tap, port: PortHandle, opts: UplinkOptions) -> io::Result<Self> {
        let stop = Arc::new(EventFd::new()?);
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("uplink-{}", port.name()))
            .spawn(move || run(tap, port, &s, opts))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread and returns the TAP, the port and the pump counters.
    pub fn stop(mut self) -> Option<(Tap, PortHandle, UplinkStats)> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Option<(Tap, PortHandle, UplinkStats)> {
        self.stop.signal();
        self.thread.take()?.join().ok()
    }
}

impl Drop for TapUplink {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}

fn run(
    mut tap: Tap,
    mut port: PortHandle,
    stop: &EventFd,
    opts: UplinkOptions,
) -> (Tap, PortHandle, UplinkStats) {
    let mut st = UplinkStats::default();
    let budget = opts.budget.max(1);
    loop {
        let ready = match sys::poll_readable([tap.as_fd(), port.notify_fd(), stop.as_fd()], None) {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "uplink: poll failed; stopping");
                break;
            }
        };
        if ready[2] {
            break;
        }
        // Kernel → switch.
        for _ in 0..budget {
            match tap.recv() {
                Ok(Some((frame, meta))) => {
                    port.send(frame, &meta);
                    st.to_switch += 1;
                }
                Ok(None) => break,
                Err(e) => {
                    warn!(error = %e, "uplink: TAP read failed");
                    break;
                }
            }
        }
        // Switch → kernel.
        port.poll_recv_with(
            budget,
            opts.segment_gso,
            opts.complete_csum,
            &mut |frame, meta| match tap.send(frame, meta) {
                Ok(()) => st.to_tap += 1,
                Err(TapError::WouldBlock) => st.tap_errors += 1,
                Err(e) => {
                    st.tap_errors += 1;
                    debug!(error = %e, "uplink: TAP refused a frame");
                }
            },
        );
    }
    (tap, port, st)
}
