//! Loading one destination rank into caller memory: `reshard_load_rank`.

use std::ffi::{c_char, c_void, CString};

use reshard_core::{load_rank, Error, TensorMeta};

use crate::error::{c_string_lossy, FfiError, ReshardError, ReshardStatus};
use crate::ffi;
use crate::options::load_options;
use crate::panic::with_status;
use crate::plan::{out_of_range, ReshardPlan};

/// What `reshard_load_rank`'s allocation callback learns of a tensor. It and its strings and
/// shape are valid only during the callback.
#[repr(C)]
pub struct ReshardTensorInfo {
    /// Parameter name, NUL-terminated.
    pub name: *const c_char,
    /// MindSpore `tensor_type` name: "Float32", "BFloat16", "Int32", ... ("str" for strings).
    pub dtype: *const c_char,
    /// Number of dims in `shape`.
    pub ndim: u32,
    /// This rank's shape, as in the `.ckpt` file `reshard_execute` would write. A 0-d scalar has
    /// `ndim` 0, or `ndim` 1 and `shape[0]` 0 where the source stored it with dims `[0]` (as
    /// MindSpore's `.ckpt` files do); `nbytes` is then its element size.
    pub shape: *const i64,
    /// Bytes the buffer must hold.
    pub nbytes: u64,
}

/// Allocation callback of `reshard_load_rank`: returns a buffer of at least `info->nbytes`
/// bytes (any alignment) for the tensor `info` describes, or NULL to skip that tensor.
pub type ReshardAllocFn =
    Option<unsafe extern "C" fn(user: *mut c_void, info: *const ReshardTensorInfo) -> *mut c_void>;

