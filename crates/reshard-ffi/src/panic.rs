//! The panic boundary: every exported function runs its body through one of these, so a panic
//! (a bug in reshard) becomes `RESHARD_STATUS_PANIC` instead of unwinding into C, which would
//! abort the process.
//!
//! This only works with `panic = "unwind"` (the default); a build with `panic = "abort"` would
//! abort on the first panic.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::{FfiError, ReshardError, ReshardStatus};
use crate::ffi::ErrorOut;

fn panic_message(payload: &(dyn Any + Send)) -> String {
    let what = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)");
    format!("internal error: reshard panicked: {what}; please report this as a bug")
}

/// Runs `f`, turning a panic into an [`FfiError`] with status `PANIC`.
pub(crate) fn catch<T>(f: impl FnOnce() -> Result<T, FfiError>) -> Result<T, FfiError> {
    // AssertUnwindSafe: after a panic nothing that `f` touched is used again, except plans, which
    // are immutable apart from their in-flight rank set, whose guard restores it while unwinding.
    catch_unwind(AssertUnwindSafe(f))
        .unwrap_or_else(|payload| Err(FfiError::new(ReshardStatus::Panic, panic_message(payload.as_ref()))))
}

/// The boundary of the functions that return a status and an error object: 0 on success,
/// otherwise the error's code, with the error handed out through the export's own `error_out`
/// argument. Every such export runs its whole body (argument checks included) in `f`.
///
/// # Safety
///
/// `error_out` must be NULL or valid for writing one `ReshardError *` until the call returns.
pub(crate) unsafe fn with_status(
    error_out: *mut *mut ReshardError,
    f: impl FnOnce() -> Result<(), FfiError>,
) -> ReshardStatus {
    // SAFETY: forwarded contract.
    let error_out = unsafe { ErrorOut::new(error_out) };
    match catch(f) {
        Ok(()) => ReshardStatus::Ok,
        Err(e) => error_out.set(e),
    }
}

/// The boundary of the functions that return a plain value: `on_panic` if `f` panics.
pub(crate) fn or_value<T>(on_panic: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(on_panic)
}
