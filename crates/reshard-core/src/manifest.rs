//! Per-folder manifests of what reshard wrote, and `verify`, which checks a tree against them.
//!
//! Each output folder (`rank_{r}/`) gets `reshard_manifest.json`, updated last and atomically:
//! per file, its size, crc32 and the fingerprint of the plan that wrote it. A rerun of the same
//! plan keeps files that still match and redoes the rest.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::atomic::{remove_stale_temps, write_atomic};
use crate::checkpoint::{CheckpointFile, ReadOptions};
use crate::error::{Error, Result};

/// File name of a manifest inside an output folder.
pub const MANIFEST_NAME: &str = "reshard_manifest.json";

/// The lock file next to a manifest: every read-merge-write of the manifest holds an exclusive
/// `flock` on it, so jobs writing into one folder at once (other prefixes, other ranks' files)
/// do not lose each other's entries. It stays in the folder: removing it would let a process
/// that opened it before the removal and one that creates it anew both hold "the" lock.
pub const MANIFEST_LOCK_NAME: &str = ".reshard_manifest.lock";

/// Holds the manifest lock of `dir` while alive (`None` on a filesystem without `flock`).
struct ManifestLock(#[allow(dead_code)] Option<std::fs::File>);

/// How the manifest lock file is opened and locked: the system's calls, or in tests stand-ins
/// that fail as some filesystems and other users' lock files make them fail.
struct LockCalls {
    /// Opens (creating it if needed) the lock file for reading and writing.
    open_rw: fn(&Path) -> std::io::Result<std::fs::File>,
    /// Takes an exclusive lock on the open file, waiting for it.
    lock: fn(&std::fs::File) -> std::io::Result<()>,
}

const SYSTEM_LOCK_CALLS: LockCalls = LockCalls {
    open_rw: |path| std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path),
    lock: crate::sys::lock_exclusive,
};

impl ManifestLock {
    fn take(dir: &Path) -> Result<ManifestLock> {
        Self::take_with(dir, &SYSTEM_LOCK_CALLS)
    }

    fn take_with(dir: &Path, calls: &LockCalls) -> Result<ManifestLock> {
        let path = dir.join(MANIFEST_LOCK_NAME);
        // Another user may have created the lock file (0644): flock works on a read-only
        // descriptor too, and this user can still rename a new manifest into the folder.
        let f = match (calls.open_rw)(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => std::fs::File::open(&path),
            other => other,
        }
        .map_err(|e| Error::io(&path, "open the manifest lock", e))?;
        match (calls.lock)(&f) {
            Ok(()) => Ok(ManifestLock(Some(f))),
            // Filesystems without flock (Lustre without -o flock, NFS with nolock, some FUSE):
            // go on unlocked, as before the lock existed, rather than fail a finished output.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::ENOLCK | libc::EOPNOTSUPP)) => {
                Ok(ManifestLock(None))
            }
            Err(e) => Err(Error::io(&path, "lock", e)),
        }
    }
}

/// One file listed in a manifest.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ManifestEntry {
    /// File name inside the folder.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// crc32 (zlib) of the whole file.
    pub crc32: u32,
    /// Identifies the plan and options that produced the file.
    pub plan_fingerprint: String,
    /// The destination rank the file is for (absent in manifests of version 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_rank: Option<u32>,
    /// How many destination ranks the plan has, so that `verify` can name the ranks a job has
    /// not written (absent in manifests of version 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_rank_count: Option<u32>,
}

/// Version written into new manifests: 2 added `dst_rank` and `dst_rank_count`; version 1
/// manifests are still read (without the check for missing ranks).
pub const MANIFEST_VERSION: u32 = 2;

/// Whether a manifest entry's name is a plain file name in its folder (not a path, `..`, or
/// empty): anything else would make `verify` read, and a rerun trust, files outside the folder.
pub fn is_plain_name(name: &str) -> bool {
    use std::path::Component;
    let mut c = Path::new(name).components();
    !name.contains('\0')
        && matches!((c.next(), c.next()), (Some(Component::Normal(n)), None) if n.to_str() == Some(name))
}

/// The manifest of one output folder.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// Format version of this manifest.
    pub version: u32,
    /// The files.
    pub files: Vec<ManifestEntry>,
}

