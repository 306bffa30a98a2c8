//! netvsp as a VSP process (`kvm-host vsp net`): the child holds netvsp, the demo's virtual switch
//! and the host endpoint (10.0.0.1, [`crate::vmbus::netpeer`]) on the switch's second port, so the
//! whole network path runs outside the VMM. The endpoint's counters reach the VMM through a shared
//! page ([`SharedPeerStats`], a memfd the child inherits), so the demo's host-side check (the
//! endpoint really answered ARP and ping) stays as strict as in process.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use vmbus_core::oop::{Connection, Supervisor};
use vsp_net::netvsp::HostedNetvsp;

use crate::devices::{self, DeviceSetupError};
use crate::memory::GuestRam;
use crate::vmbus::device::{OutOfProcess, memory_table};
use crate::vmbus::netpeer::PeerStats;

const PAGE: usize = 4096;
/// Counters in the shared page: ARP replies, echo replies, frames in, ignored.
const COUNTERS: usize = 4;

/// The host endpoint's counters in a page shared between the VMM and the VSP process.
pub struct SharedPeerStats {
    file: File,
    ptr: NonNull<AtomicU64>,
}

// SAFETY: the mapping is only accessed through `AtomicU64`s and lives as long as the value.
unsafe impl Send for SharedPeerStats {}
// SAFETY: as above; atomics make shared access sound.
unsafe impl Sync for SharedPeerStats {}

impl SharedPeerStats {
    /// A new zeroed page (VMM side).
    pub fn create() -> std::io::Result<Self> {
        Self::map(ringbuf::mmap::ring_memfd("netpeer-stats", PAGE as u64)?)
    }

    /// The page behind an inherited descriptor (VSP side).
    ///
    /// # Safety
    /// `fd` must be an open descriptor this process owns and uses nowhere else.
    pub unsafe fn from_raw_fd(fd: RawFd) -> std::io::Result<Self> {
        // SAFETY: per this function's contract.
        let f = unsafe { File::from_raw_fd(fd) };
        if f.metadata()?.len() < PAGE as u64 {
            return Err(std::io::Error::other(
                "stats descriptor is smaller than a page",
            ));
        }
        Self::map(f)
    }

    fn map(file: File) -> std::io::Result<Self> {
        // SAFETY: a fresh shared mapping of one page of `file` (at least a page long, checked or
        // created so); nothing else is mapped at the address the kernel picks.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<AtomicU64>())
            .ok_or_else(|| std::io::Error::other("mmap returned null"))?;
        Ok(SharedPeerStats { file, ptr })
    }

    fn counter(&self, i: usize) -> &AtomicU64 {
        let i = i.min(COUNTERS - 1);
        // SAFETY: the page holds COUNTERS aligned u64s (page-aligned mapping, i < COUNTERS); any
        // bit pattern is a valid AtomicU64 and the mapping outlives `&self`.
        unsafe { &*self.ptr.as_ptr().add(i) }
    }

    /// (ARP replies, echo replies) the endpoint sent, over every VSP process so far.
    pub fn replies(&self) -> (u64, u64) {
        (
            self.counter(0).load(Ordering::Acquire),
            self.counter(1).load(Ordering::Acquire),
        )
    }

    /// The descriptor (to pass to the child).
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Publishes `base + now` for each counter.
    fn publish(&self, base: &[u64; COUNTERS], s: &PeerStats) {
        let now = [
            s.arp_replies.load(Ordering::Relaxed),
            s.echo_replies.load(Ordering::Relaxed),
            s.frames_in.load(Ordering::Relaxed),
            s.ignored.load(Ordering::Relaxed),
        ];
        for (i, (b, n)) in base.iter().zip(now).enumerate() {
            self.counter(i)
                .store(b.saturating_add(n), Ordering::Release);
        }
    }

    fn snapshot(&self) -> [u64; COUNTERS] {
        std::array::from_fn(|i| self.counter(i).load(Ordering::Acquire))
    }
}

