//! Bad input to `alioth` ends with a clear message and exit status 2, never a panic.

use std::path::Path;
use std::process::{Command, Output};

use alioth_test_util::guest_artifact;

fn alioth(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_alioth"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run alioth")
}

#[track_caller]
fn assert_usage_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains(needle), "expected `{needle}` in: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
}

/// A folder with a placeholder "kernel" (any regular file gets past the config checks to the
/// device setup; the image is read only after the devices are made).
fn placeholder_kernel() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("k");
    std::fs::write(&k, "x").unwrap();
    let k = k.to_str().unwrap().to_string();
    (dir, k)
}

#[test]
fn missing_kernel_is_a_usage_error() {
    let out = alioth(&["boot", "--kernel", "/nonexistent/bzImage"]);
    assert_usage_error(&out, "/nonexistent/bzImage");
    assert_usage_error(&alioth(&["boot"]), "no kernel");
}

#[test]
fn a_file_that_is_not_a_kernel_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("notes.txt");
    std::fs::write(&k, "hello").unwrap();
    let out = alioth(&["boot", "--kernel", k.to_str().unwrap(), "--serial", "off"]);
    assert_usage_error(&out, "is not a kernel image");
}

#[test]
fn malformed_toml_and_unknown_keys_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("vm.toml");
    std::fs::write(&cfg, "kernel = \"k\"\ncpus = [\n").unwrap();
    let out = alioth(&["boot", "--config", cfg.to_str().unwrap()]);
    assert_usage_error(&out, "line 2");
    std::fs::write(&cfg, "kernel = \"k\"\nvcpus = 2\n").unwrap();
    let out = alioth(&["boot", "--config", cfg.to_str().unwrap()]);
    assert_usage_error(&out, "unknown field `vcpus`");
}

#[test]
fn memory_zero_or_beyond_the_host_and_zero_cpus_are_usage_errors() {
    let (_dir, k) = placeholder_kernel();
    let k = k.as_str();
    assert_usage_error(&alioth(&["boot", "--kernel", k, "--memory", "0"]), "memory");
    assert_usage_error(&alioth(&["boot", "--kernel", k, "--cpus", "0"]), "cpus");
    assert_usage_error(
        &alioth(&["boot", "--kernel", k, "--memory", "lots"]),
        "size",
    );
    let Some(vmlinux) = guest_artifact("vmlinux") else {
        return;
    };
    // 1 PiB is a valid guest-physical size but no host process can map it.
    let out = alioth(&[
        "boot",
        "--kernel",
        vmlinux.to_str().unwrap(),
        "--memory",
        "1024T",
        "--serial",
        "off",
    ]);
    // Beyond the guest-physical address space (or, on a host with more, beyond what it can
    // map): either way a usage error naming the setting.
    assert_usage_error(&out, "memory");
}

#[test]
fn initramfs_that_does_not_fit_is_a_usage_error() {
    let Some(vmlinux) = guest_artifact("vmlinux") else {
        return;
    };
    let big = tempfile::NamedTempFile::new().unwrap();
    big.as_file().set_len(64 << 20).unwrap();
    let out = alioth(&[
        "boot",
        "--kernel",
        vmlinux.to_str().unwrap(),
        "--initramfs",
        big.path().to_str().unwrap(),
        "--memory",
        "96M",
        "--serial",
        "off",
    ]);
    assert_usage_error(&out, "does not fit");
}

