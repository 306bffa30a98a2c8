//! The network VSP daemon: `vsp-net serve` runs netvsp as its own process for the VMM's
//! supervisor (see `vsp_net::netvsp::daemon`).

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "vsp-net",
    about = "Network VSP daemon (netvsp) for VMBus partitions"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a synthetic NIC on the socket the supervisor passed.
    Serve(vsp_net::netvsp::daemon::ServeArgs),
    /// Serve a virtio NIC on a vhost-user socket (TAP or in-process switch backend).
    VhostUserNet(vsp_net::vhost_user::cli::VhostUserNetArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Serve(args) => vsp_net::netvsp::daemon::serve(args),
        Command::VhostUserNet(args) => vsp_net::vhost_user::cli::run(args),
    }
}
