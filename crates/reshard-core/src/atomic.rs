//! Files appear under their final name only when complete: they are written under a temporary
//! name in the same folder (`.{name}.reshard-{owner}-{pid}-{n}.tmp`, unique per call, so two
//! writes of one file from threads of one process never share a temporary file), synced, then
//! renamed, and the folder synced so that the rename survives a crash. [`write_atomic`] is the
//! one implementation for small files (strategies, manifests); the executor writes checkpoints
//! the same way at known offsets.
//!
//! `owner` names the machine (see [`owner`]): a folder may be shared by jobs on several
//! machines, and a pid says whether its process is gone only on the machine that made it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::error::{Error, Result};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// The owner part of this process's temporary file names: the host name (at most 24
/// characters, anything but letters, digits, `.`, `_` and `-` replaced by `_`), a dot, and 8 hex
/// digits of a crc32 over the whole host name, the kernel's boot id and this process's pid
/// namespace. Two processes with the same owner see the same pids: only then can one judge
/// from a pid whether the other is gone (containers on one machine may share a host name but
/// not their pids). `None` when this cannot be found out (no /proc): then no temporary file is
/// ever judged stale.
pub fn owner() -> Option<&'static str> {
    static OWNER: OnceLock<Option<String>> = OnceLock::new();
    OWNER
        .get_or_init(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
            let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
            let pid_ns = std::fs::read_link("/proc/self/ns/pid").ok()?;
            let host = host.trim();
            let mut h = crc32fast::Hasher::new();
            for part in [host.as_bytes(), b"\n", boot.trim().as_bytes(), b"\n", pid_ns.as_os_str().as_encoded_bytes()] {
                h.update(part);
            }
            let short: String = host
                .chars()
                .take(24)
                .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' })
                .collect();
            Some(format!("{}.{:08x}", if short.is_empty() { "host" } else { &short }, h.finalize()))
        })
        .as_deref()
}

/// A temporary path next to `final_path`, unique within this process (and, with the owner in
/// it, among processes of all machines sharing the folder).
pub fn temp_path(final_path: &Path) -> PathBuf {
    let dir = final_path.parent().unwrap_or(Path::new("."));
    let name = final_path.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let owner = owner().unwrap_or("unknown");
    dir.join(format!(".{name}.reshard-{owner}-{}-{n}.tmp", std::process::id()))
}

/// Removes temporary files that runs killed before their rename left for `name` in `dir`: only
/// those whose owner is provably gone, that is, made by a process of this machine and pid
/// namespace (the owner part of the name is ours) that no longer exists. Temporary files of
/// other machines sharing the folder (whose pids mean nothing here), of live processes, and of
/// versions of reshard whose names carry no owner are left alone.
pub fn remove_stale_temps(dir: &Path, name: &str) {
    let Some(me) = owner() else {
        return;
    };
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
        // `{owner}-{pid}-{n}`; the owner may itself hold '-'.
        let mut parts = rest.rsplitn(3, '-');
        let (Some(count), Some(pid), Some(who)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if who != me || count.parse::<u64>().is_err() {
            continue;
        }
        if !Path::new(&format!("/proc/{pid}")).exists() {
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

    /// Only temporary files whose owner is provably gone are removed: a dead pid of this
    /// machine. Another machine's file with a pid that does not exist here stays (it used to be
    /// removed: on a folder shared by several machines, a live job's manifest update was lost).
    #[test]
    fn stale_temps_of_dead_processes_of_this_machine_go_others_stay() {
        let d = std::env::temp_dir().join(format!("reshard-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let me = owner().unwrap();
        let mine = temp_path(&d.join("x.ckpt"));
        std::fs::write(&mine, b"").unwrap();
        // u32::MAX is beyond pid_max: no process of this machine has it.
        let dead = d.join(format!(".x.ckpt.reshard-{me}-{}-0.tmp", u32::MAX));
        let other_host = d.join(format!(".x.ckpt.reshard-node-7.0badc0de-{}-0.tmp", u32::MAX));
        let no_owner = d.join(format!(".x.ckpt.reshard-{}-0.tmp", u32::MAX));
        let other_file = d.join(format!(".y.ckpt.reshard-{me}-{}-0.tmp", u32::MAX));
        for f in [&dead, &other_host, &no_owner, &other_file] {
            std::fs::write(f, b"").unwrap();
        }
        remove_stale_temps(&d, "x.ckpt");
        assert!(!dead.exists());
        for kept in [&mine, &other_host, &no_owner, &other_file] {
            assert!(kept.exists(), "{} was removed", kept.display());
        }
        assert!(mine.file_name().unwrap().to_str().unwrap().starts_with(&format!(".x.ckpt.reshard-{me}-")));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
