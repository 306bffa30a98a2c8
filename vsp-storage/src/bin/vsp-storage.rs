//! The storage VSP as its own process: serves one synthetic SCSI controller with one disk to the VMM
//! over the out-of-process protocol (`vmbus_core::oop`). Started by the VMM's supervisor, which
//! passes the socket in `VMBUS_VSP_SOCKET_FD`; restarted by it after a crash.
//!
//! ```text
//! vsp-storage serve --disk disk.vhd [--format auto|raw|vhd] [--read-only] [--instance GUID]
//! ```

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::sync::Arc;
use vmbus_core::wire::Guid;
use vsp_storage::backend::raw::{RawDisk, RawOptions};
use vsp_storage::storvsp::{LunAddr, StorVsp, StorVspConfig};
use vsp_storage::vhd::{OpenOptions, Vhd};

#[derive(Parser)]
#[command(
    name = "vsp-storage",
    about = "Storage VSP daemon (storvsp) for VMBus partitions"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a SCSI controller with one disk on the socket the supervisor passed.
    Serve(ServeArgs),
    /// Serve the disk as a vhost-user-blk device (QEMU, Cloud Hypervisor).
    VhostUserBlk(vsp_storage::vhost_user::cli::Args),
}

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
enum Format {
    /// VHD if the file ends in a VHD footer, raw otherwise.
    Auto,
    Raw,
    Vhd,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Disk image.
    #[arg(long)]
    disk: PathBuf,
    #[arg(long, value_enum, default_value = "auto")]
    format: Format,
    /// Present the disk read-only.
    #[arg(long)]
    read_only: bool,
    /// Controller instance GUID (keep it stable across restarts).
    #[arg(long, default_value = "f5bc8c3a-1f3c-4e0b-9c8e-5a0f0b5c2d01")]
    instance: String,
    /// Open raw images with O_DIRECT.
    #[arg(long)]
    direct: bool,
    /// Do not install the steady-state seccomp allow-list.
    #[arg(long)]
    no_seccomp: bool,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Serve(args) => serve(args),
        Command::VhostUserBlk(args) => vsp_storage::vhost_user::cli::run(args),
    }
}

fn is_vhd(path: &PathBuf) -> anyhow::Result<bool> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let len = f.metadata()?.len();
    if len < 512 {
        return Ok(false);
    }
    let mut cookie = [0u8; 8];
    f.read_exact_at(&mut cookie, len - 512)?;
    Ok(&cookie == b"conectix")
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // SAFETY: the supervisor passed this socket to this process only; it is taken once, here.
    let Some(conn) = (unsafe { vmbus_core::oop::connection_from_env() }) else {
        bail!("no socket: start me through the VMM's supervisor (it sets VMBUS_VSP_SOCKET_FD)");
    };
    let instance: Guid = args
        .instance
        .parse()
        .map_err(|e| anyhow::anyhow!("--instance: {e:?}"))?;
    let vsp = StorVsp::new(StorVspConfig::new(instance), None).context("starting storvsp")?;
    let vhd = match args.format {
        Format::Vhd => true,
        Format::Raw => false,
        Format::Auto => is_vhd(&args.disk)?,
    };
    if vhd {
        let mut opts = OpenOptions::default();
        opts.read_only = args.read_only;
        let disk = Vhd::open(&args.disk, &opts)
            .with_context(|| format!("opening {}", args.disk.display()))?;
        vsp.add_lun(LunAddr::new(0, 0, 0), Arc::new(disk), None, None);
    } else {
        let opts = RawOptions {
            read_only: args.read_only,
            direct: args.direct,
            ..RawOptions::default()
        };
        let disk = RawDisk::open(&args.disk, &opts)
            .with_context(|| format!("opening {}", args.disk.display()))?;
        vsp.add_raw_lun(LunAddr::new(0, 0, 0), Arc::new(disk));
    }
    let mut vsp = vsp;
    if !args.no_seccomp {
        use vmbus_core::oop::seccomp;
        seccomp::install(&seccomp::storage_syscalls()).context("seccomp")?;
        seccomp::selftest_from_env();
    }
    tracing::info!(disk = %args.disk.display(), vhd, "vsp-storage serving");
    vmbus_core::oop::serve(&conn, &mut vsp).context("serving the VMM")?;
    Ok(())
}
