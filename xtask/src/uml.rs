//! `cargo xtask uml`: Linux's own virtio drivers against Alioth's vhost-user backends.
//!
//! User-Mode Linux (Debian's `user-mode-linux`, a Linux kernel that runs as a process) boots a
//! busybox initramfs in about a second here and drives virtio devices over vhost-user with its
//! `virtio_uml` transport. The initramfs holds busybox, UML's `virtio_blk` module and `uml-io`
//! (our static I/O program); `/init` runs the test named by `alioth.test=` on the kernel command
//! line and prints one `ALIOTH-UML result <check> pass|fail|skip <why>` line per check.
//!
//! Checks, on the io_uring and the epoll backend:
//! - `blk`: a marker written with fsync reads back after dropping caches (and the host finds it
//!   in the image); the write cache is on and `sync`/flush succeed; a discarded and a
//!   zeroed range read back as zeros (also host-side); `uml-io verify` writes 2000 random blocks
//!   with 16 in flight and reads them back.
//! - `blk-ro`: a read-only disk reports itself read-only, refuses writes, and reads the
//!   host's marker.
//! - `net`: UML's virtio_net against `alioth vhost-user net` on a tap in a network namespace
//!   this run creates: the MAC, ping, and TCP both ways (16 MiB down, 4 MiB up) with the
//!   offloads Linux negotiates, checked by MD5.
//!
//! `cargo xtask bench vhost-user-blk` runs `uml-io randread` at QD1 and QD32 against our
//! backend and against `qemu-storage-daemon --export type=vhost-user-blk` on the same file.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::cpio::Cpio;
use crate::e2e::{Server, start_server};
use crate::{cargo, run};

const UML_PACKAGE: &str = "user-mode-linux";
const BUSYBOX_PACKAGE: &str = "busybox-static";
/// A UML boot plus its checks takes a few seconds here; this bounds a hang.
const TIMEOUT: Duration = Duration::from_secs(120);
/// What the blk check writes at sector 10 and the host looks for.
const MARKER: &str = "ALIOTH-UML-MARKER-0001";
/// What the host writes at sector 0 of the read-only disk.
const RO_MARKER: &str = "ALIOTH-UML-READ-ONLY";
const DISK_SIZE: u64 = 64 << 20;
/// UML's virtio_net and what it depends on, in load order.
const NET_MODULES: [&str; 3] = ["failover", "net_failover", "virtio_net"];
/// The MAC address the net check gives the device.
const NET_MAC: &str = "02:00:00:00:0a:01";

/// The UML kernel and the test initramfs.
pub struct Uml {
    linux: PathBuf,
    initrd: PathBuf,
    dir: PathBuf,
}

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
r() { echo "ALIOTH-UML result $1 $2"; }
test=$(sed -n 's/.*alioth\.test=\([^ ]*\).*/\1/p' /proc/cmdline)
case "$test" in
net)
  for m in failover net_failover virtio_net; do insmod /lib/modules/$m.ko; done
  i=0; while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
  ;;
*)
  insmod /lib/modules/virtio_blk.ko
  i=0; while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
  ;;
esac
q=/sys/block/vda/queue
zeros() { [ "$(dd if=/dev/vda bs=4096 skip=$1 count=$2 2>/dev/null | tr -d '\000' | wc -c)" = 0 ]; }
case "$test" in
blk)
  echo @MARKER@ | dd of=/dev/vda bs=512 seek=10 conv=fsync 2>/dev/null
  echo 3 > /proc/sys/vm/drop_caches
  got=$(dd if=/dev/vda bs=512 skip=10 count=1 2>/dev/null | head -c @MARKERLEN@)
  [ "$got" = @MARKER@ ] && r marker pass || r marker "fail read back '$got'"
  if [ "$(cat $q/write_cache)" = "write back" ]; then
    sync && blockdev --flushbufs /dev/vda && r flush pass || r flush "fail flush failed"
  else
    r flush "fail no volatile write cache: the device offers no flush"
  fi
  dd if=/dev/urandom of=/dev/vda bs=4096 seek=256 count=512 conv=fsync 2>/dev/null
  if [ "$(cat $q/discard_max_bytes)" != 0 ]; then
    blkdiscard -o 1048576 -l 1048576 /dev/vda && echo 3 > /proc/sys/vm/drop_caches
    zeros 256 256 && r discard pass || r discard "fail discarded range is not zero"
  else
    r discard "skip discard not offered"
  fi
  if [ "$(cat $q/write_zeroes_max_bytes)" != 0 ]; then
    uml-io zeroout /dev/vda 2097152 1048576 && echo 3 > /proc/sys/vm/drop_caches
    zeros 512 256 && r write-zeroes pass || r write-zeroes "fail zeroed range is not zero"
  else
    r write-zeroes "skip write-zeroes not offered"
  fi
  out=$(uml-io verify /dev/vda 2000 16)
  case "$out" in *pass*) r verify pass ;; *) r verify "fail $out" ;; esac
  ;;
