//! Plans and their execution: `reshard_plan`, `reshard_execute` and the plan queries.

use std::collections::BTreeSet;
use std::ffi::{c_char, c_void};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use reshard_core::execute::{execute, ExecuteOptions};
use reshard_core::plan::Plan;
use reshard_core::report::plan_json;

use crate::cancel::{self, ReshardCancel};
use crate::error::{FfiError, ReshardError, ReshardStatus};
use crate::ffi::{self, Out, OutSlice};
use crate::options::{distributed_options, execute_options, plan_options};
use crate::panic::{catch, or_value, with_status};

/// A compiled transform from a source checkpoint folder to a destination strategy.
///
/// Opaque to C. Made by `reshard_plan`, freed with `reshard_plan_free`. Immutable once built:
/// any number of threads may use one plan at once (queries and executes of disjoint ranks).
pub struct ReshardPlan {
    plan: Plan,
    /// Destination ranks that some `reshard_execute` call is writing right now.
    in_flight: Mutex<BTreeSet<u32>>,
}

/// Ranks claimed by one execute call; released when the call ends, even by a panic.
struct Claim<'a> {
    plan: &'a ReshardPlan,
    ranks: Vec<u32>,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut set = self.plan.in_flight.lock().unwrap_or_else(PoisonError::into_inner);
        for r in &self.ranks {
            set.remove(r);
        }
    }
}

impl ReshardPlan {
    /// The core's plan.
    pub(crate) fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Claims `ranks` for one execute call, or fails with `Busy` naming the ranks another call
    /// is writing. Two writers of one rank in one process would share the core's temporary file
    /// name, and each deletes the other's "stale" temporary file and rewrites the manifest.
    fn claim(&self, ranks: &[u32]) -> Result<Claim<'_>, FfiError> {
        let mut set = self.in_flight.lock().unwrap_or_else(PoisonError::into_inner);
        let busy: Vec<String> = ranks.iter().filter(|r| set.contains(r)).map(u32::to_string).collect();
        if !busy.is_empty() {
            return Err(FfiError::new(
                ReshardStatus::Busy,
                format!(
                    "destination rank(s) {} are being written by another reshard_execute call on this plan; \
                     nothing was written by this call (a rank may be executed again once that call has returned)",
                    busy.join(", ")
                ),
            ));
        }
        set.extend(ranks.iter().copied());
        Ok(Claim { plan: self, ranks: ranks.to_vec() })
    }
}

/// The ranks to write: all for an empty list; otherwise each must exist and appear once.
fn resolve_ranks(plan: &Plan, ranks: &[u32]) -> Result<Vec<u32>, FfiError> {
    let count = plan.dst_rank_count();
    if ranks.is_empty() {
        return Ok((0..count).collect());
    }
    let mut seen = BTreeSet::new();
    for &r in ranks {
        if r >= count {
            return Err(out_of_range(r, count));
        }
        if !seen.insert(r) {
            return Err(FfiError::new(
                ReshardStatus::InvalidArgument,
                format!("destination rank {r} appears more than once in dst_ranks"),
            ));
        }
    }
    Ok(ranks.to_vec())
}

pub(crate) fn out_of_range(rank: u32, count: u32) -> FfiError {
    FfiError::new(
        ReshardStatus::RankOutOfRange,
        format!(
            "destination rank {rank} does not exist: the plan has {count} destination rank(s), 0 to {}",
            count.saturating_sub(1)
        ),
    )
}

