//! Per-folder manifests of what reshard wrote, and `verify`, which checks a tree against them.
//!
//! Each output folder (`rank_{r}/`) gets `reshard_manifest.json`, updated last and atomically:
//! per file, its size, crc32 and the fingerprint of the plan that wrote it. A rerun of the same
//! plan keeps files that still match and redoes the rest.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::atomic::write_atomic;
use crate::checkpoint::{CheckpointFile, ReadOptions};
use crate::error::{Error, Result};

/// File name of a manifest inside an output folder.
pub const MANIFEST_NAME: &str = "reshard_manifest.json";

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

    /// Records `entry` in the manifest of `dir` (replacing an entry of the same name).
    pub fn record(dir: &Path, entry: ManifestEntry, sync: bool) -> Result<()> {
        let mut m = Manifest::read(dir).unwrap_or(Manifest { version: 1, files: Vec::new() });
        m.files.retain(|e| e.name != entry.name);
        m.files.push(entry);
        m.files.sort_by(|a, b| a.name.cmp(&b.name));
        m.write(dir, sync)
    }

    /// Drops entries whose files no longer exist.
    pub fn prune(dir: &Path, sync: bool) -> Result<()> {
        let Some(mut m) = Manifest::read(dir) else {
            return Ok(());
        };
        let before = m.files.len();
        m.files.retain(|e| dir.join(&e.name).exists());
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
}

/// Checks every manifest under `root`: each listed file exists, has its size and crc32, and
/// parses as a checkpoint. Checkpoint files not listed in any manifest are reported as bad.
pub fn verify(root: &Path) -> Result<VerifyReport> {
    let mut report = VerifyReport::default();
    let mut stack = vec![root.to_path_buf()];
    if !root.is_dir() {
        return Err(Error::Source { path: root.to_path_buf(), detail: "not a folder".into() });
    }
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
                listed.insert(e.name.clone());
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
            if p.is_dir() {
                stack.push(p);
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
    if report.manifests == 0 && report.bad.is_empty() {
        return Err(Error::Source {
            path: root.to_path_buf(),
            detail: format!("no {MANIFEST_NAME} under this folder: nothing written by reshard to verify"),
        });
    }
    report.ok.sort();
    report.bad.sort();
    Ok(report)
}
