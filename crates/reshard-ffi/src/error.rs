//! Status codes and the error object handed to C.

use std::ffi::{c_char, CString};

use crate::ffi;
use crate::panic;

/// Status codes returned by the `int32_t` functions of this library.
///
/// 0 is success. 2-99 are the core's error kinds (the same numbers as `reshard_core::Error::code`
/// and as the `error_code` of the error object); 100 and up come from the C layer itself. A
/// number is never reused for another meaning; new kinds get new numbers. 1 is not used.
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
    /// The run was asked to stop (the CLI on SIGINT/SIGTERM); its temporary files were removed
    /// and outputs already under their final names are complete. The C API has no way to ask
    /// yet, so it does not return this code today; it is reserved for the core's kind.
    Cancelled = 11,
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

/// An error on its way out to C: a status code and the full message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FfiError {
    pub(crate) code: i32,
    pub(crate) message: String,
}

impl FfiError {
    pub(crate) fn new(status: ReshardStatus, message: impl Into<String>) -> Self {
        FfiError { code: status.code(), message: message.into() }
    }
}

impl From<reshard_core::Error> for FfiError {
    fn from(e: reshard_core::Error) -> Self {
        FfiError { code: e.code(), message: e.to_string() }
    }
}

/// An error: a status code and a message naming the file, rank and parameter involved.
///
/// Opaque to C. Created by the library on failure, owned by the caller, freed with
/// `reshard_error_free`.
pub struct ReshardError {
    pub(crate) code: i32,
    pub(crate) message: CString,
}

impl ReshardError {
    pub(crate) fn from_ffi(e: FfiError) -> Self {
        ReshardError { code: e.code, message: c_string_lossy(e.message) }
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
pub unsafe extern "C" fn reshard_error_code(error: *const ReshardError) -> i32 {
    panic::or_value(ReshardStatus::Panic.code(), || {
        // SAFETY: NULL or a live error object (# Safety).
        unsafe { ffi::try_ref(error, "error") }.map_or(ReshardStatus::NullArgument.code(), |e| e.code)
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
