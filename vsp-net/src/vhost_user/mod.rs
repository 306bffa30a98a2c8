//! vhost-user-net: the second front door (next to netvsp) onto the same TAP and switch ports.
//!
//! A standard virtio-net device served over a vhost-user socket with rust-vmm's
//! `vhost-user-backend`: features MAC, STATUS, MRG_RXBUF, CSUM/GUEST_CSUM, HOST/GUEST_TSO4/6,
//! HOST_ECN, MQ (one worker thread per queue pair), EVENT_IDX, VERSION_1, INDIRECT_DESC,
//! CTRL_VQ (RX mode, MAC table, MAC address, queue pairs), config space via GET_CONFIG.
//!
//! * The virtio-net header is the TAP's vnet header ([`crate::tap::vnet`]): frames and their
//!   offload metadata ([`crate::tap::FrameMeta`]) go to a [`port::TapPort`] or a
//!   [`port::SwitchPort`] unchanged; a switch port is the same kind netvsp NICs use.
//! * Every descriptor chain is hostile ([`chain`]): bad chains are used with length 0, counted in
//!   [`NetStats`] and logged; they never stop the device.
//! * Back-pressure: a worker reads the port only while the driver has RX buffers; a frame in hand
//!   when they run out is kept until the next RX kick.
//! * One [`device::VhostUserNet`] per frontend connection (vhost-user-backend's workers end with
//!   the connection); [`NetServer`] accepts the next frontend afterwards (QEMU `reconnect=`).

pub mod chain;
pub mod cli;
pub mod config;
pub mod ctrl;
pub mod device;
pub mod hdr;
pub mod port;
mod relay;
mod worker;

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;
use tracing::info;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

pub use device::{NetDeviceConfig, NetStats, NetStatsSnapshot, VhostUserNet};
pub use port::{FramePort, GuestOffloads, SharedPort, SwitchPort, TapPort};

/// Errors of the vhost-user-net server.
#[derive(Debug, Error)]
pub enum VhostUserNetError {
    /// Creating the listening socket failed.
    #[error("vhost-user socket {path}: {source}")]
    Listen {
        /// Socket path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The vhost-user daemon failed (setup or the connection); its error type is not `Sync`.
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
    /// Setting up the device failed.
    #[error("vhost-user-net device: {0}")]
    Device(#[from] std::io::Error),
}

/// The listening vhost-user socket (removed on drop).
#[derive(Debug)]
pub struct NetListener {
    listener: UnixListener,
    path: PathBuf,
    inner: PathBuf,
}

impl Drop for NetListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Serves one NIC on a socket, one frontend after another.
#[derive(Debug)]
pub struct NetServer {
    cfg: NetDeviceConfig,
    port: SharedPort,
    stats: Arc<NetStats>,
}

impl NetServer {
    /// A server for a NIC attached to `port`.
    pub fn new(cfg: NetDeviceConfig, port: Box<dyn FramePort>) -> Self {
        Self {
            cfg,
            port: SharedPort::new(port),
            stats: Arc::new(NetStats::default()),
        }
    }

    /// Counters (shared, live).
    pub fn stats(&self) -> Arc<NetStats> {
        self.stats.clone()
    }

    /// The port (e.g. to look at a switch port's counters).
    pub fn port(&self) -> SharedPort {
        self.port.clone()
    }

    /// Binds `path` (replacing a stale socket).
    pub fn listen(path: &Path) -> Result<NetListener, VhostUserNetError> {
        let err = |source| VhostUserNetError::Listen {
            path: path.display().to_string(),
            source,
        };
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(err)?;
        let mut inner = path.as_os_str().to_owned();
        inner.push(".backend");
        Ok(NetListener {
            listener,
            path: path.to_owned(),
            inner: PathBuf::from(inner),
        })
    }

    /// Accepts one frontend and serves it until it disconnects.
    pub fn serve_one(&self, listener: &mut NetListener) -> Result<(), VhostUserNetError> {
        let (front, _) = listener.listener.accept()?;
        info!("vhost-user-net: frontend connected");
        let dev = Arc::new(VhostUserNet::new(
            self.cfg.clone(),
            self.port.clone(),
            self.stats.clone(),
        )?);
        let mut daemon = VhostUserDaemon::new(
            "vhost-user-net".to_owned(),
            dev.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(daemon_err)?;
        let r = dev
            .attach(daemon.get_epoll_handlers())
            .map_err(VhostUserNetError::from)
            .and_then(|()| self.connect_backend(listener, &mut daemon))
            .and_then(|back| {
                // The relay ends when either side hangs up; the library then sees its socket close.
                let relay = std::thread::Builder::new()
                    .name("vhost-user-net-relay".into())
                    .spawn(move || relay::run(front, back))?;
                let r = match daemon.wait() {
                    // A frontend that quits mid-message is a disconnect too (as `serve` treats it).
                    Err(vhost_user_backend::Error::HandleRequest(
                        vhost::vhost_user::Error::Disconnected
                        | vhost::vhost_user::Error::PartialMessage,
                    )) => Ok(()),
                    r => r.map_err(daemon_err),
                };
                if let Ok(Err(e)) = relay.join() {
                    info!(error = %e, "vhost-user-net: relay ended");
                }
                r
            });
        dev.detach();
        info!(stats = ?self.stats.snapshot(), "vhost-user-net: frontend gone");
        r
    }

    /// Lets vhost-user-backend connect to a private socket next to the public one and returns our
    /// end of that connection.
    fn connect_backend(
        &self,
        listener: &NetListener,
        daemon: &mut VhostUserDaemon<Arc<VhostUserNet>>,
    ) -> Result<UnixStream, VhostUserNetError> {
        let _ = std::fs::remove_file(&listener.inner);
        let inner = UnixListener::bind(&listener.inner)?;
        let path = listener.inner.to_string_lossy().into_owned();
        // connect() completes from the backlog, so the library's client start does not wait for
        // our accept.
        let r = daemon.start_client(&path).map_err(daemon_err);
        let _ = std::fs::remove_file(&listener.inner);
        r?;
        Ok(inner.accept()?.0)
    }

    /// Serves frontends one after another until `keep_going` says stop (checked between
    /// connections) or a connection fails in a way that is not a disconnect.
    pub fn serve(
        &self,
        listener: &mut NetListener,
        keep_going: &dyn Fn() -> bool,
    ) -> Result<(), VhostUserNetError> {
        while keep_going() {
            self.serve_one(listener)?;
        }
        Ok(())
    }
}

fn daemon_err(e: vhost_user_backend::Error) -> VhostUserNetError {
    VhostUserNetError::Daemon(e.to_string())
}
