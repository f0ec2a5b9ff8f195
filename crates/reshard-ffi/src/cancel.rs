//! Cancelling a run from another thread: `reshard_cancel_new`, `reshard_cancel_request`,
//! `reshard_cancel_free`, passed to `reshard_execute_cancellable` or `reshard_auto_cancellable`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::error::{FfiError, ReshardStatus};
use crate::ffi;
use crate::panic::or_value;

/// A request to stop, shared between the thread that runs a transform and the one that stops it.
///
/// Opaque to C. Made by `reshard_cancel_new`, freed with `reshard_cancel_free`. Once requested it
/// stays requested: use a new one for the next run. One handle may be given to several calls
/// (one request stops all of them).
pub struct ReshardCancel {
    flag: Arc<AtomicBool>,
}

impl ReshardCancel {
    /// The flag the core's options take.
    pub(crate) fn flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.flag)
    }
}

/// The flag behind an optional cancel handle (NULL = the call cannot be cancelled).
///
/// # Safety
///
/// `cancel` must be NULL or a live handle from `reshard_cancel_new`.
pub(crate) unsafe fn flag_of(cancel: *const ReshardCancel) -> Option<Arc<AtomicBool>> {
    // SAFETY: NULL or a live handle (# Safety).
    unsafe { ffi::try_ref(cancel, "cancel") }.ok().map(ReshardCancel::flag)
}

/// Makes a cancel handle, not requested. Free it with `reshard_cancel_free` once no call that
/// was given it is running. Returns NULL only if memory runs out.
#[no_mangle]
pub extern "C" fn reshard_cancel_new() -> *mut ReshardCancel {
    or_value(std::ptr::null_mut(), || ffi::into_handle(ReshardCancel { flag: Arc::new(AtomicBool::new(false)) }))
}

/// Asks every call that was given `cancel` to stop. It returns at once; the call stops at its
/// next block of work (or within 100 ms while `reshard_auto_cancellable` waits for strategy
/// files) and returns `RESHARD_STATUS_CANCELLED`. The output it was writing is removed (its
/// temporary file; nothing appears under a final name), outputs already complete stay.
///
/// May be called from any thread, any number of times, and from a signal handler (it only
/// stores to an atomic flag). Returns 0, or `RESHARD_STATUS_NULL_ARGUMENT` for NULL.
///
/// # Safety
///
/// `cancel` must be NULL or a live handle from `reshard_cancel_new`.
#[no_mangle]
pub unsafe extern "C" fn reshard_cancel_request(cancel: *const ReshardCancel) -> ReshardStatus {
    or_value(ReshardStatus::Panic, || {
        // SAFETY: NULL or a live handle (# Safety).
        match unsafe { ffi::try_ref(cancel, "cancel") } {
            Ok(c) => {
                c.flag.store(true, Ordering::Release);
                ReshardStatus::Ok
            }
            Err(FfiError { status, .. }) => status,
        }
    })
}

/// Frees a cancel handle. NULL is a no-op.
///
/// # Safety
///
/// `cancel` must be NULL or a handle from `reshard_cancel_new` that was not freed before, and no
/// call that was given it may still be running, nor another thread using it.
#[no_mangle]
pub unsafe extern "C" fn reshard_cancel_free(cancel: *mut ReshardCancel) {
    or_value((), || {
        // SAFETY: NULL or a live, unshared handle (# Safety).
        unsafe { ffi::free_handle(cancel) }
    })
}
