use super::*;

const KINDS: [ThreadKind; 5] = [
    ThreadKind::Main,
    ThreadKind::Vcpu,
    ThreadKind::Worker,
    ThreadKind::Input,
    ThreadKind::Api,
];

/// Runs `f` on a new thread under `kind`'s filter, with EPERM (rather than SIGSYS) for what
/// the filter forbids, so a test can see it.
fn under(kind: ThreadKind, f: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        for p in programs(kind, SeccompAction::Errno(libc::EPERM as u32)).unwrap() {
            seccompiler::apply_filter(&p).unwrap();
        }
        f();
    })
    .join()
    .unwrap();
}

fn errno<T>(r: std::io::Result<T>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

fn inet_socket() -> i32 {
    // SAFETY: plain syscall; a descriptor that opens is closed.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        if fd >= 0 {
            libc::close(fd);
            return 0;
        }
        *libc::__errno_location()
    }
}

fn kvm_ioctl_on_stdin() -> i32 {
    // KVM_GET_API_VERSION on a descriptor that is not KVM: ENOTTY if allowed, EPERM if not.
    // SAFETY: an ioctl without a pointer argument.
    unsafe {
        if libc::ioctl(0, 0xAE00) < 0 {
            *libc::__errno_location()
        } else {
            0
        }
    }
}

#[test]
fn a_vcpu_may_use_kvm_ioctls_but_not_open_files_sockets_or_other_ioctls() {
    under(ThreadKind::Vcpu, || {
        assert_eq!(errno(std::fs::File::open("/dev/null")), Some(libc::EACCES));
        assert_eq!(inet_socket(), libc::EPERM);
        assert_ne!(kvm_ioctl_on_stdin(), libc::EPERM, "KVM ioctls pass");
        // SAFETY: TCGETS with a valid termios buffer.
        let r = unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            libc::ioctl(0, libc::TCGETS, &mut t)
        };
        assert_eq!(r, -1);
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EPERM)
        );
        // What it needs goes through.
        assert!(alioth_hv::EventFd::new(0).is_ok());
        let (tx, rx) = std::sync::mpsc::channel();
        tx.send(1).unwrap();
        assert_eq!(rx.recv().unwrap(), 1);
    });
}

#[test]
fn a_worker_may_use_unix_sockets_and_rings_but_not_open_files_or_kvm() {
    under(ThreadKind::Worker, || {
        assert_eq!(errno(std::fs::File::open("/dev/null")), Some(libc::EACCES));
        assert_eq!(inet_socket(), libc::EPERM);
        assert_eq!(kvm_ioctl_on_stdin(), libc::EPERM);
        assert!(
            std::os::unix::net::UnixStream::pair().is_err(),
            "no socketpair"
        );
        // SAFETY: plain syscall; the descriptor is closed.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        assert!(fd >= 0, "Unix sockets pass");
        // SAFETY: closing the descriptor just opened.
        unsafe { libc::close(fd) };
        // SAFETY: plain syscall; the descriptor is closed.
        let ep = unsafe { libc::epoll_create1(0) };
        assert!(ep >= 0);
        // SAFETY: as above.
        unsafe { libc::close(ep) };
    });
}

#[test]
fn the_input_and_api_threads_may_not_open_files_or_make_sockets() {
    for kind in [ThreadKind::Input, ThreadKind::Api] {
        under(kind, || {
            assert_eq!(errno(std::fs::File::open("/dev/null")), Some(libc::EACCES));
            // SAFETY: plain syscall.
            let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            assert_eq!(fd, -1);
            assert_eq!(kvm_ioctl_on_stdin(), libc::EPERM);
            let (tx, rx) = std::sync::mpsc::channel();
            tx.send(2).unwrap();
            assert_eq!(rx.recv().unwrap(), 2);
        });
    }
}

#[test]
fn the_main_thread_may_build_machines_but_not_exec_trace_or_mount() {
    under(ThreadKind::Main, || {
        assert!(std::fs::File::open("/dev/null").is_ok());
        assert_eq!(
            errno(std::process::Command::new("/bin/true").status()),
            Some(libc::EPERM),
            "no execve (or the fork before it)"
        );
        // SAFETY: PTRACE_TRACEME takes no pointers.
        let r = unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) };
        assert_eq!(r, -1);
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EPERM)
        );
        assert_eq!(inet_socket(), libc::EPERM);
    });
}

#[test]
fn every_filter_compiles() {
    for kind in KINDS {
        for action in [SeccompAction::Trap, SeccompAction::Log] {
            assert!(!program(kind, action.clone()).unwrap().is_empty());
            let n = programs(kind, action).unwrap().len();
            assert_eq!(n, if kind == ThreadKind::Main { 1 } else { 2 });
        }
    }
}

