use super::*;

#[test]
fn zero_turns_polling_off() {
    assert!(PollWindow::new(0).is_none());
}

#[test]
fn work_found_keeps_the_window_and_timeouts_shrink_it_to_a_floor() {
    let mut p = PollWindow::new(64).unwrap();
    assert!(p.poll(|| true));
    assert_eq!(p.window(), Duration::from_micros(64));
    for _ in 0..10 {
        assert!(!p.poll(|| false));
    }
    assert_eq!(p.window(), Duration::from_micros(4), "1/16 of the maximum");
    assert!(p.poll(|| true));
    assert_eq!(p.window(), Duration::from_micros(8), "doubles after work");
}

#[test]
fn a_poll_that_finds_nothing_lasts_about_its_window() {
    let mut p = PollWindow::new(2000).unwrap();
    let t = Instant::now();
    assert!(!p.poll(|| false));
    assert!(t.elapsed() >= Duration::from_micros(2000));
    assert!(p.spent() >= Duration::from_micros(2000));
}
