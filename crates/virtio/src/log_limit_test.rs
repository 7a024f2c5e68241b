use super::*;

#[test]
fn ten_lines_per_window_then_a_count_of_what_was_suppressed() {
    let l = LogLimiter::new();
    for _ in 0..LogLimiter::LINES {
        assert_eq!(l.allow(), Some(0));
    }
    for _ in 0..5 {
        assert_eq!(l.allow(), None);
    }
    // A new window reports the five suppressed lines with its first line.
    l.0.lock().unwrap().window -= LogLimiter::WINDOW;
    assert_eq!(l.allow(), Some(5));
    assert_eq!(l.allow(), Some(0));
}
