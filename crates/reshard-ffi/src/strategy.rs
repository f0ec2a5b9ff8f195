//! `reshard_merge_strategies`: MindSpore's `merge_pipeline_strategys` over the C ABI.

use std::ffi::c_char;

use reshard_core::strategy::merge_dir;

use crate::error::{ReshardError, ReshardStatus};
use crate::ffi;
use crate::panic::with_status;

/// Merges the per-pipeline-stage strategy files in `src_dir` (all `*.ckpt`, or all `*.json`)
/// into one file `dst_file`, as MindSpore's `merge_pipeline_strategys` does (the same bytes for
/// protobuf files, the same JSON value for `.json` files). The folder of `dst_file` is created if needed; the file is written to a temporary name and
/// renamed into place.
///
/// Returns 0 on success; otherwise a `RESHARD_STATUS_*` code, leaving any existing `dst_file`
/// as it was, and if `error_out` is not NULL a new error object in `*error_out` (the caller
/// frees it with `reshard_error_free`).
///
/// # Safety
///
/// The strings must be NULL or NUL-terminated; `error_out` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn reshard_merge_strategies(
    src_dir: *const c_char,
    dst_file: *const c_char,
    error_out: *mut *mut ReshardError,
) -> ReshardStatus {
    let body = || {
        // SAFETY: NULL or NUL-terminated (# Safety).
        let [src, dst] = unsafe { ffi::path_args([(src_dir, "src_dir"), (dst_file, "dst_file")]) }?;
        let merged = merge_dir(&src)?;
        reshard_core::atomic::write_atomic(&dst, &merged.to_bytes(), true)?;
        Ok(())
    };
    // SAFETY: `error_out` is NULL or writable (# Safety).
    unsafe { with_status(error_out, body) }
}
