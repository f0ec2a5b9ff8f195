//! The one error type of the core. Every variant names what a user needs to find the problem:
//! the file, the rank, the parameter and the shapes involved.

use std::path::PathBuf;
use std::sync::Arc;

/// Result alias used throughout the core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while reading, planning or writing.
///
/// `Clone`, so that one failure shared by several workers (a source that cannot be mapped)
/// reaches each of them as the same kind. The C ABI's status code for each kind is the FFI
/// crate's (`reshard-ffi`, one exhaustive match), not the core's.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// An operating-system error on a named path.
    #[error("{path}: {op}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What was being done (open, read, write, rename...).
        op: &'static str,
        /// The underlying error (shared, so that the error can be cloned).
        #[source]
        source: Arc<std::io::Error>,
    },

    /// A checkpoint, safetensors or strategy file whose bytes do not parse.
    #[error("{path}: malformed {kind} file: {detail}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// "checkpoint", "safetensors" or "strategy".
        kind: &'static str,
        /// What is wrong and where (byte offset, tag).
        detail: String,
    },

    /// A tensor whose header disagrees with its content or with sane limits.
    #[error("{path}: tensor '{tensor}': {detail}")]
    BadTensor {
        /// The file.
        path: PathBuf,
        /// The tensor name (tag).
        tensor: String,
        /// What is wrong: sizes, dims, dtype.
        detail: String,
    },

    /// The crc32 trailer (or safetensors `crc_num`) does not match the content.
    #[error("{path}: crc check failed: file says {expected:#010x}, content gives {actual:#010x}; the file is damaged")]
    CrcMismatch {
        /// The file.
        path: PathBuf,
        /// The value stored in the file.
        expected: u32,
        /// The value computed from the content.
        actual: u32,
    },

    /// A file that reshard recognises but refuses to handle (encrypted, MapTensor...).
    #[error("{path}: {detail}")]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// Why it is refused.
        detail: String,
    },

    /// A strategy file that parses but makes no sense.
    #[error("{path}: strategy for parameter '{param}': {detail}")]
    BadLayout {
        /// The strategy file (or a description of where the layout came from).
        path: PathBuf,
        /// The parameter.
        param: String,
        /// What is inconsistent.
        detail: String,
    },

    /// A checkpoint that does not fit its strategy.
    #[error("{path}: rank {rank}: parameter '{param}': {detail}")]
    ShapeMismatch {
        /// The source checkpoint file.
        path: PathBuf,
        /// The source rank.
        rank: u32,
        /// The parameter.
        param: String,
        /// Expected and found shapes.
        detail: String,
    },

    /// A problem with the source folder layout (`rank_*` folders, candidate files).
    #[error("{path}: {detail}")]
    Source {
        /// The folder or file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },

    /// Invalid options or arguments.
    #[error("{0}")]
    Invalid(String),

    /// Another process of a distributed job (`distributed`) failed, or fell silent for longer
    /// than the timeout, so this process's job cannot complete.
    #[error("{path}: {detail}")]
    Distributed {
        /// The share record of the process that failed or fell silent (or the output folder).
        path: PathBuf,
        /// Which share (process, ranks, host, pid) and what it recorded.
        detail: String,
    },

    /// An object whose table of contents was taken from another object of the same size (its
    /// check deferred to the copy, `PlanOptions::defer_toc_checks`) holds other bytes where that
    /// table of contents rests: the plan does not fit it and must be made again without
    /// deferring (what `reshard transform` does by itself). Nothing read from it was committed.
    #[error(
        "{path}: its table of contents was taken from {leader} (an object of the same size), but its byte {offset} \
         differs from that object's: the plan does not fit it; make the plan again with every table of contents \
         checked before the plan"
    )]
    PredictionMismatch {
        /// The object.
        path: PathBuf,
        /// The object whose table of contents was taken.
        leader: PathBuf,
        /// The first offset found differing.
        offset: u64,
    },

    /// The run was stopped (`ExecuteOptions::cancel`) before this output was finished.
    #[error("{path}: stopped (cancelled) before this file was finished; nothing of it was left behind")]
    Cancelled {
        /// The output that was not finished.
        path: PathBuf,
    },
}

impl Error {
    /// Wraps an io error with the path and the operation.
    pub fn io(path: impl Into<PathBuf>, op: &'static str, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), op, source: Arc::new(source) }
    }
}
