//! The snapshot cases of `cargo xtask e2e`: the kit's `snapshot` test (blk writes and reads in
//! a counted loop) is paused and snapshotted through the API, the VMM is killed, and two clones
//! are restored from the same snapshot, each with its own copy of the disk; both must finish
//! the loop where it stopped and pass, and their disks must hold every iteration's sector.
//! Then damaged and mismatched snapshots must be refused with exit 2.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

const ITERS: usize = 400;
const SECTOR: u64 = 16;

fn snap_byte(i: usize, k: usize) -> u8 {
    (i as u8).wrapping_mul(31) ^ (k as u8) ^ ((i >> 8) as u8)
}

/// Lines of a child's stdout as they come.
fn lines(child: &mut Child) -> Result<mpsc::Receiver<String>> {
    let out = child.stdout.take().context("stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

/// `alioth ctl` with its round-trip time.
fn ctl(alioth: &Path, sock: &Path, args: &[&str]) -> Result<Duration> {
    let t = Instant::now();
    crate::api::ctl(alioth, sock, args)?;
    Ok(t.elapsed())
}

fn progress(line: &str) -> Option<usize> {
    line.strip_prefix("ALIOTH-KIT snapshot progress ")?
        .trim()
        .parse()
        .ok()
}

fn check_disk(img: &Path) -> Result<()> {
    let data = std::fs::read(img)?;
    for i in 0..ITERS {
        let at = (SECTOR as usize + i) * 512;
        let s = data.get(at..at + 512).context("the disk is too short")?;
        if let Some(k) = (0..512).find(|&k| s[k] != snap_byte(i, k)) {
            bail!(
                "{}: iteration {i}'s sector differs at byte {k}",
                img.display()
            );
        }
    }
    Ok(())
}

/// Figures for the note.
pub struct Figures {
    pub pause_ms: f64,
    pub snapshot_ms: f64,
    pub snapshot_kib: u64,
    pub restore_ms: Vec<f64>,
}

/// Runs the kit to iteration 100, snapshots it, kills it, and restores two clones. Returns the
/// figures and leaves the snapshot in `dir/snap` for [`bad_snapshots`].
pub fn clones(alioth: &Path, kit: &Path, dir: &Path, backend: &str) -> Result<Figures> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)?.set_len(16 << 20)?;
    let sock = dir.join("api.sock");
    let snap = dir.join("snap");
    let mut child = crate::e2e::kit_boot_args(&mut Command::new(alioth), kit, "128M")
        .arg("--cmdline")
        .arg(format!("kit.test=snapshot kit.iters={ITERS}"))
        .arg("--disk")
        .arg(format!("path={},backend={backend}", disk.display()))
        .arg("--api-socket")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting alioth")?;
    let rx = lines(&mut child)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    let at = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(l) = rx.recv_timeout(left) else {
            let _ = child.kill();
            bail!("no progress 100 line:\n{}", seen.join("\n"));
        };
        seen.push(l.clone());
        if let Some(n) = progress(&l)
            && n >= 100
        {
            break n;
        }
    };
    let pause = ctl(alioth, &sock, &["pause"])?;
    let snapshot = ctl(alioth, &sock, &["snapshot", &snap.display().to_string()])?;
    // The VMM dies; what was acknowledged before the pause is in the disk file.
    let _ = child.kill();
    let _ = child.wait();
    let kib: u64 = std::fs::read_dir(&snap)?
        .flatten()
        .map(|e| e.metadata().map_or(0, |m| m.blocks() / 2))
        .sum();
    let mut restore_ms = Vec::new();
    // Clone a: `alioth boot --restore` with a copy of the disk. Clone b: a VMM started with
    // only its API socket, restored through `vm.restore` (as Cloud Hypervisor's clients do),
    // on the original disk (the killed VMM no longer uses it).
    let copy = dir.join("disk-a.img");
    std::fs::copy(&disk, &copy)?;
    for clone in ["a", "b"] {
        let img = if clone == "a" {
            copy.clone()
        } else {
            disk.clone()
        };
        let api = dir.join(format!("api-{clone}.sock"));
        let mut cmd = Command::new(alioth);
        cmd.args(["-v", "boot"]);
        if clone == "a" {
            cmd.arg("--restore")
                .arg(&snap)
                .arg("--disk")
                .arg(format!("path={},backend={backend}", img.display()));
        }
        let mut c = cmd
            .arg("--api-socket")
            .arg(&api)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("restoring")?;
        if clone == "b" {
            let deadline = Instant::now() + Duration::from_secs(20);
            while !api.exists() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    bail!("clone b: no API socket");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            // No VM yet: the VMM answers, the VM does not exist.
            let (ping, _) = crate::api::ch_remote(&api, "GET", "vmm.ping", "")?;
            let (info, _) = crate::api::ch_remote(&api, "GET", "vm.info", "")?;
            if (ping, info) != (200, 404) {
                let _ = c.kill();
                bail!("clone b before vm.restore: vmm.ping {ping}, vm.info {info}");
            }
            let body = format!(
                r#"{{"source_url":"file://{}","prefault":false}}"#,
                snap.display()
            );
            let (status, text) = crate::api::ch_remote(&api, "PUT", "vm.restore", &body)?;
            if status != 204 {
                let _ = c.kill();
                bail!("clone b: vm.restore answered {status}: {text}");
            }
        }
        let rx = lines(&mut c)?;
        // The VMM logs how long the restore took before the vCPUs start.
        let errs = c.stderr.take().context("stderr")?;
        let (etx, erx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut all = String::new();
            for l in BufReader::new(errs).lines().map_while(Result::ok) {
                all.push_str(&l);
                all.push('\n');
            }
            let _ = etx.send(all);
        });
        let mut out: Vec<String> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            while let Ok(l) = rx.try_recv() {
                out.push(l);
            }
            if let Some(s) = c.try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                bail!("clone {clone} timed out:\n{}", out.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        std::thread::sleep(Duration::from_millis(50));
        while let Ok(l) = rx.try_recv() {
            out.push(l);
        }
        let err = erx.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
        let text = out.join("\n");
        if status.code() != Some(0) || !text.contains("ALIOTH-KIT result snapshot pass") {
            bail!("clone {clone}: exit {status}\n--- serial ---\n{text}\n--- stderr ---\n{err}");
        }
        let took = err
            .lines()
            .filter(|l| l.contains("restored from"))
            .find_map(|l| {
                l.split_once(" in ")?
                    .1
                    .split_once(" ms")?
                    .0
                    .parse::<f64>()
                    .ok()
            })
            .with_context(|| format!("clone {clone}: no restore time logged:\n{err}"))?;
        restore_ms.push(took);
        if text.contains("ALIOTH-KIT start") {
            bail!("clone {clone} booted afresh instead of continuing:\n{text}");
        }
        let resumed = out.iter().find_map(|l| progress(l));
        if resumed.is_none_or(|n| n < at) {
            bail!("clone {clone} did not continue from iteration {at}:\n{text}");
        }
        check_disk(&img)?;
    }
    Ok(Figures {
        pause_ms: pause.as_secs_f64() * 1e3,
        snapshot_ms: snapshot.as_secs_f64() * 1e3,
        snapshot_kib: kib,
        restore_ms,
    })
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)?.flatten() {
        std::fs::copy(e.path(), to.join(e.file_name()))?;
    }
    Ok(())
}

