//! `vsp-net vhost-user-net`: serve a virtio NIC on a vhost-user socket, attached to a TAP or to
//! an in-process switch (optionally with a TAP uplink); listen again after each frontend.

use std::path::PathBuf;

use anyhow::{Context, bail};
use tracing::info;

use super::{NetDeviceConfig, NetServer, SwitchPort, TapPort};
use crate::switch::uplink::{TapUplink, UplinkOptions};
use crate::switch::{MacAddr, PortConfig, Switch};
use crate::tap::netns::netns_path;
use crate::tap::{Tap, TapConfig};

/// Arguments of `vsp-net vhost-user-net`.
#[derive(Debug, Clone, clap::Args)]
pub struct VhostUserNetArgs {
    /// vhost-user socket path to listen on (replaced if stale).
    #[arg(long)]
    pub socket: PathBuf,
    /// Attach the NIC to this TAP (created if missing, brought up).
    #[arg(long, conflicts_with = "switch", required_unless_present = "switch")]
    pub tap: Option<String>,
    /// Create/open the TAP inside this network namespace (`ip netns` name).
    #[arg(long, requires = "tap")]
    pub netns: Option<String>,
    /// Attach the NIC to an in-process learning switch instead.
    #[arg(long)]
    pub switch: bool,
    /// Give the switch an uplink to this TAP.
    #[arg(long, requires = "switch")]
    pub uplink_tap: Option<String>,
    /// Guest MAC (config space), e.g. 52:54:00:12:34:56.
    #[arg(long, value_parser = parse_mac)]
    pub mac: Option<MacAddr>,
    /// Queue pairs (1..=16).
    #[arg(long, default_value_t = 1)]
    pub queues: u16,
    /// MTU to advertise to the guest (VIRTIO_NET_F_MTU).
    #[arg(long)]
    pub mtu: Option<u16>,
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<MacAddr, String> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts
            .next()
            .ok_or_else(|| format!("MAC {s:?}: too short"))?;
        *b = u8::from_str_radix(p, 16).map_err(|e| format!("MAC {s:?}: {e}"))?;
    }
    if parts.next().is_some() {
        return Err(format!("MAC {s:?}: too long"));
    }
    if mac[0] & 1 != 0 {
        return Err(format!("MAC {s:?} is a group address"));
    }
    Ok(mac)
}

/// Runs the daemon until killed (SIGTERM's default action ends it; nothing is left to flush).
pub fn run(args: VhostUserNetArgs) -> anyhow::Result<()> {
    if !(1..=16).contains(&args.queues) {
        bail!("--queues must be 1..=16");
    }
    let cfg = NetDeviceConfig {
        mac: args.mac.unwrap_or(NetDeviceConfig::default().mac),
        pairs: args.queues,
        mtu: args.mtu,
        ..NetDeviceConfig::default()
    };
    // Kept alive for the daemon's life.
    let mut _uplink = None;
    let server = if let Some(name) = &args.tap {
        let tap = Tap::open(&TapConfig {
            up: true,
            netns: args.netns.as_deref().map(netns_path),
            ..TapConfig::named(name)
        })
        .with_context(|| format!("opening TAP {name}"))?;
        info!(tap = %tap.name(), "vhost-user-net on a TAP");
        NetServer::new(cfg.clone(), Box::new(TapPort(tap)))
    } else {
        let sw = Switch::default();
        if let Some(name) = &args.uplink_tap {
            let tap = Tap::open(&TapConfig {
                up: true,
                ..TapConfig::named(name)
            })
            .with_context(|| format!("opening uplink TAP {name}"))?;
            let port = sw.add_port(PortConfig::uplink(name))?;
            _uplink = Some(TapUplink::spawn(tap, port, UplinkOptions::default())?);
        }
        let port = SwitchPort::new(&sw, "virtio-net0", cfg.mac)?;
        info!("vhost-user-net on the in-process switch");
        NetServer::new(cfg.clone(), Box::new(port))
    };
    let mut listener = NetServer::listen(&args.socket)?;
    info!(socket = %args.socket.display(), queues = cfg.pairs, "vhost-user-net listening");
    server.serve(&mut listener, &|| true)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("52:54:00:ab:CD:01"),
            Ok([0x52, 0x54, 0, 0xab, 0xcd, 1])
        );
        assert!(parse_mac("52:54:00:ab:cd").is_err());
        assert!(parse_mac("52:54:00:ab:cd:01:02").is_err());
        assert!(parse_mac("01:00:5e:00:00:01").is_err());
        assert!(parse_mac("zz:54:00:ab:cd:01").is_err());
    }
}
