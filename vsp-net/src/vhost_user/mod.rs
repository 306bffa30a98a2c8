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
mod worker;

use std::path::Path;
use std::sync::Arc;

use thiserror::Error;
use tracing::info;
use vhost::vhost_user::Listener;
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
        source: vhost::vhost_user::Error,
    },
    /// The vhost-user daemon failed (setup or the connection); its error type is not `Sync`.
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
    /// Setting up the device failed.
    #[error("vhost-user-net device: {0}")]
    Device(#[from] std::io::Error),
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
    pub fn listen(path: &Path) -> Result<Listener, VhostUserNetError> {
        Listener::new(path, true).map_err(|source| VhostUserNetError::Listen {
            path: path.display().to_string(),
            source,
        })
    }

    /// Accepts one frontend and serves it until it disconnects.
    pub fn serve_one(&self, listener: &mut Listener) -> Result<(), VhostUserNetError> {
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
            .and_then(|()| daemon.start(listener).map_err(daemon_err))
            .and_then(|()| {
                info!("vhost-user-net: frontend connected");
                match daemon.wait() {
                    // A frontend that quits mid-message is a disconnect too (as `serve` treats it).
                    Err(vhost_user_backend::Error::HandleRequest(
                        vhost::vhost_user::Error::Disconnected
                        | vhost::vhost_user::Error::PartialMessage,
                    )) => Ok(()),
                    r => r.map_err(daemon_err),
                }
            });
        dev.detach();
        info!(stats = ?self.stats.snapshot(), "vhost-user-net: frontend gone");
        r
    }

    /// Serves frontends one after another until `keep_going` says stop (checked between
    /// connections) or a connection fails in a way that is not a disconnect.
    pub fn serve(
        &self,
        listener: &mut Listener,
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
