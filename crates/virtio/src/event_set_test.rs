use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use super::*;

#[test]
fn edges_are_reported_once_with_their_token_and_removed_fds_go_quiet() {
    let set = EventSet::new().unwrap();
    let (mut a, b) = UnixStream::pair().unwrap();
    set.add(b.as_raw_fd(), 7).unwrap();
    let mut seen = Vec::new();
    set.drain(|t, bits| seen.push((t, bits)));
    // A fresh socket is writable.
    assert!(
        seen.iter().any(|&(t, bits)| t == 7 && bits & WRITABLE != 0),
        "{seen:?}"
    );
    seen.clear();
    set.drain(|t, bits| seen.push((t, bits)));
    assert!(seen.is_empty(), "edge-triggered: nothing new");
    a.write_all(b"x").unwrap();
    set.drain(|t, bits| seen.push((t, bits)));
    assert!(
        seen.iter().any(|&(t, bits)| t == 7 && bits & READABLE != 0),
        "{seen:?}"
    );
    seen.clear();
    set.remove(b.as_raw_fd());
    a.write_all(b"y").unwrap();
    drop(a);
    set.drain(|t, bits| seen.push((t, bits)));
    assert!(seen.is_empty(), "{seen:?}");
    // Watching a closed descriptor fails rather than misbehaving.
    assert!(set.add(-1, 1).is_err());
}
