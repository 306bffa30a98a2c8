//! The listening socket: accepts one frontend at a time, serves it until it disconnects, then
//! listens again (so QEMU's `reconnect=` and a restarted frontend both work).

use super::device::BlkDevice;
use super::handler::BlkBackend;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use vhost::vhost_user::{BackendReqHandler, Error as VuError, Listener};

/// Stops a running [`BlkServer::serve`] from another thread.
#[derive(Clone, Default)]
pub struct StopHandle {
    stop: Arc<AtomicBool>,
    conn: Arc<Mutex<Option<UnixStream>>>,
}

impl StopHandle {
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        if let Ok(c) = self.conn.lock()
            && let Some(c) = c.as_ref()
        {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }
}

/// A vhost-user-blk socket.
pub struct BlkServer {
    listener: Listener,
    dev: Arc<BlkDevice>,
    stop: StopHandle,
}

impl BlkServer {
    /// Binds `path` (an existing socket file is replaced).
    pub fn bind(path: &Path, dev: Arc<BlkDevice>) -> io::Result<Self> {
        let listener = Listener::new(path, true).map_err(io::Error::other)?;
        listener.set_nonblocking(true).map_err(io::Error::other)?;
        Ok(BlkServer {
            listener,
            dev,
            stop: StopHandle::default(),
        })
    }

    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// Serves frontends one after the other until stopped.
    pub fn serve(&mut self) -> io::Result<()> {
        while !self.stop.stopped() {
            self.serve_one()?;
        }
        Ok(())
    }

    /// Waits for one frontend and serves it until it disconnects (or the server is stopped).
    pub fn serve_one(&mut self) -> io::Result<()> {
        let stream = loop {
            if self.stop.stopped() {
                return Ok(());
            }
            match self.listener.accept().map_err(io::Error::other)? {
                Some(s) => break s,
                None => wait_readable(self.listener.as_raw_fd(), 100),
            }
        };
        stream.set_nonblocking(false)?;
        *self
            .stop
            .conn
            .lock()
            .map_err(|_| io::Error::other("poisoned"))? = Some(stream.try_clone()?);
        tracing::info!("vhost-user frontend connected");
        let backend = Arc::new(Mutex::new(BlkBackend::new(Arc::clone(&self.dev))));
        let mut handler = BackendReqHandler::from_stream(stream, Arc::clone(&backend));
        loop {
            match handler.handle_request() {
                Ok(()) => {}
                Err(VuError::Disconnected | VuError::PartialMessage) => {
                    tracing::info!("vhost-user frontend disconnected");
                    break;
                }
                Err(VuError::SocketBroken(e)) => {
                    tracing::info!(error = %e, "vhost-user connection closed");
                    break;
                }
                Err(e @ (VuError::InvalidOperation(_) | VuError::ReqHandlerError(_))) => {
                    // The request was refused (and acked as failed); the connection lives on.
                    tracing::debug!(error = %e, "request refused");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "vhost-user protocol error; dropping the frontend");
                    break;
                }
            }
            if self.stop.stopped() {
                break;
            }
        }
        if let Ok(mut b) = backend.lock() {
            b.stop_all();
        }
        *self
            .stop
            .conn
            .lock()
            .map_err(|_| io::Error::other("poisoned"))? = None;
        Ok(())
    }
}

fn wait_readable(fd: i32, ms: i32) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut p, 1, ms) };
}
