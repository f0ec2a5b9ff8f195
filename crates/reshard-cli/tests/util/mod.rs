//! Helpers shared by the CLI's integration tests (`cli.rs`, `auto.rs`, `reliability.rs`), in
//! ripgrep's `tests/util.rs` habit: paths of the repository, fixtures and corpus, scratch
//! folders (`Scratch`, shared with the core's tests), running the binary, the checks every
//! refusal must pass, and table-driven checks that report every failing row.
#![allow(dead_code)] // each test binary uses its own subset
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const BIN: &str = env!("CARGO_BIN_EXE_reshard");

/// Command-line words from strings and paths alike: `argv!["inspect", &file]`.
macro_rules! argv {
    ($($a:expr),* $(,)?) => {
        vec![$(std::ffi::OsString::from($a)),*]
    };
}
#[allow(unused_imports)] // not every test binary spells command lines
pub(crate) use argv;

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

pub fn corpus(rel: &str) -> PathBuf {
    repo().join("tests/corpus").join(rel)
}

pub fn fixture(rel: &str) -> PathBuf {
    repo().join("tests/fixtures").join(rel)
}

#[path = "../../../reshard-core/tests/util/scratch.rs"]
mod scratch;
pub use scratch::Scratch;

impl Scratch {
    /// A new scratch folder under the system's temporary folder (which `nobody` can reach, for
    /// `output_not_writable_is_refused`).
    pub fn new(tag: &str) -> Scratch {
        Scratch::in_folder(&std::env::temp_dir(), tag)
    }
}

/// Runs the binary with `args` (no backtraces) and returns what it did.
pub fn reshard<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Command::new(BIN).args(args).env("RUST_BACKTRACE", "0").output().unwrap()
}

/// `reshard transform -q --src_ckpt_dir SRC --dst_ckpt_dir DST` followed by `extra`.
pub fn transform(src: &Path, dst: &Path, extra: Vec<OsString>) -> Output {
    let mut args = argv!["transform", "--src_ckpt_dir", src, "--dst_ckpt_dir", dst, "-q"];
    args.extend(extra);
    reshard(args)
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Every file (not folder) under `dir`, recursively, sorted; empty when `dir` does not exist.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// Checks a refusal: exit status 1, one `reshard: error:` line containing every needle, no
/// panic, nothing on stdout. Returns the message.
#[track_caller]
pub fn assert_refused(out: &Output, needles: &[&str]) -> String {
    let stderr = text(&out.stderr);
    let stdout = text(&out.stdout);
    assert!(!stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"), "panic:\n{stderr}");
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected exit status 1, got {:?}\nstderr:\n{stderr}\nstdout:\n{stdout}",
        out.status
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected exactly one line on stderr, got:\n{stderr}");
    let msg = lines[0];
    assert!(msg.starts_with("reshard: error: "), "not an error line: {msg}");
    for n in needles {
        assert!(msg.contains(n), "message does not name {n:?}:\n{msg}");
    }
    assert!(stdout.trim().is_empty(), "a refused command printed to stdout:\n{stdout}");
    msg.to_string()
}

/// Nothing under `dst`: no output under a final name, no temporary file, no manifest.
#[track_caller]
pub fn assert_nothing_written(dst: &Path) {
    let files = files_under(dst);
    assert!(files.is_empty(), "a failed run left files under {}: {files:?}", dst.display());
}

/// Copies the folder `from` to `to`, recursively.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

/// Runs `check` on every row of a table and fails once at the end, naming every failing row
/// and its assertion, rather than stopping at the first. A row fails by panicking (the usual
/// `assert!`s), so its scratch folder is kept.
#[track_caller]
pub fn check_rows<R>(rows: &[R], name: impl Fn(&R) -> String, check: impl Fn(&R)) {
    let failed: Vec<String> = rows
        .iter()
        .filter_map(|r| {
            let p = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(r))).err()?;
            let what = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Some(format!("{}: {what}", name(r)))
        })
        .collect();
    assert!(failed.is_empty(), "{} of {} rows failed:\n\n{}", failed.len(), rows.len(), failed.join("\n\n"));
}
