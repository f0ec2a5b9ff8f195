//! Opening input files: only regular files (after symlinks), and reads with a ceiling.
//!
//! A FIFO or a device named like a checkpoint or a strategy would otherwise block `open` for
//! ever (a FIFO with no writer) or be read until memory runs out (`/dev/zero`).

use std::fs::{File, Metadata};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use crate::error::{Error, Result};

/// The most a strategy file may hold. The largest strategy this project has seen (4,096 ranks x
/// 3,000 parameters, generated) is a few MB; a GiB is not a strategy.
pub const MAX_STRATEGY_BYTES: u64 = 1 << 30;

/// What a path that is not a regular file is, for messages.
fn kind_of(meta: &Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        "a folder"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Why `path` cannot be read as a file, or `None` when it is a regular file (after symlinks).
pub fn not_regular(path: &Path) -> Option<String> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => None,
        Ok(m) => Some(format!("{}, not a regular file", kind_of(&m))),
        Err(e) if std::fs::symlink_metadata(path).is_ok() => {
            Some(format!("a symbolic link whose target cannot be read ({e})"))
        }
        Err(e) => Some(e.to_string()),
    }
}

/// Opens a regular file for reading (symlinks followed). Anything else is refused without
/// blocking: the file is opened with `O_NONBLOCK` (a FIFO then opens at once) and checked with
/// `fstat` before it is used.
pub fn open_regular(path: &Path) -> Result<(File, Metadata)> {
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).map_err(|e| {
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_symlink() => Error::Unsupported {
                path: path.to_path_buf(),
                detail: format!("a symbolic link whose target cannot be opened ({e})"),
            },
            _ => Error::io(path, "open", e),
        }
    })?;
    let meta = file.metadata().map_err(|e| Error::io(path, "stat", e))?;
    if !meta.is_file() {
        return Err(Error::Unsupported {
            path: path.to_path_buf(),
            detail: format!("{}; reshard reads only regular files", kind_of(&meta)),
        });
    }
    Ok((file, meta))
}

/// Reads a whole regular file of at most `cap` bytes; `what` names it in the message ("strategy").
/// The size is checked before reading, and the read stops after `cap` bytes in case the file
/// grows or reports no size (files under /proc).
pub fn read_capped(path: &Path, cap: u64, what: &str) -> Result<Vec<u8>> {
    let (file, meta) = open_regular(path)?;
    let too_big = |n: u64| Error::Unsupported {
        path: path.to_path_buf(),
        detail: format!("the {what} file holds {n} bytes or more; at most {cap} are accepted"),
    };
    if meta.len() > cap {
        return Err(too_big(meta.len()));
    }
    let mut out = Vec::with_capacity(meta.len() as usize);
    file.take(cap + 1).read_to_end(&mut out).map_err(|e| Error::io(path, "read", e))?;
    if out.len() as u64 > cap {
        return Err(too_big(cap + 1));
    }
    Ok(out)
}

/// Checks that no JSON object in `bytes` has a key twice. serde_json keeps the last value of a
/// repeated key without a word, so a safetensors header or a strategy could say two things of
/// one tensor or parameter and be read as one of them. `Err` gives the key and where it is.
pub fn check_unique_json_keys(bytes: &[u8]) -> std::result::Result<(), String> {
    use serde::de::{Deserialize, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};

    struct Unique;
    struct UniqueVisitor;
    impl<'de> Deserialize<'de> for Unique {
        fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
            d.deserialize_any(UniqueVisitor)
        }
    }
    impl<'de> Visitor<'de> for UniqueVisitor {
        type Value = Unique;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_bool<E>(self, _: bool) -> std::result::Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_i64<E>(self, _: i64) -> std::result::Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_u64<E>(self, _: u64) -> std::result::Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_f64<E>(self, _: f64) -> std::result::Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_str<E>(self, _: &str) -> std::result::Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_unit<E>(self) -> std::result::Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> std::result::Result<Unique, A::Error> {
            while a.next_element::<Unique>()?.is_some() {}
            Ok(Unique)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> std::result::Result<Unique, A::Error> {
            let mut seen = std::collections::HashSet::new();
            while let Some(k) = a.next_key::<String>()? {
                if seen.contains(&k) {
                    return Err(A::Error::custom(format!("key {k:?} appears twice in one object")));
                }
                a.next_value::<Unique>()?;
                seen.insert(k);
            }
            Ok(Unique)
        }
    }
    serde_json::from_slice::<Unique>(bytes).map(|_| ()).map_err(|e| match e.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => format!("not valid JSON: {e}"),
        _ => e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_and_fifos_are_refused_without_blocking() {
        let err = read_capped(Path::new("/dev/zero"), 1 << 20, "strategy").unwrap_err();
        assert!(err.to_string().contains("character device"), "{err}");
        let t = std::env::temp_dir().join(format!("reshard-input-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&t);
        std::fs::create_dir_all(&t).unwrap();
        let fifo = t.join("s.ckpt");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        let err = open_regular(&fifo).unwrap_err();
        assert!(err.to_string().contains("FIFO"), "{err}");
        std::os::unix::fs::symlink(t.join("nowhere"), t.join("d.ckpt")).unwrap();
        let err = open_regular(&t.join("d.ckpt")).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        std::fs::write(t.join("big.json"), [b' '; 100]).unwrap();
        let err = read_capped(&t.join("big.json"), 99, "strategy").unwrap_err();
        assert!(err.to_string().contains("at most 99"), "{err}");
        assert_eq!(read_capped(&t.join("big.json"), 100, "strategy").unwrap().len(), 100);
        std::fs::remove_dir_all(&t).unwrap();
    }

    #[test]
    fn repeated_json_keys_are_found_at_any_depth() {
        assert!(check_unique_json_keys(br#"{"a": {"b": [1, {"c": 1, "d": 2}]}, "b": 2}"#).is_ok());
        let e = check_unique_json_keys(br#"{"a": {"b": [1, {"c": 1, "c": 2}]}}"#).unwrap_err();
        assert!(e.contains("\"c\"") && e.contains("twice"), "{e}");
        assert!(check_unique_json_keys(br#"{"w": 1, "x": 2, "w": 3}"#).is_err());
    }
}
