//! The steady-state seccomp allow-list of the VSP daemons (seccompiler, rust-vmm).
//!
//! A daemon does its setup first (socket from the supervisor, disk / TAP opened, logging), then
//! calls [`install`]: from then on every thread of the process may only make the system calls in
//! [`base_syscalls`] plus the daemon's additions. Steady state still includes new channel opens
//! and memory tables re-sent after a VMM restart, so mapping memory, receiving descriptors and
//! starting threads stay allowed; opening files or sockets, exec and the like do not.
//!
//! A forbidden call raises `SIGSYS` (`SECCOMP_RET_TRAP`); the handler writes the call's number to
//! stderr and exits the process with status [`EXIT_FORBIDDEN`]. A dead VSP is the designed
//! failure path: the supervisor restarts it, and the log says which call to look at.

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
use std::collections::BTreeMap;

/// Exit status of a daemon that made a forbidden system call.
pub const EXIT_FORBIDDEN: i32 = 159;
/// Test hook: after [`install`], a daemon whose environment has this variable set to `socket` or
/// `execve` tries that call (it must die with [`EXIT_FORBIDDEN`]).
pub const SELFTEST_ENV: &str = "VMBUS_VSP_SECCOMP_SELFTEST";

/// Why the filter could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp filter: {0}")]
    Filter(#[from] seccompiler::BackendError),
    #[error("installing the seccomp filter: {0}")]
    Install(#[from] seccompiler::Error),
    #[error("SIGSYS handler: {0}")]
    Signal(std::io::Error),
    #[error("unsupported architecture {0}")]
    Arch(&'static str),
}

/// What every VSP daemon needs in steady state (checked with `strace -f` on the soak tests: the
/// calls seen after the filter went in, plus those of paths a short run may miss — thread exit,
/// sleeping, a panic's abort): I/O on descriptors it holds (the VMM socket with
/// `SCM_RIGHTS`, eventfds, epoll/poll), memory mapping (guest memory regions, rings, the
/// in-flight journal, thread stacks, the allocator), threads (a worker per channel), time, signals
/// and exit.
pub fn base_syscalls() -> Vec<i64> {
    let mut v = vec![
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_close,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_lseek,
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_mprotect,
        libc::SYS_madvise,
        libc::SYS_brk,
        libc::SYS_rt_sigaction,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_restart_syscall,
        libc::SYS_sigaltstack,
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_sched_getaffinity,
        libc::SYS_nanosleep,
        libc::SYS_clock_nanosleep,
        libc::SYS_clock_gettime,
        libc::SYS_gettimeofday,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_getrandom,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_tgkill,
        libc::SYS_ppoll,
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_pwait,
        libc::SYS_eventfd2,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_fcntl,
        libc::SYS_clone,
        libc::SYS_clone3,
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_prctl,
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([libc::SYS_poll, libc::SYS_epoll_wait, libc::SYS_arch_prctl]);
    v
}

/// `vsp-storage serve`'s additions: positioned and vectored disk I/O, io_uring (a queue is set
/// up per channel at open), flushes and VHD growth.
pub fn storage_syscalls() -> Vec<i64> {
    vec![
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_preadv2,
        libc::SYS_pwritev2,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_fallocate,
        libc::SYS_ftruncate,
    ]
}

/// `vsp-net serve`'s additions: TAP and interface ioctls (link state, offloads).
pub fn net_syscalls() -> Vec<i64> {
    vec![libc::SYS_ioctl]
}

/// Calls answered with `EACCES` instead of killing the process: glibc opens
/// `/proc/sys/vm/overcommit_memory` the first time it shrinks a thread's malloc arena (a thread
/// exiting, e.g. after a channel close) and copes with a failed open.
fn refused_syscalls() -> Vec<i64> {
    let mut v = vec![libc::SYS_openat];
    #[cfg(target_arch = "x86_64")]
    v.push(libc::SYS_open);
    v
}

fn arch() -> Result<TargetArch, SeccompError> {
    TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|_| SeccompError::Arch(std::env::consts::ARCH))
}

/// The filter program for `base_syscalls() + extra`.
pub fn program(extra: &[i64]) -> Result<BpfProgram, SeccompError> {
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = base_syscalls()
        .into_iter()
        .chain(extra.iter().copied())
        .chain(refused_syscalls())
        .map(|nr| (nr, Vec::new()))
        .collect();
    let filter = SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, arch()?)?;
    Ok(filter.try_into()?)
}

/// The second, stacked filter: [`refused_syscalls`] fail with `EACCES` (the kernel applies the
/// most restrictive answer of all filters, so these are allowed by [`program`] and refused here).
fn refusals() -> Result<BpfProgram, SeccompError> {
    let rules = refused_syscalls()
        .into_iter()
        .map(|nr| (nr, Vec::new()))
        .collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        arch()?,
    )?;
    Ok(filter.try_into()?)
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // siginfo for SIGSYS (`_sigsys`): si_call_addr (pointer) at offset 16, si_syscall (int)
    // right after it — the same on every 64-bit Linux architecture.
    let nr = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel passes a valid siginfo_t for a SA_SIGINFO handler; the read stays
        // inside it (siginfo_t is 128 bytes).
        unsafe { info.cast::<u8>().add(24).cast::<i32>().read_unaligned() }
    };
    const PREFIX: &[u8] = b"VSP seccomp: forbidden system call ";
    let mut num = [0u8; 12];
    let mut at = num.len() - 1;
    num[at] = b'\n';
    let mut n = nr.unsigned_abs();
    loop {
        at -= 1;
        num[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || at == 0 {
            break;
        }
    }
    // SAFETY: write(2) and _exit(2) are async-signal-safe and allowed by every filter; the buffer
    // is valid for its length.
    unsafe {
        libc::write(2, PREFIX.as_ptr().cast(), PREFIX.len());
        libc::write(2, num[at..].as_ptr().cast(), num.len() - at);
        libc::_exit(EXIT_FORBIDDEN);
    }
}

