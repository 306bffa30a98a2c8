//! Ring throughput against baselines measured in the same run.
//!
//! - ring64: 64-byte packets between two threads through a 64 KiB ring (batched, spinning) versus
//!   crossbeam's `ArrayQueue<[u8; 64]>` doing the same hand-off.
//! - ring64k: 64 KiB packets through a 1 MiB ring (copy in + zero-copy view copied out) versus one
//!   thread doing `memcpy` of the same sizes.
//! - ringxproc: 64-byte packets to a child process over memfd + eventfd, parking reader, versus the
//!   same `Sender`/`Receiver` pair between two threads of one process.
//!
//! Each figure is the median of several runs. The last lines are `RESULT ...` for scripts.
//!
//! `--cfg loom` compiles `HeapRing`, `signal` and `handoff` out of the library, yet
//! `cargo test --test loom` still builds every binary of the package: under loom this is an empty
//! program.
#![cfg_attr(loom, allow(dead_code, unused_imports, unused_macros))]

use crossbeam::queue::ArrayQueue;
#[cfg(not(loom))]
use ringbuf::handoff::SharedRing;
#[cfg(not(loom))]
use ringbuf::{HeapRing, OutgoingPacket, PacketType, RingReader, RingWriter, WriteError};
use std::hint::black_box;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

macro_rules! err {
    ($($t:tt)*) => {
        Box::<dyn std::error::Error + Send + Sync>::from(format!($($t)*))
    };
}

macro_rules! ensure {
    ($cond:expr, $($t:tt)*) => {
        if !$cond {
            return Err(err!($($t)*));
        }
    };
}

const CHILD_ENV: &str = "RINGBENCH_XPROC";
const TIMEOUT: Option<Duration> = Some(Duration::from_secs(30));

struct Config {
    small_packets: u64,
    large_packets: u64,
    runs: usize,
}

#[cfg(loom)]
fn main() {}

