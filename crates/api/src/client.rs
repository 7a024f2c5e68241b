//! A client for the API: one request per connection, as `ch-remote` sends them.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::ApiError;

/// How long the client waits for the VMM's answer (a snapshot of a large VM takes a while).
pub const TIMEOUT: Duration = Duration::from_secs(300);

/// Sends `method path` with an optional JSON `body` to the API socket at `socket`; returns the
/// status and the body.
pub fn call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String), ApiError> {
    let io = |source| ApiError::Socket {
        path: socket.to_path_buf(),
        source,
    };
    let mut s = UnixStream::connect(socket).map_err(io)?;
    s.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
    let body = body.unwrap_or("");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\nConnection: close\r\n"
    );
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).map_err(io)?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).map_err(io)?;
    let proto = |reason: String| ApiError::Protocol {
        path: socket.to_path_buf(),
        reason,
    };
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut headers);
    let n = match r.parse(&resp) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err(proto("the answer ended early".into())),
        Err(e) => return Err(proto(format!("not HTTP: {e}"))),
    };
    let status = r.code.unwrap_or(0);
    Ok((status, String::from_utf8_lossy(&resp[n..]).into_owned()))
}
