use super::*;

fn manifest() -> Manifest {
    Manifest {
        format: FORMAT.into(),
        version: FORMAT_VERSION,
        alioth_version: "test".into(),
        config: String::new(),
        cpus: 1,
        memory: 128 << 20,
        devices: vec!["virtio-blk0".into()],
        disks: vec![],
        state_len: 0,
        state_hash: 0,
        memory_bytes: 0,
        memory_hash: 0,
    }
}

fn write(dir: &Path, m: &Manifest) {
    std::fs::write(dir.join(MANIFEST), serde_json::to_vec(m).unwrap()).unwrap();
}

#[test]
fn manifests_of_another_format_or_version_or_garbage_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let e = read_manifest(d).unwrap_err().to_string();
    assert!(e.contains("manifest.json"), "{e}");
    std::fs::write(d.join(MANIFEST), b"{\"format\": ").unwrap();
    let e = read_manifest(d).unwrap_err().to_string();
    assert!(e.contains("corrupt"), "{e}");
    let mut m = manifest();
    m.format = "qemu".into();
    write(d, &m);
    assert!(
        read_manifest(d)
            .unwrap_err()
            .to_string()
            .contains("not an Alioth snapshot")
    );
    let mut m = manifest();
    m.version = 7;
    write(d, &m);
    let e = read_manifest(d).unwrap_err().to_string();
    assert!(e.contains("format version 7"), "{e}");
    write(d, &manifest());
    assert_eq!(read_manifest(d).unwrap().cpus, 1);
    // Every refusal is a configuration (user) error.
    std::fs::remove_file(d.join(MANIFEST)).unwrap();
    assert!(read_manifest(d).unwrap_err().is_user_error());
}

#[test]
fn a_snapshot_of_another_shape_is_refused_before_its_state_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, &manifest());
    let kernel = d.join("k");
    std::fs::write(&kernel, b"k").unwrap();
    let mut config = VmConfig::new(&kernel);
    config.memory = 128 << 20;
    config.cpus = 2;
    let e = read_state(d, &config, &["virtio-blk0".into()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("1 vCPUs"), "{e}");
    config.cpus = 1;
    let e = read_state(d, &config, &["virtio-rng0".into()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("devices"), "{e}");
    // The right shape, but no state file.
    let e = read_state(d, &config, &["virtio-blk0".into()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("state.json"), "{e}");
}
