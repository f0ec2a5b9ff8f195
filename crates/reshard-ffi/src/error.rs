//! Status codes and the error object handed to C.

use std::ffi::CString;

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
        FfiError {
            code: status.code(),
            message: message.into(),
        }
    }
}

impl From<reshard_core::Error> for FfiError {
    fn from(e: reshard_core::Error) -> Self {
        FfiError {
            code: e.code(),
            message: e.to_string(),
        }
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
        ReshardError {
            code: e.code,
            message: c_string_lossy(e.message),
        }
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
