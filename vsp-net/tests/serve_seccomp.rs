//! The `vsp-net serve` binary runs under its seccomp allow-list: a forbidden call after setup
//! kills it with `EXIT_FORBIDDEN` and names the call; `--no-seccomp` lets the same call through;
//! with the filter on and no probe it serves the VMM (handshake, memory table).
#![allow(clippy::unwrap_used)]

use std::os::fd::{AsFd, AsRawFd};
use std::process::{Command, Stdio};
use std::time::Duration;
use vmbus_core::oop::{Connection, Region, SOCKET_FD_ENV, VspClient, seccomp};

/// The daemon's command with its end of a fresh socket pair (drop `theirs` once spawned).
fn daemon(extra: &[&str], probe: Option<&str>) -> (Connection, Connection, Command) {
    let (ours, theirs) = Connection::pair().unwrap();
    ringbuf::mmap::set_inheritable(theirs.as_fd()).unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_vsp-net"));
    c.args(["serve", "--switch"])
        .args(extra)
        .env(SOCKET_FD_ENV, theirs.as_fd().as_raw_fd().to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(p) = probe {
        c.env(seccomp::SELFTEST_ENV, p);
    }
    (ours, theirs, c)
}

#[test]
fn serve_dies_on_a_forbidden_call_and_serves_otherwise() {
    for (probe, nr) in [("socket", libc::SYS_socket), ("execve", libc::SYS_execve)] {
        let (_ours, theirs, mut c) = daemon(&[], Some(probe));
        let child = c.spawn().unwrap();
        drop(theirs);
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(seccomp::EXIT_FORBIDDEN),
            "{probe}: {err}"
        );
        assert!(
            err.contains(&format!("forbidden system call {nr}")),
            "{probe}: {err}"
        );
    }
    // With and without the filter (no probe) the daemon serves until we hang up.
    for extra in [&["--no-seccomp"][..], &[][..]] {
        let (ours, theirs, mut c) = daemon(extra, None);
        let mut child = c.spawn().unwrap();
        drop(theirs);
        let mut client = VspClient::connect(ours, Some(Duration::from_secs(10))).unwrap();
        let ram = ringbuf::mmap::ring_memfd("seccomp-ram", 1 << 20).unwrap();
        let region = Region {
            gpa: 0,
            size: 1 << 20,
            fd_offset: 0,
        };
        client.set_memory(&[(region, ram.as_fd())]).unwrap();
        drop(client);
        let status = child.wait().unwrap();
        assert!(status.success(), "{extra:?}: {status:?}");
    }
}
