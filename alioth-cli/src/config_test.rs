use std::io::Write;

use super::*;

fn file_with(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

#[test]
fn sizes_parse_with_units_and_reject_nonsense() {
    assert_eq!(parse_size("4096").unwrap(), 4096);
    assert_eq!(parse_size("512M").unwrap(), 512 << 20);
    assert_eq!(parse_size("2g").unwrap(), 2 << 30);
    assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
    assert!(parse_size("").is_err());
    assert!(parse_size("M").is_err());
    assert!(parse_size("12Q").unwrap_err().to_string().contains("unit"));
    assert!(
        parse_size("99999999999T")
            .unwrap_err()
            .to_string()
            .contains("too large")
    );
}

#[test]
fn malformed_toml_names_line_and_column() {
    let f = file_with("kernel = \"a\"\ncpus = = 2\n");
    let err = read_file(f.path()).unwrap_err().to_string();
    assert!(err.contains("line 2"), "{err}");
    assert!(err.contains("column"), "{err}");
}

#[test]
fn unknown_keys_are_rejected_by_name() {
    let f = file_with("kernel = \"a\"\nmemroy = \"1G\"\n");
    let err = read_file(f.path()).unwrap_err().to_string();
    assert!(err.contains("memroy"), "{err}");
}

#[test]
fn flags_override_the_file_and_file_paths_are_relative_to_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("kernel.bin"), b"x").unwrap();
    std::fs::write(dir.path().join("other.bin"), b"x").unwrap();
    let cfg = dir.path().join("vm.toml");
    std::fs::write(
        &cfg,
        "kernel = \"kernel.bin\"\ncpus = 2\nmemory = \"256M\"\ncmdline = \"a\"\nexit_device = true\n\
         serial = \"off\"\ncpu_features = \"-xsave\"\nboot_protocol = \"linux64\"\n",
    )
    .unwrap();
    let args = BootArgs {
        config: Some(cfg.clone()),
        cpus: Some(3),
        ..Default::default()
    };
    let c = build(&args).unwrap();
    assert_eq!(c.kernel.kernel, dir.path().join("kernel.bin"));
    assert_eq!(c.cpus, 3);
    assert_eq!(c.memory, 256 << 20);
    assert_eq!(c.kernel.cmdline, "a");
    assert_eq!(c.exit_device, Some(0xf4));
    assert_eq!(c.serial, SerialConfig::Off);
    assert_eq!(c.cpu_features.len(), 1);
    assert_eq!(c.kernel.protocol, BootProtocol::Linux64);

    let args = BootArgs {
        config: Some(cfg),
        kernel: Some(dir.path().join("other.bin")),
        memory: Some("1G".into()),
        exit_device: Some("0x501".into()),
        ..Default::default()
    };
    let c = build(&args).unwrap();
    assert_eq!(c.kernel.kernel, dir.path().join("other.bin"));
    assert_eq!(c.memory, 1 << 30);
    assert_eq!(c.exit_device, Some(0x501));
}

#[test]
fn zero_memory_zero_cpus_and_bad_values_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("k");
    std::fs::write(&k, b"x").unwrap();
    let base = || BootArgs {
        kernel: Some(k.clone()),
        ..Default::default()
    };
    let err = |a: BootArgs| format!("{:#}", build(&a).unwrap_err());
    assert!(
        err(BootArgs {
            memory: Some("0".into()),
            ..base()
        })
        .contains("memory")
    );
    assert!(
        err(BootArgs {
            cpus: Some(0),
            ..base()
        })
        .contains("cpus")
    );
    assert!(
        err(BootArgs {
            serial: Some("tcp".into()),
            ..base()
        })
        .contains("serial")
    );
    assert!(
        err(BootArgs {
            boot_protocol: Some("uefi".into()),
            ..base()
        })
        .contains("protocol")
    );
    assert!(
        err(BootArgs {
            exit_device: Some("x".into()),
            ..base()
        })
        .contains("exit device")
    );
    assert!(
        err(BootArgs {
            exit_device: Some("0x3f8".into()),
            ..base()
        })
        .contains("COM1")
    );
    assert!(
        err(BootArgs {
            cpu_features: Some("-nope".into()),
            ..base()
        })
        .contains("nope")
    );
    assert!(err(BootArgs::default()).contains("no kernel"));
}