impl Manifest {
    /// Reads the manifest of `dir`, if there is a readable one.
    pub fn read(dir: &Path) -> Option<Manifest> {
        let bytes = std::fs::read(dir.join(MANIFEST_NAME)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Records `entry` in the manifest of `dir` (replacing an entry of the same name), under
    /// the folder's manifest lock.
    pub fn record(dir: &Path, entry: ManifestEntry, sync: bool) -> Result<()> {
        Self::record_with(dir, entry, sync, &SYSTEM_LOCK_CALLS)
    }

    fn record_with(dir: &Path, entry: ManifestEntry, sync: bool, calls: &LockCalls) -> Result<()> {
        let _lock = ManifestLock::take_with(dir, calls)?;
        // Under the lock, so that no other process of this machine is between creating its
        // manifest temporary file and renaming it; and only this machine's dead processes' files
        // (another machine sharing the folder may be writing its own even where flock is not
        // shared between machines, or not there at all).
        remove_stale_temps(dir, MANIFEST_NAME);
        // A manifest that cannot be read now (EIO, EMFILE, ...) is not an empty one: rewriting
        // it with only this entry would drop every other entry.
        // (A manifest that does not parse lists nothing that can be trusted: it is started anew.)
        let path = dir.join(MANIFEST_NAME);
        let empty = || Manifest { version: MANIFEST_VERSION, files: Vec::new() };
        let mut m = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|_| empty()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => empty(),
            Err(e) => return Err(Error::io(&path, "read the manifest", e)),
        };
        m.version = MANIFEST_VERSION;
        m.files.retain(|e| e.name != entry.name);
        m.files.push(entry);
        m.files.sort_by(|a, b| a.name.cmp(&b.name));
        m.write(dir, sync)
    }

    /// Drops entries whose files no longer exist, under the folder's manifest lock.
    pub fn prune(dir: &Path, sync: bool) -> Result<()> {
        if !dir.join(MANIFEST_NAME).exists() {
            return Ok(());
        }
        let _lock = ManifestLock::take(dir)?;
        remove_stale_temps(dir, MANIFEST_NAME);
        let Some(mut m) = Manifest::read(dir) else {
            return Ok(());
        };
        let before = m.files.len();
        m.files.retain(|e| is_plain_name(&e.name) && dir.join(&e.name).exists());
        if m.files.len() == before {
            return Ok(());
        }
        m.write(dir, sync)
    }

    /// Writes the manifest of `dir` atomically (temporary file, sync, rename).
    pub fn write(&self, dir: &Path, sync: bool) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| Error::Invalid(e.to_string()))?;
        write_atomic(&dir.join(MANIFEST_NAME), &bytes, sync)
    }
}

/// crc32 and size of a file, read in bounded chunks.
pub fn file_crc(path: &Path) -> Result<(u64, u32)> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, "open", e))?;
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).map_err(|e| Error::io(path, "read", e))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((n, h.finalize()))
}

/// Whether `dir/entry.name` still has the recorded size and crc.
pub fn entry_matches(dir: &Path, entry: &ManifestEntry) -> bool {
    if !is_plain_name(&entry.name) {
        return false;
    }
    let p = dir.join(&entry.name);
    match std::fs::metadata(&p) {
        Ok(m) if m.len() == entry.size => file_crc(&p).map(|(_, c)| c == entry.crc32).unwrap_or(false),
        _ => false,
    }
}

/// What `verify` found.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct VerifyReport {
    /// Files that match their manifest and parse.
    pub ok: Vec<PathBuf>,
    /// Files that do not, with the reason.
    pub bad: Vec<(PathBuf, String)>,
    /// Manifests read.
    pub manifests: usize,
    /// Jobs whose manifests say they have ranks that have no output.
    pub missing: Vec<MissingRanks>,
    /// Folders reached a second time (through a symbolic link: a loop, or a second path to one
    /// folder), with why they were not entered again.
    pub skipped: Vec<(PathBuf, String)>,
}

/// The destination ranks of one job (one plan fingerprint in one output folder) that have no
/// output: the job did not finish, or was run for some ranks only.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MissingRanks {
    /// The output folder (holding `rank_{r}/`).
    pub dir: PathBuf,
    /// The job's plan fingerprint.
    pub plan_fingerprint: String,
    /// How many destination ranks the job has.
    pub rank_count: u32,
    /// The ranks with no output.
    pub ranks: Vec<u32>,
}

impl std::fmt::Display for MissingRanks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: the job that wrote these outputs (plan {}) has {} rank(s); missing: {} (the job did not finish, \
             or was run for some ranks only)",
            self.dir.display(),
            self.plan_fingerprint,
            self.rank_count,
            crate::plan::fmt_rank_folders(&self.ranks)
        )
    }
}