/// Builds a plan: reads the strategies and the source checkpoints' tables of contents, checks
/// that they fit together, and decides which source bytes go into which destination rank.
///
/// - `src_ckpt_dir`: folder with `rank_0/`, `rank_1/`, ... each holding one checkpoint
///   (`.ckpt` or `.safetensors`). Required.
/// - `src_strategy`: the strategy the sources were saved with: a strategy file (protobuf, or
///   JSON when the name ends in `.json`) or a folder of per-stage files. NULL = complete
///   weights in `rank_0`.
/// - `dst_strategy`: the strategy to convert to, same forms. NULL = one complete checkpoint.
/// - `options_json`: NULL, or a JSON object with optional keys `"src_ckpt_name"` (string: the
///   file to use when a rank folder holds several, `{rank}` standing for the rank number),
///   `"skip_crc"` (bool: do not verify crc trailers of the sources) and `"io"` (how sources are
///   read while indexing: "mmap", "pread" or "auto" (default: pread on network filesystems, mmap
///   elsewhere)). Unknown keys are an error.
///
/// On success returns 0 and stores a new plan in `*plan_out`; the caller owns it and frees it
/// with `reshard_plan_free`. On failure returns a non-zero `RESHARD_STATUS_*` code, leaves
/// `*plan_out` untouched and, if `error_out` is not NULL, stores a new error object in
/// `*error_out` (the caller frees it with `reshard_error_free`).
///
/// # Safety
///
/// Every string argument must be NULL or a NUL-terminated string; `plan_out` must be NULL or
/// point to writable storage for one pointer; `error_out` must be NULL or point to writable
/// storage for one pointer.
#[no_mangle]
pub unsafe extern "C" fn reshard_plan(
    src_ckpt_dir: *const c_char,
    src_strategy: *const c_char,
    dst_strategy: *const c_char,
    options_json: *const c_char,
    plan_out: *mut *mut ReshardPlan,
    error_out: *mut *mut ReshardError,
) -> ReshardStatus {
    let body = || {
        // SAFETY: `plan_out` is NULL or writable (# Safety).
        let plan_out = unsafe { Out::new(plan_out, "plan_out") }?;
        // SAFETY: the strings are NULL or NUL-terminated (# Safety).
        let src = unsafe { ffi::path_arg(src_ckpt_dir, "src_ckpt_dir") }?;
        // SAFETY: as above.
        let src_strategy = unsafe { ffi::opt_path_arg(src_strategy, "src_strategy") }?;
        // SAFETY: as above.
        let dst_strategy = unsafe { ffi::opt_path_arg(dst_strategy, "dst_strategy") }?;
        // SAFETY: as above.
        let opts = unsafe { ffi::options_arg(options_json, plan_options) }?;
        let plan = Plan::build(&src, src_strategy.as_deref(), dst_strategy.as_deref(), &opts)?;
        plan_out.write(ffi::into_handle(ReshardPlan { plan, in_flight: Mutex::new(BTreeSet::new()) }));
        Ok(())
    };
    // SAFETY: `error_out` is NULL or writable (# Safety).
    unsafe { with_status(error_out, body) }
}

/// Frees a plan. NULL is a no-op.
///
/// # Safety
///
/// `plan` must be NULL or a plan from `reshard_plan` that was not freed before and that no
/// other thread is using.
#[no_mangle]
pub unsafe extern "C" fn reshard_plan_free(plan: *mut ReshardPlan) {
    or_value((), || {
        // SAFETY: NULL or a live, unshared plan handle (# Safety).
        unsafe { ffi::free_handle(plan) }
    })
}

/// The number of destination ranks (1 for a complete destination). Returns 0 when `plan` is
/// NULL.
///
/// # Safety
///
/// `plan` must be NULL or a live plan from `reshard_plan`.
#[no_mangle]
pub unsafe extern "C" fn reshard_plan_dst_rank_count(plan: *const ReshardPlan) -> u32 {
    or_value(0, || {
        // SAFETY: NULL or a live plan (# Safety).
        unsafe { ffi::try_ref(plan, "plan") }.map_or(0, |p| p.plan.dst_rank_count())
    })
}

/// The source ranks that destination rank `dst_rank` reads, highest first (the order of
/// MindSpore's `rank_list_for_transform`).
///
/// Stores the number of source ranks in `*len_out` and, when it is at most `cap`, the ranks in
/// `out[0..len)`, and returns 0. When `cap` is too small, returns
/// `RESHARD_STATUS_BUFFER_TOO_SMALL`, stores the required length in `*len_out` and writes nothing
/// to `out` (so a call with `out = NULL, cap = 0` asks for the length). Other failures return
/// their status code and write nothing: `RESHARD_STATUS_NULL_ARGUMENT` (NULL `plan` or
/// `len_out`, or NULL `out` with `cap > 0`), `RESHARD_STATUS_RANK_OUT_OF_RANGE`, or a core error.
///
/// # Safety
///
/// `plan` must be NULL or a live plan; `out` must be NULL or writable for `cap` values;
/// `len_out` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn reshard_plan_src_ranks(
    plan: *const ReshardPlan,
    dst_rank: u32,
    out: *mut u32,
    cap: usize,
    len_out: *mut usize,
) -> ReshardStatus {
    let r = catch(|| {
        // SAFETY: NULL or a live plan (# Safety).
        let plan = unsafe { ffi::try_ref(plan, "plan") }?;
        // SAFETY: NULL or writable for one size_t (# Safety).
        let len_out = unsafe { Out::new(len_out, "len_out") }?;
        // SAFETY: NULL or writable for `cap` values (# Safety).
        let out = unsafe { OutSlice::new(out, cap, "out") }?;
        let count = plan.plan.dst_rank_count();
        if dst_rank >= count {
            return Err(out_of_range(dst_rank, count));
        }
        let ranks = plan.plan.src_ranks_for(dst_rank)?;
        let fits = ranks.len() <= out.cap();
        len_out.write(ranks.len());
        if !fits {
            return Ok(ReshardStatus::BufferTooSmall);
        }
        out.write(&ranks);
        Ok(ReshardStatus::Ok)
    });
    r.unwrap_or_else(|e| e.status)
}

