//! The `options_json` arguments: a JSON object with known keys only, each of a fixed type, so a
//! typo is an error rather than a silently ignored setting.

use std::time::Duration;

use reshard_core::checkpoint::Format;
use reshard_core::distributed::{process_from_env, DistributedOptions};
use reshard_core::execute::ExecuteOptions;
use reshard_core::plan::PlanOptions;
use reshard_core::storage::IoMode;
use reshard_core::LoadOptions;
use serde_json::{Map, Value};

use crate::error::{FfiError, ReshardStatus};

fn invalid(msg: impl Into<String>) -> FfiError {
    FfiError::new(ReshardStatus::InvalidOptions, msg)
}

fn object(json: Option<&str>, func: &str) -> Result<Map<String, Value>, FfiError> {
    let Some(text) = json else {
        return Ok(Map::new());
    };
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(invalid(format!("{func}: options_json must be a JSON object, got {}", kind(&other)))),
        Err(e) => Err(invalid(format!("{func}: options_json is not valid JSON: {e}"))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn wrong_type(func: &str, key: &str, want: &str, got: &Value) -> FfiError {
    invalid(format!("{func}: option \"{key}\" must be {want}, got {}", kind(got)))
}

fn unknown(func: &str, key: &str, known: &[&str]) -> FfiError {
    invalid(format!(
        "{func}: unknown option \"{key}\" (known options: {})",
        known.iter().map(|k| format!("\"{k}\"")).collect::<Vec<_>>().join(", ")
    ))
}

/// The `"io"` option: `"mmap"`, `"pread"` or `"auto"`.
fn io_mode(func: &str, key: &str, v: &Value) -> Result<IoMode, FfiError> {
    let Value::String(s) = v else {
        return Err(wrong_type(func, key, "\"mmap\", \"pread\" or \"auto\"", v));
    };
    IoMode::parse(s).map_err(|e| invalid(format!("{func}: {e}")))
}

/// Options of `reshard_plan`: `{"src_ckpt_name": string|null, "skip_crc": bool, "io": "mmap"|"pread"|"auto"}`.
pub(crate) fn plan_options(json: Option<&str>) -> Result<PlanOptions, FfiError> {
    const F: &str = "reshard_plan";
    let mut opts = PlanOptions::default();
    for (key, v) in object(json, F)? {
        match key.as_str() {
            "src_ckpt_name" => {
                opts.src_ckpt_name = match v {
                    Value::Null => None,
                    Value::String(s) if !s.is_empty() => Some(s),
                    other => return Err(wrong_type(F, &key, "a non-empty string or null", &other)),
                }
            }
            "skip_crc" => opts.skip_crc = v.as_bool().ok_or_else(|| wrong_type(F, &key, "a boolean", &v))?,
            "io" => opts.io = io_mode(F, &key, &v)?,
            _ => return Err(unknown(F, &key, &["src_ckpt_name", "skip_crc", "io"])),
        }
    }
    Ok(opts)
}

/// Options of `reshard_execute`: `{"prefix": string, "output_format": "ckpt"|"safetensors",
/// "threads": integer >= 0, "crc": bool, "resume": bool, "sync": bool, "io": "mmap"|"pread"|"auto"}`.
pub(crate) fn execute_options(json: Option<&str>, func: &str) -> Result<ExecuteOptions, FfiError> {
    // Far above any machine, low enough that a garbage value fails cleanly instead of trying
    // to start billions of threads.
    const MAX_THREADS: u64 = 4096;
    let mut opts = ExecuteOptions::default();
    for (key, v) in object(json, func)? {
        match key.as_str() {
            "prefix" => {
                let Value::String(p) = v else {
                    return Err(wrong_type(func, &key, "a string", &v));
                };
                // The prefix becomes part of a file name inside rank_N/: no way out of it.
                if p.contains('/') || p.contains('\0') {
                    return Err(invalid(format!(
                        "{func}: option \"prefix\" must be a file name prefix without '/' or NUL, got {p:?}"
                    )));
                }
                opts.prefix = p;
            }
            "output_format" => {
                let Value::String(f) = &v else {
                    return Err(wrong_type(func, &key, "\"ckpt\" or \"safetensors\"", &v));
                };
                opts.format = Format::parse(f).map_err(|e| invalid(format!("{func}: {e}")))?;
            }
            "threads" => {
                let n = v.as_u64().ok_or_else(|| wrong_type(func, &key, "a non-negative integer", &v))?;
                if n > MAX_THREADS {
                    return Err(invalid(format!(
                        "{func}: option \"threads\" is {n}; at most {MAX_THREADS} (0 = all cores)"
                    )));
                }
                opts.threads = n as usize;
            }
            "crc" | "resume" | "sync" => {
                let b = v.as_bool().ok_or_else(|| wrong_type(func, &key, "a boolean", &v))?;
                match key.as_str() {
                    "crc" => opts.crc = b,
                    "resume" => opts.resume = b,
                    _ => opts.sync = b,
                }
            }
            "io" => opts.io = io_mode(func, &key, &v)?,
            // Parsed by `distributed_options`.
            "distributed" | "process_index" | "process_count" | "timeout" => {}
            _ => {
                return Err(unknown(
                    func,
                    &key,
                    &[
                        "prefix",
                        "output_format",
                        "threads",
                        "crc",
                        "resume",
                        "sync",
                        "io",
                        "distributed",
                        "process_index",
                        "process_count",
                        "timeout",
                    ],
                ))
            }
        }
    }
    Ok(opts)
}

/// Options of `reshard_load_rank`: `{"threads": integer >= 0, "names": [string, ...] | null,
/// "io": "mmap"|"pread"|"auto"}`.
pub(crate) fn load_options(json: Option<&str>, func: &str) -> Result<LoadOptions, FfiError> {
    let mut opts = LoadOptions::default();
    for (key, v) in object(json, func)? {
        match key.as_str() {
            "threads" => {
                let n = v.as_u64().ok_or_else(|| wrong_type(func, &key, "a non-negative integer", &v))?;
                // reshard_execute's bound.
                if n > 4096 {
                    return Err(invalid(format!("{func}: option \"threads\" is {n}; at most 4096 (0 = all cores)")));
                }
                opts.threads = n as usize;
            }
            "names" => {
                opts.names = match v {
                    Value::Null => None,
                    Value::Array(items) => Some(
                        items
                            .into_iter()
                            .map(|n| match n {
                                Value::String(s) => Ok(s),
                                other => Err(wrong_type(func, "names", "an array of strings", &other)),
                            })
                            .collect::<Result<_, _>>()?,
                    ),
                    other => return Err(wrong_type(func, &key, "an array of strings or null", &other)),
                }
            }
            "io" => opts.io = io_mode(func, &key, &v)?,
            _ => return Err(unknown(func, &key, &["threads", "names", "io"])),
        }
    }
    Ok(opts)
}

/// The process-share options of `reshard_execute`: `{"distributed": bool, "process_index":
/// integer|null, "process_count": integer|null, "timeout": seconds >= 1 (default 600)}`. `None`
/// unless `"distributed"` is true; the index and count not given come from the launcher's
/// environment (`reshard_core::distributed::process_from_env`).
pub(crate) fn distributed_options(json: Option<&str>, func: &str) -> Result<Option<DistributedOptions>, FfiError> {
    let mut distributed = false;
    let (mut index, mut count, mut timeout) = (None, None, None);
    for (key, v) in object(json, func)? {
        let number = |v: &Value| -> Result<Option<u32>, FfiError> {
            match v {
                Value::Null => Ok(None),
                _ => v
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .map(Some)
                    .ok_or_else(|| wrong_type(func, &key, "an integer from 0 to 4294967295, or null", v)),
            }
        };
        match key.as_str() {
            "distributed" => distributed = v.as_bool().ok_or_else(|| wrong_type(func, &key, "a boolean", &v))?,
            "process_index" => index = number(&v)?,
            "process_count" => count = number(&v)?,
            "timeout" => {
                let secs = v.as_f64().ok_or_else(|| wrong_type(func, &key, "a number of seconds", &v))?;
                timeout = Some(
                    Duration::try_from_secs_f64(secs)
                        .ok()
                        .filter(|t| *t >= Duration::from_secs(1))
                        .ok_or_else(|| invalid(format!("{func}: option \"timeout\" is {secs}; at least 1 second")))?,
                );
            }
            _ => {}
        }
    }
    if !distributed {
        if index.is_some() || count.is_some() || timeout.is_some() {
            return Err(invalid(format!(
                "{func}: options \"process_index\", \"process_count\" and \"timeout\" need \"distributed\": true"
            )));
        }
        return Ok(None);
    }
    let process = process_from_env(index, count).map_err(|e| invalid(format!("{func}: {e}")))?;
    Ok(Some(DistributedOptions { process, timeout: timeout.unwrap_or(Duration::from_secs(600)) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_values() {
        let p = plan_options(None).unwrap();
        assert_eq!(p.src_ckpt_name, None);
        assert!(!p.skip_crc);
        let p = plan_options(Some(r#"{"src_ckpt_name": "a_{rank}.ckpt", "skip_crc": true}"#)).unwrap();
        assert_eq!(p.src_ckpt_name.as_deref(), Some("a_{rank}.ckpt"));
        assert!(p.skip_crc);
        assert_eq!(plan_options(Some(r#"{"io": "pread"}"#)).unwrap().io, IoMode::Pread);
        assert_eq!(execute_options(Some(r#"{"io": "mmap"}"#), "f").unwrap().io, IoMode::Mmap);
        let e = execute_options(None, "f").unwrap();
        assert_eq!(e.prefix, "checkpoint_");
        assert_eq!(e.format, Format::Ckpt);
        assert!(e.resume && e.sync);
        let e = execute_options(
            Some(
                r#"{"prefix": "p_", "output_format": "safetensors", "threads": 2, "crc": true,
                    "resume": false, "sync": false}"#,
            ),
            "f",
        )
        .unwrap();
        assert_eq!(
            (e.prefix.as_str(), e.format, e.threads, e.crc, e.resume, e.sync),
            ("p_", Format::Safetensors, 2, true, false, false)
        );
        assert!(distributed_options(None, "f").unwrap().is_none());
        let json = r#"{"distributed": true, "process_index": 1, "process_count": 3, "timeout": 2.5, "threads": 1}"#;
        assert!(execute_options(Some(json), "f").is_ok());
        let d = distributed_options(Some(json), "f").unwrap().unwrap();
        assert_eq!((d.process.index, d.process.count, d.timeout), (Some(1), 3, Duration::from_millis(2500)));
    }

    #[test]
    fn bad_options_are_refused_with_the_key_named() {
        for (json, needle) in [
            (r#"{"prefx": "a"}"#, "unknown option \"prefx\""),
            (r#"{"threads": "2"}"#, "\"threads\" must be a non-negative integer"),
            (r#"{"threads": -1}"#, "\"threads\" must be a non-negative integer"),
            (r#"{"threads": 100000}"#, "at most 4096"),
            (r#"{"output_format": "npz"}"#, "unknown output format 'npz'"),
            (r#"{"prefix": "../x"}"#, "without '/'"),
            (r#"{"crc": 1}"#, "\"crc\" must be a boolean"),
            (r#"{"resume": "no"}"#, "\"resume\" must be a boolean"),
            (r#"{"io": "mapped"}"#, "unknown io mode 'mapped'"),
            (r#"{"io": 1}"#, "\"io\" must be"),
            ("[1]", "must be a JSON object, got an array"),
            ("{", "not valid JSON"),
        ] {
            let e = execute_options(Some(json), "reshard_execute").unwrap_err();
            assert_eq!(e.status, ReshardStatus::InvalidOptions, "{json}");
            assert!(e.message.contains(needle), "{json}: {}", e.message);
        }
        for (json, needle) in [
            (r#"{"process_index": 0}"#, "need \"distributed\": true"),
            (r#"{"distributed": 1}"#, "\"distributed\" must be a boolean"),
            (
                r#"{"distributed": true, "process_index": -1, "process_count": 2}"#,
                "\"process_index\" must be an integer",
            ),
            (r#"{"distributed": true, "process_index": 0, "process_count": 2, "timeout": 0.5}"#, "at least 1 second"),
            (r#"{"distributed": true, "process_index": 2, "process_count": 2}"#, "not below the process count 2"),
        ] {
            let e = distributed_options(Some(json), "reshard_execute").unwrap_err();
            assert_eq!(e.status, ReshardStatus::InvalidOptions, "{json}");
            assert!(e.message.contains(needle), "{json}: {}", e.message);
        }
        let e = plan_options(Some(r#"{"skip_crc": "yes"}"#)).unwrap_err();
        assert!(e.message.contains("\"skip_crc\" must be a boolean"), "{}", e.message);
        let e = plan_options(Some(r#"{"prefix": "x"}"#)).unwrap_err();
        assert!(e.message.contains("unknown option \"prefix\""), "{}", e.message);
    }
}