/// Installs the allow-list (`base_syscalls() + extra`) on every thread of the process.
pub fn install(extra: &[i64]) -> Result<(), SeccompError> {
    let prog = program(extra)?;
    let refuse = refusals()?;
    // SAFETY: a zeroed sigaction is valid; the handler only makes async-signal-safe calls.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
            return Err(SeccompError::Signal(std::io::Error::last_os_error()));
        }
    }
    seccompiler::apply_filter_all_threads(&refuse)?;
    seccompiler::apply_filter_all_threads(&prog)?;
    tracing::info!(
        syscalls = base_syscalls().len() + extra.len(),
        "seccomp allow-list installed"
    );
    Ok(())
}

/// Runs the [`SELFTEST_ENV`] probe, if asked for (call right after [`install`]). Returns only if
/// the probe was not requested or the call was (wrongly) allowed.
pub fn selftest_from_env() {
    let Ok(what) = std::env::var(SELFTEST_ENV) else {
        return;
    };
    tracing::warn!(probe = %what, "seccomp self-test: making a forbidden call");
    match what.as_str() {
        "socket" => {
            // SAFETY: plain system call; a descriptor it might return is closed at once.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            if fd >= 0 {
                // SAFETY: `fd` was just returned to us.
                unsafe { libc::close(fd) };
            }
        }
        "execve" => {
            let path = c"/bin/true";
            let argv = [path.as_ptr(), std::ptr::null()];
            let envp = [std::ptr::null()];
            // SAFETY: NUL-terminated path and argument/environment arrays.
            unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        }
        _ => {}
    }
    tracing::error!(probe = %what, "seccomp self-test: forbidden call was allowed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile_with_additions() {
        let p = program(&storage_syscalls()).unwrap();
        assert!(p.len() > base_syscalls().len() + storage_syscalls().len());
        assert!(!refusals().unwrap().is_empty());
        for nr in [libc::SYS_socket, libc::SYS_execve, libc::SYS_openat] {
            assert!(!base_syscalls().contains(&nr), "{nr} must stay forbidden");
        }
    }
}
