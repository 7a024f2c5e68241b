use super::*;

/// Requests admitted over `secs` simulated seconds, asking again exactly when told to wait.
fn run(limit: RateLimit, bytes: u64, secs: u64) -> (u64, u64) {
    let start = Instant::now();
    let mut l = RateLimiter::new(&limit);
    let mut now = start;
    let end = start + Duration::from_secs(secs);
    let (mut n, mut total) = (0u64, 0u64);
    while now < end {
        match l.admit_at(bytes, now) {
            Ok(()) => {
                n += 1;
                total += bytes;
            }
            Err(w) => {
                assert!(w > Duration::ZERO && w <= Duration::from_secs(2), "{w:?}");
                now += w;
            }
        }
    }
    (n, total)
}

#[test]
fn the_ops_limit_holds_over_time() {
    let (n, _) = run(
        RateLimit {
            ops: Some(1000),
            ..Default::default()
        },
        4096,
        10,
    );
    // 10 s at 1000/s plus the bucket's initial tenth of a second.
    assert!((10_000..=10_200).contains(&n), "{n}");
}

#[test]
fn the_bandwidth_limit_holds_even_for_requests_larger_than_the_bucket() {
    // 1 MB/s, a bucket of 100 kB, 256 KiB requests.
    let (_, bytes) = run(
        RateLimit {
            bandwidth: Some(1_000_000),
            ..Default::default()
        },
        256 << 10,
        20,
    );
    let rate = bytes as f64 / 20.0;
    assert!((950_000.0..=1_070_000.0).contains(&rate), "{rate}");
}

#[test]
fn a_one_time_burst_passes_at_once_then_the_rate_applies() {
    let mut l = RateLimiter::new(&RateLimit {
        ops: Some(10),
        ops_burst: 50,
        ..Default::default()
    });
    let now = Instant::now();
    // The burst (50) and the bucket (1) pass at once; the next waits about 100 ms.
    for _ in 0..51 {
        assert!(l.admit_at(1, now).is_ok());
    }
    let w = l.admit_at(1, now).unwrap_err();
    assert!(
        w > Duration::from_millis(50) && w <= Duration::from_millis(101),
        "{w:?}"
    );
}

#[test]
fn no_limit_admits_everything() {
    let mut l = RateLimiter::new(&RateLimit::default());
    for _ in 0..100_000 {
        assert!(l.admit(1 << 20).is_ok());
    }
}
