//! Status codes and the error object handed to C.

use std::ffi::{c_char, CString};

use crate::ffi;
use crate::panic;

/// Status codes returned by the functions of this library. An `int32_t` in the ABI: C sees
/// `typedef int32_t ReshardStatus`, C++ an enum with `int32_t` as its underlying type.
///
/// 0 is success. 2-99 are the core's error kinds (also the `error_code` of the error object;
/// the mapping from `reshard_core::Error` is `ReshardStatus::from`, in this crate); 100 and up
/// come from the C layer itself. A number is never reused for another meaning; new kinds get new
/// numbers. 1 is not used.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReshardStatus {
    /// Success.
    Ok = 0,
    /// An operating-system error on a named file or folder (open, read, write, rename).
    Io = 2,
    /// A checkpoint, safetensors or strategy file whose bytes do not parse.
    Malformed = 3,
    /// A tensor whose header disagrees with its content or with sane limits.
    BadTensor = 4,
    /// A crc32 trailer (or safetensors `crc_num`) that does not match the content.
    Crc = 5,
    /// A file reshard recognises but refuses (encrypted checkpoints, map tensors, ...).
    Unsupported = 6,
    /// A strategy file that parses but makes no sense.
    BadLayout = 7,
    /// A checkpoint that does not fit its strategy.
    ShapeMismatch = 8,
    /// A problem with the source folder (`rank_N` folders, candidate files) or a source file
    /// that changed after the plan was made.
    Source = 9,
    /// An invalid argument: an empty path, a repeated rank, an output folder inside the source
    /// folder, ...
    InvalidArgument = 10,
    /// The run was asked to stop (`reshard_cancel_request`; the CLI on SIGINT/SIGTERM); its
    /// temporary files were removed and outputs already under their final names are complete.
    Cancelled = 11,
    /// A distributed job (`"distributed": true`) cannot complete because another process's
    /// share failed (the message quotes its error) or fell silent for longer than the timeout
    /// (the message names the share).
    Distributed = 12,
    /// A pointer argument that must not be NULL was NULL.
    NullArgument = 100,
    /// A string argument that must be UTF-8 (options_json) was not.
    InvalidUtf8 = 101,
    /// options_json is not a JSON object, has an unknown key or a value of the wrong type.
    InvalidOptions = 102,
    /// A destination rank that the plan does not have.
    RankOutOfRange = 103,
    /// The output buffer is too small; the required length was written to `len_out`.
    BufferTooSmall = 104,
    /// Another call on the same plan is writing one of the requested ranks right now.
    Busy = 105,
    /// reshard panicked (a bug); the call had no effect beyond possibly some temporary files.
    Panic = 106,
}

impl ReshardStatus {
    /// The value returned through the ABI.
    pub fn code(self) -> i32 {
        self as i32
    }
}

/// The status of each kind of core error: one exhaustive match, without a wildcard arm, so a
/// new kind in the core does not compile here until it has a status.
impl From<&reshard_core::Error> for ReshardStatus {
    fn from(e: &reshard_core::Error) -> Self {
        use reshard_core::Error;
        match e {
            Error::Io { .. } => ReshardStatus::Io,
            Error::Malformed { .. } => ReshardStatus::Malformed,
            Error::BadTensor { .. } => ReshardStatus::BadTensor,
            Error::CrcMismatch { .. } => ReshardStatus::Crc,
            Error::Unsupported { .. } => ReshardStatus::Unsupported,
            Error::BadLayout { .. } => ReshardStatus::BadLayout,
            Error::ShapeMismatch { .. } => ReshardStatus::ShapeMismatch,
            // A source that is not what the plan took it for, as a source changed since the plan.
            Error::Source { .. } | Error::PredictionMismatch { .. } => ReshardStatus::Source,
            Error::Invalid(_) => ReshardStatus::InvalidArgument,
            Error::Cancelled { .. } => ReshardStatus::Cancelled,
            Error::Distributed { .. } => ReshardStatus::Distributed,
        }
    }
}

/// An error on its way out to C: a status code and the full message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FfiError {
    pub(crate) status: ReshardStatus,
    pub(crate) message: String,
}

impl FfiError {
    pub(crate) fn new(status: ReshardStatus, message: impl Into<String>) -> Self {
        FfiError { status, message: message.into() }
    }
}

impl From<reshard_core::Error> for FfiError {
    fn from(e: reshard_core::Error) -> Self {
        FfiError { status: ReshardStatus::from(&e), message: e.to_string() }
    }
}

/// An error: a status code and a message naming the file, rank and parameter involved.
///
/// Opaque to C. Created by the library on failure, owned by the caller, freed with
/// `reshard_error_free`.
pub struct ReshardError {
    pub(crate) status: ReshardStatus,
    pub(crate) message: CString,
}

