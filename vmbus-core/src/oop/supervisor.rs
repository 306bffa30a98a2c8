//! The VMM side's keeper of one VSP process: starts it, remembers what it was given (memory table,
//! open channels with their eventfds), notices when it dies and brings it back with the same state.
//! The guest sees latency, not errors: ring positions live in guest memory, so the new process takes
//! up exactly where the old one stopped.

use super::socket::Connection;
use super::vmm::{VmmError, VspClient};
use super::wire::Region;
use crate::device::OpenChannelInfo;
use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Environment variable naming the VSP's end of the socket in the child.
pub const SOCKET_FD_ENV: &str = "VMBUS_VSP_SOCKET_FD";

/// Why supervising failed.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("starting the VSP: {0}")]
    Spawn(std::io::Error),
    #[error(transparent)]
    Vsp(#[from] VmmError),
    #[error("VSP failed {0} restarts in a row")]
    GaveUp(u32),
}

struct OpenChannel {
    info: OpenChannelInfo,
    kick: OwnedFd,
    call: OwnedFd,
    /// The event-flag target last accepted ([`Supervisor::signal_target`]), replayed on restart.
    target: Option<(u64, u32)>,
}

/// One supervised VSP process.
pub struct Supervisor {
    command: Box<dyn FnMut() -> Command + Send>,
    memory: Vec<(Region, OwnedFd)>,
    /// The in-flight journal, created once and handed to every process (it outlives them).
    inflight: std::fs::File,
    channels: BTreeMap<u32, OpenChannel>,
    gpadls: BTreeMap<u32, crate::gpadl::Gpadl>,
    timeout: Duration,
    child: Option<Child>,
    client: Option<VspClient>,
    /// Device state from the last [`Supervisor::refresh_state`], handed to every new process
    /// before its channels re-open (e.g. storvsp's negotiated protocol version).
    device_state: Option<Vec<u8>>,
    /// Sub-channel counts the VSP asked for that the VMM has not collected yet.
    subchannel_requests: Vec<u16>,
    /// Time from noticing a dead VSP to every channel re-opened, per restart.
    pub restarts: Vec<Duration>,
}

impl Supervisor {
    /// Starts a VSP with `command()` (called again for every restart) and hands it the memory
    /// table. `timeout` bounds every reply; a VSP that does not answer in time is restarted.
    pub fn start(
        command: impl FnMut() -> Command + Send + 'static,
        memory: Vec<(Region, OwnedFd)>,
        timeout: Duration,
    ) -> Result<Self, SupervisorError> {
        let inflight = ringbuf::mmap::ring_memfd("vsp-inflight", super::inflight::DEFAULT_SIZE)
            .map_err(SupervisorError::Spawn)?;
        let mut s = Supervisor {
            command: Box::new(command),
            memory,
            inflight,
            channels: BTreeMap::new(),
            gpadls: BTreeMap::new(),
            timeout,
            child: None,
            client: None,
            device_state: None,
            subchannel_requests: Vec::new(),
            restarts: Vec::new(),
        };
        s.spawn()?;
        Ok(s)
    }

    fn spawn(&mut self) -> Result<(), SupervisorError> {
        let (ours, theirs) = Connection::pair().map_err(SupervisorError::Spawn)?;
        ringbuf::mmap::set_inheritable(theirs.as_fd()).map_err(SupervisorError::Spawn)?;
        let mut cmd = (self.command)();
        cmd.env(SOCKET_FD_ENV, theirs.as_fd().as_raw_fd().to_string());
        let child = cmd.spawn().map_err(SupervisorError::Spawn)?;
        drop(theirs);
        self.child = Some(child);
        let mut client = VspClient::connect(ours, Some(self.timeout))?;
        let table: Vec<_> = self.memory.iter().map(|(r, f)| (*r, f.as_fd())).collect();
        client.set_memory(&table)?;
        client.set_inflight(super::inflight::DEFAULT_SIZE, self.inflight.as_fd())?;
        if let Some(state) = &self.device_state {
            client.restore(state)?;
        }
        for g in self.gpadls.values() {
            client.add_gpadl(g)?;
        }
        for ch in self.channels.values() {
            client.open(&ch.info, ch.kick.as_fd(), ch.call.as_fd())?;
            if ch.target.is_some() && !client.signal_target(ch.info.relid, ch.target)? {
                // A VSP without the feature only writes *call*; the VMM, which registered it as
                // an irqfd, would inject without the flag. Refuse it like a broken VSP.
                return Err(VmmError::Refused {
                    request: super::wire::ty::SIGNAL_TARGET,
                    relid: ch.info.relid,
                    status: 1,
                }
                .into());
            }
        }
        self.client = Some(client);
        Ok(())
    }

