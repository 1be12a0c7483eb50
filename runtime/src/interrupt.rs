//! Stopping signals noted instead of ending the process while a long job holds them: a training
//! run saves and stops after its step; `v3r serve` stops taking requests and ends once those
//! running have. The first signal puts back the default action, so a second ends the process at
//! once; dropping the [`Interrupt`] does too.

use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

#[cfg(unix)]
extern "C" fn note(signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
    // SAFETY: signal() is async-signal-safe; restoring the default action.
    unsafe { libc::signal(signal, libc::SIG_DFL) };
}

/// The signals held while it lives.
pub struct Interrupt {
    #[cfg_attr(not(unix), allow(dead_code))]
    signals: Vec<libc::c_int>,
}

impl Interrupt {
    /// `signals` (e.g. SIGINT, SIGTERM) noted from now on.
    pub fn install(signals: &[libc::c_int]) -> Interrupt {
        INTERRUPTED.store(false, Ordering::SeqCst);
        #[cfg(unix)]
        for &s in signals {
            // SAFETY: the handler only stores an atomic and calls signal(), both async-signal-safe.
            unsafe { libc::signal(s, note as extern "C" fn(libc::c_int) as libc::sighandler_t) };
        }
        Interrupt { signals: signals.to_vec() }
    }

    /// Whether one came.
    pub fn happened(&self) -> bool {
        happened()
    }
}

/// Whether a signal an [`Interrupt`] holds came (false when none is held).
pub fn happened() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

impl Drop for Interrupt {
    fn drop(&mut self) {
        #[cfg(unix)]
        for &s in &self.signals {
            // SAFETY: restoring the default action.
            unsafe { libc::signal(s, libc::SIG_DFL) };
        }
    }
}