impl ReshardError {
    pub(crate) fn from_ffi(e: FfiError) -> Self {
        ReshardError { status: e.status, message: c_string_lossy(e.message) }
    }
}

/// A C string from any Rust string: interior NULs (possible in tensor names read from a file)
/// become U+FFFD instead of failing.
pub(crate) fn c_string_lossy(s: String) -> CString {
    match CString::new(s) {
        Ok(c) => c,
        Err(e) => {
            let cleaned = String::from_utf8_lossy(&e.into_vec()).replace('\0', "\u{fffd}");
            CString::new(cleaned).unwrap_or_default()
        }
    }
}

/// The status code of an error object, or `RESHARD_STATUS_NULL_ARGUMENT` when `error` is NULL.
///
/// # Safety
///
/// `error` must be NULL or a live error object from this library.
#[no_mangle]
pub unsafe extern "C" fn reshard_error_code(error: *const ReshardError) -> ReshardStatus {
    panic::or_value(ReshardStatus::Panic, || {
        // SAFETY: NULL or a live error object (# Safety).
        unsafe { ffi::try_ref(error, "error") }.map_or(ReshardStatus::NullArgument, |e| e.status)
    })
}

/// The full message of an error object: what failed, naming the file, rank, parameter and
/// shapes involved. The string belongs to the error object and stays valid until
/// `reshard_error_free`; do not free it. When `error` is NULL returns a static message saying
/// so (never NULL).
///
/// # Safety
///
/// `error` must be NULL or a live error object from this library.
#[no_mangle]
pub unsafe extern "C" fn reshard_error_message(error: *const ReshardError) -> *const c_char {
    const NULL_ERROR: &str = "reshard_error_message: the error object is NULL\0";
    let null_error = NULL_ERROR.as_ptr().cast::<c_char>();
    panic::or_value(null_error, || {
        // SAFETY: NULL or a live error object (# Safety).
        unsafe { ffi::try_ref(error, "error") }.map_or(null_error, |e| e.message.as_ptr())
    })
}

