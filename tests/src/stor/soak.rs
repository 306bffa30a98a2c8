//! The VSP kill soak: random write-then-verify I/O from storvsc while the storvsp child process
//! is killed with SIGKILL again and again; the supervisor restarts it and the harness resends
//! what the dead one had taken and not answered.
//!
//! Each of `slots` streams owns a stripe of the disk and loops: write a random extent (4–32 KiB)
//! of its stripe with fresh data, read it back, compare with the model. At the end every request
//! must have completed exactly once, without an error, and the file must equal the model.

use super::{Rng, percentile};
use anyhow::anyhow;
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};
use vsc_guest::harness::{DmaBuffer, IoOp, StorHarness};

/// What to run.
#[derive(Clone, Debug)]
pub struct SoakConfig {
    /// Kills to deliver (at least).
    pub kills: u32,
    /// Time from a kill (once the restarted VSP served a request) to the next kill.
    pub kill_interval: Duration,
    /// Concurrent write-then-verify streams.
    pub slots: usize,
    /// 512-byte blocks per stream's stripe.
    pub stripe_blocks: u64,
    pub seed: u64,
    /// Give up (and report) after this long.
    pub limit: Duration,
    /// How long requests in flight may take to finish once the kills are over.
    pub drain: Duration,
}

impl Default for SoakConfig {
    fn default() -> Self {
        SoakConfig {
            kills: 20,
            kill_interval: Duration::from_millis(200),
            slots: 16,
            stripe_blocks: 2048,
            seed: 0x50a6,
            limit: Duration::from_secs(50),
            drain: Duration::from_secs(10),
        }
    }
}

impl SoakConfig {
    /// Bytes of disk the soak uses.
    pub fn disk_bytes(&self) -> u64 {
        self.slots as u64 * self.stripe_blocks * 512
    }
}

/// What happened.
#[derive(Clone, Debug, Default)]
pub struct SoakReport {
    pub kills: u32,
    pub restarts: u64,
    pub submitted: u64,
    pub completed: u64,
    pub writes: u64,
    pub verified_reads: u64,
    /// Requests submitted and never completed.
    pub lost: u64,
    /// Requests that completed with an error or short, plus harness failures.
    pub io_errors: u64,
    /// Reads whose data differed from the model.
    pub verify_errors: u64,
    /// 4 KiB blocks of the file that differ from the model at the end.
    pub file_mismatches: u64,
    /// SIGKILL → first request completed by the restarted VSP, ms.
    pub reconnect_ms: Vec<f64>,
    /// The supervisor's own restart time (noticed dead → channels re-opened), ms.
    pub restart_ms: Vec<f64>,
    pub resent: u64,
    pub duplicates: u64,
    pub unknown: u64,
    pub elapsed: Duration,
    /// First few failure descriptions.
    pub failures: Vec<String>,
}

impl SoakReport {
    pub fn clean(&self) -> bool {
        self.lost == 0
            && self.io_errors == 0
            && self.verify_errors == 0
            && self.file_mismatches == 0
            && self.unknown == 0
    }

    pub fn reconnect_p50(&self) -> f64 {
        percentile(&self.reconnect_ms, 50.0)
    }

    pub fn reconnect_p99(&self) -> f64 {
        percentile(&self.reconnect_ms, 99.0)
    }

    fn fail(&mut self, what: String) {
        if self.failures.len() < 10 {
            self.failures.push(what);
        }
    }
}