/// glibc's malloc opens `/proc/sys/vm/overcommit_memory` once per process, the first time a
/// thread's heap shrinks; under a worker's filter that used to be SIGSYS, and the VM stopped
/// (`cargo xtask bench vsock` got its worker to free enough at once). The test runs in a
/// fresh process (this test binary again) so that the first time happens under the filter.
#[test]
fn a_worker_whose_heap_shrinks_under_its_filter_lives_on() {
    const CHILD: &str = "ALIOTH_SANDBOX_HEAP_CHILD";
    if std::env::var_os(CHILD).is_some() {
        install_sigsys_handler();
        std::thread::spawn(|| {
            install(ThreadKind::Worker, SeccompMode::On).unwrap();
            // 64 KiB blocks come from the thread's own heap (below the mmap threshold); freed
            // together they leave a top chunk far above the trim threshold, so the heap shrinks.
            let blocks: Vec<Vec<u8>> = (0..64u8).map(|i| vec![i; 64 << 10]).collect();
            assert!(blocks.iter().all(|b| b.len() == 64 << 10));
            drop(blocks);
            let again: Vec<u8> = vec![1; 64 << 10];
            assert_eq!(again[100], 1);
        })
        .join()
        .unwrap();
        println!("heap-child-done");
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "sandbox::tests::a_worker_whose_heap_shrinks_under_its_filter_lives_on",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("heap-child-done"),
        "the child died: {:?}\n{}\n{}",
        out.status,
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a classic BPF program on `data` (struct seccomp_data: nr, arch, ip, args) the way
/// the kernel does, for the instructions seccompiler and [`dispatch`] emit; returns the verdict
/// and how many instructions ran. Panics on any other instruction and on running off the end.
fn run_bpf(prog: &[sock_filter], data: &[u32; 16]) -> (u32, usize) {
    let (mut a, mut pc, mut steps) = (0u32, 0usize, 0usize);
    loop {
        let i = prog.get(pc).expect("the program ran off its end");
        pc += 1;
        steps += 1;
        let jump = |taken: bool| usize::from(if taken { i.jt } else { i.jf });
        match u32::from(i.code) {
            c if c == libc::BPF_LD | libc::BPF_W | libc::BPF_ABS => {
                assert_eq!(i.k % 4, 0, "an aligned word load");
                a = data[i.k as usize / 4];
            }
            c if c == libc::BPF_ALU | libc::BPF_AND | libc::BPF_K => a &= i.k,
            c if c == libc::BPF_JMP | libc::BPF_JA => pc += i.k as usize,
            c if c == libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K => pc += jump(a == i.k),
            c if c == libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K => pc += jump(a >= i.k),
            c if c == libc::BPF_JMP | libc::BPF_JGT | libc::BPF_K => pc += jump(a > i.k),
            c if c == libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K => pc += jump(a & i.k != 0),
            c if c == libc::BPF_RET | libc::BPF_K => return (i.k, steps),
            other => panic!("instruction {other:#x} at {} is not expected", pc - 1),
        }
    }
}

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const AUDIT_ARCH_I386: u32 = 0x4000_0003;

/// `kind`'s list as seccompiler lays it out on its own: one chain.
fn flat(kind: ThreadKind) -> BpfProgram {
    SeccompFilter::new(
        rules(kind),
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .unwrap()
    .try_into()
    .unwrap()
}

#[test]
fn a_bucketed_filter_gives_every_syscall_the_verdict_of_the_flat_one() {
    // First arguments the lists look at (prctl options, socket families, seccomp ops, ioctl
    // requests), their neighbours and values no rule names.
    let args: &[u32] = &[
        0,
        1,
        2,
        10,
        libc::PR_SET_NAME as u32,
        libc::PR_SET_NO_NEW_PRIVS as u32,
        libc::PR_SET_NO_NEW_PRIVS as u32 + 1,
        libc::AF_UNIX as u32,
        libc::AF_INET as u32,
        libc::SECCOMP_SET_MODE_FILTER,
        0xae00,
        0xae80,
        0xaf00,
        libc::TCGETS as u32,
        0x5401_ae00,
        u32::MAX,
    ];
    for kind in KINDS {
        let flat = flat(kind);
        let bucketed = program(kind, SeccompAction::Trap).unwrap();
        assert_ne!(
            bucketed, flat,
            "{kind:?}: a list longer than a bucket is split"
        );
        let (mut allowed, mut runs) = (0, 0);
        for arch in [AUDIT_ARCH_X86_64, AUDIT_ARCH_I386] {
            for nr in 0..1024u32 {
                for &arg in args {
                    let mut data = [0u32; 16];
                    (data[0], data[1]) = (nr, arch);
                    // Arguments 0 and 1, low halves (the rules compare 32 bits).
                    (data[4], data[6]) = (arg, arg);
                    let want = run_bpf(&flat, &data).0;
                    assert_eq!(
                        run_bpf(&bucketed, &data).0,
                        want,
                        "{kind:?}: syscall {nr}, arch {arch:#x}, argument {arg:#x}"
                    );
                    runs += 1;
                    allowed += usize::from(want == libc::SECCOMP_RET_ALLOW);
                }
            }
        }
        assert!(allowed > 0 && allowed < runs, "{kind:?}: both verdicts met");
    }
}

#[test]
fn a_syscall_off_the_list_meets_a_few_comparisons_instead_of_the_whole_chain() {
    let mut data = [0u32; 16];
    (data[0], data[1]) = (libc::SYS_execve as u32, AUDIT_ARCH_X86_64);
    let (verdict, flat) = run_bpf(&flat(ThreadKind::Main), &data);
    let (same, bucketed) = run_bpf(
        &program(ThreadKind::Main, SeccompAction::Trap).unwrap(),
        &data,
    );
    assert_eq!(
        (verdict, same),
        (libc::SECCOMP_RET_TRAP, libc::SECCOMP_RET_TRAP)
    );
    assert!(flat > 150, "the flat chain ran {flat} instructions");
    assert!(
        bucketed * 5 < flat,
        "bucketed {bucketed}, flat {flat} instructions"
    );
}
