use super::*;

fn rows() -> Vec<BenchRow> {
    ["alioth io_uring", "upstream io_uring"]
        .iter()
        .flat_map(|vmm| {
            [1u32, 32].map(|qd| BenchRow {
                vmm: vmm.to_string(),
                qd,
                iops: 1000.0 * f64::from(qd),
                host_iops: 40_000.0,
                peer_iops: Some(900.0 * f64::from(qd)),
                cpu_us_per_io: if qd == 1 { Some(5.5) } else { None },
            })
        })
        .collect()
}

#[test]
fn bench_rows_are_written_as_json_and_drawn_as_an_svg_chart() {
    let dir = tempfile_dir();
    let json = dir.join("blk.json");
    write_bench_json(&json, 3, &rows()).unwrap();
    let text = std::fs::read_to_string(&json).unwrap();
    assert!(
        text.contains("\"vmm\": \"alioth io_uring\", \"qd\": 32, \"iops\": 32000"),
        "{text}"
    );
    assert!(text.contains("\"vs_upstream\": 1.111"), "{text}");
    assert!(text.contains("\"cpu_us_per_io\": null"), "{text}");
    let svg = dir.join("blk.svg");
    draw_bench_svg(&svg, &rows()).unwrap();
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg"));
    assert!(text.contains("upstream io_uring") && text.contains("QD32"));
    // Two rows x two depths: four bars.
    assert!(text.matches("<rect").count() >= 4);
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("xtask-e2e-test-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}
