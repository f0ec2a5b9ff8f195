//! Files appear under their final name only when complete: they are written under a temporary
//! name in the same folder (`.{name}.reshard-{pid}-{n}.tmp`, unique per call, so two writes of
//! one file from threads of one process never share a temporary file), synced, then renamed,
//! and the folder synced so that the rename survives a crash. [`write_atomic`] is the one
//! implementation for small files (strategies, manifests); the executor writes checkpoints the
//! same way at known offsets.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A temporary path next to `final_path`, unique within this process.
pub fn temp_path(final_path: &Path) -> PathBuf {
    let dir = final_path.parent().unwrap_or(Path::new("."));
    let name = final_path.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(".{name}.reshard-{}-{n}.tmp", std::process::id()))
}

/// Removes temporary files that runs killed before their rename left for `name` in `dir`:
/// those of processes that no longer exist on this machine. (A live process, here or on
/// another machine sharing the folder, may still be writing its own.)
pub fn remove_stale_temps(dir: &Path, name: &str) {
    let prefix = format!(".{name}.reshard-");
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let n = e.file_name();
        let n = n.to_string_lossy();
        let Some(rest) = n.strip_prefix(&prefix).and_then(|r| r.strip_suffix(".tmp")) else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if !alive {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename. With
/// `sync`, the file is fsynced before the rename and the folder after it.
pub fn write_atomic(path: &Path, bytes: &[u8], sync: bool) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, "create folder", e))?;
    let tmp = temp_path(path);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, "create", e))?;
        f.write_all(bytes).map_err(|e| Error::io(&tmp, "write", e))?;
        if sync {
            f.sync_all().map_err(|e| Error::io(&tmp, "sync", e))?;
        }
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, "rename into place", e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    } else if sync {
        // The file is complete under its final name whatever happens next; a folder that cannot
        // be opened or synced (some network filesystems refuse fsync on folders) only makes the
        // rename less durable, as in the executor.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_temps_of_dead_processes_go_live_ones_stay() {
        let d = std::env::temp_dir().join(format!("reshard-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let mine = temp_path(&d.join("x.ckpt"));
        std::fs::write(&mine, b"").unwrap();
        // pid 0 is never a process that left a file; u32::MAX is beyond pid_max.
        let dead = d.join(format!(".x.ckpt.reshard-{}-0.tmp", u32::MAX));
        std::fs::write(&dead, b"").unwrap();
        let other = d.join(".y.ckpt.reshard-1-0.tmp");
        std::fs::write(&other, b"").unwrap();
        remove_stale_temps(&d, "x.ckpt");
        assert!(mine.exists() && !dead.exists() && other.exists());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
