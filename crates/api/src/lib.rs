//! `alioth-api`: the control plane of a VM, an HTTP/1.1 API with JSON bodies on a Unix socket.
//!
//! The paths, methods, bodies and status codes follow Cloud Hypervisor's API (its OpenAPI file,
//! `vmm/src/api/openapi/cloud-hypervisor.yaml`), for the subset in [`Request`], so clients
//! written for Cloud Hypervisor (`ch-remote`, orchestration stacks) drive a VM through it.
//! [`ApiServer`] parses each request with `httparse` (one connection at a time, a read
//! timeout, size limits: a slow or hostile client cannot hold the VM) and hands it to the
//! VMM's [`Controller`] as a typed [`Request`]; [`client::call`] is the matching client.
//!
//! ```
//! use std::sync::Arc;
//! use alioth_api::{ApiServer, Controller, Request, Response, client};
//!
//! struct Vm;
//! impl Controller for Vm {
//!     fn handle(&self, req: Request) -> Response {
//!         match req {
//!             Request::Ping => Response::json(200, serde_json::json!({"version": "0.1.0"})),
//!             _ => Response::error(405, "not here"),
//!         }
//!     }
//! }
//!
//! let dir = tempfile::tempdir().unwrap();
//! let sock = dir.path().join("api.sock");
//! let server = ApiServer::start(&sock, Arc::new(Vm)).unwrap();
//! let (status, body) = client::call(&sock, "GET", "/api/v1/vmm.ping", None).unwrap();
//! assert_eq!(status, 200);
//! assert!(body.contains("0.1.0"));
//! drop(server); // stops serving and removes the socket
//! assert!(!sock.exists());
//! ```

pub mod client;
mod http;
mod server;

use std::path::PathBuf;

pub use server::ApiServer;

/// The API's path prefix.
pub const PREFIX: &str = "/api/v1/";

/// What a client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `GET vmm.ping`: the VMM answers (version, pid).
    Ping,
    /// `GET vm.info`: configuration and state.
    Info,
    /// `GET vm.counters`: per-device counters.
    Counters,
    /// `PUT vm.pause`: every vCPU parked, every device quiet.
    Pause,
    /// `PUT vm.resume`: continue after a pause.
    Resume,
    /// `PUT vm.shutdown`: stop the VM (the VMM exits 0).
    Shutdown,
    /// `PUT vm.reboot`: restart the guest.
    Reboot,
    /// `PUT vm.power-button`: press the ACPI power button.
    PowerButton,
    /// `PUT vm.snapshot` with `{"destination_url": "file:///dir"}`.
    Snapshot {
        /// The directory the snapshot goes to.
        destination: PathBuf,
    },
    /// `PUT vm.restore` with `{"source_url": "file:///dir"}`.
    Restore {
        /// The snapshot directory.
        source: PathBuf,
    },
    /// `PUT vmm.shutdown`: stop the VM and the VMM.
    VmmShutdown,
}

/// What the API answers.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// Body: JSON, or a plain-text error message (as Cloud Hypervisor sends), or nothing.
    pub body: Body,
}

/// A response body.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    /// No body (204).
    Empty,
    /// `application/json`.
    Json(serde_json::Value),
    /// `text/plain`: what went wrong.
    Text(String),
}

impl Response {
    /// 204 No Content: done.
    pub fn done() -> Self {
        Response {
            status: 204,
            body: Body::Empty,
        }
    }

    /// A JSON body with `status`.
    pub fn json(status: u16, v: serde_json::Value) -> Self {
        Response {
            status,
            body: Body::Json(v),
        }
    }

    /// An error `status` with a message.
    pub fn error(status: u16, msg: impl Into<String>) -> Self {
        Response {
            status,
            body: Body::Text(msg.into()),
        }
    }
}

/// What the VMM does with requests. Called on the API thread, one request at a time.
pub trait Controller: Send + Sync + 'static {
    /// Performs `req` and says how it went.
    fn handle(&self, req: Request) -> Response;
}

/// Errors of the API server and client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket could not be set up or reached.
    #[error("API socket {path}: {source}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The server's answer was not HTTP.
    #[error("API socket {path}: {reason}")]
    Protocol {
        /// The socket path.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
}

/// `file:///abs/dir` -> `/abs/dir`.
pub fn file_url_path(url: &str) -> Option<PathBuf> {
    let p = url.strip_prefix("file://")?;
    p.starts_with('/').then(|| PathBuf::from(p))
}

#[cfg(test)]
#[path = "lib_test.rs"]
mod tests;