/// A JSON summary of the plan: source and destination rank counts and stages, warnings, and per
/// destination rank its output file (relative to the output folder, with the default prefix and
/// format), tensor count, bytes written and the source files and bytes it reads.
///
/// Returns a new NUL-terminated string that the caller frees with `reshard_string_free`, or
/// NULL when `plan` is NULL or the summary cannot be made.
///
/// # Safety
///
/// `plan` must be NULL or a live plan from `reshard_plan`.
#[no_mangle]
pub unsafe extern "C" fn reshard_plan_to_json(plan: *const ReshardPlan) -> *mut c_char {
    let r = catch(|| {
        // SAFETY: NULL or a live plan (# Safety).
        let plan = unsafe { ffi::try_ref(plan, "plan") }?;
        let v = plan_json(&plan.plan, Path::new(""), &ExecuteOptions::default(), false)?;
        Ok(ffi::into_c_string(v.to_string()))
    });
    r.unwrap_or(std::ptr::null_mut())
}

/// Frees a string returned by this library (`reshard_plan_to_json`). NULL is a no-op.
///
/// # Safety
///
/// `s` must be NULL or a string from this library that was not freed before.
#[no_mangle]
pub unsafe extern "C" fn reshard_string_free(s: *mut c_char) {
    or_value((), || {
        // SAFETY: NULL or an unfreed string from `into_c_string` (# Safety).
        unsafe { ffi::free_string(s) }
    })
}

/// Progress callback of `reshard_execute_with_progress`: `done` of `total` content bytes have
/// been written; `user` is the pointer given to that call.
pub type ReshardProgressFn = Option<unsafe extern "C" fn(done: u64, total: u64, user: *mut c_void)>;

struct ProgressSink {
    callback: unsafe extern "C" fn(u64, u64, *mut c_void),
    user: *mut c_void,
    /// The last `done` reported; also serialises the calls.
    last: Mutex<Option<u64>>,
}

// SAFETY: `user` is never dereferenced here, only handed back to `callback`, and the contract of
// `reshard_execute_with_progress` requires the callback to accept being called with it from
// other threads (one call at a time, which `last` enforces).
unsafe impl Send for ProgressSink {}
// SAFETY: as for Send; all shared state is behind the mutex.
unsafe impl Sync for ProgressSink {}

impl ProgressSink {
    fn report(&self, done: u64, total: u64) {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        // Workers finish blocks out of order; report only progress.
        if last.is_some_and(|l| done <= l) {
            return;
        }
        *last = Some(done);
        // SAFETY: a valid callback per the contract of `reshard_execute_with_progress`, called
        // with the caller's own `user` pointer, never concurrently (the mutex is held).
        unsafe { (self.callback)(done, total, self.user) }
    }
}

/// The arguments the execute functions share, and the name their error messages give.
struct Execute {
    plan: *const ReshardPlan,
    dst_ckpt_dir: *const c_char,
    dst_ranks: *const u32,
    n_dst_ranks: usize,
    options_json: *const c_char,
    func: &'static str,
}