blk-ro)
  [ "$(blockdev --getro /dev/vda)" = 1 ] && r ro-flag pass || r ro-flag "fail not read-only"
  echo x | dd of=/dev/vda bs=512 seek=20 conv=fsync 2>/dev/null && r ro-write "fail write accepted" || r ro-write pass
  got=$(dd if=/dev/vda bs=512 count=1 2>/dev/null | head -c @ROLEN@)
  [ "$got" = @ROMARKER@ ] && r ro-read pass || r ro-read "fail read '$got'"
  ;;
net)
  mac=$(sed -n 's/.*alioth\.mac=\([^ ]*\).*/\1/p' /proc/cmdline)
  got=$(cat /sys/class/net/eth0/address 2>/dev/null)
  [ "$got" = "$mac" ] && r mac pass || r mac "fail eth0 has '$got', not $mac"
  ip link set lo up; ip addr add 192.0.2.2/24 dev eth0; ip link set eth0 up
  ping -c 5 -W 2 192.0.2.1 > /tmp/ping 2>&1
  grep -q " 5 packets received" /tmp/ping && r ping pass || r ping "fail $(tail -2 /tmp/ping | tr '\n' ' ')"
  nc 192.0.2.1 7000 > /tmp/down
  echo "ALIOTH-UML tcp-down $(md5sum < /tmp/down | cut -d' ' -f1) $(wc -c < /tmp/down)"
  dd if=/dev/urandom of=/tmp/up bs=65536 count=64 2>/dev/null
  echo "ALIOTH-UML tcp-up $(md5sum < /tmp/up | cut -d' ' -f1)"
  nc 192.0.2.1 7001 < /tmp/up
  ;;
bench)
  secs=$(sed -n 's/.*alioth\.secs=\([0-9]*\).*/\1/p' /proc/cmdline)
  uml-io randread /dev/vda ${secs:-3} 1
  uml-io randread /dev/vda ${secs:-3} 32
  ;;
*) r "$test" "fail unknown test" ;;
esac
echo ALIOTH-UML done
poweroff -f
"#;

fn init_script() -> String {
    INIT.replace("@MARKERLEN@", &MARKER.len().to_string())
        .replace("@MARKER@", MARKER)
        .replace("@ROLEN@", &RO_MARKER.len().to_string())
        .replace("@ROMARKER@", RO_MARKER)
}

