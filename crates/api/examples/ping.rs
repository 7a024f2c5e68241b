//! Serves a toy controller on a temporary socket and pings it, as `alioth ctl ping` would.
//!
//! `cargo run -p alioth-api --example ping`

use std::sync::Arc;

use alioth_api::{ApiServer, Controller, Request, Response, client};

struct Toy;

impl Controller for Toy {
    fn handle(&self, req: Request) -> Response {
        match req {
            Request::Ping => Response::json(200, serde_json::json!({"version": "toy"})),
            Request::Pause | Request::Resume => Response::done(),
            other => Response::error(405, format!("{other:?} is not supported by the toy")),
        }
    }
}

fn main() {
    let sock = std::env::temp_dir().join(format!("alioth-api-example-{}.sock", std::process::id()));
    let server = ApiServer::start(&sock, Arc::new(Toy)).expect("start the API server");
    for (method, path) in [
        ("GET", "/api/v1/vmm.ping"),
        ("PUT", "/api/v1/vm.pause"),
        ("GET", "/api/v1/vm.nope"),
        ("PUT", "/api/v1/vm.reboot"),
    ] {
        let (status, body) = client::call(server.path(), method, path, None).expect("call");
        println!("{method} {path} -> {status} {body}");
    }
}
