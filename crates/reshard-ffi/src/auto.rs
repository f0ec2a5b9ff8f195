//! `reshard_auto` (automatic transform at start-up, one call per rank) and
//! `reshard_strategy_new` (strategy files for a target layout, without MindSpore).

use std::ffi::c_char;
use std::io::Write;

use reshard_core::auto::{auto, rank_from_env, AutoOptions};
use reshard_core::strategy_new::NewOptions;
use serde_json::Value;

use crate::cancel::{self, ReshardCancel};
use crate::error::{FfiError, ReshardError, ReshardStatus};
use crate::ffi::{self, Out};
use crate::panic::with_status;

fn options_object(text: &str, func: &str) -> Result<serde_json::Map<String, Value>, FfiError> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => {
            Err(FfiError::new(ReshardStatus::InvalidOptions, format!("{func}: options_json must be a JSON object")))
        }
        Err(e) => {
            Err(FfiError::new(ReshardStatus::InvalidOptions, format!("{func}: options_json is not valid JSON: {e}")))
        }
    }
}

/// Converts this rank's checkpoint for the strategy the runtime has just written, as
/// `reshard auto` does: finds what `load_checkpoint` holds (a folder of `rank_*` folders, a
/// folder with only `rank_0` or loose checkpoints, or one file), waits for every rank's
/// `ckpt_strategy_rank_{r}.ckpt` in `dst_strategy_dir`, merges them, and writes
/// `output_dir/transformed_checkpoint/rank_{r}/{prefix}{r}.ckpt`.
///
/// `options_json` (required) is a JSON object with the keys `load_checkpoint` (required),
/// `src_strategy_path_or_dir`, `output_dir` (default "output"), `dst_strategy_dir` (default
/// `output_dir/strategy`), `rank` and `world_size` (default: RANK_ID/RANK_SIZE, RANK/WORLD_SIZE,
/// OMPI_COMM_WORLD_*, PMI_*, SLURM_PROCID/SLURM_NTASKS), `prefix` (default "checkpoint_"),
/// `output_format` ("ckpt" or "safetensors"), `timeout` (seconds, default 600), `threads`
/// (0 = all cores), `io` ("mmap", "pread" or "auto" (default): how sources are read) and
/// `quiet` (default false: the log goes to stderr, one line per step).
///
/// Returns 0 on success and stores in `*load_path_out` the checkpoint this rank should load
/// (free it with `reshard_string_free`). Otherwise returns a `RESHARD_STATUS_*` code, leaves
/// `*load_path_out` untouched and, if `error_out` is not NULL, stores an error object there (free
/// it with `reshard_error_free`). Several processes may call this at once for different ranks;
/// they coordinate only through files.
///
/// # Safety
///
/// `options_json` must be NULL or NUL-terminated; `load_path_out` must be NULL or writable;
/// `error_out` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn reshard_auto(
    options_json: *const c_char,
    load_path_out: *mut *mut c_char,
    error_out: *mut *mut ReshardError,
) -> ReshardStatus {
    // SAFETY: forwarded contract (# Safety), without a cancel handle.
    let body = || unsafe { auto_impl(options_json, std::ptr::null(), load_path_out, "reshard_auto") };
    // SAFETY: `error_out` is NULL or writable (# Safety).
    unsafe { with_status(error_out, body) }
}

/// `reshard_auto` that another thread can stop: `reshard_cancel_request(cancel)` ends the wait
/// for strategy files (within 100 ms) or the transform (at its next block of work), and the call
/// returns `RESHARD_STATUS_CANCELLED`, leaving no partial output. `cancel` may be NULL.
///
/// # Safety
///
/// As `reshard_auto`; in addition `cancel` must be NULL or a live handle from
/// `reshard_cancel_new`, not freed before this call returns.
#[no_mangle]
pub unsafe extern "C" fn reshard_auto_cancellable(
    options_json: *const c_char,
    cancel: *const ReshardCancel,
    load_path_out: *mut *mut c_char,
    error_out: *mut *mut ReshardError,
) -> ReshardStatus {
    // SAFETY: forwarded contract (# Safety).
    let body = || unsafe { auto_impl(options_json, cancel, load_path_out, "reshard_auto_cancellable") };
    // SAFETY: `error_out` is NULL or writable (# Safety).
    unsafe { with_status(error_out, body) }
}