/// Fetches UML and busybox, builds `uml-io` statically and the initramfs, under `target/uml/`.
pub fn prepare(root: &Path) -> Result<Uml> {
    let dir = root.join("target/uml");
    let work = dir.join("work");
    let linux = dir.join("linux.uml");
    if !linux.is_file()
        || NET_MODULES
            .iter()
            .chain(["virtio_blk"].iter())
            .any(|m| !dir.join(format!("modules/{m}.ko")).is_file())
    {
        if work.exists() {
            std::fs::remove_dir_all(&work)?;
        }
        std::fs::create_dir_all(&work)?;
        run(Command::new("apt-get").current_dir(&work).args([
            "download",
            "-q",
            UML_PACKAGE,
            BUSYBOX_PACKAGE,
        ]))
        .context("apt-get download (run `apt-get update` first on a fresh machine)")?;
        for deb in std::fs::read_dir(&work)?.filter_map(|e| e.ok().map(|e| e.path())) {
            if deb.extension().is_some_and(|x| x == "deb") {
                run(Command::new("dpkg-deb")
                    .arg("-x")
                    .arg(&deb)
                    .arg(work.join("root")))?;
            }
        }
        std::fs::create_dir_all(dir.join("modules"))?;
        for m in NET_MODULES.iter().chain(["virtio_blk"].iter()) {
            let name = format!("{m}.ko");
            let ko = find(&work.join("root/usr/lib/uml/modules"), &name)?
                .with_context(|| format!("user-mode-linux ships no {name}"))?;
            std::fs::copy(ko, dir.join("modules").join(&name))?;
        }
        std::fs::copy(work.join("root/bin/busybox"), dir.join("busybox"))?;
        std::fs::copy(work.join("root/usr/bin/linux.uml"), &linux)?;
        std::fs::remove_dir_all(&work)?;
    }
    // uml-io, static (glibc's static libraries come with gcc's libc6-dev).
    run(cargo()
        .args([
            "build",
            "--quiet",
            "--release",
            "-p",
            "alioth-uml-io",
            "--target",
            "x86_64-unknown-linux-gnu",
            "--target-dir",
        ])
        .arg(root.join("target/uml-io"))
        .env(
            "RUSTFLAGS",
            "-C target-feature=+crt-static -C debuginfo=0 -C strip=symbols",
        ))?;
    let uml_io = std::fs::read(root.join("target/uml-io/x86_64-unknown-linux-gnu/release/uml-io"))?;
    let mut cpio = Cpio::default();
    for d in ["bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"] {
        cpio.dir(d);
    }
    cpio.char_dev("dev/console", 0o600, 5, 1);
    cpio.char_dev("dev/null", 0o666, 1, 3);
    cpio.file("bin/busybox", 0o755, &std::fs::read(dir.join("busybox"))?);
    cpio.symlink("bin/sh", "busybox");
    cpio.file("bin/uml-io", 0o755, &uml_io);
    for m in NET_MODULES.iter().chain(["virtio_blk"].iter()) {
        let name = format!("{m}.ko");
        cpio.file(
            &format!("lib/modules/{name}"),
            0o644,
            &std::fs::read(dir.join("modules").join(&name))?,
        );
    }
    cpio.file("init", 0o755, init_script().as_bytes());
    let initrd = dir.join("initramfs.cpio");
    std::fs::write(&initrd, cpio.finish())?;
    Ok(Uml { linux, initrd, dir })
}

fn find(dir: &Path, name: &str) -> Result<Option<PathBuf>> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            if let Some(f) = find(&p, name)? {
                return Ok(Some(f));
            }
        } else if p.file_name().is_some_and(|n| n == name) {
            return Ok(Some(p));
        }
    }
    Ok(None)
}

/// `alioth vhost-user blk` serving `image` on `sock`; `opts` adds disk options (`,backend=..`).
pub fn alioth_blk_cmd(alioth: &Path, sock: &Path, image: &Path, opts: &str) -> Vec<String> {
    vec![
        alioth.display().to_string(),
        "vhost-user".into(),
        "blk".into(),
        "--socket".into(),
        sock.display().to_string(),
        "--disk".into(),
        format!("path={}{opts}", image.display()),
    ]
}

/// qemu-storage-daemon exporting `image` over vhost-user-blk on `sock` with `queues` queues.
pub fn qsd_blk_cmd(sock: &Path, image: &Path, queues: u16) -> Vec<String> {
    vec![
        "qemu-storage-daemon".into(),
        "--blockdev".into(),
        format!(
            "driver=file,node-name=disk,filename={},aio=io_uring",
            image.display()
        ),
        "--export".into(),
        format!(
            "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
            sock.display()
        ),
    ]
}

fn alioth_backend(alioth: &Path, sock: &Path, image: &Path, opts: &str) -> Result<Server> {
    start_server(&alioth_blk_cmd(alioth, sock, image, opts), sock)
}

fn qsd_backend(sock: &Path, image: &Path) -> Result<Server> {
    start_server(&qsd_blk_cmd(sock, image, 1), sock)
        .context("qemu-storage-daemon comes with Debian's qemu-system-common")
}

impl Uml {
    /// Boots UML against the backend on `sock` (a blk device) with `alioth.test=<test>`;
    /// returns its console output.
    fn boot(&self, sock: &Path, test: &str, extra: &str) -> Result<String> {
        self.boot_device(sock, 2, test, extra)
    }

