//! SIGINT and SIGTERM during `transform` and `auto`: the first one asks the job to stop (`auto`
//! stops waiting for strategy files; the executor looks between blocks, removes the temporary
//! files of the outputs in flight and returns), and reshard then exits with 128 + the signal
//! number. A second one takes the default action at once (temporary files it leaves are removed
//! by the next run over the folder). Outputs already under their final names are complete and
//! stay; a rerun keeps them.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, Ordering};
use std::sync::Arc;

/// The signal received, 0 if none.
static RECEIVED: AtomicI32 = AtomicI32::new(0);
/// The executor's cancel flag (a leaked `Arc`: the handler may run until the process ends).
static CANCEL: AtomicPtr<AtomicBool> = AtomicPtr::new(std::ptr::null_mut());

extern "C" fn on_signal(sig: libc::c_int) {
    RECEIVED.store(sig, Ordering::SeqCst);
    // SAFETY: null or the flag leaked by `cancel_on_signals`, never freed. Only atomic stores
    // here: async-signal-safe.
    if let Some(flag) = unsafe { CANCEL.load(Ordering::SeqCst).as_ref() } {
        flag.store(true, Ordering::SeqCst);
    }
}

/// Installs the handlers and returns the flag to give the executor (`ExecuteOptions::cancel`).
pub fn cancel_on_signals() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    CANCEL.store(Arc::into_raw(Arc::clone(&flag)).cast_mut(), Ordering::SeqCst);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction is valid (empty mask); the handler only does atomic
        // stores. SA_RESETHAND: the second signal gets the default action.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            act.sa_flags = libc::SA_RESETHAND | libc::SA_RESTART;
            libc::sigemptyset(&mut act.sa_mask);
            libc::sigaction(sig, &act, std::ptr::null_mut());
        }
    }
    flag
}

/// The signal that asked the job to stop, if one did.
pub fn received() -> Option<i32> {
    Some(RECEIVED.load(Ordering::SeqCst)).filter(|&s| s != 0)
}
