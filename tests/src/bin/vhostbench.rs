//! vhostbench: 4 KiB random reads at QD32 and 1 MiB sequential reads at QD8 through a vhost-user
//! frontend (the `vhost` crate, virtqueues driven by `tests::virtio_driver`) → our
//! vhost-user-blk daemon (in a thread of this process) → a file, divided by direct io_uring on the
//! same file in the same run (`tests::stor::direct`, storbench's baseline). Rounds alternate
//! between the two paths; each ratio is the median over rounds.
//!
//! `cargo run --release -p tests --bin vhostbench -- --quick` (≤ 60 s). Last lines:
//! `RESULT vhostblk1m ratio_vs_direct=X` then `RESULT vhostblk4k ratio_vs_direct=Y`.

use anyhow::{Context, bail};
use clap::Parser;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tests::stor::{Meter, Offsets, Sample, Workload, direct, fill_file, fs_type, median};
use tests::virtio_driver::{GuestRam, SplitQueue, blk, connect, negotiate};
use vhost::VhostBackend;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vm_memory::{Bytes, GuestAddress};
use vsp_storage::backend::raw::{RawDisk, RawOptions};
use vsp_storage::vhost_user::{BlkDevice, BlkOptions, BlkServer};

#[derive(Parser)]
#[command(
    name = "vhostbench",
    about = "vhost-user-blk vs direct io_uring on the same file"
)]
struct Args {
    /// Short run (≤ 60 s): 256 MiB file, 5 rounds of 0.4 s per workload and path.
    #[arg(long)]
    quick: bool,
    /// Directory of the test file (default: /dev/shm, tmpfs, buffered).
    #[arg(long, default_value = "/dev/shm")]
    dir: PathBuf,
    /// Open the file O_DIRECT on both paths (not on tmpfs).
    #[arg(long)]
    direct: bool,
    /// Rounds per workload.
    #[arg(long)]
    rounds: Option<usize>,
    /// Daemon polling window in microseconds (`--poll-us` of the daemon; 0: off).
    #[arg(long, default_value_t = 0)]
    poll_us: u32,
    /// Only these workloads (comma-separated: 4k, 1m).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

/// One request slot of the frontend: header, data buffer and status byte in guest RAM.
struct Slot {
    hdr: GuestAddress,
    buf: GuestAddress,
    status: GuestAddress,
}

struct Front {
    _fe: vhost::vhost_user::Frontend,
    ram: GuestRam,
    q: SplitQueue,
    slots: Vec<Slot>,
}

const QUEUE: u16 = 128;
const MAX_DEPTH: usize = 32;
const MAX_BLOCK: u64 = 1 << 20;

fn front(socket: &std::path::Path) -> anyhow::Result<Front> {
    let mut fe = connect(socket, 1, Duration::from_secs(5))?;
    let proto = VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK;
    let (features, _) = negotiate(&mut fe, u64::MAX, proto)?;
    if features & tests::virtio_driver::F_EVENT_IDX == 0 {
        bail!("EVENT_IDX not offered");
    }
    let mut ram = GuestRam::new((MAX_DEPTH + 2) * (MAX_BLOCK as usize) + (4 << 20))?;
    fe.set_mem_table(&[ram.region()?])?;
    let q = SplitQueue::new(&mut ram, 0, QUEUE)?;
    q.setup(&mut fe, &ram, true)?;
    let slots = (0..MAX_DEPTH)
        .map(|_| {
            Ok(Slot {
                hdr: ram.alloc(16, 16)?,
                buf: ram.alloc(MAX_BLOCK, 4096)?,
                status: ram.alloc(1, 1)?,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Front {
        _fe: fe,
        ram,
        q,
        slots,
    })
}

fn submit(f: &mut Front, slot: usize, offset: u64, len: u32) -> anyhow::Result<u16> {
    let s = &f.slots[slot];
    blk::header(&f.ram, s.hdr, blk::T_IN, offset / 512)?;
    let chain = [(s.hdr, 16, false), (s.buf, len, true), (s.status, 1, true)];
    f.q.add(&f.ram, &chain)
}

/// Runs `w` through the daemon for `interval`.
fn run_vhost(
    f: &mut Front,
    w: Workload,
    size: u64,
    interval: Duration,
    seed: u64,
) -> anyhow::Result<Sample> {
    let (depth, len) = (w.depth(), u32::try_from(w.block())?);
    let mut offsets = Offsets::new(w, size, seed);
    // Slot of each head in flight (indexed by head: no hashing on the hot path).
    let mut heads: Vec<Option<usize>> = vec![None; usize::from(QUEUE)];
    let mut in_flight = 0usize;
    for slot in 0..depth {
        heads[usize::from(submit(f, slot, offsets.next_offset(), len)?)] = Some(slot);
        in_flight += 1;
    }
    f.q.kick()?;
    let mut meter = Meter::start(interval);
    let mut sample = Sample::default();
    let mut done = Vec::with_capacity(depth);
    while in_flight > 0 {
        done.clear();
        f.q.poll_used_into(&f.ram, &mut done)?;
        if done.is_empty() {
            done = f.q.wait_used(&f.ram, 1, Duration::from_secs(5))?;
        }
        let measuring = meter.measuring();
        for &(head, used) in &done {
            let Some(slot) = heads.get_mut(usize::from(head)).and_then(Option::take) else {
                bail!("completion for unknown head {head}");
            };
            in_flight -= 1;
            let st: u8 = f.ram.mem().read_obj(f.slots[slot].status)?;
            if st != blk::S_OK || used != len + 1 {
                bail!("request failed: status {st}, used length {used}");
            }
            if measuring {
                sample.ops += 1;
                sample.bytes += u64::from(len);
                heads[usize::from(submit(f, slot, offsets.next_offset(), len)?)] = Some(slot);
                in_flight += 1;
            }
        }
        f.q.notify(&f.ram)?;
        meter.tick(&mut sample);
    }
    Ok(sample)
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let rounds = a.rounds.unwrap_or(if a.quick { 5 } else { 9 });
    let interval = Duration::from_millis(if a.quick { 400 } else { 1000 });
    let size: u64 = if a.quick { 256 << 20 } else { 1 << 30 };
    let tmp = tempfile::Builder::new()
        .prefix("vhostbench")
        .tempdir_in(&a.dir)
        .with_context(|| format!("temporary directory in {}", a.dir.display()))?;
    let file = tmp.path().join("disk.raw");
    fill_file(&file, size, 7)?;
    println!(
        "vhostbench: file {} ({}, {} MiB, {}), {} CPUs, {} rounds x {:?}, daemon in a thread (poll {} us)",
        file.display(),
        fs_type(tmp.path()),
        size >> 20,
        if a.direct { "O_DIRECT" } else { "buffered" },
        tests::stor::cpus(),
        rounds,
        interval,
        a.poll_us
    );
    let opts = RawOptions {
        direct: a.direct,
        read_only: true,
        ..RawOptions::default()
    };
    let raw = Arc::new(RawDisk::open(&file, &opts)?);
    if !raw.uses_io_uring() {
        println!("note: io_uring unavailable; the daemon uses pread/pwrite");
    }
    let dev = Arc::new(BlkDevice::new(
        raw.clone(),
        Some(raw),
        BlkOptions {
            read_only: true,
            poll_us: a.poll_us,
            ..BlkOptions::default()
        },
    ));
    let socket = tmp.path().join("blk.sock");
    let mut server = BlkServer::bind(&socket, dev)?;
    let stop = server.stop_handle();
    let daemon = std::thread::Builder::new()
        .name("vhost-blk-main".into())
        .spawn(move || server.serve())?;
    let mut f = front(&socket)?;
    let base = direct::open(&file, a.direct, false)?;

    let mut results = Vec::new();
    for w in [Workload::SeqRead1m, Workload::RandRead4k] {
        let tag = if w == Workload::SeqRead1m { "1m" } else { "4k" };
        if !a.only.is_empty() && !a.only.iter().any(|o| o == tag) {
            continue;
        }
        // Warm both paths (page cache, rings) before measuring.
        direct::run(&base, w, interval / 2, 1)?;
        run_vhost(&mut f, w, size, interval / 2, 1)?;
        let (mut d, mut v, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for r in 0..rounds {
            let seed = 100 + r as u64;
            let (ds, vs) = if r % 2 == 0 {
                let ds = direct::run(&base, w, interval, seed)?;
                (ds, run_vhost(&mut f, w, size, interval, seed)?)
            } else {
                let vs = run_vhost(&mut f, w, size, interval, seed)?;
                (direct::run(&base, w, interval, seed)?, vs)
            };
            ratios.push(vs.iops() / ds.iops().max(1e-9));
            d.push(ds);
            v.push(vs);
        }
        let med =
            |s: &[Sample], f: fn(&Sample) -> f64| median(&s.iter().map(f).collect::<Vec<_>>());
        println!(
            "{:<18} direct {:>9.0} IOPS {:>8.1} MiB/s {:>6.2} us CPU/op | vhost-user-blk {:>9.0} IOPS {:>8.1} MiB/s {:>6.2} us CPU/op | ratio {:.3}",
            w.name(),
            med(&d, Sample::iops),
            med(&d, Sample::mib_s),
            med(&d, Sample::cpu_us_per_op),
            med(&v, Sample::iops),
            med(&v, Sample::mib_s),
            med(&v, Sample::cpu_us_per_op),
            median(&ratios)
        );
        results.push((w, median(&ratios)));
    }
    drop(f);
    stop.stop();
    let _ = daemon.join();
    for (w, r) in &results {
        if *w == Workload::SeqRead1m {
            println!("RESULT vhostblk1m ratio_vs_direct={r:.3}");
        }
    }
    for (w, r) in &results {
        if *w == Workload::RandRead4k {
            println!("RESULT vhostblk4k ratio_vs_direct={r:.3}");
        }
    }
    Ok(())
}
