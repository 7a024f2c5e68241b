//! seccomp filters, one per kind of thread, built with seccompiler.
//!
//! Each thread installs its filter on itself before it touches anything the guest controls:
//! a vCPU before its first `KVM_RUN`, a device worker before it serves a queue, COM1's input
//! thread before it reads, the API thread before it accepts. The main thread installs the
//! widest one (everything the process does after start-up: it builds machines again on a
//! reboot or a restore) once the machine is built; threads it spawns afterwards inherit it and
//! add their own, so each runs with the intersection. Nothing may `execve`, `ptrace`, mount,
//! load modules or BPF, change credentials, or open network sockets other than Unix ones.
//!
//! Threads other than the main one may not open files, but an `openat` there fails with
//! `EACCES` instead of ending the process: the C library opens files on its own, lazily (glibc's
//! malloc reads `/proc/sys/vm/overcommit_memory` the first time a thread's heap shrinks, and
//! uses `madvise` when it cannot), so a refused open must be an error it can handle. A second,
//! small filter gives that answer; the thread's list lets `openat` through to it.
//!
//! io_uring operations are invisible to seccomp: the workers' rings are restricted to their
//! opcodes by `IORING_REGISTER_RESTRICTIONS` instead (see `alioth-io-uring`).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch, sock_filter,
};

/// How filters treat a syscall outside a thread's list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompMode {
    /// The process gets SIGSYS, whose handler names the syscall and ends it (exit 1).
    #[default]
    On,
    /// The syscall runs and the kernel logs it (audit): for finding what a list lacks.
    Log,
    /// No filters.
    Off,
}

/// The kinds of threads, each with its own list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread: builds machines, serves control requests (pause, snapshot).
    Main,
    /// A vCPU: `KVM_RUN` and the device emulation its exits reach.
    Vcpu,
    /// A device worker, io_uring or epoll: queues, files, taps, sockets.
    Worker,
    /// COM1's input pump and the signal forwarder.
    Input,
    /// The HTTP API server.
    Api,
}

/// What every thread needs: memory, locks, signals, thread bookkeeping, time, its own exit,
/// and writing (logs, eventfds).
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_fcntl,
    libc::SYS_futex,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_madvise,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_munmap,
    libc::SYS_nanosleep,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_read,
    libc::SYS_restart_syscall,
    libc::SYS_rseq,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_yield,
    libc::SYS_set_robust_list,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    libc::SYS_write,
    libc::SYS_writev,
];

/// Starting a thread (a vCPU starting a vhost-user backend's relay; the main thread).
const THREADS: &[i64] = &[libc::SYS_clone, libc::SYS_clone3, libc::SYS_set_tid_address];

/// Talking over Unix sockets already open or accepted (vhost-user, vsock, the API).
const SOCKET_IO: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
];

const VCPU: &[i64] = &[libc::SYS_eventfd2];

const WORKER: &[i64] = &[
    libc::SYS_connect,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_wait,
    libc::SYS_eventfd2,
    libc::SYS_fallocate,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_io_uring_setup,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_preadv2,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_pwritev2,
    libc::SYS_readv,
    libc::SYS_socket,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_gettime,
    libc::SYS_timerfd_settime,
    libc::SYS_unlink,
    libc::SYS_writev,
];

/// What the main thread may do after start-up besides a worker's and a vCPU's lists: build
/// machines again (reboot, restore), write snapshots, serve control requests.
const MAIN: &[i64] = &[
    libc::SYS_access,
    libc::SYS_bind,
    libc::SYS_fstat,
    libc::SYS_ftruncate,
    libc::SYS_getcwd,
    libc::SYS_getdents64,
    libc::SYS_getegid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getuid,
    libc::SYS_uname,
    libc::SYS_listen,
    libc::SYS_lseek,
    libc::SYS_memfd_create,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_newfstatat,
    libc::SYS_openat,
    libc::SYS_pipe2,
    libc::SYS_prlimit64,
    libc::SYS_readlink,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_rt_sigaction,
    libc::SYS_socketpair,
    libc::SYS_statx,
    libc::SYS_unlinkat,
];

/// Opening files: refused with `EACCES` (by `file_refusal`) on every thread but the main one.
const OPEN: &[i64] = &[libc::SYS_openat];

/// `ioctl` request types (bits 8-15) a kind may use.
const KVMIO: u64 = 0xAE;
/// TUN ioctls and FIONREAD share the terminal group.
const TTY_TUN: u64 = 0x54;

fn ioctl_type(ty: u64) -> SeccompRule {
    // (request >> 8) & 0xff == ty, as a masked compare of the request argument.
    SeccompRule::new(vec![
        SeccompCondition::new(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(0xff00),
            ty << 8,
        )
        .expect("a valid condition"),
    ])
    .expect("a non-empty rule")
}