impl Drop for SharedPeerStats {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the page mapped in `map`; no reference outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), PAGE) };
    }
}

/// In the VSP process: serves netvsp with its switch and the host endpoint over `conn` until the
/// VMM closes it. Counters go to `stats` every 20 ms (a restarted process adds to what its
/// predecessors counted).
pub fn serve(
    conn: &Connection,
    stats: Option<SharedPeerStats>,
    seccomp: bool,
) -> Result<(), DeviceSetupError> {
    let (switch, guest_port, peer) = devices::switch_with_peer()?;
    let mut dev = HostedNetvsp::new(devices::netvsp_config(), Box::new(guest_port), None);
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = match stats {
        Some(shared) => {
            let (s, peer_stats) = (stop.clone(), peer.stats.clone());
            let base = shared.snapshot();
            Some(
                std::thread::Builder::new()
                    .name("netpeer-stats".into())
                    .spawn(move || {
                        while !s.load(Ordering::Acquire) {
                            shared.publish(&base, &peer_stats);
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        shared.publish(&base, &peer_stats);
                    })
                    .map_err(DeviceSetupError::Netvsp)?,
            )
        }
        None => None,
    };
    if seccomp {
        vmbus_core::oop::seccomp::install(&vmbus_core::oop::seccomp::net_syscalls())
            .map_err(|e| DeviceSetupError::Netvsp(std::io::Error::other(e.to_string())))?;
    }
    tracing::info!(
        seccomp,
        "kvm-host vsp net: netvsp, switch and host endpoint serving"
    );
    let r = vmbus_core::oop::serve(conn, &mut dev)
        .map_err(|e| DeviceSetupError::Netvsp(std::io::Error::other(e.to_string())));
    stop.store(true, Ordering::Release);
    if let Some(t) = publisher
        && t.join().is_err()
    {
        tracing::error!("netpeer-stats thread panicked");
    }
    drop((dev, peer, switch));
    r
}

/// The NIC in a VSP process: `exe vsp net --stats-fd N`, supervised; the returned stats page shows
/// what the host endpoint in the child answered.
pub fn network_out_of_process(
    exe: &Path,
    ram: &GuestRam,
) -> Result<(OutOfProcess, Arc<SharedPeerStats>), DeviceSetupError> {
    let stats = Arc::new(SharedPeerStats::create().map_err(DeviceSetupError::Netvsp)?);
    // The child inherits a duplicate (kept open here for every restart).
    let fd: OwnedFd = stats
        .fd()
        .try_clone_to_owned()
        .map_err(DeviceSetupError::Netvsp)?;
    ringbuf::mmap::set_inheritable(fd.as_fd()).map_err(DeviceSetupError::Netvsp)?;
    let exe = exe.to_path_buf();
    let memory = memory_table(ram).map_err(DeviceSetupError::Memory)?;
    let sup = Supervisor::start(
        move || {
            let mut c = std::process::Command::new(&exe);
            c.arg("vsp")
                .arg("net")
                .arg("--stats-fd")
                .arg(fd.as_raw_fd().to_string());
            c
        },
        memory,
        Duration::from_secs(10),
    )?;
    Ok((
        OutOfProcess::new(sup, devices::network_description()),
        stats,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_stats_add_to_what_predecessors_counted() {
        let a = SharedPeerStats::create().unwrap();
        let s = PeerStats::default();
        s.arp_replies.store(2, Ordering::Relaxed);
        s.echo_replies.store(3, Ordering::Relaxed);
        a.publish(&a.snapshot(), &s);
        assert_eq!(a.replies(), (2, 3));
        // A second mapping of the same page (what the child sees) continues from there.
        let dup = a.fd().try_clone_to_owned().unwrap();
        // SAFETY: `dup` is a fresh descriptor owned by nothing else.
        let b = unsafe { SharedPeerStats::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(dup)) }
            .unwrap();
        let base = b.snapshot();
        b.publish(&base, &s);
        assert_eq!(a.replies(), (4, 6));
    }
}
