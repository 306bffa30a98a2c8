//! The bare-metal Rust test guest (`kvm-host/guest`, built for `x86_64-unknown-none`) and the host
//! side of its protocol.
//!
//! The guest reports each step on COM1 as `ok <step> [detail]` or `FAIL <step> <detail>`, ends with
//! `done`, and writes its status to [`crate::EXIT_PORT`] (0 = every step passed). RCX selects the
//! scenario ([`MODE_PHASE1`], [`MODE_HOSTILE`], [`MODE_TRIPLE_FAULT`], [`MODE_VMBUS`],
//! [`MODE_VMBUS_HOSTILE`]).
//!
//! The host side for the phase-1 scenario is [`install_echo`] (an [`EchoHandler`] on two registered
//! test ports) plus [`queue_welcome`] (two SynIC messages queued before the guest enables its
//! SynIC, so the second one exercises the pending flag / EOM path).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::synic::{HostPort, PortKind, PortStatus, Sint, Synic, SynicError, SynicHandler};

/// Scenario: CPUID, guest OS id, hypercall page, SynIC messages/events, APs, emulator quirks.
pub const MODE_PHASE1: u64 = 0;
/// Scenario: bogus MSRs, malformed hypercalls, SIMP/SIEFP outside RAM, floods, stray I/O.
pub const MODE_HOSTILE: u64 = 1;
/// Scenario: the guest triple-faults on purpose.
pub const MODE_TRIPLE_FAULT: u64 = 2;
/// Scenario: VMBus end to end (connect, offers, SCSI disk I/O through vsc-guest's storvsc, NIC
/// with ARP/ping through vsc-guest's netvsc, teardown); the host runs a
/// [`crate::vmbus::VmbusHost`] with a storage controller and a NIC.
pub const MODE_VMBUS: u64 = 3;

/// Message port of the echo service: every posted message comes back on the poster's SINT 2.
pub const ECHO_MESSAGE_CONNECTION: u32 = 0x7E57;
/// Event port of the echo service: a signal sets [`ECHO_EVENT_FLAG`] in the signaller's SINT 2.
pub const ECHO_EVENT_CONNECTION: u32 = 0x7E58;
/// The event flag the echo service sets.
pub const ECHO_EVENT_FLAG: u32 = 5;
/// The two messages [`queue_welcome`] sends.
pub const WELCOME: [&[u8]; 2] = [b"welcome 1 from the host", b"welcome 2 from the host"];

/// Steps the phase-1 guest reports with 1 VP (plus `aps` with more).
pub const PHASE1_STEPS: &[&str] = &[
    "cpuid-hyperv",
    "cpuid-features",
    "guest-os-id",
    "vp-index",
    "time-ref-count",
    "hypercall-enable",
    "hypercall-bad-connection",
    "hypercall-bad-code",
    "synic-enable",
    "synic-welcome-1",
    "synic-welcome-2",
    "synic-echo",
    "synic-event",
    "emulator-quirks",
];

/// Scenario: a guest that misuses VMBus (malformed messages, GPADL outside RAM, refused opens, a
/// corrupted ring, a signal flood, UNLOAD with a channel open); the host must keep serving it.
pub const MODE_VMBUS_HOSTILE: u64 = 4;

/// Steps of the VMBus hostile scenario (after `hv-setup`, `vmbus-connect`, `vmbus-offers`).
pub const VMBUS_HOSTILE_STEPS: &[&str] = &[
    "garbage-messages",
    "gpadl-outside-ram",
    "open-refused",
    "ring-corruption",
    "reopen-after-corruption",
    "signal-flood",
    "unload-with-open-channel",
];

/// Steps of the VMBus scenario that need only the bus.
pub const VMBUS_STEPS: &[&str] = &[
    "hv-setup",
    "vmbus-connect",
    "vmbus-offers",
    "vmbus-teardown",
];
/// Steps of the VMBus scenario that prove disk I/O.
pub const STORAGE_STEPS: &[&str] = &[
    "storage-open",
    "storvsc-init",
    "scsi-probe",
    "scsi-inquiry",
    "scsi-read-capacity",
    "disk-write",
    "disk-read-verify",
];
/// Steps of the VMBus scenario that prove the network path.
pub const NET_STEPS: &[&str] = &["net-open", "netvsc-bringup", "net-arp", "net-ping"];

/// Steps of the hostile scenario.
pub const HOSTILE_STEPS: &[&str] = &[
    "msr-gp-readonly",
    "msr-gp-unknown",
    "msr-gp-reserved",
    "msr-gp-sint-vector",
    "simp-outside-ram",
    "siefp-outside-ram",
    "hypercall-outside-ram",
    "hypercall-enable",
    "hypercall-misaligned",
    "hypercall-straddle",
    "hypercall-gpa-hole",
    "hypercall-payload-size",
    "hypercall-message-type",
    "hypercall-rep-count",
    "hypercall-fast-post",
    "signal-bad-flag",
    "post-flood",
    "stray-io",
];

/// The test guest's host side: echoes every message posted to a registered message port back to
/// the poster's SINT 2, and answers every signal on a registered event port by setting
/// [`ECHO_EVENT_FLAG`] in the signaller's SINT 2. [`install_echo`] registers its two ports.
#[derive(Debug, Default)]
pub struct EchoHandler;

