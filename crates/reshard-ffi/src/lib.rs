//! libreshard: the C ABI of reshard.
//!
//! A stable C interface over `reshard-core` for C/C++ runtimes, launchers and ctypes: build a
//! plan once, execute it for all or some destination ranks, from one or many threads. The
//! header `include/reshard.h` is generated from this crate by cbindgen.
//!
//! ```c
//! ReshardPlan *plan = NULL;
//! ReshardError *err = NULL;
//! if (reshard_plan("src", "src_strategy.ckpt", "dst_strategy.ckpt", NULL, &plan, &err) != 0 ||
//!     reshard_execute(plan, "dst", NULL, 0, "{\"prefix\": \"checkpoint_\"}", &err) != 0) {
//!     fprintf(stderr, "reshard: %s\n", reshard_error_message(err));
//!     reshard_error_free(err);
//! }
//! reshard_plan_free(plan);
//! ```
//!
//! Conventions (see the README section "C API conventions"): functions returning `ReshardStatus`
//! return 0 on success or a `RESHARD_STATUS_*` code; out-parameters are written only on
//! success and error objects only on failure; every pointer is checked for NULL; every export
//! catches panics; handles are freed by their `_free` function, and freeing NULL is a no-op.
//! Pointer handling lives in the `ffi` module, the panic boundary in `panic`.
#![warn(missing_docs)]

// The exports, in the order the header lists them (cbindgen follows module order).
mod plan;

mod cancel;

mod strategy;

mod auto;

mod load;
mod unify;

mod error;

mod version;

// Internals.
mod ffi;
mod options;
mod panic;

pub use auto::{reshard_auto, reshard_auto_cancellable, reshard_strategy_new};
pub use cancel::{reshard_cancel_free, reshard_cancel_new, reshard_cancel_request, ReshardCancel};
pub use error::{reshard_error_code, reshard_error_free, reshard_error_message, ReshardError, ReshardStatus};
pub use load::{reshard_load_rank, ReshardAllocFn, ReshardTensorInfo};
pub use plan::{
    reshard_execute, reshard_execute_cancellable, reshard_execute_with_progress, reshard_plan,
    reshard_plan_dst_rank_count, reshard_plan_free, reshard_plan_src_ranks, reshard_plan_to_json, reshard_string_free,
    ReshardPlan, ReshardProgressFn,
};
pub use strategy::reshard_merge_strategies;
pub use unify::reshard_unify;
pub use version::{reshard_abi_version, reshard_version};

/// The version of the C ABI described by this header. `reshard_abi_version()` returns the
/// version of the loaded library; they differ when the header and library do not match. It
/// changes whenever a signature, a struct or the meaning of a status code changes; adding a new
/// function or status code does not change it.
pub const RESHARD_ABI_VERSION: u32 = 1;

#[cfg(test)]
mod tests {
    use super::*;
    use std::ptr::{null, null_mut};

    #[test]
    fn panics_become_a_status_and_an_error_object() {
        let mut err: *mut ReshardError = null_mut();
        // SAFETY: `err` is a writable local.
        let code = unsafe { panic::with_status(&mut err, || panic!("boom")) };
        assert_eq!(code, ReshardStatus::Panic);
        // SAFETY: `err` was just set by the library.
        unsafe {
            assert_eq!(reshard_error_code(err), ReshardStatus::Panic);
            let msg = std::ffi::CStr::from_ptr(reshard_error_message(err));
            assert!(msg.to_str().unwrap().contains("panicked: boom"), "{msg:?}");
            reshard_error_free(err);
        }
        assert_eq!(panic::or_value(7, || panic!("x")), 7);
    }

    #[test]
    fn null_arguments_are_errors() {
        let mut err: *mut ReshardError = null_mut();
        let mut plan: *mut ReshardPlan = null_mut();
        // SAFETY: NULL and valid out-pointers only.
        unsafe {
            let code = reshard_plan(null(), null(), null(), null(), &mut plan, &mut err);
            assert_eq!(code, ReshardStatus::NullArgument);
            assert!(plan.is_null());
            let msg = std::ffi::CStr::from_ptr(reshard_error_message(err));
            assert!(msg.to_str().unwrap().contains("'src_ckpt_dir' is NULL"));
            reshard_error_free(err);
            assert_eq!(reshard_plan_dst_rank_count(null()), 0);
            assert!(reshard_plan_to_json(null()).is_null());
            assert_eq!(reshard_error_code(null()), ReshardStatus::NullArgument);
            reshard_plan_free(null_mut());
            reshard_error_free(null_mut());
            reshard_string_free(null_mut());
        }
    }

    #[test]
    fn cancel_handles() {
        let c = reshard_cancel_new();
        assert!(!c.is_null());
        // SAFETY: a live handle from reshard_cancel_new, then NULL.
        unsafe {
            assert_eq!(cancel::flag_of(c).map(|f| f.load(std::sync::atomic::Ordering::Acquire)), Some(false));
            assert_eq!(reshard_cancel_request(c), ReshardStatus::Ok);
            assert_eq!(reshard_cancel_request(c), ReshardStatus::Ok);
            assert_eq!(cancel::flag_of(c).map(|f| f.load(std::sync::atomic::Ordering::Acquire)), Some(true));
            assert_eq!(reshard_cancel_request(null()), ReshardStatus::NullArgument);
            assert!(cancel::flag_of(null()).is_none());
            reshard_cancel_free(c);
            reshard_cancel_free(null_mut());
        }
    }

    #[test]
    fn messages_with_nul_survive() {
        let c = error::c_string_lossy("a\0b".to_string());
        assert_eq!(c.to_str().unwrap(), "a\u{fffd}b");
    }

    #[test]
    fn version_matches_cargo() {
        // SAFETY: a static NUL-terminated string.
        let v = unsafe { std::ffi::CStr::from_ptr(reshard_version()) };
        assert_eq!(v.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
        assert_eq!(reshard_abi_version(), RESHARD_ABI_VERSION);
    }
}
