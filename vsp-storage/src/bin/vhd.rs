//! `vhd`: inspect, create, expand, compact, convert and merge VHD disk images.
//!
//! ```text
//! vhd inspect disk.vhd [--json] [--no-parent]
//! vhd create disk.vhd --size 10G [--type fixed|dynamic] [--block-size 2M] [--exact-size]
//! vhd create child.vhd --parent base.vhd
//! vhd expand disk.vhd --size 20G [--exact-size]
//! vhd compact disk.vhd
//! vhd convert in.raw out.vhd --to dynamic      (raw | fixed | dynamic; any VHD or raw input)
//! vhd merge child.vhd [--remove-child]
//! ```

use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use vsp_storage::vhd::{
    self, ConvertOptions, CreateOptions, DEFAULT_BLOCK_SIZE, DiskKind, Format, Inspection,
};

#[derive(Parser)]
#[command(
    name = "vhd",
    version,
    about = "Inspect, create and convert VHD (Virtual Hard Disk) images"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show the footer, dynamic header, BAT usage and parent chain, and check consistency
    /// (exit status 2 when a check fails).
    Inspect {
        image: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Do not look for the parent of a differencing image.
        #[arg(long)]
        no_parent: bool,
    },
    /// Create a new image (fixed, dynamic, or differencing with --parent).
    Create {
        image: PathBuf,
        /// Virtual size, e.g. 10G, 512M, 1048576 (binary units; rounded up to a CHS geometry
        /// unless --exact-size). Optional with --parent (default: the parent's size).
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Image type (default: dynamic, or differencing with --parent).
        #[arg(long = "type", value_enum)]
        kind: Option<Kind>,
        /// Parent image of a differencing image.
        #[arg(long)]
        parent: Option<PathBuf>,
        /// Block size of dynamic and differencing images (power of two, at least 512).
        #[arg(long, value_parser = parse_size, default_value_t = u64::from(DEFAULT_BLOCK_SIZE))]
        block_size: u64,
        /// Keep the size exactly (geometry 65535/16/255, like qemu's force_size) instead of
        /// rounding it up to a CHS geometry.
        #[arg(long)]
        exact_size: bool,
    },
    /// Grow the virtual size (new space reads as zeros).
    Expand {
        image: PathBuf,
        /// New virtual size, e.g. 20G.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Keep the size exactly instead of rounding it up to a CHS geometry.
        #[arg(long)]
        exact_size: bool,
    },
    /// Drop all-zero and unmapped blocks of a dynamic image (or blocks a differencing image
    /// shares with its parent), move the rest together and shrink the file.
    Compact {
        image: PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Convert between raw images and fixed / dynamic VHDs (a differencing chain is flattened).
    Convert {
        /// Source: a raw image or any VHD (detected by its footer).
        source: PathBuf,
        /// Target (must not exist).
        target: PathBuf,
        /// Target format.
        #[arg(long, value_enum)]
        to: TargetFormat,
        /// Block size of a dynamic target.
        #[arg(long, value_parser = parse_size, default_value_t = u64::from(DEFAULT_BLOCK_SIZE))]
        block_size: u64,
        /// Keep the source size exactly instead of rounding it up to a CHS geometry.
        #[arg(long)]
        exact_size: bool,
    },
    /// Merge a differencing image into its parent.
    Merge {
        child: PathBuf,
        /// Delete the child after a successful merge.
        #[arg(long)]
        remove_child: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Kind {
    Fixed,
    Dynamic,
    Differencing,
}

#[derive(Clone, Copy, ValueEnum)]
enum TargetFormat {
    Raw,
    Fixed,
    Dynamic,
}

/// Parses `1048576`, `512K`, `10M`, `2G`, `1T` (binary units, optional `B`/`iB`).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("unknown size suffix in {s:?} (use K, M, G or T)")),
            };
            (t.get(..i).unwrap_or(""), shift)
        }
        _ => (t, 0),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 10G, 512M, 1048576)"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn block_size(v: u64) -> Result<u32> {
    u32::try_from(v).context("the block size must be below 4 GiB")
}