impl SynicHandler for EchoHandler {
    fn post_message(
        &self,
        synic: &Synic,
        vp: u32,
        _connection_id: u32,
        message_type: u32,
        payload: &[u8],
    ) -> Result<(), PortStatus> {
        match synic.send_message(vp, Sint::VMBUS, message_type, payload) {
            Ok(_) => Ok(()),
            Err(SynicError::QueueFull { .. }) => Err(PortStatus::InsufficientBuffers),
            Err(e) => {
                tracing::debug!("echo: {e}");
                Err(PortStatus::InvalidSynicState)
            }
        }
    }

    fn signal_event(
        &self,
        synic: &Synic,
        vp: u32,
        _connection_id: u32,
        _flag: u16,
    ) -> Result<(), PortStatus> {
        synic
            .signal_guest(vp, Sint::VMBUS, ECHO_EVENT_FLAG)
            .map(|_| ())
            .map_err(|_| PortStatus::InvalidSynicState)
    }
}

/// Registers [`ECHO_MESSAGE_CONNECTION`] / [`ECHO_EVENT_CONNECTION`] and installs [`EchoHandler`].
pub fn install_echo(synic: &Synic) -> Result<(), SynicError> {
    synic.register_port(ECHO_MESSAGE_CONNECTION, PortKind::Message)?;
    synic.register_port(ECHO_EVENT_CONNECTION, PortKind::Event)?;
    synic.set_handler(std::sync::Arc::new(EchoHandler));
    Ok(())
}

/// Queues the two [`WELCOME`] messages for VP 0, SINT 2 (before the guest runs).
pub fn queue_welcome(synic: &Synic) -> Result<(), SynicError> {
    for m in WELCOME {
        synic.post_to_guest(0, Sint::VMBUS, m)?;
    }
    Ok(())
}

/// Errors building the test guest.
#[derive(Debug, thiserror::Error)]
pub enum GuestBuildError {
    #[error("running cargo for the test guest: {0}")]
    Spawn(std::io::Error),
    #[error("cargo build of the test guest failed ({status}):\n{stderr}")]
    Failed { status: String, stderr: String },
}

/// The guest crate (`kvm-host/guest`).
pub fn guest_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("guest")
}

/// Default target directory for the guest build (`<workspace>/target/kvm-guest`).
pub fn default_target_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join("kvm-guest")
}

/// Code generation flags for the guest: no instructions this host's KVM emulator cannot execute
/// (POPCNT, CMPXCHG16B, XSAVE*, AVX, ...), static relocation model.
pub const GUEST_RUSTFLAGS: &[&str] = &[
    "-C",
    "target-feature=-popcnt,-cmpxchg16b,-sse3,-ssse3,-sse4.1,-sse4.2,-avx,-avx2,-xsave,-bmi1,-bmi2,-lzcnt,-movbe,-fxsr",
    "-C",
    "relocation-model=static",
];

/// Makes sure the guest's Rust target is installed (a fresh machine has only the host target).
/// Best effort: without rustup the build below reports the missing target itself.
fn ensure_guest_target() {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.trim() == "x86_64-unknown-none")
        });
    if let Ok(false) = installed {
        tracing::info!("installing the x86_64-unknown-none target for the test guest");
        let _ = Command::new("rustup")
            .args(["target", "add", "x86_64-unknown-none"])
            .status();
    }
}

/// Builds the test guest in release mode; returns the ELF path.
pub fn build_guest(target_dir: &Path) -> Result<PathBuf, GuestBuildError> {
    ensure_guest_target();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--target",
            "x86_64-unknown-none",
            "--manifest-path",
        ])
        .arg(guest_dir().join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env("CARGO_ENCODED_RUSTFLAGS", GUEST_RUSTFLAGS.join("\u{1f}"))
        .output()
        .map_err(GuestBuildError::Spawn)?;
    if !out.status.success() {
        return Err(GuestBuildError::Failed {
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(target_dir
        .join("x86_64-unknown-none")
        .join("release")
        .join("kvm-test-guest"))
}

/// A parsed serial transcript.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Transcript {
    /// `(step, detail)` of every `ok` line, in order.
    pub ok: Vec<(String, String)>,
    /// Every `FAIL` line.
    pub failed: Vec<String>,
    /// Whether `done` was printed.
    pub done: bool,
}

impl Transcript {
    pub fn parse(serial: &str) -> Transcript {
        let mut t = Transcript::default();
        for line in serial.lines() {
            let line = line.trim_end();
            if let Some(rest) = line.strip_prefix("ok ") {
                let (step, detail) = rest.split_once(' ').unwrap_or((rest, ""));
                t.ok.push((step.to_string(), detail.to_string()));
            } else if line.starts_with("FAIL") {
                t.failed.push(line.to_string());
            } else if line == "done" {
                t.done = true;
            }
        }
        t
    }

    /// Whether step `name` was reported ok.
    pub fn has(&self, name: &str) -> bool {
        self.ok.iter().any(|(s, _)| s == name)
    }

    /// The detail of step `name`.
    pub fn detail(&self, name: &str) -> Option<&str> {
        self.ok
            .iter()
            .find(|(s, _)| s == name)
            .map(|(_, d)| d.as_str())
    }

    /// Expected steps that are missing.
    pub fn missing<'a>(&self, expected: &[&'a str]) -> Vec<&'a str> {
        expected.iter().copied().filter(|s| !self.has(s)).collect()
    }
}
