//! One HTTP/1.1 exchange: read a request (headers through `httparse`, then a
//! `Content-Length` body), route it to a [`Request`], write the response.

use std::io::{Read, Write};

use serde::Deserialize;

use crate::{Body, PREFIX, Request, Response, file_url_path};

/// The most header bytes read.
pub const MAX_HEADER: usize = 16 << 10;
/// The largest body taken.
pub const MAX_BODY: usize = 64 << 10;
const MAX_HEADERS: usize = 64;

/// A request as read, before routing.
#[derive(Debug)]
pub struct Raw {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
}

/// Reads one request. `Err` carries the response to send instead (400, 411, 413, ...), or
/// `None` when the client sent nothing (closed or timed out before a byte).
pub fn read_request(s: &mut impl Read) -> Result<Raw, Option<Response>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let (head_len, method, path, content_length) = loop {
        let n = match s.read(&mut chunk) {
            Ok(0) if buf.is_empty() => return Err(None),
            Ok(0) => return Err(Some(Response::error(400, "the request ended early"))),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) if buf.is_empty() => return Err(None),
            Err(e) => {
                return Err(Some(Response::error(
                    408,
                    format!("reading the request: {e}"),
                )));
            }
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let mut length = 0usize;
                for h in req.headers.iter() {
                    if h.name.eq_ignore_ascii_case("content-length") {
                        let v = std::str::from_utf8(h.value)
                            .ok()
                            .and_then(|v| v.trim().parse().ok());
                        let Some(v) = v else {
                            return Err(Some(Response::error(400, "bad Content-Length")));
                        };
                        length = v;
                    } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        return Err(Some(Response::error(
                            411,
                            "chunked bodies are not accepted: send Content-Length",
                        )));
                    }
                }
                if length > MAX_BODY {
                    return Err(Some(Response::error(
                        413,
                        format!("a body of {length} bytes; at most {MAX_BODY}"),
                    )));
                }
                let method = req.method.unwrap_or("").to_string();
                let path = req.path.unwrap_or("").to_string();
                break (len, method, path, length);
            }
            Ok(httparse::Status::Partial) => {
                if buf.len() > MAX_HEADER {
                    return Err(Some(Response::error(
                        431,
                        format!("headers beyond {MAX_HEADER} bytes"),
                    )));
                }
            }
            Err(e) => return Err(Some(Response::error(400, format!("not HTTP/1.1: {e}")))),
        }
    };
    let mut body = buf.split_off(head_len);
    if body.len() > content_length {
        // Pipelined requests are not served: one request per connection.
        body.truncate(content_length);
    }
    while body.len() < content_length {
        let want = (content_length - body.len()).min(chunk.len());
        match s.read(&mut chunk[..want]) {
            Ok(0) => return Err(Some(Response::error(400, "the body ended early"))),
            Ok(n) => body.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(Some(Response::error(408, format!("reading the body: {e}"))));
            }
        }
    }
    Ok(Raw { method, path, body })
}

#[derive(Deserialize)]
struct SnapshotBody {
    destination_url: String,
}

#[derive(Deserialize)]
struct RestoreBody {
    source_url: String,
    #[serde(default)]
    #[allow(dead_code)]
    prefault: Option<bool>,
    #[serde(default)]
    #[allow(dead_code)]
    resume: Option<bool>,
}

fn json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Response> {
    if body.is_empty() {
        return Err(Response::error(400, "a JSON body is required"));
    }
    serde_json::from_slice(body).map_err(|e| Response::error(400, format!("bad JSON: {e}")))
}

/// Maps method and path to a [`Request`]: 404 for an unknown path, 405 for a known one with
/// the wrong method, 400 for a body that does not parse.
pub fn route(raw: &Raw) -> Result<Request, Response> {
    // A query string is not part of any endpoint.
    let path = raw.path.split('?').next().unwrap_or("");
    let Some(name) = path.strip_prefix(PREFIX) else {
        return Err(Response::error(404, format!("no endpoint {path}")));
    };
    let need = |method: &str| -> Result<(), Response> {
        if raw.method == method {
            Ok(())
        } else {
            Err(Response::error(405, format!("{name} takes {method}")))
        }
    };
    let get = |r: Request| need("GET").map(|_| r);
    let put = |r: Request| need("PUT").map(|_| r);
    match name {
        "vmm.ping" => get(Request::Ping),
        "vm.info" => get(Request::Info),
        "vm.counters" => get(Request::Counters),
        "vm.pause" => put(Request::Pause),
        "vm.resume" => put(Request::Resume),
        "vm.shutdown" => put(Request::Shutdown),
        "vm.reboot" => put(Request::Reboot),
        "vm.power-button" => put(Request::PowerButton),
        "vmm.shutdown" => put(Request::VmmShutdown),
        "vm.snapshot" => {
            need("PUT")?;
            let b: SnapshotBody = json(&raw.body)?;
            let destination = file_url_path(&b.destination_url).ok_or_else(|| {
                Response::error(400, "destination_url must be file:///absolute/directory")
            })?;
            Ok(Request::Snapshot { destination })
        }
        "vm.restore" => {
            need("PUT")?;
            let b: RestoreBody = json(&raw.body)?;
            let source = file_url_path(&b.source_url).ok_or_else(|| {
                Response::error(400, "source_url must be file:///absolute/directory")
            })?;
            Ok(Request::Restore { source })
        }
        _ => Err(Response::error(404, format!("no endpoint {path}"))),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Writes `r` (and `Connection: close`: one request per connection).
pub fn write_response(s: &mut impl Write, r: &Response) -> std::io::Result<()> {
    let (ctype, body) = match &r.body {
        Body::Empty => (None, Vec::new()),
        Body::Json(v) => (Some("application/json"), v.to_string().into_bytes()),
        Body::Text(t) => (Some("text/plain"), t.clone().into_bytes()),
    };
    let mut head = format!("HTTP/1.1 {} {}\r\n", r.status, reason(r.status));
    if let Some(c) = ctype {
        head.push_str(&format!("Content-Type: {c}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    s.write_all(head.as_bytes())?;
    s.write_all(&body)?;
    s.flush()
}