#[test]
fn help_explains_every_option() {
    let out = alioth(&["--help"]);
    assert!(out.status.success());
    let top = String::from_utf8_lossy(&out.stdout);
    assert!(top.contains("boot") && top.contains("Exit status"), "{top}");
    let out = alioth(&["boot", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--config",
        "--kernel",
        "--initramfs",
        "--cmdline",
        "--cpus",
        "--memory",
        "--serial",
        "--cpu-features",
        "--boot-protocol",
        "--exit-device",
        "--disk",
        "--net",
        "--rng",
        "--vsock",
        "--console",
    ] {
        assert!(
            help.contains(flag),
            "`{flag}` missing from boot --help:\n{help}"
        );
    }
    assert_eq!(alioth(&["boot", "--bogus"]).status.code(), Some(2));
    assert!(Path::new(env!("CARGO_BIN_EXE_alioth")).exists());
}

#[test]
fn vhost_user_bad_specs_and_sockets_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).to_string_lossy().into_owned();
    let img = d("disk.img");
    std::fs::write(&img, vec![0u8; 4096]).unwrap();
    let sock = d("blk.sock");
    // The disk image is missing.
    let out = alioth(&[
        "vhost-user",
        "blk",
        "--socket",
        &sock,
        "--disk",
        &d("none.img"),
    ]);
    assert_usage_error(&out, "none.img");
    // A bad disk spec.
    let out = alioth(&[
        "vhost-user",
        "blk",
        "--socket",
        &sock,
        "--disk",
        "path=x,bogus=1",
    ]);
    assert_usage_error(&out, "unknown key `bogus`");
    // The socket path exists and is not a socket.
    let out = alioth(&["vhost-user", "blk", "--socket", &img, "--disk", &img]);
    assert_usage_error(&out, "not a socket");
    // A socket another process accepts on.
    let _live = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let out = alioth(&["vhost-user", "blk", "--socket", &sock, "--disk", &img]);
    assert_usage_error(&out, "in use");
    // Neither a device nor a file; both; a file with two devices.
    assert_usage_error(&alioth(&["vhost-user"]), "give a device");
    let cfg = d("vu.toml");
    std::fs::write(
        &cfg,
        "socket = \"s.sock\"\n[rng]\n[blk]\npath = \"disk.img\"\n",
    )
    .unwrap();
    assert_usage_error(&alioth(&["vhost-user", "--config", &cfg]), "exactly one of");
    let out = alioth(&["vhost-user", "--config", &cfg, "rng", "--socket", &sock]);
    assert_usage_error(&out, "not both");
    std::fs::write(&cfg, "sockett = 1\n").unwrap();
    assert_usage_error(&alioth(&["vhost-user", "--config", &cfg]), "unknown field");
}

/// Runs alioth, failing the test if it has not exited within `secs` (a blocking open or an
/// endless read must show up as a failure, not a hung test run).
fn alioth_within(args: &[&str], secs: u64) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_alioth"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run alioth");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("alioth {args:?} did not exit within {secs} s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path; the result is checked.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

#[test]
fn a_config_that_is_not_a_regular_file_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("cfg.fifo");
    mkfifo(&fifo);
    for cfg in ["/dev/zero", fifo.to_str().unwrap()] {
        let out = alioth_within(&["boot", "-c", cfg], 10);
        assert_usage_error(&out, "is not a regular file");
    }
    let big = dir.path().join("big.toml");
    std::fs::write(&big, vec![b'#'; 2 << 20]).unwrap();
    assert_usage_error(
        &alioth_within(&["boot", "-c", big.to_str().unwrap()], 10),
        "at most",
    );
}

#[test]
fn a_serial_file_that_is_not_a_regular_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("serial.fifo");
    mkfifo(&fifo);
    for target in [fifo.to_str().unwrap(), "/dev/full"] {
        let serial = format!("file:{target}");
        let out = alioth_within(&["boot", "--kernel", "/bin/true", "--serial", &serial], 10);
        assert_usage_error(&out, "is not a regular file");
    }
}

#[test]
fn memory_beyond_what_kvm_addresses_is_a_usage_error_naming_memory() {
    let Some(k) = guest_artifact("vmlinux") else {
        return;
    };
    let out = alioth_within(
        &[
            "boot",
            "--kernel",
            k.to_str().unwrap(),
            "--memory",
            "16T",
            "--serial",
            "off",
        ],
        60,
    );
    assert_usage_error(&out, "--memory");
}

#[test]
fn a_truncated_bzimage_is_refused_not_booted() {
    let Some(vmlinuz) = guest_artifact("vmlinuz") else {
        return;
    };
    let whole = std::fs::read(&vmlinuz).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for len in [1 << 20, 2048] {
        let k = dir.path().join(format!("vmlinuz-{len}"));
        std::fs::write(&k, &whole[..len]).unwrap();
        let out = alioth_within(
            &[
                "boot",
                "--kernel",
                k.to_str().unwrap(),
                "--memory",
                "256M",
                "--serial",
                "off",
            ],
            30,
        );
        assert_usage_error(&out, "truncated bzImage");
    }
}

#[test]
fn bad_net_settings_are_usage_errors() {
    let (dir, k) = placeholder_kernel();
    let k = k.as_str();
    for (spec, needle) in [
        ("tap=auto,mac=02:00:00:00:00", "six hex bytes"),
        ("tap=auto,mac=zz:00:00:00:00:01", "six hex bytes"),
        ("tap=auto,mac=01:00:5e:00:00:01", "multicast"),
        ("tap=auto,queues=0", "queues = 0"),
        ("tap=auto,queues=99", "1 to 16"),
        ("tap=auto,queue_size=100", "queue_size"),
        ("tap=auto,mtu=20", "mtu"),
        ("tap=a-name-far-too-long-for-linux", "longer than 15"),
        ("tap=auto,speed=10", "unknown key `speed`"),
        ("tap=auto,backend=dpdk", "backend"),
    ] {
        let out = alioth(&["boot", "--kernel", k, "--serial", "off", "--net", spec]);
        assert_usage_error(&out, needle);
    }
    let cfg = dir.path().join("vm.toml");
    std::fs::write(
        &cfg,
        format!("kernel = \"{k}\"\n[[net]]\ntap = \"t0\"\n[[net]]\ntap = \"t0\"\n"),
    )
    .unwrap();
    let out = alioth(&["boot", "--config", cfg.to_str().unwrap()]);
    assert_usage_error(&out, "two net devices");
}