/// Argument `arg` (32-bit) equals `v`.
fn arg_is(arg: u8, v: u64) -> SeccompRule {
    SeccompRule::new(vec![
        SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v)
            .expect("a valid condition"),
    ])
    .expect("a non-empty rule")
}

/// The rules of `kind`: syscall number -> conditions (empty: any arguments).
pub fn rules(kind: ThreadKind) -> BTreeMap<i64, Vec<SeccompRule>> {
    let lists: &[&[i64]] = match kind {
        ThreadKind::Main => &[COMMON, THREADS, SOCKET_IO, MAIN, WORKER, VCPU],
        ThreadKind::Vcpu => &[COMMON, THREADS, SOCKET_IO, VCPU, OPEN],
        ThreadKind::Worker => &[COMMON, SOCKET_IO, WORKER, OPEN],
        ThreadKind::Input => &[COMMON, OPEN],
        ThreadKind::Api => &[COMMON, SOCKET_IO, OPEN],
    };
    let mut m: BTreeMap<i64, Vec<SeccompRule>> = lists
        .iter()
        .flat_map(|l| l.iter())
        .map(|&nr| (nr, Vec::new()))
        .collect();
    // Threads name themselves when they start (and a vCPU may start a relay thread), and add
    // their own filter under an inherited one (which can only narrow what they may do).
    m.insert(
        libc::SYS_prctl,
        vec![
            arg_is(0, libc::PR_SET_NAME as u64),
            arg_is(0, libc::PR_SET_NO_NEW_PRIVS as u64),
        ],
    );
    m.insert(
        libc::SYS_seccomp,
        vec![arg_is(0, u64::from(libc::SECCOMP_SET_MODE_FILTER))],
    );
    // Sockets are Unix sockets only (vsock's host side, vhost-user, the API).
    if m.contains_key(&libc::SYS_socket) {
        m.insert(libc::SYS_socket, vec![arg_is(0, libc::AF_UNIX as u64)]);
    }
    match kind {
        // The main thread sets up terminals, taps and KVM: any ioctl.
        ThreadKind::Main => {
            m.insert(libc::SYS_ioctl, Vec::new());
        }
        // A vCPU only talks to KVM (run, routes, ioeventfds, irqfds, registers).
        ThreadKind::Vcpu => {
            m.insert(libc::SYS_ioctl, vec![ioctl_type(KVMIO)]);
        }
        // A worker: tap queues (TUNSETQUEUE, TUNSETOFFLOAD) and FIONREAD.
        ThreadKind::Worker => {
            m.insert(libc::SYS_ioctl, vec![ioctl_type(TTY_TUN)]);
        }
        ThreadKind::Input | ThreadKind::Api => {}
    }
    m
}

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
#[error("seccomp filter for {kind:?} threads: {reason}")]
pub struct SandboxError {
    kind: ThreadKind,
    reason: String,
}

/// Syscalls per bucket of a filter's dispatch tree (see [`compile`]).
const BUCKET: usize = 8;

/// Compiles `rules` (answered with `on_match`, everything else with `mismatch`) for `kind`'s
/// threads; `what` names the filter in errors.
///
/// seccompiler lays a filter out as one chain that compares the syscall number with each
/// listed syscall in turn, so a syscall off the list runs the whole chain. The kernel runs
/// the filter once per syscall number when it installs it (to cache which syscalls are always
/// allowed), which made installing the main thread's list (~500 instructions) cost ~0.3 ms
/// of start-up. So a list longer than [`BUCKET`] is split by syscall number into buckets, each
/// compiled by seccompiler as it stands, behind a binary search on the number: every syscall
/// meets the same verdict, after a few comparisons instead of hundreds.
fn compile(
    kind: ThreadKind,
    what: &str,
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    on_match: SeccompAction,
) -> Result<BpfProgram, SandboxError> {
    let err = |e: &dyn std::fmt::Display| SandboxError {
        kind,
        reason: format!("{what}: {e}"),
    };
    let one = |rules: BTreeMap<i64, Vec<SeccompRule>>| -> Result<BpfProgram, SandboxError> {
        let f = SeccompFilter::new(
            rules,
            mismatch.clone(),
            on_match.clone(),
            TargetArch::x86_64,
        )
        .map_err(|e| err(&e))?;
        f.try_into().map_err(|e: seccompiler::BackendError| err(&e))
    };
    if rules.len() <= BUCKET {
        return one(rules);
    }
    let entries: Vec<_> = rules.into_iter().collect();
    let mut buckets = Vec::new();
    for chunk in entries.chunks(BUCKET) {
        let first = u32::try_from(chunk[0].0).map_err(|e| err(&e))?;
        buckets.push((first, one(chunk.iter().cloned().collect())?));
    }
    dispatch(buckets).map_err(|e| err(&e))
}