impl Execute {
    /// The shared body of the execute functions: `reshard_execute_cancellable` (NULL `progress`
    /// and `cancel` for the others).
    ///
    /// # Safety
    ///
    /// The pointer contracts of `reshard_execute_cancellable`.
    unsafe fn run(
        self,
        progress: ReshardProgressFn,
        user: *mut c_void,
        cancel: *const ReshardCancel,
    ) -> Result<(), FfiError> {
        let Execute { plan, dst_ckpt_dir, dst_ranks, n_dst_ranks, options_json, func } = self;
        // SAFETY: NULL or a live plan (caller's contract).
        let plan = unsafe { ffi::try_ref(plan, "plan") }?;
        // SAFETY: NULL or NUL-terminated (caller's contract).
        let dst = unsafe { ffi::path_arg(dst_ckpt_dir, "dst_ckpt_dir") }?;
        let count = plan.plan.dst_rank_count();
        if n_dst_ranks > count as usize {
            return Err(FfiError::new(
                ReshardStatus::InvalidArgument,
                format!("n_dst_ranks is {n_dst_ranks}, but the plan has only {count} destination rank(s)"),
            ));
        }
        // SAFETY: NULL with 0, or `n_dst_ranks` readable values (caller's contract).
        let ranks = unsafe { ffi::slice_arg(dst_ranks, n_dst_ranks, "dst_ranks") }?;
        // SAFETY: NULL or NUL-terminated (caller's contract).
        let options = unsafe { ffi::opt_utf8_arg(options_json, "options_json") }?;
        let mut opts = execute_options(options, func)?;
        let distributed = distributed_options(options, func)?;
        opts.progress = progress.map(|callback| {
            let sink = ProgressSink { callback, user, last: Mutex::new(None) };
            Arc::new(move |done: u64, total: u64| sink.report(done, total)) as Arc<reshard_core::execute::ProgressFn>
        });
        // SAFETY: NULL or a live cancel handle (caller's contract).
        opts.cancel = unsafe { cancel::flag_of(cancel) };
        let ranks = resolve_ranks(&plan.plan, ranks)?;
        let _claim = plan.claim(&ranks)?;
        match distributed {
            None => execute(&plan.plan, &dst, &ranks, &opts).map(drop)?,
            Some(d) => reshard_core::distributed::execute_distributed(&plan.plan, &dst, &ranks, &opts, &d).map(drop)?,
        }
        Ok(())
    }
}

/// Writes the checkpoints of some or all destination ranks into
/// `dst_ckpt_dir/rank_{r}/{prefix}{r}.{ckpt|safetensors}` (folders are created).
///
/// - `dst_ranks`, `n_dst_ranks`: the ranks to write; NULL with 0 (or any pointer with 0) means
///   all ranks. Each rank must exist (`RESHARD_STATUS_RANK_OUT_OF_RANGE`) and appear once
///   (`RESHARD_STATUS_INVALID_ARGUMENT`).
/// - `options_json`: NULL, or a JSON object with optional keys `"prefix"` (string without '/',
///   default "checkpoint_"), `"output_format"` ("ckpt" (default) or "safetensors"),
///   `"threads"` (integer, 0 (default) = all cores), `"crc"` (bool, default false: append
///   MindSpore's crc32 trailer), `"resume"` (bool, default true: keep an output that the
///   manifest of its folder says this same plan already wrote and that still has the recorded
///   size and crc32), `"sync"` (bool, default true: fsync each output before renaming it into
///   place) and `"io"` ("mmap", "pread" or "auto" (default): how sources are read; "pread" maps
///   nothing, so a source truncated during the call is an error, never a SIGBUS in the host).
///   Unknown keys are an error.
/// - Process shares (`reshard transform --distributed`): with `"distributed": true` this call is
///   one process of a job spread over several, started by a launcher with the same arguments
///   and an output folder they all see. It writes its share of the ranks (`dst_ranks`, or all),
///   balanced by bytes and derived from the plan, records its result in
///   `dst_ckpt_dir/reshard_share_{i}_of_{n}.json`, and returns 0 only when every share is done
///   and verified. `"process_index"` and `"process_count"` (integers; default: the launcher's
///   environment, as the CLI reads it) and `"timeout"` (seconds a share may stay silent, default
///   600) go with it. Another share's failure or silence returns `RESHARD_STATUS_DISTRIBUTED`
///   with its error in the message; no index in the environment is `RESHARD_STATUS_INVALID_OPTIONS`.
///
/// Each output is written to a temporary file and renamed into place, so a reader sees either
/// the previous file or the complete new one; each `rank_{r}/` folder also gets a manifest,
/// `reshard_manifest.json`. On failure no new output of the failing rank is left behind
/// (outputs of other ranks written by this call may remain).
///
/// Executing a rank again: allowed once any earlier call writing it has returned. With
/// `"resume": true` a verified output of the same plan is kept as it is, anything else is
/// rewritten atomically; with `"resume": false` it is always rewritten atomically.
///
/// Threads: any number of threads (or processes) may execute disjoint ranks of one plan at once.
/// While one call is writing a rank, another call on the same plan that asks for that rank fails
/// at once with `RESHARD_STATUS_BUSY` and writes nothing.
///
/// Returns 0 on success; otherwise a `RESHARD_STATUS_*` code, and if `error_out` is not NULL a
/// new error object in `*error_out` (the caller frees it with `reshard_error_free`).
///
/// # Safety
///
/// `plan` must be NULL or a live plan; the strings must be NULL or NUL-terminated; `dst_ranks`
/// must be NULL or readable for `n_dst_ranks` values; `error_out` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn reshard_execute(
    plan: *const ReshardPlan,
    dst_ckpt_dir: *const c_char,
    dst_ranks: *const u32,
    n_dst_ranks: usize,
    options_json: *const c_char,
    error_out: *mut *mut ReshardError,
) -> ReshardStatus {
    let call = Execute { plan, dst_ckpt_dir, dst_ranks, n_dst_ranks, options_json, func: "reshard_execute" };
    // SAFETY: forwarded contract (# Safety), with neither callback nor cancel handle.
    let body = || unsafe { call.run(None, std::ptr::null_mut(), std::ptr::null()) };
    // SAFETY: `error_out` is NULL or writable (# Safety).
    unsafe { with_status(error_out, body) }
}