/// Bytes a stream writes: differ by position and generation.
pub fn pattern(lba: u64, generation: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    let mut x = lba.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ generation.wrapping_mul(0xA24B_AED4);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

enum Phase {
    Write,
    Verify,
}

struct InFlight {
    slot: usize,
    phase: Phase,
    lba: u64,
    buf: DmaBuffer,
}

struct Kill {
    at: Instant,
    restarts_before: u64,
}

/// Runs the soak on `h` (storvsp in a supervised child process serving `disk`, a raw file of at
/// least [`SoakConfig::disk_bytes`] that starts as zeros).
pub fn run(h: &mut StorHarness, disk: &Path, cfg: &SoakConfig) -> anyhow::Result<SoakReport> {
    let mut rep = SoakReport::default();
    let block = u64::from(h.disk().map_err(|e| anyhow!("{e}"))?.block_size);
    if block != 512 {
        anyhow::bail!("soak expects 512-byte blocks, disk has {block}");
    }
    let mut model = vec![0u8; cfg.disk_bytes() as usize];
    let mut rng = Rng::new(cfg.seed);
    let mut generation = 0u64;
    let mut flying: HashMap<u64, InFlight> = HashMap::new();
    let start = Instant::now();
    let mut kill: Option<Kill> = None;
    let mut last_kill = start;
    let mut stopping = false;
    let mut stop_at = None;

    // Starts slot `s`'s next write.
    let write = |h: &mut StorHarness,
                 s: usize,
                 rng: &mut Rng,
                 generation: &mut u64,
                 model: &mut [u8]|
     -> anyhow::Result<(u64, InFlight)> {
        let blocks = 8 * (1 + rng.below(8));
        let lba =
            s as u64 * cfg.stripe_blocks + 8 * rng.below((cfg.stripe_blocks - blocks) / 8 + 1);
        *generation += 1;
        let data = pattern(lba, *generation, (blocks * 512) as usize);
        let buf = h.ram().alloc(blocks * 512).map_err(|e| anyhow!("{e}"))?;
        h.ram().write(&buf, 0, &data).map_err(|e| anyhow!("{e}"))?;
        let at = (lba * 512) as usize;
        model[at..at + data.len()].copy_from_slice(&data);
        let tag = h
            .submit(IoOp::Write {
                lba,
                buf: buf.clone(),
                fua: false,
            })
            .map_err(|e| anyhow!("submit: {e}"))?;
        Ok((
            tag,
            InFlight {
                slot: s,
                phase: Phase::Write,
                lba,
                buf,
            },
        ))
    };

    for s in 0..cfg.slots {
        let (tag, f) = write(h, s, &mut rng, &mut generation, &mut model)?;
        flying.insert(tag, f);
        rep.submitted += 1;
        rep.writes += 1;
    }
    while !flying.is_empty() {
        let now = Instant::now();
        if !stopping && (rep.kills >= cfg.kills || now - start > cfg.limit) {
            // Let the last restart serve, then stop issuing and drain.
            if kill.is_none() || now - start > cfg.limit {
                stopping = true;
                stop_at = Some(now);
            }
        }
        if let Some(t) = stop_at
            && now - t > cfg.drain
        {
            rep.fail(format!("{} requests never completed", flying.len()));
            break;
        }
        if !stopping && kill.is_none() && now - last_kill >= cfg.kill_interval {
            let pid = h.supervisor().and_then(|s| s.pid());
            if let Some(pid) = pid.and_then(|p| libc::pid_t::try_from(p).ok()) {
                // SAFETY: plain syscall on the VSP child this harness started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                rep.kills += 1;
                last_kill = now;
                kill = Some(Kill {
                    at: now,
                    restarts_before: h.vsp_restarts,
                });
            }
        }
        let restarts_before_poll = h.vsp_restarts;
        let done = match h.poll(Duration::from_millis(2)) {
            Ok(d) => d,
            Err(e) => {
                rep.io_errors += 1;
                rep.fail(format!("poll: {e}"));
                break;
            }
        };
        // Notice a dead VSP at once (a VMM watches the process; the harness alone checks every
        // 20 ms).
        if let Err(e) = h.check_vsp() {
            rep.io_errors += 1;
            rep.fail(format!("restart: {e}"));
            break;
        }
        if let Some(k) = &kill
            && restarts_before_poll > k.restarts_before
            && !done.is_empty()
        {
            rep.reconnect_ms.push(k.at.elapsed().as_secs_f64() * 1000.0);
            kill = None;
        }
        for d in done {
            let Some(f) = flying.remove(&d.tag) else {
                rep.duplicates += 1;
                continue;
            };
            rep.completed += 1;
            let len = f.buf.len();
            let ok = match d.result {
                Ok(n) if n == len => true,
                other => {
                    rep.io_errors += 1;
                    rep.fail(format!("slot {} lba {}: {other:?}", f.slot, f.lba));
                    false
                }
            };
            if ok && matches!(f.phase, Phase::Verify) {
                let mut got = vec![0u8; len as usize];
                h.ram()
                    .read(&f.buf, 0, &mut got)
                    .map_err(|e| anyhow!("{e}"))?;
                let at = (f.lba * 512) as usize;
                if got[..] != model[at..at + got.len()] {
                    rep.verify_errors += 1;
                    let dups = h.driver().stats().duplicates;
                    rep.fail(format!(
                        "slot {} lba {}: data differs (duplicate completions so far: {dups})",
                        f.slot, f.lba
                    ));
                }
                rep.verified_reads += 1;
            }
            let (slot, phase, lba, buf) = (f.slot, f.phase, f.lba, f.buf);
            if stopping {
                h.ram().free(buf);
                continue;
            }
            let (tag, next) = match phase {
                Phase::Write if ok => {
                    let tag = h
                        .submit(IoOp::Read {
                            lba,
                            buf: buf.clone(),
                        })
                        .map_err(|e| anyhow!("submit: {e}"))?;
                    (
                        tag,
                        InFlight {
                            slot,
                            phase: Phase::Verify,
                            lba,
                            buf,
                        },
                    )
                }
                _ => {
                    h.ram().free(buf);
                    rep.writes += 1;
                    write(h, slot, &mut rng, &mut generation, &mut model)?
                }
            };
            rep.submitted += 1;
            flying.insert(tag, next);
        }
    }
    rep.lost = flying.len() as u64;
    rep.elapsed = start.elapsed();
    if rep.lost == 0
        && let Err(e) = h.flush()
    {
        rep.io_errors += 1;
        rep.fail(format!("flush: {e}"));
    }
    let file = std::fs::read(disk)?;
    rep.file_mismatches = model
        .chunks(4096)
        .zip(file.chunks(4096))
        .filter(|(a, b)| a != b)
        .count() as u64;
    if file.len() < model.len() {
        rep.file_mismatches += 1;
    }
    rep.restarts = h.vsp_restarts;
    if let Some(s) = h.supervisor() {
        rep.restart_ms = s
            .restarts
            .iter()
            .map(|d| d.as_secs_f64() * 1000.0)
            .collect();
    }
    let st = h.driver().stats();
    rep.resent = st.resent;
    rep.duplicates += st.duplicates;
    rep.unknown = st.unknown;
    Ok(rep)
}