/// A program that loads the syscall number and jumps, by binary search over each bucket's
/// first number, to the bucket whose range holds it (the first bucket also takes everything
/// below it); each bucket is a whole filter of its own, checking the architecture first.
fn dispatch(buckets: Vec<(u32, BpfProgram)>) -> Result<BpfProgram, String> {
    fn insn(code: u32, k: u32, jt: u8, jf: u8) -> sock_filter {
        sock_filter {
            code: code as u16,
            jt,
            jf,
            k,
        }
    }
    /// Lays out the tree for buckets `lo..hi`: a node is `JGE first[mid]` with its lower half
    /// right after it; a leaf is a `JA` to its bucket, patched once the buckets are placed.
    fn tree(
        prog: &mut BpfProgram,
        leaves: &mut Vec<(usize, usize)>,
        firsts: &[u32],
        lo: usize,
        hi: usize,
    ) -> Result<(), String> {
        if hi - lo == 1 {
            leaves.push((prog.len(), lo));
            prog.push(insn(libc::BPF_JMP | libc::BPF_JA, 0, 0, 0));
            return Ok(());
        }
        let mid = lo + (hi - lo) / 2;
        // The lower half holds (mid - lo) leaves and one node fewer.
        let skip = u8::try_from(2 * (mid - lo) - 1)
            .map_err(|_| format!("{} buckets are too many for one jump", hi - lo))?;
        prog.push(insn(
            libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K,
            firsts[mid],
            skip,
            0,
        ));
        tree(prog, leaves, firsts, lo, mid)?;
        tree(prog, leaves, firsts, mid, hi)
    }
    let firsts: Vec<u32> = buckets.iter().map(|(f, _)| *f).collect();
    // seccomp_data.nr is the first field.
    let mut prog = vec![insn(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0, 0, 0)];
    let mut leaves = Vec::new();
    tree(&mut prog, &mut leaves, &firsts, 0, buckets.len())?;
    let mut starts = Vec::with_capacity(buckets.len());
    for (_, body) in buckets {
        starts.push(prog.len());
        prog.extend(body);
    }
    for (at, bucket) in leaves {
        // A jump counts from the instruction after it.
        prog[at].k = u32::try_from(starts[bucket] - at - 1).map_err(|e| e.to_string())?;
    }
    if prog.len() > libc::BPF_MAXINSNS as usize {
        return Err(format!("{} instructions, more than BPF allows", prog.len()));
    }
    Ok(prog)
}

/// The BPF program for `kind` with `mismatch` for syscalls outside its list.
pub fn program(kind: ThreadKind, mismatch: SeccompAction) -> Result<BpfProgram, SandboxError> {
    compile(
        kind,
        "the list",
        rules(kind),
        mismatch,
        SeccompAction::Allow,
    )
}

/// The filter that answers [`OPEN`] with `EACCES` and lets everything else through to the
/// thread's list; installed with every list but the main thread's.
fn file_refusal(kind: ThreadKind) -> Result<BpfProgram, SandboxError> {
    compile(
        kind,
        "the file-refusal filter",
        OPEN.iter().map(|&nr| (nr, Vec::new())).collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
    )
}

/// The programs a `kind` thread installs: its list with `mismatch` for what is not on it,
/// and, on every thread but the main one, a filter that answers `openat` with `EACCES`.
pub fn programs(
    kind: ThreadKind,
    mismatch: SeccompAction,
) -> Result<Vec<BpfProgram>, SandboxError> {
    let mut v = vec![program(kind, mismatch)?];
    if kind != ThreadKind::Main {
        v.push(file_refusal(kind)?);
    }
    Ok(v)
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // The syscall number sits after the address in the SIGSYS layout of siginfo_t: si_addr
    // (8 bytes) at offset 16, si_syscall (4) at 24.
    // SAFETY: the kernel passes a valid siginfo_t for SIGSYS with SA_SIGINFO.
    let nr = unsafe { *(info.cast::<u8>().add(24).cast::<i32>()) };
    let mut msg =
        *b"alioth: seccomp: a thread made syscall 000, which its filter forbids; stopping\n";
    let mut n = nr.unsigned_abs();
    for i in (39..42).rev() {
        msg[i] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    // SAFETY: write(2) and _exit(2) are async-signal-safe.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(1);
    }
}

/// Installs the SIGSYS handler that reports a forbidden syscall (mode `On`). Once per process.
pub fn install_sigsys_handler() {
    // SAFETY: a zeroed sigaction is valid; the handler only does async-signal-safe calls.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut());
    }
}

/// Installs `kind`'s filter on the calling thread.
pub fn install(kind: ThreadKind, mode: SeccompMode) -> Result<(), SandboxError> {
    let action = match mode {
        SeccompMode::Off => return Ok(()),
        SeccompMode::On => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
    };
    for p in programs(kind, action)? {
        seccompiler::apply_filter(&p).map_err(|e| SandboxError {
            kind,
            reason: e.to_string(),
        })?;
    }
    Ok(())
}

#[cfg(test)]
#[path = "sandbox_test.rs"]
mod tests;
