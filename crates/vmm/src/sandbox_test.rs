use super::*;

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
    for kind in [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::Worker,
        ThreadKind::Input,
        ThreadKind::Api,
    ] {
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