#[cfg(not(loom))]
fn main() -> Result<()> {
    // SAFETY: the parent passes these descriptors to this child only; taken once, here.
    if let Some(ring) = unsafe { SharedRing::from_env(CHILD_ENV) }? {
        return xproc_child(ring);
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let cfg = if quick {
        Config {
            small_packets: 8_000_000,
            large_packets: 200_000,
            runs: 5,
        }
    } else {
        Config {
            small_packets: 40_000_000,
            large_packets: 1_000_000,
            runs: 9,
        }
    };
    pin(PRODUCER_CPU);
    let started = Instant::now();
    println!(
        "{:<34} {:>12} {:>10}",
        "measurement (median of runs)", "Mpackets/s", "GB/s"
    );

    let aq = median(cfg.runs, || arrayqueue_64(cfg.small_packets));
    row("crossbeam ArrayQueue<[u8;64]>", &aq, 64);
    let r64 = median(cfg.runs, || ring_64(cfg.small_packets));
    row("ring 64 B (64 KiB ring, batched)", &r64, 64);

    let mc = median(cfg.runs, || memcpy_64k(cfg.large_packets));
    row("memcpy 64 KiB, one thread", &mc, 65536);
    let r64k = median(cfg.runs, || ring_64k(cfg.large_packets));
    row("ring 64 KiB (1 MiB ring)", &r64k, 65536);

    let inproc = median(cfg.runs, || channel_inproc(cfg.small_packets));
    row("channel 64 B, two threads", &inproc, 64);
    let xproc = median(cfg.runs, || channel_xproc(cfg.small_packets));
    row("channel 64 B, two processes", &xproc, 64);

    let (aq, r64, mc, r64k, inproc, xproc) = (aq?, r64?, mc?, r64k?, inproc?, xproc?);
    println!("elapsed {:.1} s", started.elapsed().as_secs_f64());
    println!("RESULT ring64 ratio_vs_arrayqueue={:.2}", r64 / aq);
    println!("RESULT ring64k ratio_vs_memcpy={:.2}", r64k / mc);
    println!("RESULT ringxproc ratio_vs_inproc={:.2}", xproc / inproc);
    Ok(())
}

/// Pins the calling thread to one CPU so producer and consumer never share a core (on a 2-CPU
/// machine the scheduler otherwise sometimes stacks both spinning threads on one). Both the baselines
/// and the rings run pinned the same way.
fn pin(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity(0, ...) only affects the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        // Best effort: on a machine with fewer CPUs the call fails and nothing changes.
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

const PRODUCER_CPU: usize = 0;
const CONSUMER_CPU: usize = 1;

/// Median packets per second over `runs` runs.
fn median(runs: usize, mut f: impl FnMut() -> Result<f64>) -> Result<f64> {
    let mut v = (0..runs).map(|_| f()).collect::<Result<Vec<f64>>>()?;
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}

fn row(name: &str, rate: &Result<f64>, bytes: u64) {
    match rate {
        Ok(r) => println!(
            "{name:<34} {:>12.2} {:>10.2}",
            r / 1e6,
            r * bytes as f64 / 1e9
        ),
        Err(e) => println!("{name:<34} failed: {e}"),
    }
}

fn rate(packets: u64, t: Duration) -> f64 {
    packets as f64 / t.as_secs_f64()
}

fn arrayqueue_64(n: u64) -> Result<f64> {
    let q = Arc::new(ArrayQueue::<[u8; 64]>::new(1024));
    let consumer = {
        let q = q.clone();
        std::thread::spawn(move || {
            pin(CONSUMER_CPU);
            let mut sum = 0u64;
            let mut got = 0;
            while got < n {
                match q.pop() {
                    Some(m) => {
                        sum = sum.wrapping_add(m[0] as u64);
                        got += 1;
                    }
                    None => idle(),
                }
            }
            sum
        })
    };
    let t = Instant::now();
    for i in 0..n {
        let mut m = [0u8; 64];
        m[0] = i as u8;
        while let Err(back) = q.push(m) {
            m = back;
            idle();
        }
    }
    black_box(consumer.join().map_err(|_| err!("consumer panicked"))?);
    Ok(rate(n, t.elapsed()))
}

/// Writer thread pushes `n` packets of `size` bytes through a spinning reader; returns packets/s.
#[cfg(not(loom))]
fn ring_pipe(n: u64, size: usize, data_pages: usize, batch: usize) -> Result<f64> {
    let ring = Arc::new(HeapRing::new(data_pages).ok_or_else(|| err!("alloc"))?);
    let reader = {
        let ring = ring.clone();
        std::thread::spawn(move || -> Result<u64> {
            pin(CONSUMER_CPU);
            let mut r = RingReader::new(ring)?;
            r.mask_interrupts();
            let mut dst = vec![0u8; size];
            let (mut got, mut sum) = (0u64, 0u64);
            while got < n {
                let mut k = 0;
                while k < batch {
                    let Some(pkt) = r.peek()? else { break };
                    pkt.copy_payload(0, &mut dst)?;
                    sum = sum.wrapping_add(dst[0] as u64);
                    pkt.consume();
                    k += 1;
                }
                if k == 0 {
                    idle();
                } else {
                    r.commit()?;
                    got += k as u64;
                }
            }
            Ok(sum)
        })
    };
    let mut w = RingWriter::new(ring.clone())?;
    let mut src = vec![0u8; size];
    let t = Instant::now();
    let mut sent = 0u64;
    while sent < n {
        let mut b = w.batch();
        while b.len() < batch && sent < n {
            src[0] = sent as u8;
            let parts: [&[u8]; 1] = [&src];
            match b.write(&OutgoingPacket::in_band(sent, false, &parts)) {
                Ok(()) => sent += 1,
                Err(WriteError::Full { .. }) => break,
                Err(e) => return Err(e.into()),
            }
        }
        if b.is_empty() {
            idle();
        }
        b.commit()?;
    }
    black_box(reader.join().map_err(|_| err!("reader panicked"))??);
    Ok(rate(n, t.elapsed()))
}

#[cfg(not(loom))]
fn ring_64(n: u64) -> Result<f64> {
    ring_pipe(n, 64, 16, 32)
}

#[cfg(not(loom))]
fn ring_64k(n: u64) -> Result<f64> {
    ring_pipe(n, 65536, 256, 4)
}

fn memcpy_64k(n: u64) -> Result<f64> {
    // Source hot in cache, destination cycling through 1 MiB: what one ring copy does.
    let src = vec![7u8; 65536];
    let mut dst = vec![0u8; 1 << 20];
    let t = Instant::now();
    for i in 0..n as usize {
        let at = (i % 16) * 65536;
        dst[at..at + 65536].copy_from_slice(black_box(&src));
        black_box(&mut dst);
    }
    Ok(rate(n, t.elapsed()))
}

/// Receives until the completion packet that ends a run; returns the data packets seen.
#[cfg(not(loom))]
fn drain<M: ringbuf::RingMem>(rx: &mut ringbuf::signal::Receiver<M>) -> Result<u64> {
    let (mut got, mut done) = (0u64, false);
    let mut dst = [0u8; 64];
    while !done {
        rx.recv_batch(64, TIMEOUT, |pkt| {
            if pkt.packet_type() == PacketType::Completion {
                done = true;
            } else if pkt.copy_payload(0, &mut dst).is_ok() {
                got += 1;
            }
        })?;
    }
    Ok(got)
}

/// Sends `n` 64-byte packets in batches of 32, then the end marker.
#[cfg(not(loom))]
fn send_run<M: ringbuf::RingMem>(tx: &mut ringbuf::signal::Sender<M>, n: u64) -> Result<()> {
    let payload = [0x5Au8; 64];
    let parts: [&[u8]; 1] = [&payload];
    let batch: Vec<OutgoingPacket<'_>> = (0..32)
        .map(|i| OutgoingPacket::in_band(i, false, &parts))
        .collect();
    let mut sent = 0;
    while sent < n {
        let k = (n - sent).min(32) as usize;
        tx.send_all(&batch[..k], TIMEOUT)?;
        sent += k as u64;
    }
    tx.send(&OutgoingPacket::completion(u64::MAX, &[]), TIMEOUT)?;
    Ok(())
}

#[cfg(not(loom))]
fn channel_inproc(n: u64) -> Result<f64> {
    let ring = SharedRing::create("ringbench", 16)?;
    let mut rx = ring.receiver()?;
    let mut tx = ring.sender()?;
    let reader = std::thread::spawn(move || {
        pin(CONSUMER_CPU);
        drain(&mut rx)
    });
    let t = Instant::now();
    send_run(&mut tx, n)?;
    let got = reader.join().map_err(|_| err!("reader panicked"))??;
    ensure!(got == n, "received {got} of {n}");
    Ok(rate(n, t.elapsed()))
}

#[cfg(not(loom))]
fn channel_xproc(n: u64) -> Result<f64> {
    let ring = SharedRing::create("ringbench", 16)?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.stdout(Stdio::piped());
    ring.pass_to_child(&mut cmd, CHILD_ENV)?;
    let mut child = cmd.spawn()?;
    let mut lines = BufReader::new(child.stdout.take().ok_or_else(|| err!("no pipe"))?).lines();
    ensure!(
        lines.next().transpose()?.as_deref() == Some("READY"),
        "child not ready"
    );
    let mut tx = ring.sender()?;
    let t = Instant::now();
    send_run(&mut tx, n)?;
    let done = lines.next().transpose()?;
    let elapsed = t.elapsed();
    ensure!(child.wait()?.success(), "child failed");
    ensure!(done == Some(format!("DONE {n}")), "child reported {done:?}");
    Ok(rate(n, elapsed))
}

#[cfg(not(loom))]
fn xproc_child(ring: SharedRing) -> Result<()> {
    pin(CONSUMER_CPU);
    let mut rx = ring.receiver()?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "READY")?;
    out.flush()?;
    let got = drain(&mut rx)?;
    writeln!(out, "DONE {got}")?;
    out.flush()?;
    Ok(())
}

/// What a spinning side does between polls: nothing. With a PAUSE here (`spin_loop`) runs on this
/// KVM guest were bimodal (the same measurement at 12 or 48 Mpackets/s): pause-loop exiting lets
/// the hypervisor deschedule a spinning vCPU. Baselines and rings spin the same way.
#[inline]
fn idle() {}