fn progress_bar(message: &str) -> ProgressBar {
    let pb = ProgressBar::new(0);
    if std::io::stderr().is_terminal() {
        pb.set_draw_target(ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(
            "{msg:>10} [{bar:40}] {percent:>3}% {elapsed_precise} eta {eta}",
        ) {
            pb.set_style(style.progress_chars("=> "));
        }
    } else {
        pb.set_draw_target(ProgressDrawTarget::hidden());
    }
    pb.set_message(message.to_string());
    pb
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.2} {} ({bytes} bytes)", UNITS[u])
    }
}

/// Prints to stdout; a closed pipe (`vhd inspect x | head`) is not an error.
macro_rules! emit {
    ($($t:tt)*) => {
        emit_str(&format!("{}\n", format_args!($($t)*)))
    };
}

fn emit_str(s: &str) {
    let _ = std::io::stdout().lock().write_all(s.as_bytes());
}

fn format_inspection(i: &Inspection) -> String {
    let mut o = String::new();
    macro_rules! out {
        ($($t:tt)*) => {
            let _ = writeln!(o, $($t)*);
        };
    }
    let f = &i.footer;
    out!("image:           {}", i.path);
    out!("file size:       {}", human(i.file_size));
    out!("type:            {}", f.disk_type);
    out!("virtual size:    {}", human(i.virtual_size));
    out!("footer ({}):", f.location);
    out!("  features:        {:#010x}", f.features);
    out!("  format version:  {}", f.format_version);
    out!("  data offset:     {:#x}", f.data_offset);
    out!("  timestamp:       {} ({})", f.timestamp, f.time);
    out!(
        "  creator:         {:?} {} on {:?}",
        f.creator_app,
        f.creator_version,
        f.creator_os
    );
    out!("  original size:   {}", f.original_size);
    out!("  current size:    {}", f.current_size);
    out!(
        "  geometry (CHS):  {}/{}/{} = {} bytes",
        f.geometry.cylinders,
        f.geometry.heads,
        f.geometry.sectors,
        f.chs_size
    );
    out!(
        "  checksum:        {:#010x} ({})",
        f.checksum,
        if f.checksum_ok { "ok" } else { "BAD" }
    );
    out!("  uuid:            {}", f.uuid);
    out!("  saved state:     {}", f.saved_state);
    if let Some(h) = &i.header {
        out!("dynamic header (at {:#x}):", h.offset);
        out!("  table offset:      {:#x}", h.table_offset);
        out!("  version:           {}", h.header_version);
        out!("  max table entries: {}", h.max_table_entries);
        out!("  block size:        {}", human(u64::from(h.block_size)));
        out!(
            "  checksum:          {:#010x} ({})",
            h.checksum,
            if h.checksum_ok { "ok" } else { "BAD" }
        );
        if f.disk_type == vhd::DiskType::Differencing {
            out!("  parent uuid:       {}", h.parent_uuid);
            out!(
                "  parent timestamp:  {} ({})",
                h.parent_timestamp,
                h.parent_time
            );
            out!("  parent name:       {}", h.parent_name);
            for l in &h.locators {
                out!(
                    "  locator {}: {:<5} {} bytes at {:#x}: {}",
                    l.index,
                    l.platform,
                    l.data_length,
                    l.data_offset,
                    l.path.as_deref().unwrap_or("-")
                );
            }
        }
    }
    if let Some(b) = &i.bat {
        out!("BAT:");
        out!(
            "  allocated blocks:  {} of {} ({} partially filled)",
            b.allocated_blocks,
            b.entries_used,
            b.partial_blocks
        );
        out!("  sectors present:   {}", b.sectors_present);
        out!("  unused file bytes: {}", b.unused_file_bytes);
    }
    for (n, p) in i.parents.iter().enumerate() {
        out!("parent {}:        {p}", n + 1);
    }
    out!("checks:");
    for c in &i.checks {
        out!(
            "  [{}] {}: {}",
            if c.ok { " ok " } else { "FAIL" },
            c.name,
            c.detail
        );
    }
    o
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Inspect {
            image,
            json,
            no_parent,
        } => {
            let i = vhd::inspect(&image, !no_parent)
                .with_context(|| format!("cannot inspect {}", image.display()))?;
            if json {
                emit!("{}", serde_json::to_string_pretty(&i)?);
            } else {
                emit_str(&format_inspection(&i));
            }
            return Ok(if i.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            });
        }
        Command::Create {
            image,
            size,
            kind,
            parent,
            block_size: bs,
            exact_size,
        } => {
            let kind = match (kind, parent) {
                (None | Some(Kind::Differencing), Some(parent)) => {
                    DiskKind::Differencing { parent }
                }
                (Some(Kind::Differencing), None) => bail!("a differencing image needs --parent"),
                (Some(_), Some(_)) => bail!("--parent only goes with --type differencing"),
                (Some(Kind::Fixed), None) => DiskKind::Fixed,
                (None | Some(Kind::Dynamic), None) => DiskKind::Dynamic,
            };
            let size = match (size, &kind) {
                (Some(s), _) => s,
                (None, DiskKind::Differencing { .. }) => 0,
                (None, _) => bail!("--size is required"),
            };
            let opts = CreateOptions {
                size,
                kind,
                block_size: block_size(bs)?,
                exact_size,
            };
            let v = vhd::create(&image, &opts)
                .with_context(|| format!("cannot create {}", image.display()))?;
            let g = v.footer().geometry;
            emit!(
                "created {} ({} image, {}, CHS {}/{}/{})",
                image.display(),
                v.disk_type(),
                human(v.footer().current_size),
                g.cylinders,
                g.heads,
                g.sectors
            );
        }
        Command::Expand {
            image,
            size,
            exact_size,
        } => {
            let new = vhd::expand(&image, size, exact_size)
                .with_context(|| format!("cannot expand {}", image.display()))?;
            emit!("{}: virtual size is now {}", image.display(), human(new));
        }
        Command::Compact { image, json } => {
            let pb = progress_bar("compact");
            let r = vhd::compact(&image, &mut |done, total| {
                pb.set_length(total);
                pb.set_position(done);
            })
            .with_context(|| format!("cannot compact {}", image.display()))?;
            pb.finish_and_clear();
            if json {
                emit!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                emit!(
                    "{}: {} of {} blocks dropped, {} moved; file {} -> {}",
                    image.display(),
                    r.blocks_dropped,
                    r.blocks_before,
                    r.blocks_moved,
                    human(r.file_size_before),
                    human(r.file_size_after)
                );
            }
        }
        Command::Convert {
            source,
            target,
            to,
            block_size: bs,
            exact_size,
        } => {
            let opts = ConvertOptions {
                to: match to {
                    TargetFormat::Raw => Format::Raw,
                    TargetFormat::Fixed => Format::Fixed,
                    TargetFormat::Dynamic => Format::Dynamic,
                },
                block_size: block_size(bs)?,
                exact_size,
            };
            let pb = progress_bar("convert");
            let size = vhd::convert(&source, &target, &opts, &mut |done, total| {
                pb.set_length(total);
                pb.set_position(done);
            })
            .with_context(|| {
                format!(
                    "cannot convert {} to {}",
                    source.display(),
                    target.display()
                )
            })?;
            pb.finish_and_clear();
            emit!(
                "{} -> {} ({})",
                source.display(),
                target.display(),
                human(size)
            );
        }
        Command::Merge {
            child,
            remove_child,
            json,
        } => {
            let pb = progress_bar("merge");
            let r = vhd::merge(&child, &mut |done, total| {
                pb.set_length(total);
                pb.set_position(done);
            })
            .with_context(|| format!("cannot merge {}", child.display()))?;
            pb.finish_and_clear();
            if remove_child {
                std::fs::remove_file(&child)
                    .with_context(|| format!("merged, but cannot remove {}", child.display()))?;
            }
            if json {
                emit!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                emit!(
                    "merged {} sectors of {} into {}{}",
                    r.sectors_merged,
                    child.display(),
                    r.parent.display(),
                    if remove_child { " (child removed)" } else { "" }
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vhd: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("10M"), Ok(10 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1t"), Ok(1 << 40));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
