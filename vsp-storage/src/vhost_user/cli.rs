//! `vsp-storage vhost-user-blk --socket S --disk D [--format auto|raw|vhd] [--readonly]
//! [--queues N] [--direct]`: serves the disk until killed; after a frontend disconnects it listens
//! again. SIGTERM ends the process (the default action): nothing is lost that the inflight region
//! does not cover, and the frontend re-sends what was in flight on reconnect.

use super::device::{BlkDevice, BlkOptions};
use super::server::BlkServer;
use crate::backend::AsyncDisk;
use crate::backend::raw::{RawDisk, RawOptions};
use crate::block::BlockDevice;
use crate::vhd::{OpenOptions, Vhd};
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Copy, Clone, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// VHD if the file ends in a VHD footer, raw otherwise.
    Auto,
    Raw,
    Vhd,
}

/// Arguments of `vsp-storage vhost-user-blk`.
#[derive(clap::Args)]
pub struct Args {
    /// vhost-user socket to listen on (replaced if it exists).
    #[arg(long)]
    pub socket: PathBuf,
    /// Disk image.
    #[arg(long)]
    pub disk: PathBuf,
    #[arg(long, value_enum, default_value = "auto")]
    pub format: Format,
    /// Present the disk read-only (VIRTIO_BLK_F_RO; writes fail with IOERR).
    #[arg(long)]
    pub readonly: bool,
    /// Number of virtqueues (one worker thread each).
    #[arg(long, default_value_t = 1)]
    pub queues: u16,
    /// Open raw images with O_DIRECT.
    #[arg(long)]
    pub direct: bool,
    /// GET_ID serial (default: the image's file name, at most 20 bytes).
    #[arg(long)]
    pub serial: Option<String>,
    /// Poll virtqueues and completions this many microseconds before sleeping (0: off).
    #[arg(long, default_value_t = 0)]
    pub poll_us: u32,
    /// Test hook: never execute requests touching this sector (they stay in flight).
    #[arg(long, hide = true)]
    pub test_hold_sector: Option<u64>,
}

fn is_vhd(path: &Path) -> anyhow::Result<bool> {
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

/// Opens the disk the arguments name as a vhost-user-blk device.
pub fn open_device(args: &Args) -> anyhow::Result<BlkDevice> {
    let vhd = match args.format {
        Format::Vhd => true,
        Format::Raw => false,
        Format::Auto => is_vhd(&args.disk)?,
    };
    let serial = match &args.serial {
        Some(s) => s.as_bytes().to_vec(),
        None => args
            .disk
            .file_name()
            .map(|n| n.to_string_lossy().as_bytes().to_vec())
            .unwrap_or_default(),
    };
    let opts = BlkOptions {
        num_queues: args.queues,
        read_only: args.readonly,
        serial,
        hold_sector: args.test_hold_sector,
        poll_us: args.poll_us,
    };
    let open = || format!("opening {}", args.disk.display());
    if vhd {
        let o = OpenOptions {
            read_only: args.readonly,
            ..OpenOptions::default()
        };
        let disk: Arc<dyn BlockDevice> = Arc::new(Vhd::open(&args.disk, &o).with_context(open)?);
        Ok(BlkDevice::new(disk, None, opts))
    } else {
        let o = RawOptions {
            read_only: args.readonly,
            direct: args.direct,
            ..RawOptions::default()
        };
        let raw = Arc::new(RawDisk::open(&args.disk, &o).with_context(open)?);
        let disk: Arc<dyn BlockDevice> = raw.clone();
        let async_disk: Arc<dyn AsyncDisk> = raw;
        Ok(BlkDevice::new(disk, Some(async_disk), opts))
    }
}

/// Runs the daemon.
pub fn run(args: Args) -> anyhow::Result<()> {
    let dev = Arc::new(open_device(&args)?);
    let mut server = BlkServer::bind(&args.socket, dev)
        .with_context(|| format!("binding {}", args.socket.display()))?;
    tracing::info!(socket = %args.socket.display(), disk = %args.disk.display(), queues = args.queues, "vhost-user-blk serving");
    server.serve().context("serving")?;
    Ok(())
}