#[test]
fn disks_and_rng_come_from_the_file_or_the_flags() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["k", "a.img", "b.img"] {
        std::fs::write(dir.path().join(f), b"x").unwrap();
    }
    let cfg = dir.path().join("vm.toml");
    std::fs::write(
        &cfg,
        "kernel = \"k\"\n[rng]\n[[disk]]\npath = \"a.img\"\nread_only = true\nnum_queues = 2\n\
         backend = \"epoll\"\n[[disk]]\npath = \"b.img\"\n",
    )
    .unwrap();
    let args = BootArgs {
        config: Some(cfg.clone()),
        ..Default::default()
    };
    let c = build(&args).unwrap();
    assert_eq!(c.disks.len(), 2);
    assert_eq!(c.disks[0].blk.path, dir.path().join("a.img"));
    assert!(c.disks[0].blk.read_only);
    assert_eq!(c.disks[0].blk.num_queues, 2);
    assert_eq!(c.disks[0].backend, IoBackend::Epoll);
    assert_eq!(c.disks[1].blk.queue_size, 256);
    assert_eq!(c.disks[1].backend, IoBackend::Auto);
    assert_eq!(
        c.disks[1].poll_us, DEFAULT_DISK_POLL_US,
        "disks poll by default"
    );
    assert!(c.rng.is_some());

    let b = dir.path().join("b.img");
    let args = BootArgs {
        config: Some(cfg),
        disk: vec![format!(
            "path={},direct=on,queue_size=64,backend=io_uring",
            b.display()
        )],
        ..Default::default()
    };
    let c = build(&args).unwrap();
    assert_eq!(c.disks.len(), 1, "--disk replaces the file's disks");
    assert!(c.disks[0].blk.direct);
    assert_eq!(c.disks[0].blk.queue_size, 64);
    assert_eq!(c.disks[0].backend, IoBackend::IoUring);
    assert_eq!(c.disks[0].poll_us, DEFAULT_DISK_POLL_US);
    let off = build(&BootArgs {
        disk: vec![format!("path={},poll_us=0", b.display())],
        kernel: Some(dir.path().join("k")),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(off.disks[0].poll_us, 0, "poll_us=0 turns polling off");
}

#[test]
fn bad_disk_specs_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("k");
    std::fs::write(&k, b"x").unwrap();
    let with = |spec: &str| BootArgs {
        kernel: Some(k.clone()),
        disk: vec![spec.to_string()],
        ..Default::default()
    };
    let err = |a: BootArgs| format!("{:#}", build(&a).unwrap_err());
    assert!(err(with("/nonexistent.img")).contains("/nonexistent.img"));
    assert!(err(with("path=x,speed=fast")).contains("unknown key `speed`"));
    assert!(err(with("read_only=on")).contains("path="));
    let img = dir.path().join("d.img");
    std::fs::write(&img, b"x").unwrap();
    let spec = |rest: &str| format!("path={},{rest}", img.display());
    assert!(err(with(&spec("read_only=maybe"))).contains("read_only"));
    assert!(err(with(&spec("backend=aio"))).contains("backend"));
    assert!(err(with(&spec("num_queues=x"))).contains("num_queues"));
}

#[test]
fn the_example_vm_parses_with_a_disk_an_rng_and_a_network_card() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/vm.toml");
    let file: FileConfig = toml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(file.disk.len(), 1);
    assert!(file.rng.is_some());
    assert_eq!(file.net.len(), 1);
    let net = file.net[0].clone().into_config().unwrap();
    assert_eq!(net.net.tap, "alioth%d");
    assert_eq!(net.net.mac[0], 0x02, "a locally administered address");
}

#[test]
fn net_flags_fill_every_setting() {
    let n = parse_net_flag(
        "tap=tap3,mac=02:aa:bb:cc:dd:ee,queues=2,queue_size=128,mtu=9000,backend=epoll",
    )
    .unwrap()
    .into_config()
    .unwrap();
    assert_eq!(n.net.tap, "tap3");
    assert_eq!(n.net.mac, [2, 0xaa, 0xbb, 0xcc, 0xdd, 0xee]);
    assert_eq!(
        (n.net.queue_pairs, n.net.queue_size, n.net.mtu),
        (2, 128, 9000)
    );
    assert_eq!(n.backend, IoBackend::Epoll);
}

#[test]
fn the_toml_a_snapshot_records_rebuilds_the_same_vm() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("k"), "k").unwrap();
    std::fs::write(d.join("disk.img"), vec![0u8; 4096]).unwrap();
    let cfg = d.join("vm.toml");
    std::fs::write(
        &cfg,
        "kernel = \"k\"\ncpus = 2\nmemory = \"256M\"\ncmdline = \"console=hvc0\"\n\
         exit_device = 0x501\nserial = \"file:serial.log\"\ncpu_features = \"-xsave\"\n\
         boot_protocol = \"pvh\"\n\
         [[disk]]\npath = \"disk.img\"\nread_only = true\nnum_queues = 2\nbackend = \"epoll\"\npoll_us = 50\n\
         [rng]\nbackend = \"io_uring\"\n\
         [[net]]\ntap = \"tap7\"\nmac = \"02:01:02:03:04:05\"\nqueues = 2\nmtu = 9000\n\
         [vsock]\ncid = 9\nuds = \"v.sock\"\nmax_connections = 8\n\
         [console]\nmode = \"socket:c.sock\"\n"
    )
    .unwrap();
    let args = BootArgs {
        config: Some(cfg),
        ..Default::default()
    };
    let first = build(&args).unwrap();
    let text = to_toml(&first, Some(&d.join("api.sock"))).unwrap();
    // Read back from another directory: every path is absolute.
    let file: FileConfig = toml::from_str(&text).unwrap();
    assert_eq!(
        file.api_socket.as_deref(),
        Some(d.join("api.sock").as_path())
    );
    let again = d.join("again.toml");
    std::fs::write(&again, &text).unwrap();
    let second = build(&BootArgs {
        config: Some(again),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(second, first);
}