/// Runs `script` in a new network namespace (never the host's), if this is root with `unshare`
/// and `ip`; None (with the reason printed) otherwise.
fn in_new_netns(script: &str) -> Option<Output> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to create a network namespace and a tap");
        return None;
    }
    let out = Command::new("unshare")
        .args(["-n", "sh", "-c", script])
        .stdin(std::process::Stdio::null())
        .output();
    match out {
        Ok(o) if String::from_utf8_lossy(&o.stderr).contains("ip: not found") => {
            eprintln!("skipped: `ip` (iproute2) is missing");
            None
        }
        Ok(o) => Some(o),
        Err(e) => {
            eprintln!("skipped: cannot run unshare: {e}");
            None
        }
    }
}

#[test]
fn a_tap_with_other_flags_is_a_usage_error_naming_what_is_needed() {
    let Some(vmlinux) = guest_artifact("vmlinux") else {
        return;
    };
    // A tap made without multi_queue and vnet_hdr, in a namespace of its own.
    let script = format!(
        "ip tuntap add dev t1 mode tap && exec {} boot --kernel {} --serial off --net tap=t1",
        env!("CARGO_BIN_EXE_alioth"),
        vmlinux.display()
    );
    if let Some(out) = in_new_netns(&script) {
        assert_usage_error(&out, "multi_queue vnet_hdr");
    }
}

#[test]
fn a_disk_another_process_holds_is_a_usage_error_and_duplicate_keys_too() {
    use std::os::fd::AsRawFd;
    let (dir, k) = placeholder_kernel();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let (k, img_s) = (k.as_str(), img.to_str().unwrap());
    let spec = format!("path={img_s},path={img_s}");
    let out = alioth(&["boot", "--kernel", k, "--serial", "off", "--disk", &spec]);
    assert_usage_error(&out, "`path` is given twice");
    // Another "VM" holds a write lock on the image, as Alioth and QEMU take it.
    let holder = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    // SAFETY: flock is plain data; zero is valid and the fields used are set.
    let mut l: libc::flock = unsafe { std::mem::zeroed() };
    l.l_type = libc::F_WRLCK as libc::c_short;
    l.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: fcntl on a descriptor `holder` owns with a valid flock.
    let r = unsafe { libc::fcntl(holder.as_raw_fd(), libc::F_OFD_SETLK, &mut l) };
    assert_eq!(r, 0);
    let out = alioth(&["boot", "--kernel", k, "--serial", "off", "--disk", img_s]);
    assert_usage_error(&out, "locked by another process");
    let ro = format!("path={img_s},read_only=on");
    let out = alioth(&["boot", "--kernel", k, "--serial", "off", "--disk", &ro]);
    assert_usage_error(&out, "a write lock");
}

#[test]
fn bad_vsock_settings_are_usage_errors() {
    let (dir, k) = placeholder_kernel();
    let k = k.as_str();
    let d = dir.path().display().to_string();
    let plain = format!("{d}/plain");
    std::fs::write(&plain, "keep").unwrap();
    let long = format!("{d}/{}", "s".repeat(110));
    for (spec, needle) in [
        (format!("cid=2,uds={d}/v.sock"), "cid 2 is reserved"),
        (format!("cid=x,uds={d}/v.sock"), "--vsock cid=`x`"),
        (format!("uds={d}/v.sock"), "`cid` is missing"),
        ("cid=3".to_string(), "`uds` is missing"),
        (format!("cid=3,uds={d}/no/such/dir/v.sock"), "directory"),
        (format!("cid=3,uds={plain}"), "is not a socket"),
        (format!("cid=3,uds={long}"), "bytes long"),
        (format!("cid=3,cid=4,uds={d}/v.sock"), "given twice"),
        (format!("cid=3,uds={d}/v.sock,port=1"), "unknown key `port`"),
        (
            format!("cid=3,uds={d}/v.sock,max_connections=0"),
            "max_connections",
        ),
    ] {
        let out = alioth(&["boot", "--kernel", k, "--serial", "off", "--vsock", &spec]);
        assert_usage_error(&out, needle);
    }
    assert_eq!(std::fs::read_to_string(&plain).unwrap(), "keep");
    // The same checks from a file.
    let cfg = dir.path().join("vm.toml");
    std::fs::write(
        &cfg,
        format!("kernel = \"{k}\"\n[vsock]\ncid = 1\nuds = \"v.sock\"\n"),
    )
    .unwrap();
    let out = alioth(&["boot", "--config", cfg.to_str().unwrap()]);
    assert_usage_error(&out, "cid 1 is reserved");
}