/// Checks every manifest under `root`: each listed file exists, has its size and crc32, and
/// parses as a checkpoint. Checkpoint files not listed in any manifest are reported as bad, and
/// so are names in a manifest that are not plain file names of its folder (they are not read).
/// For each job whose output folder is `root` or below it, the destination ranks that have no
/// output are reported in `missing` (from version 2 manifests, which record the rank count).
pub fn verify(root: &Path) -> Result<VerifyReport> {
    if crate::storage::is_url(root) {
        #[cfg(feature = "s3")]
        return crate::exec::object_sink::verify(root);
        #[cfg(not(feature = "s3"))]
        return Err(crate::storage::no_object_storage(root));
    }
    let mut report = VerifyReport::default();
    // (output folder, fingerprint) -> (rank count, ranks with an output listed).
    let mut jobs: JobRanks = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    let root_meta = match std::fs::metadata(root) {
        Ok(m) if m.is_dir() => m,
        _ => return Err(Error::Source { path: root.to_path_buf(), detail: "not a folder".into() }),
    };
    // Every folder is entered once, by device and inode: symbolic links to folders are
    // followed, but a link back up the tree (a loop) used to be followed for ever.
    let dev_ino = |m: &std::fs::Metadata| {
        use std::os::unix::fs::MetadataExt;
        (m.dev(), m.ino())
    };
    let mut entered: std::collections::HashMap<(u64, u64), PathBuf> =
        std::collections::HashMap::from([(dev_ino(&root_meta), root.to_path_buf())]);
    while let Some(dir) = stack.pop() {
        let mut listed = std::collections::HashSet::new();
        let manifest_path = dir.join(MANIFEST_NAME);
        if manifest_path.exists() {
            let Some(m) = Manifest::read(&dir) else {
                report.bad.push((manifest_path, "the manifest is not readable JSON".into()));
                continue;
            };
            report.manifests += 1;
            for e in &m.files {
                if !is_plain_name(&e.name) {
                    report.bad.push((
                        manifest_path.clone(),
                        format!(
                            "lists {:?}, which is not a file name in this folder (a path, '..' or empty); it was not read",
                            e.name
                        ),
                    ));
                    continue;
                }
                listed.insert(e.name.clone());
                // The rank from the entry, or (version 1 entries a resumed run kept) from the
                // folder name `rank_{r}`.
                let folder_rank = || dir.file_name()?.to_str()?.strip_prefix("rank_")?.parse::<u32>().ok();
                if let (Some(rank), Some(job)) = (e.dst_rank.or_else(folder_rank), dir.parent()) {
                    if job.starts_with(root) {
                        let slot = jobs.entry((job.to_path_buf(), e.plan_fingerprint.clone())).or_default();
                        slot.0 = slot.0.max(e.dst_rank_count.unwrap_or(0));
                        slot.1.insert(rank);
                    }
                }
                let p = dir.join(&e.name);
                let problem = match file_crc(&p) {
                    Err(err) => Some(err.to_string()),
                    Ok((size, _)) if size != e.size => Some(format!("size {size}, the manifest says {}", e.size)),
                    Ok((_, crc)) if crc != e.crc32 => Some(format!(
                        "crc32 {crc:#010x}, the manifest says {:#010x}: the file changed or is damaged",
                        e.crc32
                    )),
                    Ok(_) => CheckpointFile::open(&p, ReadOptions::default()).err().map(|err| err.to_string()),
                };
                match problem {
                    Some(why) => report.bad.push((p, why)),
                    None => report.ok.push(p),
                }
            }
        }
        let rd = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, "read folder", e))?;
        for entry in rd.flatten() {
            let p = entry.path();
            let folder = std::fs::metadata(&p).ok().filter(std::fs::Metadata::is_dir);
            if let Some(m) = folder {
                match entered.entry(dev_ino(&m)) {
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert(p.clone());
                        stack.push(p);
                    }
                    std::collections::hash_map::Entry::Occupied(first) => {
                        let link = entry.file_type().is_ok_and(|t| t.is_symlink());
                        let why = format!(
                            "{} the folder {}, which is checked already: not entered again ({})",
                            if link { "a symbolic link to" } else { "another path to" },
                            first.get().display(),
                            if first.get().starts_with(&p) || p.starts_with(first.get()) {
                                "a symlink loop"
                            } else {
                                "a second path to one folder"
                            }
                        );
                        report.skipped.push((p, why));
                    }
                }
            } else if crate::checkpoint::Format::from_path(&p).is_some()
                && !listed.contains(p.file_name().and_then(|n| n.to_str()).unwrap_or(""))
                && dir != root.join("merged_strategy")
            {
                report.bad.push((
                    p,
                    "not listed in any reshard manifest (not written by reshard, or its run did not finish)".into(),
                ));
            }
        }
    }
    finish_report(report, jobs, root, "folder")
}