/// The required `options_json` argument of the functions of this module, as text.
///
/// # Safety
///
/// `options_json` must be NULL or NUL-terminated.
unsafe fn options_text<'a>(options_json: *const c_char, func: &str) -> Result<&'a str, FfiError> {
    // SAFETY: forwarded contract.
    unsafe { ffi::opt_utf8_arg(options_json, "options_json") }?
        .ok_or_else(|| FfiError::new(ReshardStatus::NullArgument, format!("{func}: options_json is NULL")))
}

/// The body of the two auto functions.
///
/// # Safety
///
/// The pointer contracts of `reshard_auto_cancellable`.
unsafe fn auto_impl(
    options_json: *const c_char,
    cancel: *const ReshardCancel,
    load_path_out: *mut *mut c_char,
    func: &str,
) -> Result<(), FfiError> {
    // SAFETY: NULL or NUL-terminated (# Safety).
    let text = unsafe { options_text(options_json, func) }?;
    // SAFETY: NULL or writable (# Safety).
    let out = unsafe { Out::new(load_path_out, "load_path_out") }?;
    // SAFETY: NULL or a live cancel handle (# Safety).
    let cancel = unsafe { cancel::flag_of(cancel) };
    let mut obj = options_object(text, func)?;
    let quiet = match obj.remove("quiet") {
        None => false,
        Some(Value::Bool(b)) => b,
        Some(_) => {
            return Err(FfiError::new(
                ReshardStatus::InvalidOptions,
                format!("{func}: option \"quiet\" must be a boolean"),
            ))
        }
    };
    if !obj.contains_key("load_checkpoint") {
        return Err(FfiError::new(
            ReshardStatus::InvalidOptions,
            format!("{func}: option \"load_checkpoint\" is required"),
        ));
    }
    let mut opts: AutoOptions = serde_json::from_value(Value::Object(obj))
        .map_err(|e| FfiError::new(ReshardStatus::InvalidOptions, format!("{func}: {e}")))?;
    opts.cancel = cancel;
    let tag = opts.rank.or_else(|| rank_from_env().map(|x| x.0)).unwrap_or(0);
    let result = auto(&opts).map_err(|e| {
        let mut fe = FfiError::from(e);
        fe.message = format!("[rank {tag}] {}", fe.message);
        fe
    })?;
    if !quiet {
        let text: String = result.log.iter().map(|l| format!("reshard[rank {tag}]: {l}\n")).collect();
        let _ = std::io::stderr().write_all(text.as_bytes());
    }
    out.write(ffi::into_c_string(result.load_path.display().to_string()));
    Ok(())
}

/// Writes strategy files for a target layout without MindSpore, as `reshard strategy new`:
/// reads parameter names and shapes from a checkpoint, applies sharding rules (a llama preset by
/// default), and writes one file per pipeline stage plus `merged_ckpt_strategy.ckpt`.
///
/// `options_json` (required) has the keys of `reshard strategy new`: `from` (checkpoint or
/// folder, required), `dp`, `mp` (required), `pp`, `optimizer_shard`, `opt_shard_size`,
/// `opt_shard_threshold_kb`, `rules` (a rules file), `rules_text`, `preset`, `layers_per_stage`,
/// `out` (folder, required) and `json` (write JSON files).
///
/// Returns 0 on success. Otherwise returns a `RESHARD_STATUS_*` code and, if `error_out` is not
/// NULL, stores an error object there (free it with `reshard_error_free`).
///
/// # Safety
///
/// `options_json` must be NULL or NUL-terminated; `error_out` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn reshard_strategy_new(
    options_json: *const c_char,
    error_out: *mut *mut ReshardError,
) -> ReshardStatus {
    const F: &str = "reshard_strategy_new";
    let body = || {
        // SAFETY: NULL or NUL-terminated (# Safety).
        let text = unsafe { options_text(options_json, F) }?;
        options_object(text, F)?;
        let opts = NewOptions::from_json(text)
            .map_err(|e| FfiError::new(ReshardStatus::InvalidOptions, format!("{F}: {e}")))?;
        opts.run()?;
        Ok(())
    };
    // SAFETY: `error_out` is NULL or writable (# Safety).
    unsafe { with_status(error_out, body) }
}
