//! The in-process VMBus control plane both std harnesses run: the guest `Client` and the host
//! `Server` exchange messages directly (what the SynIC does in a partition), and channel opens and
//! closes go to whoever hosts the device.

use ringbuf::signal::Doorbell;
use std::collections::HashMap;
use vmbus_core::device::OpenChannelInfo;
use vmbus_core::guest::Client;
use vmbus_core::host::{HostAction, Server};

/// Channel work for the device host.
pub(crate) enum HostOp<'a> {
    /// Serve a channel the guest opened; `kick` is rung by the guest, `call` rings it.
    Open(OpenChannelInfo, &'a Doorbell, &'a Doorbell),
    Close(u32),
}

/// One exchange round: guest posts to the server, server actions to the guest or the device host
/// (a refused open fails the guest's open). Returns whether anything moved; errors name the
/// message the other side refused.
pub(crate) fn exchange<E: std::fmt::Display>(
    client: &mut Client,
    server: &mut Server,
    kicks: &HashMap<u32, Doorbell>,
    call: &Doorbell,
    host: &mut dyn FnMut(HostOp<'_>) -> Result<(), E>,
) -> Result<bool, String> {
    let mut moved = false;
    while let Some(p) = client.poll_post() {
        // Refusals are answered on the wire where the protocol has a status.
        let _ = server.handle_message(p.connection_id, &p.msg);
        moved = true;
    }
    while let Some(a) = server.poll_action() {
        moved = true;
        match a {
            HostAction::Send { msg, .. } => {
                client.handle_message(&msg).map_err(|e| e.to_string())?
            }
            HostAction::Open(info) => {
                let relid = info.relid;
                let ok = match kicks.get(&relid) {
                    Some(kick) => match host(HostOp::Open(info, kick, call)) {
                        Ok(()) => true,
                        Err(e) => {
                            tracing::warn!(relid, error = %e, "harness: device refused open");
                            false
                        }
                    },
                    None => false,
                };
                server.complete_open(relid, ok).map_err(|e| e.to_string())?;
            }
            HostAction::Close { relid } => {
                let _ = host(HostOp::Close(relid));
            }
            _ => {}
        }
    }
    Ok(moved)
}