/// The destination ranks each job wrote, with its rank count: (job folder, plan fingerprint) ->
/// (rank count, ranks found in manifests).
pub(crate) type JobRanks = std::collections::BTreeMap<(PathBuf, String), (u32, std::collections::BTreeSet<u32>)>;

/// The end of `verify` (of a folder or of an object prefix, `under` says which): the ranks each
/// job misses, a refusal when no manifest was found, and the lists sorted.
pub(crate) fn finish_report(
    mut report: VerifyReport,
    jobs: JobRanks,
    root: &Path,
    under: &str,
) -> Result<VerifyReport> {
    for ((dir, plan_fingerprint), (rank_count, seen)) in jobs {
        let ranks: Vec<u32> = (0..rank_count).filter(|r| !seen.contains(r)).collect();
        if !ranks.is_empty() {
            report.missing.push(MissingRanks { dir, plan_fingerprint, rank_count, ranks });
        }
    }
    if report.manifests == 0 && report.bad.is_empty() {
        return Err(Error::Source {
            path: root.to_path_buf(),
            detail: format!("no {MANIFEST_NAME} under this {under}: nothing written by reshard to verify"),
        });
    }
    report.ok.sort();
    report.bad.sort();
    report.skipped.sort();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A manifest that cannot be read (here: a folder in its place, EISDIR) is not taken for an
    /// empty one: recording would otherwise replace every entry by the new one.
    #[test]
    fn an_unreadable_manifest_is_an_error_not_an_empty_one() {
        let dir = std::env::temp_dir().join(format!("reshard-manifest-unreadable-{}", std::process::id()));
        std::fs::create_dir_all(dir.join(MANIFEST_NAME)).unwrap();
        let err = Manifest::record(&dir, entry("a.ckpt"), false).unwrap_err().to_string();
        assert!(err.contains(MANIFEST_NAME) && err.contains("read the manifest"), "{err}");
        assert!(dir.join(MANIFEST_NAME).is_dir());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_plain_file_names() {
        for ok in ["checkpoint_0.ckpt", ".hidden", "a..b"] {
            assert!(is_plain_name(ok), "{ok}");
        }
        for bad in ["", ".", "..", "../x.ckpt", "/etc/passwd", "a/b", "a/", "./a", "a\0b"] {
            assert!(!is_plain_name(bad), "{bad:?}");
        }
    }

    /// 8 threads x 25 records into one folder, each with its own name (as jobs of other
    /// prefixes): every entry is in the manifest. Without the lock most were lost.
    #[test]
    fn concurrent_records_lose_no_entry() {
        let dir = std::env::temp_dir().join(format!("reshard-manifest-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        std::thread::scope(|s| {
            for t in 0..8 {
                let dir = &dir;
                s.spawn(move || {
                    for i in 0..25 {
                        Manifest::record(dir, entry(&format!("p{t}_{i}.ckpt")), false)
                            .unwrap_or_else(|e| panic!("{e}"));
                    }
                });
            }
        });
        let m = Manifest::read(&dir).unwrap_or_else(|| panic!("no manifest"));
        assert_eq!(m.files.len(), 200);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Recording cleans up manifest temporary files of this machine's dead processes, under the
    /// lock, and leaves another machine's (its pid means nothing here: that job may be about to
    /// rename it into place).
    #[test]
    fn recording_removes_only_this_machines_dead_temporary_manifests() {
        let dir = std::env::temp_dir().join(format!("reshard-manifest-temps-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let me = crate::atomic::owner().unwrap();
        let dead_here = dir.join(format!(".{MANIFEST_NAME}.reshard-{me}-{}-0.tmp", u32::MAX));
        let other_host = dir.join(format!(".{MANIFEST_NAME}.reshard-node-7.0badc0de-{}-0.tmp", u32::MAX));
        std::fs::write(&dead_here, b"{").unwrap();
        std::fs::write(&other_host, b"{").unwrap();
        Manifest::record(&dir, entry("a.ckpt"), false).unwrap();
        assert!(!dead_here.exists());
        assert!(other_host.exists(), "another machine's manifest temporary file was removed");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn entry(name: &str) -> ManifestEntry {
        ManifestEntry {
            name: name.into(),
            size: 1,
            crc32: 0,
            plan_fingerprint: "f".into(),
            dst_rank: Some(0),
            dst_rank_count: Some(1),
        }
    }

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("reshard-manifest-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Where flock is not supported (ENOSYS, ENOLCK, EOPNOTSUPP), a record goes on unlocked, as
    /// before the lock existed; any other lock failure fails the record naming the lock file.
    #[test]
    fn without_flock_records_go_on_unlocked_other_lock_errors_fail() {
        let dir = scratch("no-flock");
        fn unsupported(code: i32) -> std::io::Result<()> {
            Err(std::io::Error::from_raw_os_error(code))
        }
        type Lock = fn(&std::fs::File) -> std::io::Result<()>;
        let failing: [(i32, Lock); 4] = [
            (libc::ENOSYS, |_| unsupported(libc::ENOSYS)),
            (libc::ENOLCK, |_| unsupported(libc::ENOLCK)),
            (libc::EOPNOTSUPP, |_| unsupported(libc::EOPNOTSUPP)),
            (libc::EIO, |_| unsupported(libc::EIO)),
        ];
        for (code, lock) in failing {
            let calls = LockCalls { open_rw: SYSTEM_LOCK_CALLS.open_rw, lock };
            let held = ManifestLock::take_with(&dir, &calls);
            let name = format!("e{code}.ckpt");
            let recorded = Manifest::record_with(&dir, entry(&name), false, &calls);
            if code == libc::EIO {
                let err = held.err().map(|e| e.to_string()).unwrap_or_default();
                assert!(err.contains(MANIFEST_LOCK_NAME) && err.contains("lock"), "{err}");
                assert!(recorded.is_err());
            } else {
                assert!(held.unwrap().0.is_none(), "errno {code}: a lock was held");
                recorded.unwrap();
                let m = Manifest::read(&dir).unwrap();
                assert!(m.files.iter().any(|e| e.name == name), "errno {code}: not recorded");
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A lock file that this user may not open for writing (another user created it, 0644) is
    /// opened read-only, and flock on that descriptor still excludes other lockers.
    #[test]
    fn a_lock_file_this_user_cannot_write_is_locked_read_only() {
        let dir = scratch("read-only-lock");
        let calls = LockCalls {
            open_rw: |_| Err(std::io::Error::from_raw_os_error(libc::EACCES)),
            lock: SYSTEM_LOCK_CALLS.lock,
        };
        // Made by "the other user" (the fallback only opens an existing file).
        std::fs::write(dir.join(MANIFEST_LOCK_NAME), b"").unwrap();
        let held = ManifestLock::take_with(&dir, &calls).unwrap();
        let f = held.0.as_ref().expect("a lock is held");
        use std::io::Write;
        assert!((&*f).write(b"x").is_err(), "the lock file was opened for writing");
        let other = std::fs::File::open(dir.join(MANIFEST_LOCK_NAME)).unwrap();
        assert!(!crate::sys::try_lock_exclusive(&other).unwrap(), "the read-only descriptor holds no lock");
        drop(held);
        assert!(crate::sys::try_lock_exclusive(&other).unwrap());
        drop(other);
        Manifest::record_with(&dir, entry("a.ckpt"), false, &calls).unwrap();
        assert_eq!(Manifest::read(&dir).unwrap().files.len(), 1);
        // No lock file and no right to create one: the record fails naming it.
        std::fs::remove_file(dir.join(MANIFEST_LOCK_NAME)).unwrap();
        let err = Manifest::record_with(&dir, entry("b.ckpt"), false, &calls).unwrap_err().to_string();
        assert!(err.contains(MANIFEST_LOCK_NAME) && err.contains("open the manifest lock"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn version_1_manifests_are_still_read() {
        let v1 = r#"{"version": 1, "files": [{"name": "c_0.ckpt", "size": 3, "crc32": 7, "plan_fingerprint": "ab"}]}"#;
        let m: Manifest = serde_json::from_str(v1).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((m.files[0].dst_rank, m.files[0].dst_rank_count), (None, None));
    }
}