/// Loads one destination rank's tensors into caller memory: the bytes `reshard_execute` would
/// write for each tensor, with nothing written to disk and only the source bytes the rank needs
/// read.
///
/// `alloc(user, info)` is called on the calling thread, once per tensor of the rank, in the order
/// the rank's `.ckpt` file would hold them, before any data moves. It returns a buffer of at
/// least `info->nbytes` bytes (any alignment; buffers must not overlap) or NULL to skip the
/// tensor. `info` and its strings are valid only during the call. reshard then fills every
/// buffer with worker threads and returns 0 once every byte is in place.
///
/// - `dst_rank`: the destination rank (`RESHARD_STATUS_RANK_OUT_OF_RANGE` if the plan has no
///   such rank). For a pipeline destination the rank holds only its stage's parameters.
/// - `options_json`: NULL, or a JSON object with optional keys `"threads"` (integer, 0 (default)
///   = all cores), `"names"` (array of strings: load only these parameters; a name the rank lacks
///   is `RESHARD_STATUS_INVALID_ARGUMENT`, naming it, before any callback) and `"io"` (`"mmap"`,
///   `"pread"` or `"auto"`). Unknown keys are an error.
///
/// On failure returns a `RESHARD_STATUS_*` code and, if `error_out` is not NULL, a new error
/// object naming the file, rank and parameter; the contents of the buffers are then unspecified.
/// No callback runs after this function returns. A source file truncated or replaced since the
/// plan was made fails the call (`RESHARD_STATUS_SOURCE`, naming the file), in both io modes.
///
/// Threads: any number of threads may load ranks of one plan at once (the same rank too, into
/// different buffers).
///
/// # Safety
///
/// `plan` must be NULL or a live plan; `options_json` NULL or NUL-terminated; `error_out` NULL
/// or writable; `alloc` must be NULL or a function safe to call with `user` on this thread, that
/// does not unwind or `longjmp`, and returns NULL or a pointer valid for writing `info->nbytes`
/// bytes, not overlapping any other buffer it returned, that stays valid and is not otherwise
/// accessed until this function returns.
#[no_mangle]
pub unsafe extern "C" fn reshard_load_rank(
    plan: *const ReshardPlan,
    dst_rank: u32,
    alloc: ReshardAllocFn,
    user: *mut c_void,
    options_json: *const c_char,
    error_out: *mut *mut ReshardError,
) -> ReshardStatus {
    let body = || {
        // SAFETY: NULL or a live plan (# Safety).
        let plan = unsafe { ffi::try_ref(plan, "plan") }?;
        let alloc = alloc.ok_or_else(|| FfiError::new(ReshardStatus::NullArgument, "argument 'alloc' is NULL"))?;
        // SAFETY: NULL or NUL-terminated (# Safety).
        let opts = unsafe { ffi::options_arg(options_json, |o| load_options(o, "reshard_load_rank")) }?;
        let count = plan.plan().dst_rank_count();
        if dst_rank >= count {
            return Err(out_of_range(dst_rank, count));
        }
        let mut shape: Vec<i64> = Vec::new();
        let mut on_tensor = |m: &TensorMeta<'_>| -> reshard_core::Result<Option<&mut [u8]>> {
            shape.clear();
            for &d in m.shape {
                shape.push(i64::try_from(d).map_err(|_| {
                    Error::Invalid(format!(
                        "destination rank {dst_rank}: parameter '{}' has a dim of {d}, beyond int64_t",
                        m.name
                    ))
                })?);
            }
            let name = c_string_lossy(m.name.to_string());
            // Type names are ASCII without NUL.
            let dtype = CString::new(m.dtype.ckpt_name()).unwrap_or_default();
            let info = ReshardTensorInfo {
                name: name.as_ptr(),
                dtype: dtype.as_ptr(),
                ndim: shape.len() as u32,
                shape: shape.as_ptr(),
                nbytes: m.nbytes,
            };
            // SAFETY: `alloc` is safe to call with `user` on this thread (# Safety); `info` and
            // what it points to live until the call returns.
            let buf = unsafe { alloc(user, &info) };
            if buf.is_null() {
                return Ok(None);
            }
            let len = usize::try_from(m.nbytes).map_err(|_| {
                Error::Invalid(format!(
                    "parameter '{}' needs {} bytes, beyond this machine's address space",
                    m.name, m.nbytes
                ))
            })?;
            // SAFETY: the callback's contract (# Safety): a non-NULL result is valid for writing
            // `nbytes` bytes, overlaps no other buffer and is not accessed by anyone else until
            // this function returns, which outlives every use of the slice (the core fills it
            // before `load_rank` returns). The memory may be uninitialised: the core only writes
            // to it (every byte exactly once), never reads it.
            Ok(Some(unsafe { std::slice::from_raw_parts_mut(buf.cast::<u8>(), len) }))
        };
        load_rank(plan.plan(), dst_rank, &opts, &mut on_tensor)?;
        Ok(())
    };
    // SAFETY: `error_out` is NULL or writable (# Safety).
    unsafe { with_status(error_out, body) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{reshard_error_code, reshard_error_free, reshard_error_message, reshard_plan, reshard_plan_free};
    use std::ffi::{CStr, CString};
    use std::ptr::{null, null_mut};

    /// (name, dtype, shape, nbytes) of every callback, and the buffers handed out.
    #[derive(Default)]
    struct Seen {
        calls: Vec<(String, String, Vec<i64>, u64)>,
        buffers: Vec<Vec<u8>>,
        skip_odd: bool,
    }

    unsafe extern "C" fn record(user: *mut c_void, info: *const ReshardTensorInfo) -> *mut c_void {
        // SAFETY: `user` is the `Seen` passed below; `info` is valid during the call.
        let (seen, info) = unsafe { (&mut *user.cast::<Seen>(), &*info) };
        // SAFETY: NUL-terminated strings and `ndim` dims, valid during the call.
        let (name, dtype, shape) = unsafe {
            (
                CStr::from_ptr(info.name).to_str().unwrap().to_string(),
                CStr::from_ptr(info.dtype).to_str().unwrap().to_string(),
                std::slice::from_raw_parts(info.shape, info.ndim as usize).to_vec(),
            )
        };
        let i = seen.calls.len();
        seen.calls.push((name, dtype, shape, info.nbytes));
        if seen.skip_odd && i % 2 == 1 {
            return null_mut();
        }
        seen.buffers.push(vec![0; info.nbytes as usize]);
        seen.buffers.last_mut().unwrap().as_mut_ptr().cast()
    }

    fn plan() -> *mut ReshardPlan {
        let case = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/conformance/complete_to_dp2mp2");
        let src = CString::new(format!("{case}/src")).unwrap();
        let dst = CString::new(format!("{case}/dst_strategy.ckpt")).unwrap();
        let mut plan = null_mut();
        // SAFETY: valid strings and out-pointers.
        let st = unsafe { reshard_plan(src.as_ptr(), null(), dst.as_ptr(), null(), &mut plan, null_mut()) };
        assert_eq!(st, ReshardStatus::Ok);
        plan
    }

    /// Calls `reshard_load_rank`; (status, message, what the callback saw).
    fn load(
        plan: *const ReshardPlan,
        rank: u32,
        options: Option<&str>,
        skip_odd: bool,
    ) -> (ReshardStatus, String, Seen) {
        let mut seen = Seen { skip_odd, ..Seen::default() };
        let options = options.map(|o| CString::new(o).unwrap());
        let mut err = null_mut();
        // SAFETY: a live plan, a callback honouring the contract, valid strings and out-pointer.
        let st = unsafe {
            reshard_load_rank(
                plan,
                rank,
                Some(record),
                (&mut seen as *mut Seen).cast(),
                options.as_ref().map_or(null(), |o| o.as_ptr()),
                &mut err,
            )
        };
        let msg = if err.is_null() {
            String::new()
        } else {
            // SAFETY: a live error object, freed once.
            unsafe {
                assert_eq!(reshard_error_code(err), st);
                let m = CStr::from_ptr(reshard_error_message(err)).to_str().unwrap().to_string();
                reshard_error_free(err);
                m
            }
        };
        (st, msg, seen)
    }

    #[test]
    fn a_rank_out_of_range_is_rank_out_of_range_and_calls_nothing() {
        let plan = plan();
        let (st, msg, seen) = load(plan, 4, None, false);
        assert_eq!(st, ReshardStatus::RankOutOfRange, "{msg}");
        assert!(msg.contains("destination rank 4 does not exist") && msg.contains("0 to 3"), "{msg}");
        assert!(seen.calls.is_empty());
        // SAFETY: the plan from `plan()`, freed once.
        unsafe { reshard_plan_free(plan) };
    }

    #[test]
    fn arguments_and_options_are_checked_before_any_callback() {
        let plan = plan();
        let mut err = null_mut();
        // SAFETY: NULL callback and plan are checked; `err` is writable.
        unsafe {
            assert_eq!(reshard_load_rank(plan, 0, None, null_mut(), null(), &mut err), ReshardStatus::NullArgument);
            assert!(CStr::from_ptr(reshard_error_message(err)).to_str().unwrap().contains("'alloc' is NULL"));
            reshard_error_free(err);
            let st = reshard_load_rank(null(), 0, Some(record), null_mut(), null(), null_mut());
            assert_eq!(st, ReshardStatus::NullArgument);
        }
        for (opts, want, needle) in [
            (r#"{"names": ["no_such"]}"#, ReshardStatus::InvalidArgument, "no parameter named 'no_such'"),
            (r#"{"names": "x"}"#, ReshardStatus::InvalidOptions, "\"names\" must be an array of strings"),
            (r#"{"names": [1]}"#, ReshardStatus::InvalidOptions, "\"names\" must be an array of strings"),
            (r#"{"threads": -1}"#, ReshardStatus::InvalidOptions, "\"threads\" must be a non-negative integer"),
            (r#"{"io": "mapped"}"#, ReshardStatus::InvalidOptions, "unknown io mode 'mapped'"),
            (r#"{"prefix": "x"}"#, ReshardStatus::InvalidOptions, "unknown option \"prefix\""),
        ] {
            let (st, msg, seen) = load(plan, 0, Some(opts), false);
            assert_eq!(st, want, "{opts}: {msg}");
            assert!(msg.contains(needle), "{opts}: {msg}");
            assert!(seen.calls.is_empty(), "{opts}");
        }
        // SAFETY: the plan from `plan()`, freed once.
        unsafe { reshard_plan_free(plan) };
    }

    #[test]
    fn tensors_come_in_file_order_with_their_metadata_and_null_skips() {
        let plan = plan();
        let (st, msg, all) = load(plan, 3, Some(r#"{"threads": 2, "io": "pread"}"#), false);
        assert_eq!(st, ReshardStatus::Ok, "{msg}");
        // SAFETY: a live plan.
        let rp = unsafe { &*plan }.plan().rank_plan(3).unwrap();
        let want: Vec<_> = rp
            .tensors
            .iter()
            .map(|t| {
                (t.name.clone(), t.dtype.ckpt_name().to_string(), t.dims.iter().map(|&d| d as i64).collect(), t.nbytes)
            })
            .collect();
        assert_eq!(all.calls, want);
        let (st, _, half) = load(plan, 3, None, true);
        assert_eq!(st, ReshardStatus::Ok);
        assert_eq!(half.calls, want, "every tensor is offered, skipped or not");
        let kept: Vec<&Vec<u8>> = all.buffers.iter().step_by(2).collect();
        assert_eq!(half.buffers.iter().collect::<Vec<_>>(), kept);
        let name = &want[1].0;
        let (st, _, one) = load(plan, 3, Some(&format!(r#"{{"names": ["{name}"]}}"#)), false);
        assert_eq!(st, ReshardStatus::Ok);
        assert_eq!(one.calls, vec![want[1].clone()]);
        assert_eq!(one.buffers[0], all.buffers[1]);
        // SAFETY: the plan from `plan()`, freed once.
        unsafe { reshard_plan_free(plan) };
    }
}