    /// Like `boot`, with virtio device `id` on the socket.
    fn boot_device(&self, sock: &Path, id: u16, test: &str, extra: &str) -> Result<String> {
        let tmp = self.dir.join("run");
        std::fs::create_dir_all(&tmp)?;
        let mut child = Command::new(&self.linux)
            .arg("mem=128M")
            .arg(format!("initrd={}", self.initrd.display()))
            .arg("rdinit=/init")
            .arg("con=null")
            .arg("con0=null,fd:1")
            .arg(format!("uml_dir={}", tmp.display()))
            .arg(format!("virtio_uml.device={}:{id}", sock.display()))
            .arg(format!("alioth.test={test}"))
            .args(extra.split_whitespace())
            .env("TMPDIR", &tmp)
            // UML runs as several processes; its own group lets a timeout end all of them.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting User-Mode Linux")?;
        let mut stdout = child.stdout.take().context("UML stdout")?;
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        });
        let deadline = Instant::now() + TIMEOUT;
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                // SAFETY: a plain syscall signalling the process group UML leads.
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                let _ = child.wait();
                bail!("User-Mode Linux did not finish `{test}` within {TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = reader.join().unwrap_or_default();
        if !out.contains("ALIOTH-UML done") {
            bail!("`{test}`: UML ended before its checks finished:\n{out}");
        }
        Ok(out)
    }
}

/// The `ALIOTH-UML result` lines: (check, verdict).
fn results(out: &str) -> Vec<(String, String)> {
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("ALIOTH-UML result "))
        .filter_map(|l| l.split_once(' '))
        .map(|(c, v)| (c.to_string(), v.to_string()))
        .collect()
}

fn image(path: &Path) -> Result<()> {
    let f = std::fs::File::create(path)?;
    f.set_len(DISK_SIZE)?;
    Ok(())
}

fn read_at(path: &Path, off: u64, len: usize) -> Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut b = vec![0u8; len];
    std::fs::File::open(path)?.read_exact_at(&mut b, off)?;
    Ok(b)
}

/// `cargo xtask uml`.
pub fn uml(root: &Path) -> Result<()> {
    let u = prepare(root)?;
    run(cargo().args(["build", "--quiet", "-p", "alioth-cli"]))?;
    let alioth = crate::bin_dir(root, "debug").join("alioth");
    let (mut passed, mut failed) = (0, 0);
    for backend in ["io_uring", "epoll"] {
        let sock = u.dir.join(format!("blk-{backend}.sock"));
        // Read-write disk.
        let img = u.dir.join(format!("rw-{backend}.img"));
        image(&img)?;
        let mut checks = {
            let _b = alioth_backend(&alioth, &sock, &img, &format!(",backend={backend}"))?;
            results(&u.boot(&sock, "blk", "")?)
        };
        // Host side: what the guest wrote is in the image.
        let host = |ok: bool, why: &str| {
            if ok {
                "pass".to_string()
            } else {
                format!("fail {why}")
            }
        };
        let marker = read_at(&img, 10 * 512, MARKER.len())?;
        checks.push((
            "host-marker".into(),
            host(marker == MARKER.as_bytes(), "marker not in the image"),
        ));
        let zeroed = read_at(&img, 1 << 20, 2 << 20)?;
        checks.push((
            "host-zeroes".into(),
            host(
                zeroed.iter().all(|b| *b == 0),
                "discarded/zeroed ranges hold data",
            ),
        ));
        // Read-only disk with a marker from the host.
        let ro = u.dir.join(format!("ro-{backend}.img"));
        image(&ro)?;
        {
            use std::os::unix::fs::FileExt;
            std::fs::OpenOptions::new()
                .write(true)
                .open(&ro)?
                .write_all_at(RO_MARKER.as_bytes(), 0)?;
        }
        {
            let _b = alioth_backend(
                &alioth,
                &sock,
                &ro,
                &format!(",backend={backend},read_only=on"),
            )?;
            checks.extend(results(&u.boot(&sock, "blk-ro", "")?));
        }
        checks.push((
            "host-ro-untouched".into(),
            host(
                read_at(&ro, 20 * 512, 1)? == [0],
                "the read-only image was written",
            ),
        ));
        checks.extend(net_checks(&u, &alioth, backend)?);
        for (check, verdict) in checks {
            let ok = verdict == "pass" || verdict.starts_with("skip");
            println!("uml: {check}/{backend} ... {verdict}");
            if ok {
                passed += 1;
            } else {
                failed += 1;
            }
        }
    }
    println!("uml: {passed} passed, {failed} failed");
    if failed > 0 {
        bail!("{failed} UML checks failed");
    }
    Ok(())
}

