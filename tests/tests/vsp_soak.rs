//! The storage VSP crash soak, shorter: storvsc random write-then-verify I/O against storvsp in a
//! supervised child process killed with SIGKILL at least 20 times; nothing may be lost, fail or
//! read back wrong. (The full soak with timings: `cargo run --release -p tests --bin vsp-soak`.)
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;
use tests::stor::path::{self, VspSetup};
use tests::stor::soak::{self, SoakConfig};

/// The VSP child: this test binary started again by the supervisor with only this test selected.
#[test]
fn vsp_child() {
    // Returns at once in a normal test run (no supervisor socket).
    path::serve_child().unwrap();
}

#[test]
fn storvsp_survives_20_sigkills_without_losing_or_corrupting_io() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("soak.raw");
    let cfg = SoakConfig {
        kills: 20,
        kill_interval: Duration::from_millis(100),
        slots: 8,
        stripe_blocks: 1024,
        limit: Duration::from_secs(90),
        drain: Duration::from_secs(20),
        ..SoakConfig::default()
    };
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(cfg.disk_bytes())
        .unwrap();
    let mut setup = VspSetup::new(&disk);
    setup.queues = 2;
    let exe = std::env::current_exe().unwrap();
    let command: path::ChildCommand = Box::new(move || {
        let mut c = Command::new(&exe);
        c.args(["--exact", "vsp_child", "--nocapture", "--test-threads=1"]);
        c
    });
    let mut h = path::start_child(&setup, 8192, command).unwrap();
    assert_eq!(h.channel_relids().len(), 2);
    let rep = soak::run(&mut h, &disk, &cfg).unwrap();
    eprintln!("{rep:?}");
    assert!(rep.kills >= 20, "kills {}", rep.kills);
    assert!(rep.restarts >= 20, "restarts {}", rep.restarts);
    assert_eq!(rep.lost, 0, "{:?}", rep.failures);
    assert_eq!(rep.io_errors, 0, "{:?}", rep.failures);
    assert_eq!(rep.verify_errors, 0, "{:?}", rep.failures);
    assert_eq!(rep.file_mismatches, 0);
    assert_eq!(rep.unknown, 0);
    assert_eq!(rep.submitted, rep.completed);
    assert!(rep.verified_reads > 0);
}
