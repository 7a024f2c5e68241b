use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;

/// Records every request; answers ping with a version and the rest with 204.
#[derive(Default)]
struct Recorder(Mutex<Vec<Request>>);

impl Controller for Recorder {
    fn handle(&self, req: Request) -> Response {
        self.0.lock().unwrap().push(req.clone());
        match req {
            Request::Ping => Response::json(200, serde_json::json!({"version": "test"})),
            _ => Response::done(),
        }
    }
}

fn server() -> (tempfile::TempDir, PathBuf, Arc<Recorder>, ApiServer) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let rec = Arc::new(Recorder::default());
    let s = ApiServer::start(&sock, rec.clone()).unwrap();
    (dir, sock, rec, s)
}

/// Sends raw bytes; returns the whole answer.
fn raw(sock: &std::path::Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(sock).unwrap();
    s.write_all(bytes).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn ch_remote_shaped_requests_reach_the_controller_typed() {
    let (_d, sock, rec, _s) = server();
    // As ch-remote sends them: PUT with an empty body and Content-Length: 0, or JSON.
    let out = raw(
        &sock,
        b"PUT /api/v1/vm.pause HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\nContent-Length: 0\r\n\r\n",
    );
    assert!(out.starts_with("HTTP/1.1 204"), "{out}");
    let body = r#"{"destination_url":"file:///tmp/snap"}"#;
    let req = format!(
        "PUT /api/v1/vm.snapshot HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    assert!(raw(&sock, req.as_bytes()).starts_with("HTTP/1.1 204"));
    let (status, text) = client::call(&sock, "GET", "/api/v1/vmm.ping", None).unwrap();
    assert_eq!((status, text.as_str()), (200, r#"{"version":"test"}"#));
    for (m, p, want) in [
        ("GET", "vm.info", Request::Info),
        ("GET", "vm.counters", Request::Counters),
        ("PUT", "vm.resume", Request::Resume),
        ("PUT", "vm.shutdown", Request::Shutdown),
        ("PUT", "vm.reboot", Request::Reboot),
        ("PUT", "vm.power-button", Request::PowerButton),
        ("PUT", "vmm.shutdown", Request::VmmShutdown),
    ] {
        let (status, _) = client::call(&sock, m, &format!("/api/v1/{p}"), None).unwrap();
        assert_eq!(status, 204, "{p}");
        assert_eq!(rec.0.lock().unwrap().last(), Some(&want));
    }
    let body = r#"{"source_url":"file:///tmp/snap","prefault":false}"#;
    let (status, _) = client::call(&sock, "PUT", "/api/v1/vm.restore", Some(body)).unwrap();
    assert_eq!(status, 204);
    let got = rec.0.lock().unwrap().clone();
    assert_eq!(got[0], Request::Pause);
    assert_eq!(
        got[1],
        Request::Snapshot {
            destination: "/tmp/snap".into()
        }
    );
    assert_eq!(
        got.last(),
        Some(&Request::Restore {
            source: "/tmp/snap".into()
        })
    );
}

#[test]
fn unknown_paths_wrong_methods_and_bad_bodies_get_their_status() {
    let (_d, sock, rec, _s) = server();
    let call = |m: &str, p: &str, b: Option<&str>| client::call(&sock, m, p, b).unwrap();
    assert_eq!(call("GET", "/api/v1/vm.nope", None).0, 404);
    assert_eq!(call("GET", "/", None).0, 404);
    assert_eq!(call("PUT", "/api/v1/vmm.ping", None).0, 405);
    assert_eq!(call("GET", "/api/v1/vm.pause", None).0, 405);
    assert_eq!(call("GET", "/api/v1/vm.snapshot", None).0, 405);
    let (status, msg) = call("PUT", "/api/v1/vm.snapshot", Some("{not json"));
    assert_eq!(status, 400);
    assert!(msg.contains("bad JSON"), "{msg}");
    assert_eq!(call("PUT", "/api/v1/vm.snapshot", None).0, 400);
    let (status, msg) = call(
        "PUT",
        "/api/v1/vm.snapshot",
        Some(r#"{"destination_url":"http://x/y"}"#),
    );
    assert_eq!(status, 400);
    assert!(msg.contains("file:///"), "{msg}");
    assert_eq!(
        call("PUT", "/api/v1/vm.restore", Some(r#"{"source":"x"}"#)).0,
        400
    );
    assert!(rec.0.lock().unwrap().is_empty(), "nothing reached the VM");
}

#[test]
fn garbage_oversize_and_chunked_requests_are_refused() {
    let (_d, sock, rec, _s) = server();
    assert!(raw(&sock, b"\x00\x01\x02 nonsense\r\n\r\n").starts_with("HTTP/1.1 400"));
    let big = format!(
        "PUT /api/v1/vm.snapshot HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        10 << 20
    );
    assert!(raw(&sock, big.as_bytes()).starts_with("HTTP/1.1 413"));
    let chunked =
        b"PUT /api/v1/vm.snapshot HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    assert!(raw(&sock, chunked).starts_with("HTTP/1.1 411"));
    let mut huge = b"GET /api/v1/vmm.ping HTTP/1.1\r\n".to_vec();
    for i in 0..2000 {
        huge.extend_from_slice(format!("X-Filler-{i}: {}\r\n", "a".repeat(20)).as_bytes());
    }
    let out = raw(&sock, &huge);
    assert!(
        out.starts_with("HTTP/1.1 431") || out.starts_with("HTTP/1.1 400"),
        "{out}"
    );
    assert!(rec.0.lock().unwrap().is_empty());
}

#[test]
fn a_silent_client_times_out_and_does_not_hold_the_api() {
    let (_d, sock, _rec, _s) = server();
    // Connects, sends half a request, and stalls.
    let mut stalled = UnixStream::connect(&sock).unwrap();
    stalled.write_all(b"GET /api/v1/vmm.pi").unwrap();
    let start = Instant::now();
    let (status, _) = client::call(&sock, "GET", "/api/v1/vmm.ping", None).unwrap();
    assert_eq!(status, 200);
    assert!(
        start.elapsed() < server::CLIENT_TIMEOUT + Duration::from_secs(3),
        "the next client waited {:?}",
        start.elapsed()
    );
}

#[test]
fn a_socket_path_in_use_or_not_a_socket_is_refused() {
    let (d, sock, _rec, _s) = server();
    let rec = Arc::new(Recorder::default());
    assert!(ApiServer::start(&sock, rec.clone()).is_err(), "in use");
    let plain = d.path().join("plain");
    std::fs::write(&plain, b"keep").unwrap();
    assert!(ApiServer::start(&plain, rec).is_err());
    assert_eq!(std::fs::read(&plain).unwrap(), b"keep");
}
