//! `reshard_unify`: MindSpore's `unified_safetensors` over the C ABI.

use std::ffi::c_char;

use reshard_core::storage::IoMode;
use reshard_core::unify::{unify, UnifyOptions};
use serde_json::Value;

use crate::error::{FfiError, ReshardError, ReshardStatus};
use crate::ffi;
use crate::panic::with_status;

const F: &str = "reshard_unify";
const KNOWN: &[&str] = &[
    "merge_with_redundancy",
    "file_suffix",
    "threads",
    "io",
    "sync",
    "resume",
    "skip_crc",
    "part_bytes",
    "split_dst_file",
];

fn invalid(msg: String) -> FfiError {
    FfiError::new(ReshardStatus::InvalidOptions, msg)
}

fn want(key: &str, what: &str) -> FfiError {
    invalid(format!("{F}: option \"{key}\" must be {what}"))
}

/// The options of `reshard_unify` (see its documentation).
fn unify_options(json: Option<&str>) -> Result<UnifyOptions, FfiError> {
    let mut o = UnifyOptions::default();
    let Some(text) = json else {
        return Ok(o);
    };
    let map = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => m,
        Ok(_) => return Err(invalid(format!("{F}: options_json must be a JSON object"))),
        Err(e) => return Err(invalid(format!("{F}: options_json is not valid JSON: {e}"))),
    };
    for (key, v) in map {
        match key.as_str() {
            "merge_with_redundancy" => {
                o.merge_with_redundancy = match v {
                    Value::Null => None,
                    Value::Bool(b) => Some(b),
                    _ => return Err(want(&key, "a boolean or null")),
                }
            }
            "file_suffix" => {
                o.file_suffix = match v {
                    Value::Null => None,
                    Value::String(s) if !s.contains('/') && !s.contains('\0') => Some(s),
                    _ => return Err(want(&key, "a string without '/' or NUL, or null")),
                }
            }
            "threads" => {
                let n = v.as_u64().filter(|&n| n <= 4096).ok_or_else(|| want(&key, "an integer from 0 to 4096"))?;
                o.exec.threads = n as usize;
            }
            "io" => {
                let s = v.as_str().ok_or_else(|| want(&key, "\"mmap\", \"pread\" or \"auto\""))?;
                let io = IoMode::parse(s).map_err(|e| invalid(format!("{F}: {e}")))?;
                o.exec.io = io;
                o.plan.io = io;
            }
            "sync" => o.exec.sync = v.as_bool().ok_or_else(|| want(&key, "a boolean"))?,
            "resume" => o.exec.resume = v.as_bool().ok_or_else(|| want(&key, "a boolean"))?,
            "skip_crc" => o.plan.skip_crc = v.as_bool().ok_or_else(|| want(&key, "a boolean"))?,
            "split_dst_file" => {
                o.split = match v {
                    Value::Null => None,
                    Value::Array(a) if a.is_empty() => None,
                    Value::Array(a) => match a
                        .iter()
                        .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()))
                        .collect::<Option<Vec<u32>>>()
                        .as_deref()
                    {
                        Some([c, t]) => Some((*c, *t)),
                        _ => return Err(want(&key, "[current, total] (two integers), [] or null")),
                    },
                    _ => return Err(want(&key, "[current, total] (two integers), [] or null")),
                }
            }
            "part_bytes" => {
                o.part_bytes = v.as_u64().filter(|&n| n > 0).ok_or_else(|| want(&key, "a positive integer"))?;
            }
            _ => {
                return Err(invalid(format!(
                    "{F}: unknown option \"{key}\" (known options: {})",
                    KNOWN.iter().map(|k| format!("\"{k}\"")).collect::<Vec<_>>().join(", ")
                )))
            }
        }
    }
    Ok(o)
}

/// Writes what MindSpore's `unified_safetensors(src_dir, src_strategy_file, dst_dir, ...)`
/// writes: `part{i}.safetensors` (complete tensors), `hyper_param.safetensors` and
/// `param_name_map.json` in `dst_dir`, from the distributed safetensors in `src_dir`
/// (`rank_{i}/` folders, with or without redundancy removed) and their strategy
/// `src_strategy_file` (a merged file or a folder of stage files). The tensors stream from the
/// sources; each file is written under a temporary name, synced and renamed, the map last.
///
/// `options_json` may be NULL (defaults) or a JSON object with the keys
/// `merge_with_redundancy` (bool or null: default the files' metadata, which wins as in
/// MindSpore), `file_suffix` (only files ending in `{suffix}.safetensors`), `threads`, `io`
/// (`"mmap"`, `"pread"`, `"auto"`), `sync`, `resume`, `skip_crc` and `part_bytes` (default
/// 3 GiB, MindSpore's split) and `split_dst_file` (`[current, total]`: only this task's share
/// of the parts; task 1 also writes the hyper-parameters and the map).
///
/// Returns 0 on success; otherwise a `RESHARD_STATUS_*` code and, if `error_out` is not NULL, a
/// new error object in `*error_out` (the caller frees it with `reshard_error_free`).
///
/// # Safety
///
/// The strings must be NULL or NUL-terminated; `error_out` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn reshard_unify(
    src_dir: *const c_char,
    src_strategy_file: *const c_char,
    dst_dir: *const c_char,
    options_json: *const c_char,
    error_out: *mut *mut ReshardError,
) -> ReshardStatus {
    let body = || {
        let paths = [(src_dir, "src_dir"), (src_strategy_file, "src_strategy_file"), (dst_dir, "dst_dir")];
        // SAFETY: NULL or NUL-terminated (# Safety).
        let [src, strategy, dst] = unsafe { ffi::path_args(paths) }?;
        // SAFETY: as above.
        let opts = unsafe { ffi::options_arg(options_json, unify_options) }?;
        unify(&src, &strategy, &dst, &opts)?;
        Ok(())
    };
    // SAFETY: `error_out` is NULL or writable (# Safety).
    unsafe { with_status(error_out, body) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_parsed_and_typos_refused() {
        assert_eq!(unify_options(None).unwrap().merge_with_redundancy, None);
        let o = unify_options(Some(
            r#"{"merge_with_redundancy": false, "file_suffix": "_1", "threads": 2, "io": "pread", "sync": false,
                "part_bytes": 4096}"#,
        ))
        .unwrap();
        assert_eq!(o.merge_with_redundancy, Some(false));
        assert_eq!(o.file_suffix.as_deref(), Some("_1"));
        assert_eq!(
            (o.exec.threads, o.exec.io, o.plan.io, o.exec.sync, o.part_bytes),
            (2, IoMode::Pread, IoMode::Pread, false, 4096)
        );
        for (json, needle) in [
            (r#"{"merge": true}"#, "unknown option \"merge\""),
            (r#"{"merge_with_redundancy": "yes"}"#, "a boolean or null"),
            (r#"{"file_suffix": "a/b"}"#, "without '/'"),
            (r#"{"part_bytes": 0}"#, "a positive integer"),
            (r#"{"split_dst_file": [1]}"#, "[current, total]"),
            ("[]", "must be a JSON object"),
        ] {
            let e = unify_options(Some(json)).unwrap_err();
            assert_eq!(e.status, ReshardStatus::InvalidOptions);
            assert!(e.message.contains(needle), "{json}: {}", e.message);
        }
    }
}