/// Damaged and mismatched snapshots made from `dir/snap`: each restore must exit 2 at once with
/// a message naming the problem, and never run the guest.
pub fn bad_snapshots(alioth: &Path, dir: &Path) -> Result<()> {
    let snap = dir.join("snap");
    let disk = dir.join("disk-a.img");
    type Damage = fn(&Path) -> Result<()>;
    let cases: [(&str, Damage, &[&str], &str); 7] = [
        (
            "flipped byte in state.json",
            |d| {
                let p = d.join("state.json");
                let mut b = std::fs::read(&p)?;
                let mid = b.len() / 2;
                b[mid] ^= 0x01;
                Ok(std::fs::write(p, b)?)
            },
            &[],
            "does not match its hash",
        ),
        (
            "truncated memory.bin",
            |d| {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(d.join("memory.bin"))?;
                Ok(f.set_len(64 << 20)?)
            },
            &[],
            "memory.bin",
        ),
        (
            "truncated state.json",
            |d| {
                let p = d.join("state.json");
                let b = std::fs::read(&p)?;
                Ok(std::fs::write(p, &b[..b.len() / 3])?)
            },
            &[],
            "truncated",
        ),
        (
            "a later format version",
            |d| {
                let p = d.join("manifest.json");
                let t = std::fs::read_to_string(&p)?.replace("\"version\": 1", "\"version\": 99");
                Ok(std::fs::write(p, t)?)
            },
            &[],
            "format version 99",
        ),
        (
            "no manifest",
            |d| Ok(std::fs::remove_file(d.join("manifest.json"))?),
            &[],
            "manifest.json",
        ),
        (
            "a changed vCPU count",
            |_| Ok(()),
            &["--cpus", "2"],
            "--cpus cannot be changed",
        ),
        (
            "a disk of another size",
            |_| Ok(()),
            &["--disk", "SMALL"],
            "it was",
        ),
    ];
    let small = dir.join("small.img");
    std::fs::File::create(&small)?.set_len(8 << 20)?;
    for (what, damage, extra, needle) in cases {
        let bad = dir.join("bad");
        copy_dir(&snap, &bad)?;
        damage(&bad)?;
        let mut cmd = Command::new(alioth);
        cmd.arg("boot").arg("--restore").arg(&bad);
        let mut disk_given = false;
        for a in extra {
            if *a == "SMALL" {
                cmd.arg(&small);
                disk_given = true;
            } else {
                cmd.arg(a);
            }
        }
        if !disk_given {
            cmd.arg("--disk").arg(&disk);
        }
        cmd.arg("--api-socket").arg(dir.join("api-bad.sock"));
        let t = Instant::now();
        let out = cmd.stdin(Stdio::null()).output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        let serial = String::from_utf8_lossy(&out.stdout);
        if out.status.code() != Some(2) || !err.contains(needle) {
            bail!(
                "{what}: exit {:?}, stderr: {err} (wanted `{needle}`)",
                out.status.code()
            );
        }
        if serial.contains("ALIOTH-KIT") || t.elapsed() > Duration::from_secs(10) {
            bail!(
                "{what}: the guest ran ({serial}) or the refusal took {:?}",
                t.elapsed()
            );
        }
    }
    Ok(())
}

/// The e2e directory for `backend`'s cases (short: Unix socket paths are limited).
pub fn case_dir(backend: &str) -> PathBuf {
    std::env::temp_dir().join(format!("alioth-snap-{}-{backend}", std::process::id()))
}
