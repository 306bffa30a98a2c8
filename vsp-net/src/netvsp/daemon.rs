//! `vsp-net serve`: netvsp as its own process, serving one synthetic NIC to the VMM over the
//! out-of-process protocol (`vmbus_core::oop`). Started (and restarted after a crash) by the VMM's
//! supervisor, which passes the socket in `VMBUS_VSP_SOCKET_FD`.
//!
//! ```text
//! vsp-net serve (--tap NAME [--netns NAME] | --switch [--uplink-tap NAME]) [--mac MAC]
//!               [--instance GUID] [--queues N] [--no-seccomp]
//! ```
//!
//! Attach to a persistent TAP (`ip tuntap add NAME mode tap vnet_hdr`) so the host side's
//! configuration survives daemon restarts; a TAP the daemon creates disappears with it.

use super::{HostedNetvsp, NetvspConfig};
use crate::backend::NetBackend;
use crate::switch::uplink::{TapUplink, UplinkOptions};
use crate::switch::{PortConfig, Switch, SwitchConfig};
use crate::tap::net_backend::TapBackend;
use crate::tap::netns::netns_path;
use crate::tap::{Tap, TapConfig};
use anyhow::{Context, bail};
use vmbus_core::device::ChannelControl;
use vmbus_core::oop::{Connection, Message, seccomp};
use vmbus_core::wire::Guid;

/// Options of `vsp-net serve`.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Attach the NIC to this TAP interface.
    #[arg(long, conflicts_with = "switch", required_unless_present = "switch")]
    pub tap: Option<String>,
    /// Network namespace (`/run/netns/NAME`) the TAP lives in.
    #[arg(long, requires = "tap")]
    pub netns: Option<String>,
    /// Attach the NIC to an in-process learning switch instead of a TAP.
    #[arg(long)]
    pub switch: bool,
    /// Connect the switch to the host through this TAP.
    #[arg(long, requires = "switch")]
    pub uplink_tap: Option<String>,
    /// The NIC's permanent MAC address (default: derived from the instance GUID).
    #[arg(long)]
    pub mac: Option<String>,
    /// NIC instance GUID (keep it stable across restarts).
    #[arg(long, default_value = "9a3f8c52-0d1e-4b6a-8f00-000000000001")]
    pub instance: String,
    /// Most queues (primary + sub-channels).
    #[arg(long, default_value_t = 8)]
    pub queues: u16,
    /// Do not install the steady-state seccomp allow-list.
    #[arg(long)]
    pub no_seccomp: bool,
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> anyhow::Result<[u8; 6]> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    let [a, b, c, d, e, f] = parts.as_slice() else {
        bail!("MAC {s:?}: six hex bytes expected");
    };
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip([a, b, c, d, e, f]) {
        *m = u8::from_str_radix(p, 16).with_context(|| format!("MAC {s:?}"))?;
    }
    if mac[0] & 1 != 0 {
        bail!("MAC {s:?} is multicast");
    }
    Ok(mac)
}

/// A stable locally administered unicast MAC from the instance GUID.
fn mac_from_instance(g: &Guid) -> [u8; 6] {
    let b = g.data4;
    [0x02, 0x15, 0x5d, b[5], b[6], b[7]]
}

/// Offers sub-channels by asking the VMM over (a clone of) the VSP connection; the VMM collects
/// the request with its next reply.
struct VmmSubchannels(Connection);

impl ChannelControl for VmmSubchannels {
    fn offer_subchannels(&mut self, count: u16) -> u16 {
        match self.0.send(&Message::OfferSubchannels { count }, &[]) {
            Ok(()) => count,
            Err(e) => {
                tracing::warn!(error = %e, "vsp-net: sub-channel request not sent");
                0
            }
        }
    }
}

/// Runs `vsp-net serve`.
pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // SAFETY: the supervisor passed this socket to this process only; it is taken once, here.
    let Some(conn) = (unsafe { vmbus_core::oop::connection_from_env() }) else {
        bail!("no socket: start me through the VMM's supervisor (it sets VMBUS_VSP_SOCKET_FD)");
    };
    let instance: Guid = args
        .instance
        .parse()
        .map_err(|e| anyhow::anyhow!("--instance: {e:?}"))?;
    let mac = match &args.mac {
        Some(m) => parse_mac(m)?,
        None => mac_from_instance(&instance),
    };
    let mut _keep: Option<(Switch, Option<TapUplink>)> = None;
    let backend: Box<dyn NetBackend> = if let Some(name) = &args.tap {
        let mut cfg = TapBackend::recommended_config(name);
        cfg.netns = args.netns.as_deref().map(netns_path);
        Box::new(TapBackend::open(&cfg, mac).with_context(|| format!("opening TAP {name:?}"))?)
    } else {
        let switch = Switch::new(SwitchConfig::default());
        let port = switch
            .add_port(PortConfig::nic("netvsp", mac))
            .context("switch port")?;
        let uplink = match &args.uplink_tap {
            Some(name) => {
                let tap = Tap::open(&TapConfig {
                    up: true,
                    ..TapConfig::named(name)
                })
                .with_context(|| format!("opening uplink TAP {name:?}"))?;
                let up = switch
                    .add_port(PortConfig::uplink(name))
                    .context("uplink port")?;
                Some(TapUplink::spawn(tap, up, UplinkOptions::default()).context("uplink")?)
            }
            None => None,
        };
        _keep = Some((switch, uplink));
        Box::new(port)
    };
    let sub_conn = Connection::from_fd(
        std::os::fd::AsFd::as_fd(&conn)
            .try_clone_to_owned()
            .context("cloning the VMM socket")?,
    );
    let cfg = NetvspConfig {
        instance,
        max_queues: args.queues.clamp(1, 64),
        mac: Some(mac),
        ..NetvspConfig::default()
    };
    let mut dev = HostedNetvsp::new(cfg, backend, Some(Box::new(VmmSubchannels(sub_conn))));
    if !args.no_seccomp {
        seccomp::install(&seccomp::net_syscalls()).context("seccomp")?;
        seccomp::selftest_from_env();
    }
    tracing::info!(
        tap = ?args.tap,
        netns = ?args.netns,
        switch = args.switch,
        mac = ?mac,
        seccomp = !args.no_seccomp,
        "vsp-net serving"
    );
    vmbus_core::oop::serve(&conn, &mut dev).context("serving the VMM")?;
    let s = dev.stats();
    tracing::info!(?s, "vsp-net: VMM closed the connection");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("00:15:5d:01:02:0a").unwrap(),
            [0, 0x15, 0x5d, 1, 2, 10]
        );
        assert!(parse_mac("01:15:5d:01:02:0a").is_err());
        assert!(parse_mac("00:15:5d:01:02").is_err());
        assert!(parse_mac("00:15:5d:01:02:zz").is_err());
    }
}
