//! Terminating signals (SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1/2, SIGALRM) turned into
//! machine events through a self-pipe.

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};

static WRITE_FD: AtomicI32 = AtomicI32::new(-1);

/// The catchable signals whose default action terminates the process (SIGPIPE aside, which
/// Rust programs ignore so that writes report EPIPE instead).
pub const TERMINATING_SIGNALS: [libc::c_int; 7] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGALRM,
];

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = WRITE_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let b = sig as u8;
        // SAFETY: write(2) is async-signal-safe; the buffer is one valid byte.
        unsafe { libc::write(fd, (&b as *const u8).cast(), 1) };
    }
}

/// Handles termination signals: each one received is passed to `f` (on a helper thread, under
/// the input threads' seccomp filter of `seccomp`).
pub fn forward_termination_signals(
    seccomp: crate::sandbox::SeccompMode,
    f: impl Fn(i32) + Send + 'static,
) -> std::io::Result<()> {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 returned two fresh descriptors we now own.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // The write end lives for the rest of the process: the handler may fire at any time.
    let old = WRITE_FD.swap(std::os::fd::IntoRawFd::into_raw_fd(wr), Ordering::SeqCst);
    if old >= 0 {
        // SAFETY: the previous write end was ours and nothing else uses it now.
        unsafe { libc::close(old) };
    }
    // Every signal whose default action ends the process and that can be caught: ending
    // through the machine's stop path restores the terminal and stops the threads.
    for sig in TERMINATING_SIGNALS {
        // SAFETY: a zeroed sigaction is valid; the handler is async-signal-safe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = libc::SA_RESTART;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
    let mut rd = std::fs::File::from(rd);
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Err(e) = crate::sandbox::install(crate::sandbox::ThreadKind::Input, seccomp) {
                log::error!("signals: {e}; termination signals are not handled");
                return;
            }
            let mut b = [0u8; 1];
            while let Ok(1) = rd.read(&mut b) {
                f(i32::from(b[0]));
            }
        })?;
    Ok(())
}