    /// Opens a channel in the VSP and remembers it for restarts.
    pub fn open(
        &mut self,
        info: OpenChannelInfo,
        kick: OwnedFd,
        call: OwnedFd,
    ) -> Result<(), SupervisorError> {
        let relid = info.relid;
        let ch = OpenChannel {
            info,
            kick,
            call,
            target: None,
        };
        let result = match self.client.as_mut() {
            Some(c) => c.open(&ch.info, ch.kick.as_fd(), ch.call.as_fd()),
            None => Ok(()),
        };
        self.collect_requests();
        match result {
            Ok(()) => {
                self.channels.insert(relid, ch);
                Ok(())
            }
            // The device refused: the guest's open fails, the VSP lives on.
            Err(e @ VmmError::Refused { .. }) => Err(e.into()),
            Err(e) => {
                // The VSP broke: restart it with the channel included.
                tracing::warn!(error = %e, "VSP failed during open; restarting");
                self.channels.insert(relid, ch);
                self.restart()
            }
        }
    }

    /// Forwards a GPADL to the VSP and remembers it for restarts.
    pub fn add_gpadl(&mut self, g: crate::gpadl::Gpadl) -> Result<(), SupervisorError> {
        let result = match self.client.as_mut() {
            Some(c) => c.add_gpadl(&g),
            None => Ok(()),
        };
        match result {
            Ok(()) => {
                self.gpadls.insert(g.handle, g);
                Ok(())
            }
            Err(e @ VmmError::Refused { .. }) => Err(e.into()),
            Err(e) => {
                tracing::warn!(error = %e, "VSP failed taking a GPADL; restarting");
                self.gpadls.insert(g.handle, g);
                self.restart()
            }
        }
    }

