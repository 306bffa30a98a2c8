//! Network-namespace helpers: run a closure inside a namespace on a short-lived thread.
//!
//! `setns(CLONE_NEWNET)` changes only the calling thread, and sockets and TAP devices stay in the
//! namespace they were created in, so a TAP (or socket) opened by [`run_in_netns`] can be used from
//! any thread afterwards.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use super::sys;

/// Where `ip netns add NAME` mounts the namespace.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

/// Runs `f` on a helper thread that has joined the network namespace at `ns_path`
/// (`/run/netns/NAME` or `/proc/PID/ns/net`). A panic in `f` is propagated.
pub fn run_in_netns<T: Send>(ns_path: &Path, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    let ns = File::open(ns_path)?;
    run_in_netns_fd(ns.into(), f)
}

/// Like [`run_in_netns`] with an already open namespace descriptor.
pub fn run_in_netns_fd<T: Send>(ns: OwnedFd, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    std::thread::scope(|s| {
        let h = s.spawn(move || -> io::Result<T> {
            sys::setns_net(ns.as_fd())?;
            Ok(f())
        });
        match h.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}