#[test]
fn bad_console_settings_are_usage_errors() {
    let (dir, k) = placeholder_kernel();
    let k = k.as_str();
    let d = dir.path().display().to_string();
    let plain = format!("{d}/plain");
    std::fs::write(&plain, "keep").unwrap();
    for (spec, needle) in [
        ("tty".to_string(), "expected `stdio`, `pty`"),
        ("file:".to_string(), "the path is empty"),
        (format!("file:{d}"), "not a regular file"),
        (format!("socket:{plain}"), "is not a socket"),
        (format!("socket:{d}/no/dir/c.sock"), "directory"),
    ] {
        let out = alioth(&["boot", "--kernel", k, "--serial", "off", "--console", &spec]);
        assert_usage_error(&out, needle);
    }
    assert_eq!(std::fs::read_to_string(&plain).unwrap(), "keep");
    let cfg = dir.path().join("vm.toml");
    std::fs::write(
        &cfg,
        format!("kernel = \"{k}\"\n[console]\nbackend = \"epoll\"\n"),
    )
    .unwrap();
    let out = alioth(&["boot", "--config", cfg.to_str().unwrap()]);
    assert_usage_error(&out, "`mode` is missing");
}

#[test]
fn bad_api_sockets_and_ctl_commands_are_refused_with_a_reason() {
    let (dir, k) = placeholder_kernel();
    let k = k.as_str();
    let d = dir.path().display().to_string();
    let plain = format!("{d}/plain");
    std::fs::write(&plain, "keep").unwrap();
    for (sock, needle) in [
        (format!("{d}/no/dir/api.sock"), "directory does not exist"),
        (plain.clone(), "is not a socket"),
    ] {
        let out = alioth(&[
            "boot",
            "--kernel",
            k,
            "--serial",
            "off",
            "--api-socket",
            &sock,
        ]);
        assert_usage_error(&out, needle);
    }
    assert_eq!(std::fs::read_to_string(&plain).unwrap(), "keep");
    // A socket another process serves.
    let busy = format!("{d}/busy.sock");
    let _l = std::os::unix::net::UnixListener::bind(&busy).unwrap();
    let out = alioth(&[
        "boot",
        "--kernel",
        k,
        "--serial",
        "off",
        "--api-socket",
        &busy,
    ]);
    assert_usage_error(&out, "another process is listening");
    // ctl: a command it does not know is a usage error; no VM there is a runtime failure.
    let out = alioth(&["ctl", "--api-socket", &busy, "explode"]);
    assert_usage_error(&out, "unknown command `explode`");
    let out = alioth(&["ctl", "--api-socket", &busy, "snapshot"]);
    assert_usage_error(&out, "needs a directory");
    let out = alioth(&["ctl", "--api-socket", &format!("{d}/none.sock"), "ping"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("none.sock"));
}

#[test]
fn a_bad_seccomp_mode_is_a_usage_error() {
    let (_dir, k) = placeholder_kernel();
    let out = alioth(&["boot", "--kernel", &k, "--seccomp", "maybe"]);
    assert_usage_error(&out, "seccomp `maybe`: expected `on`, `log` or `off`");
}

#[test]
fn bad_rate_limits_are_usage_errors() {
    let (dir, k) = placeholder_kernel();
    let img = dir.path().join("d.img");
    std::fs::write(&img, vec![0u8; 4096]).unwrap();
    let img = img.display().to_string();
    for (spec, needle) in [
        (format!("path={img},ops=0"), "a limit of 0"),
        (format!("path={img},ops=lots"), "ops=`lots`"),
        (format!("path={img},bandwidth=fast"), "rate_limit bandwidth"),
    ] {
        let out = alioth(&["boot", "--kernel", &k, "--serial", "off", "--disk", &spec]);
        assert_usage_error(&out, needle);
    }
    let cfg = dir.path().join("vm.toml");
    std::fs::write(
        &cfg,
        format!("kernel = \"{k}\"\n[rng]\nrate_limit = {{ ops_burst = 5 }}\n"),
    )
    .unwrap();
    let out = alioth(&["boot", "--config", cfg.to_str().unwrap()]);
    assert_usage_error(&out, "a burst needs its rate");
}