    /// Revokes a GPADL in the VSP and forgets it.
    pub fn remove_gpadl(&mut self, handle: u32) -> Result<(), SupervisorError> {
        if self.gpadls.remove(&handle).is_none() {
            return Ok(());
        }
        match self.client.as_mut().map(|c| c.remove_gpadl(handle)) {
            Some(Err(VmmError::Refused { .. })) | Some(Ok(())) | None => Ok(()),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "VSP failed revoking a GPADL; restarting");
                self.restart()
            }
        }
    }

    /// Tells the VSP where to set the channel's event flag before writing *call* (`None`: only
    /// write it), and remembers it for restarts. `Ok(true)` once the VSP applied it; `Ok(false)`
    /// if it refused or does not speak the message (the VMM keeps delivering the interrupts).
    pub fn signal_target(
        &mut self,
        relid: u32,
        target: Option<(u64, u32)>,
    ) -> Result<bool, SupervisorError> {
        let Some(ch) = self.channels.get_mut(&relid) else {
            return Ok(false);
        };
        let Some(client) = self.client.as_mut() else {
            return Ok(false);
        };
        match client.signal_target(relid, target) {
            Ok(applied) => {
                ch.target = if applied { target } else { None };
                Ok(applied)
            }
            Err(VmmError::Refused { .. }) => {
                ch.target = None;
                Ok(false)
            }
            Err(e) => {
                tracing::warn!(error = %e, "VSP failed taking a signal target; restarting");
                ch.target = None;
                self.restart().map(|()| false)
            }
        }
    }

    /// Closes a channel in the VSP and forgets it.
    pub fn close(&mut self, relid: u32) -> Result<(), SupervisorError> {
        if self.channels.remove(&relid).is_none() {
            return Ok(());
        }
        match self.client.as_mut().map(|c| c.close(relid)) {
            Some(Err(VmmError::Refused { .. })) | Some(Ok(())) | None => Ok(()),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "VSP failed during close; restarting");
                self.restart()
            }
        }
    }

    /// Fetches the device's state from the running VSP and keeps it for restarts. Call it once the
    /// guest has set the device up (and whenever that setup changes); a restarted VSP then resumes
    /// the guest's session instead of expecting a fresh handshake.
    pub fn refresh_state(&mut self) -> Result<(), SupervisorError> {
        let Some(client) = self.client.as_mut() else {
            return Ok(());
        };
        match client.save() {
            Ok(state) => {
                self.device_state = Some(state);
                self.collect_requests();
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "VSP failed to save its state; restarting");
                self.restart()
            }
        }
    }

    /// The state kept for restarts.
    pub fn device_state(&self) -> Option<&[u8]> {
        self.device_state.as_deref()
    }

    fn collect_requests(&mut self) {
        if let Some(c) = self.client.as_mut() {
            if let Err(e) = c.poll_requests() {
                // A dead or misbehaving VSP: the next request or `ensure_running` restarts it.
                tracing::warn!(error = %e, "VSP: reading its requests failed");
            }
            self.subchannel_requests
                .extend(c.take_subchannel_requests());
        }
    }

    /// Sub-channel counts the VSP's device asked the bus for (the VMM offers them through its
    /// VMBus server's `add_subchannels`).
    pub fn take_subchannel_requests(&mut self) -> Vec<u16> {
        self.collect_requests();
        std::mem::take(&mut self.subchannel_requests)
    }

    /// Whether the process is running (not exited).
    pub fn is_alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Restarts the VSP if it died. `Ok(true)` when it did.
    pub fn ensure_running(&mut self) -> Result<bool, SupervisorError> {
        if self.is_alive() {
            return Ok(false);
        }
        self.restart()?;
        Ok(true)
    }

    /// Kills the VSP hard (tests, and a VSP that stopped answering).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.client = None;
    }

    /// The process id of the running VSP.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn restart(&mut self) -> Result<(), SupervisorError> {
        let t = Instant::now();
        self.kill();
        let mut failures = 0;
        loop {
            match self.spawn() {
                Ok(()) => break,
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, failures, "VSP restart failed");
                    self.kill();
                    if failures >= 5 {
                        return Err(SupervisorError::GaveUp(failures));
                    }
                    std::thread::sleep(Duration::from_millis(10 << failures));
                }
            }
        }
        self.restarts.push(t.elapsed());
        tracing::info!(elapsed = ?t.elapsed(), channels = self.channels.len(), "VSP restarted");
        Ok(())
    }

    /// Stops the VSP: closes the connection (it exits when it sees EOF) and reaps it.
    pub fn shutdown(mut self) -> Option<std::process::ExitStatus> {
        self.client = None;
        self.child.take().and_then(|mut c| c.wait().ok())
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.kill();
    }
}

/// In a VSP process: the connection the supervisor passed, if this process was started by one.
///
/// # Safety
/// Call at most once per process: it takes ownership of the inherited descriptor.
pub unsafe fn connection_from_env() -> Option<Connection> {
    let fd: i32 = std::env::var(SOCKET_FD_ENV).ok()?.parse().ok()?;
    // SAFETY: F_GETFD only checks that the descriptor is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return None;
    }
    // SAFETY: open (checked) and, by the contract of this function, owned by nobody else.
    Some(Connection::from_fd(unsafe { OwnedFd::from_raw_fd(fd) }))
}
