//! The server thread: accepts one connection at a time on the Unix socket and answers one
//! request on it.

use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::http::{read_request, route, write_response};
use crate::{ApiError, Controller};

/// How long a client may take to send its request, or to take the response.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// A running API server; dropping it stops the thread and removes the socket file.
pub struct ApiServer {
    path: PathBuf,
    wake: UnixStream,
    thread: Option<JoinHandle<()>>,
}

/// Binds `path`, replacing a stale socket file nobody listens on.
fn bind(path: &Path) -> Result<UnixListener, ApiError> {
    let err = |source| ApiError::Socket {
        path: path.to_path_buf(),
        source,
    };
    if let Ok(m) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !m.file_type().is_socket() {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a socket; refusing to replace it",
            )));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another process is listening on it",
            )));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    UnixListener::bind(path).map_err(err)
}

/// Waits until the listener has a connection (true) or the wake socket is readable (false).
fn wait(listener: &UnixListener, wake: &UnixStream) -> bool {
    let mut fds = [
        libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfd structs.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        return fds[1].revents == 0 && fds[0].revents & libc::POLLIN != 0;
    }
}

fn serve_one(mut s: UnixStream, controller: &dyn Controller) {
    // A client that stalls gets a timeout, not the API thread forever.
    let _ = s.set_read_timeout(Some(CLIENT_TIMEOUT));
    let _ = s.set_write_timeout(Some(CLIENT_TIMEOUT));
    let response = match read_request(&mut s) {
        Ok(raw) => match route(&raw) {
            Ok(req) => {
                log::info!("api: {} {}", raw.method, raw.path);
                controller.handle(req)
            }
            Err(r) => r,
        },
        Err(Some(r)) => r,
        Err(None) => return,
    };
    if let Err(e) = write_response(&mut s, &response) {
        log::warn!("api: writing the response: {e}");
    }
}

impl ApiServer {
    /// Listens on `path` and serves `controller` on a thread of its own.
    pub fn start(path: &Path, controller: Arc<dyn Controller>) -> Result<ApiServer, ApiError> {
        Self::start_with(path, controller, || Ok(()))
    }

    /// Like [`ApiServer::start`], running `init` on the server thread before it accepts a
    /// connection (a VMM installs the thread's seccomp filter there); if `init` fails, the
    /// thread logs why and serves nothing.
    pub fn start_with(
        path: &Path,
        controller: Arc<dyn Controller>,
        init: impl FnOnce() -> Result<(), String> + Send + 'static,
    ) -> Result<ApiServer, ApiError> {
        let listener = bind(path)?;
        let err = |source| ApiError::Socket {
            path: path.to_path_buf(),
            source,
        };
        let (wake, woken) = UnixStream::pair().map_err(err)?;
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                if let Err(e) = init() {
                    log::error!("api: {e}; the API is not served");
                    return;
                }
                while wait(&listener, &woken) {
                    match listener.accept() {
                        Ok((s, _)) => serve_one(s, controller.as_ref()),
                        Err(e) => log::warn!("api: accept: {e}"),
                    }
                }
            })
            .map_err(err)?;
        Ok(ApiServer {
            path: path.to_path_buf(),
            wake,
            thread: Some(thread),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        use std::io::Write;
        let _ = (&self.wake).write_all(&[1]);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}