/// Frees an error object. NULL is a no-op.
///
/// # Safety
///
/// `error` must be NULL or an error object from this library that was not freed before.
#[no_mangle]
pub unsafe extern "C" fn reshard_error_free(error: *mut ReshardError) {
    panic::or_value((), || {
        // SAFETY: NULL or an unfreed error object (# Safety).
        unsafe { ffi::free_handle(error) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use reshard_core::Error;
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    /// Every status, with its name in the header. The match has no wildcard: a new status does
    /// not compile here until it is listed.
    fn c_name(s: ReshardStatus) -> &'static str {
        match s {
            ReshardStatus::Ok => "RESHARD_STATUS_OK",
            ReshardStatus::Io => "RESHARD_STATUS_IO",
            ReshardStatus::Malformed => "RESHARD_STATUS_MALFORMED",
            ReshardStatus::BadTensor => "RESHARD_STATUS_BAD_TENSOR",
            ReshardStatus::Crc => "RESHARD_STATUS_CRC",
            ReshardStatus::Unsupported => "RESHARD_STATUS_UNSUPPORTED",
            ReshardStatus::BadLayout => "RESHARD_STATUS_BAD_LAYOUT",
            ReshardStatus::ShapeMismatch => "RESHARD_STATUS_SHAPE_MISMATCH",
            ReshardStatus::Source => "RESHARD_STATUS_SOURCE",
            ReshardStatus::InvalidArgument => "RESHARD_STATUS_INVALID_ARGUMENT",
            ReshardStatus::Cancelled => "RESHARD_STATUS_CANCELLED",
            ReshardStatus::Distributed => "RESHARD_STATUS_DISTRIBUTED",
            ReshardStatus::NullArgument => "RESHARD_STATUS_NULL_ARGUMENT",
            ReshardStatus::InvalidUtf8 => "RESHARD_STATUS_INVALID_UTF8",
            ReshardStatus::InvalidOptions => "RESHARD_STATUS_INVALID_OPTIONS",
            ReshardStatus::RankOutOfRange => "RESHARD_STATUS_RANK_OUT_OF_RANGE",
            ReshardStatus::BufferTooSmall => "RESHARD_STATUS_BUFFER_TOO_SMALL",
            ReshardStatus::Busy => "RESHARD_STATUS_BUSY",
            ReshardStatus::Panic => "RESHARD_STATUS_PANIC",
        }
    }

    const ALL: [ReshardStatus; 19] = [
        ReshardStatus::Ok,
        ReshardStatus::Io,
        ReshardStatus::Malformed,
        ReshardStatus::BadTensor,
        ReshardStatus::Crc,
        ReshardStatus::Unsupported,
        ReshardStatus::BadLayout,
        ReshardStatus::ShapeMismatch,
        ReshardStatus::Source,
        ReshardStatus::InvalidArgument,
        ReshardStatus::Cancelled,
        ReshardStatus::Distributed,
        ReshardStatus::NullArgument,
        ReshardStatus::InvalidUtf8,
        ReshardStatus::InvalidOptions,
        ReshardStatus::RankOutOfRange,
        ReshardStatus::BufferTooSmall,
        ReshardStatus::Busy,
        ReshardStatus::Panic,
    ];

    /// One value of each kind of core error, with the number the C ABI promises for it (the
    /// README's table). `kind` has no wildcard either: a new core kind does not compile here
    /// until it has a case.
    fn every_core_error() -> Vec<(Error, i32)> {
        let p = || PathBuf::from("/data/ckpt/rank_3/model.ckpt");
        let s = String::from;
        vec![
            (Error::io(p(), "open", std::io::Error::from(std::io::ErrorKind::NotFound)), 2),
            (Error::Malformed { path: p(), kind: "checkpoint", detail: s("truncated at byte 12") }, 3),
            (Error::BadTensor { path: p(), tensor: s("w"), detail: s("dims [2, 3] need 24 bytes, has 20") }, 4),
            (Error::CrcMismatch { path: p(), expected: 1, actual: 2 }, 5),
            (Error::Unsupported { path: p(), detail: s("encrypted") }, 6),
            (Error::BadLayout { path: p(), param: s("w"), detail: s("axis 5 of 2") }, 7),
            (Error::ShapeMismatch { path: p(), rank: 3, param: s("w"), detail: s("[4, 4] vs [2, 4]") }, 8),
            (Error::Source { path: p(), detail: s("the file changed while reshard was reading it") }, 9),
            (Error::Invalid(s("a repeated rank")), 10),
            (Error::Cancelled { path: p() }, 11),
            (Error::Distributed { path: p(), detail: s("share 1 of 2 (rank_4..rank_7) failed") }, 12),
            (Error::PredictionMismatch { path: p(), leader: PathBuf::from("s3://b/rank_0/model.ckpt"), offset: 40 }, 9),
        ]
    }

    fn kind(e: &Error) -> usize {
        match e {
            Error::Io { .. } => 0,
            Error::Malformed { .. } => 1,
            Error::BadTensor { .. } => 2,
            Error::CrcMismatch { .. } => 3,
            Error::Unsupported { .. } => 4,
            Error::BadLayout { .. } => 5,
            Error::ShapeMismatch { .. } => 6,
            Error::Source { .. } => 7,
            Error::Invalid(_) => 8,
            Error::Cancelled { .. } => 9,
            Error::Distributed { .. } => 10,
            Error::PredictionMismatch { .. } => 11,
        }
    }
    const CORE_KINDS: usize = 12;

    #[test]
    fn every_core_error_kind_has_its_status() {
        let cases = every_core_error();
        let kinds: std::collections::BTreeSet<usize> = cases.iter().map(|(e, _)| kind(e)).collect();
        assert_eq!(kinds, (0..CORE_KINDS).collect(), "one case per kind of core error");
        for (e, want) in cases {
            let message = e.to_string();
            let f = FfiError::from(e);
            assert_eq!(f.status.code(), want, "{message}");
            assert_eq!(f.message, message);
            let c = ReshardError::from_ffi(f);
            // SAFETY: a live error object.
            assert_eq!(unsafe { reshard_error_code(&c) }.code(), want, "{message}");
        }
    }

    /// Every status has its own number, and the header's `RESHARD_STATUS_*` constants are
    /// exactly these names and numbers.
    #[test]
    fn statuses_are_distinct_and_match_the_header() {
        let ours: BTreeMap<&str, i32> = ALL.iter().map(|&s| (c_name(s), s.code())).collect();
        assert_eq!(ours.len(), ALL.len(), "a status listed twice");
        let mut numbers: Vec<i32> = ALL.iter().map(|s| s.code()).collect();
        numbers.sort_unstable();
        numbers.dedup();
        assert_eq!(numbers.len(), ALL.len(), "two statuses share a number: {ours:?}");

        let header_path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../include/reshard.h");
        let header = std::fs::read_to_string(header_path).expect("include/reshard.h");
        let mut theirs = BTreeMap::new();
        for line in header.lines() {
            let Some((name, value)) = line.trim().strip_suffix(',').and_then(|l| l.split_once(" = ")) else {
                continue;
            };
            if name.starts_with("RESHARD_STATUS_") {
                let value: i32 = value.parse().unwrap_or_else(|_| panic!("{header_path}: {line}"));
                assert!(theirs.insert(name, value).is_none(), "{header_path}: {name} twice");
            }
        }
        assert_eq!(theirs, ours, "{header_path} is not what cbindgen makes of ReshardStatus; regenerate it");
    }
}