/// `cargo xtask bench vhost-user-blk [--secs N]`.
pub fn bench(root: &Path, args: &[String]) -> Result<()> {
    let secs: u64 = match args {
        [] => 5,
        [flag, n] if flag == "--secs" => n.parse().context("--secs")?,
        _ => bail!("usage: cargo xtask bench vhost-user-blk [--secs N]"),
    };
    let u = prepare(root)?;
    run(cargo().args(["build", "--quiet", "--release", "-p", "alioth-cli"]))?;
    let alioth = crate::bin_dir(root, "release").join("alioth");
    let img = u.dir.join("bench.img");
    // A page-cached file: write it whole, then read it once.
    std::fs::write(&img, vec![0x5au8; 256 << 20])?;
    let _ = std::fs::read(&img)?;
    let sock = u.dir.join("bench.sock");
    let extra = format!("alioth.secs={secs}");
    let iops = |out: &str, qd: u32| -> Result<u64> {
        out.lines()
            .find(|l| l.contains(&format!("UML-IO randread qd={qd} ")))
            .and_then(|l| l.split("iops=").nth(1))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no QD{qd} figure in:\n{out}"))
    };
    const ROUNDS: usize = 3;
    // (name, alioth's disk options; None: qemu-storage-daemon, the reference, last)
    let backends: [(&str, Option<&str>); 4] = [
        // The disks' default adaptive polling, and without it.
        ("alioth io_uring", Some(",backend=io_uring")),
        ("alioth epoll", Some(",backend=epoll")),
        (
            "alioth io_uring no poll",
            Some(",backend=io_uring,poll_us=0"),
        ),
        ("qemu-storage-daemon", None),
    ];
    let names = backends.map(|b| b.0);
    // Interleaved rounds (each backend once per round), medians reported: one run at a time
    // varies by about 10 % on this machine.
    let mut samples: Vec<(Vec<u64>, Vec<u64>)> = vec![(Vec::new(), Vec::new()); names.len()];
    for _ in 0..ROUNDS {
        for (i, sample) in samples.iter_mut().enumerate() {
            let out = {
                let _b = match backends[i].1 {
                    Some(opts) => alioth_backend(&alioth, &sock, &img, opts)?,
                    None => qsd_backend(&sock, &img)?,
                };
                u.boot(&sock, "bench", &extra)?
            };
            sample.0.push(iops(&out, 1)?);
            sample.1.push(iops(&out, 32)?);
        }
    }
    let median = |v: &[u64]| {
        let mut v = v.to_vec();
        v.sort_unstable();
        v[v.len() / 2]
    };
    let rows: Vec<(&str, u64, u64, String)> = names
        .iter()
        .zip(&samples)
        .map(|(n, (a, b))| (*n, median(a), median(b), format!("{a:?} / {b:?}")))
        .collect();
    let (_, q1, q32, _) = rows[backends.len() - 1];
    println!(
        "\nvhost-user-blk: UML virtio_blk, 4 KiB O_DIRECT random reads, {secs} s each, page-cached 256 MiB file, median of {ROUNDS} interleaved rounds"
    );
    println!(
        "| backend | QD1 IOPS | QD32 IOPS | QD1 vs qemu-storage-daemon | QD32 vs qemu-storage-daemon | runs (QD1 / QD32) |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for (name, a, b, runs) in &rows {
        println!(
            "| {name} | {a} | {b} | {:.2} | {:.2} | {runs} |",
            *a as f64 / q1.max(1) as f64,
            *b as f64 / q32.max(1) as f64
        );
    }
    // Alioth's VMM with the guest kit, its disk served over vhost-user (--disk vhost_user=).
    let kit = crate::e2e::build_kit(root)?;
    println!(
        "\nvhost-user-blk: alioth VMM + guest kit (polling driver), 4 KiB random reads, {secs} s each"
    );
    println!(
        "| backend | QD1 IOPS | QD32 IOPS | QD1 vs qemu-storage-daemon | QD32 vs qemu-storage-daemon |"
    );
    println!("| --- | --- | --- | --- | --- |");
    let mut kit_rows = Vec::new();
    for (name, opts) in backends {
        let _b = match opts {
            Some(opts) => alioth_backend(&alioth, &sock, &img, &format!("{opts},read_only=on"))?,
            None => qsd_backend(&sock, &img)?,
        };
        let disk = format!("vhost_user={}", sock.display());
        let a = crate::e2e::kit_bench_iops(&alioth, &kit, &disk, 1, secs)?;
        let b = crate::e2e::kit_bench_iops(&alioth, &kit, &disk, 32, secs)?;
        kit_rows.push((name, a, b));
    }
    let (_, k1, k32) = kit_rows[backends.len() - 1];
    for (name, a, b) in &kit_rows {
        println!(
            "| {name} | {a:.0} | {b:.0} | {:.2} | {:.2} |",
            a / k1.max(1.0),
            b / k32.max(1.0)
        );
    }
    let _ = std::fs::remove_file(&img);
    Ok(())
}