/// `reshard_execute` with a progress callback (NULL = none).
///
/// `progress(done, total, user)` is called as content is written: `done` strictly increases
/// from call to call and reaches `total` (bytes of tensor content of all requested ranks) at the
/// end. It is called from reshard's worker threads, never from two threads at once, and never
/// after this function returns; it may not be called at all when there is nothing to write. It
/// must not unwind (throw a C++ exception) or `longjmp` out, and should return quickly.
///
/// # Safety
///
/// As `reshard_execute`; in addition `progress` must be NULL or a function safe to call from
/// any thread with `user`, for the duration of the call.
#[no_mangle]
pub unsafe extern "C" fn reshard_execute_with_progress(
    plan: *const ReshardPlan,
    dst_ckpt_dir: *const c_char,
    dst_ranks: *const u32,
    n_dst_ranks: usize,
    options_json: *const c_char,
    progress: ReshardProgressFn,
    user: *mut c_void,
    error_out: *mut *mut ReshardError,
) -> ReshardStatus {
    let func = "reshard_execute_with_progress";
    let call = Execute { plan, dst_ckpt_dir, dst_ranks, n_dst_ranks, options_json, func };
    // SAFETY: forwarded contract (# Safety), without a cancel handle.
    let body = || unsafe { call.run(progress, user, std::ptr::null()) };
    // SAFETY: `error_out` is NULL or writable (# Safety).
    unsafe { with_status(error_out, body) }
}

/// `reshard_execute_with_progress` that another thread can stop: `reshard_cancel_request(cancel)`
/// makes it return `RESHARD_STATUS_CANCELLED` at its next block of work. The output being written
/// then is removed (only its temporary file existed; nothing appears under its final name and
/// its manifest entry is not written), outputs of ranks finished before stay, complete, and a
/// later call with `"resume": true` keeps them. A handle already requested when the call starts
/// stops it before anything is written. `cancel` may be NULL (the call cannot be stopped), and so
/// may `progress`.
///
/// # Safety
///
/// As `reshard_execute_with_progress`; in addition `cancel` must be NULL or a live handle from
/// `reshard_cancel_new`, not freed before this call returns.
#[no_mangle]
pub unsafe extern "C" fn reshard_execute_cancellable(
    plan: *const ReshardPlan,
    dst_ckpt_dir: *const c_char,
    dst_ranks: *const u32,
    n_dst_ranks: usize,
    options_json: *const c_char,
    progress: ReshardProgressFn,
    user: *mut c_void,
    cancel: *const ReshardCancel,
    error_out: *mut *mut ReshardError,
) -> ReshardStatus {
    let func = "reshard_execute_cancellable";
    let call = Execute { plan, dst_ckpt_dir, dst_ranks, n_dst_ranks, options_json, func };
    // SAFETY: forwarded contract (# Safety).
    let body = || unsafe { call.run(progress, user, cancel) };
    // SAFETY: `error_out` is NULL or writable (# Safety).
    unsafe { with_status(error_out, body) }
}