/// Linux's virtio_net (in UML) against `alioth vhost-user net` on a tap in a namespace of its
/// own: the MAC from the config space, ping, and 16 MiB down and 4 MiB up over TCP (checksum
/// and segmentation offloads as Linux negotiates them), compared by MD5 on both sides.
fn net_checks(u: &Uml, alioth: &Path, backend: &str) -> Result<Vec<(String, String)>> {
    if let Some(why) = crate::net::unavailable() {
        if std::env::var_os("CI").is_some() {
            return Ok(vec![("net".into(), format!("fail cannot run: {why}"))]);
        }
        return Ok(vec![("net".into(), format!("skip {why}"))]);
    }
    let ns = crate::net::NetNs::new()?;
    let sock = u.dir.join(format!("net-{backend}.sock"));
    let mut cmd: Vec<String> = vec!["ip".into(), "netns".into(), "exec".into(), ns.name().into()];
    cmd.extend([
        alioth.display().to_string(),
        "vhost-user".into(),
        "net".into(),
        "--socket".into(),
        sock.display().to_string(),
        "--net".into(),
        format!("tap={},mac={NET_MAC},backend={backend}", crate::net::TAP),
    ]);
    let _backend = start_server(&cmd, &sock)?;
    let files = u.dir.join(format!("net-{backend}"));
    std::fs::create_dir_all(&files)?;
    let xtask = std::env::current_exe()?;
    let mut peer = ns
        .exec(&xtask)
        .args(["net-peer", "uml-serve"])
        .arg(&files)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let out = u.boot_device(&sock, 1, "net", &format!("alioth.mac={NET_MAC}"));
    let _ = peer.kill();
    let _ = peer.wait();
    let out = out?;
    let mut checks = results(&out);
    let line = |tag: &str| -> Vec<String> {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(tag))
            .map(|l| l.split_whitespace().map(String::from).collect())
            .unwrap_or_default()
    };
    let md5 = |path: &Path| -> Result<String> {
        let o = Command::new("md5sum").arg(path).output()?;
        Ok(String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string())
    };
    // (check, the guest's line, the host's copy)
    for (check, file) in [("tcp-down", "down.bin"), ("tcp-up", "up.bin")] {
        let guest = line(&format!("ALIOTH-UML {check} "));
        let host = md5(&files.join(file))?;
        checks.push((
            check.into(),
            if guest.first() == Some(&host) {
                "pass".into()
            } else {
                format!("fail the guest's md5 and size {guest:?}, the host's md5 {host}")
            },
        ));
    }
    Ok(checks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines_are_parsed_and_the_init_script_is_filled_in() {
        let out = "noise\nALIOTH-UML result marker pass\nALIOTH-UML result discard skip discard not offered\n";
        assert_eq!(
            results(out),
            vec![
                ("marker".into(), "pass".into()),
                ("discard".into(), "skip discard not offered".into())
            ]
        );
        let s = init_script();
        assert!(s.contains(MARKER) && s.contains(RO_MARKER));
        assert!(!s.contains('@'), "a placeholder is left");
    }
}
