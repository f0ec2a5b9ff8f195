//! Writing destination ranks to an object store (`--dst_ckpt_dir s3://bucket/prefix`).
//!
//! Each rank is written by the file sink into a local staging folder (the codec's layout, crc,
//! the same code path as local outputs), then sent as a multipart upload of 8 MiB parts read
//! back from the staged file, so memory stays bounded by the parts in flight whatever the size
//! of the output. The upload is completed only when the whole object is in (S3 makes an object
//! visible under its key only then); any failure or a cancel aborts it. Then the rank folder's
//! manifest object is rewritten with the object's size, crc32 and ETag: that write is the commit.
//! A rerun of the same plan keeps an object whose manifest entry, size and ETag still match.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use super::{file_sink, output_path, Job, WrittenFile};
use crate::error::{Error, Result};
use crate::formats::codec::Codec;
use crate::manifest::{ManifestEntry, VerifyReport, MANIFEST_NAME, MANIFEST_VERSION};
use crate::plan::RankPlan;
use crate::storage::object;

/// A manifest entry of an object output: the local entry plus the object's ETag.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct ObjectEntry {
    #[serde(flatten)]
    entry: ManifestEntry,
    /// The ETag the store gave the object when its upload completed.
    #[serde(default)]
    etag: String,
}

/// The manifest object of a rank folder (the local manifest's format, with ETags).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct ObjectManifest {
    version: u32,
    files: Vec<ObjectEntry>,
}

/// Manifest objects are read, changed and written back by one thread of this process at a time.
static MANIFEST_LOCK: Mutex<()> = Mutex::new(());

/// The manifest object of `dir`, or None when there is none (or it does not parse: it then lists
/// nothing that can be trusted).
fn read_manifest(dir: &Path) -> Result<Option<ObjectManifest>> {
    let url = dir.join(MANIFEST_NAME);
    if object::head(&url)?.is_none() {
        return Ok(None);
    }
    let bytes = object::read_all(&url, 64 << 20, "manifest")?;
    Ok(serde_json::from_slice(&bytes).ok())
}

fn record(dir: &Path, entry: ObjectEntry) -> Result<()> {
    let _held = MANIFEST_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let mut m = read_manifest(dir)?.unwrap_or(ObjectManifest { version: MANIFEST_VERSION, files: Vec::new() });
    m.version = MANIFEST_VERSION;
    m.files.retain(|e| e.entry.name != entry.entry.name);
    m.files.push(entry);
    m.files.sort_by(|a, b| a.entry.name.cmp(&b.entry.name));
    let bytes = serde_json::to_vec_pretty(&m).map_err(|e| Error::Invalid(e.to_string()))?;
    object::put(&dir.join(MANIFEST_NAME), bytes)?;
    Ok(())
}

/// Removes the staging folder on every way out.
struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Where ranks are staged before their upload: `RESHARD_STAGING_DIR`, else the system's
/// temporary folder.
fn staging_root() -> PathBuf {
    std::env::var_os("RESHARD_STAGING_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir)
}

/// Writes destination rank `rp` to its object (or keeps the one a previous run finished).
pub(crate) fn write_rank(job: &Job<'_>, codec: &dyn Codec, rp: &RankPlan) -> Result<WrittenFile> {
    write_object(job, codec, rp, output_path(job.plan, job.dst_dir, rp.rank, job.opts), Some(rp.rank))
}

/// Writes the tensors of `rp` to the object `final_url` (or keeps the one a previous run
/// finished); the manifest records it as destination rank `dst_rank` (`None`: an object of no
/// rank, such as a unified folder's part), as `file_sink::write_file` does for files.
pub(crate) fn write_object(
    job: &Job<'_>,
    codec: &dyn Codec,
    rp: &RankPlan,
    final_url: PathBuf,
    dst_rank: Option<u32>,
) -> Result<WrittenFile> {
    let dir = final_url.parent().map(Path::to_path_buf).unwrap_or_default();
    let name = final_url.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
    if job.opts.resume {
        if let Some(e) = read_manifest(&dir)?.and_then(|m| {
            m.files.into_iter().find(|e| e.entry.name == name && e.entry.plan_fingerprint == job.fingerprint)
        }) {
            if object::head(&final_url)?.is_some_and(|(size, etag)| size == e.entry.size && etag == e.etag) {
                job.advance(rp.bytes_written());
                return Ok(WrittenFile {
                    rank: rp.rank,
                    path: final_url,
                    len: e.entry.size,
                    crc32: e.entry.crc32,
                    reused: true,
                });
            }
        }
    }
    job.check_cancel(&final_url)?;
    let staging = staging_root().join(format!("reshard-upload-{}-{}", std::process::id(), rp.rank));
    let _remove = RemoveDir(staging.clone());
    // The staged file is read back at once and never kept: no fsync, no resume.
    let opts = super::ExecuteOptions { sync: false, resume: false, ..job.opts.clone() };
    let staged_job = Job { dst_dir: &staging, opts: &opts, ..*job };
    let staged = file_sink::write_rank(&staged_job, codec, rp)?;
    let file = std::fs::File::open(&staged.path).map_err(|e| Error::io(&staged.path, "open the staged output", e))?;
    let cancelled = || job.opts.cancel.as_ref().is_some_and(|c| c.load(Ordering::Acquire));
    let etag = object::upload_file(&file, staged.len, &final_url, &cancelled)?;
    let entry = ManifestEntry {
        name,
        size: staged.len,
        crc32: staged.crc32,
        plan_fingerprint: job.fingerprint.to_string(),
        dst_rank,
        dst_rank_count: dst_rank.map(|_| job.plan.dst_rank_count()),
    };
    record(&dir, ObjectEntry { entry, etag })?;
    Ok(WrittenFile { rank: rp.rank, path: final_url, len: staged.len, crc32: staged.crc32, reused: false })
}

/// crc32 and size of an object, fetched in 8 MiB ranges.
fn object_crc(url: &Path) -> Result<(u64, u32)> {
    let src = object::ObjectSource::open(url)?;
    let src: &dyn crate::storage::ByteSource = &src;
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; (8usize << 20).min(src.len() as usize)];
    let mut at = 0;
    while at < src.len() {
        let n = ((src.len() - at) as usize).min(buf.len());
        src.read_at(at, &mut buf[..n])?;
        h.update(&buf[..n]);
        at += n as u64;
    }
    Ok((src.len(), h.finalize()))
}

/// `verify` on an object store: every manifest object under `root`, each listed object's size,
/// ETag and crc32 (the object is fetched once), and its table of contents; checkpoints no
/// manifest lists and missing ranks are reported as for a local folder.
pub(crate) fn verify(root: &Path) -> Result<VerifyReport> {
    use std::collections::{BTreeMap, BTreeSet, HashSet};
    let mut report = VerifyReport::default();
    let objects = object::list(root)?;
    let mut listed: HashSet<PathBuf> = HashSet::new();
    let mut jobs: BTreeMap<(PathBuf, String), (u32, BTreeSet<u32>)> = BTreeMap::new();
    for (url, _) in objects.iter().filter(|(u, _)| u.file_name().and_then(|n| n.to_str()) == Some(MANIFEST_NAME)) {
        let dir = url.parent().map(Path::to_path_buf).unwrap_or_default();
        let Some(m) = read_manifest(&dir)? else {
            report.bad.push((url.clone(), "the manifest is not readable JSON".into()));
            continue;
        };
        report.manifests += 1;
        for e in &m.files {
            if !crate::manifest::is_plain_name(&e.entry.name) {
                report
                    .bad
                    .push((url.clone(), format!("lists {:?}, which is not a file name in this folder", e.entry.name)));
                continue;
            }
            let p = dir.join(&e.entry.name);
            listed.insert(p.clone());
            if let (Some(rank), Some(job)) = (e.entry.dst_rank, dir.parent()) {
                let slot = jobs.entry((job.to_path_buf(), e.entry.plan_fingerprint.clone())).or_default();
                slot.0 = slot.0.max(e.entry.dst_rank_count.unwrap_or(0));
                slot.1.insert(rank);
            }
            let problem = match object::head(&p) {
                Err(err) => Some(err.to_string()),
                Ok(None) => Some("no such object".into()),
                Ok(Some((size, _))) if size != e.entry.size => {
                    Some(format!("size {size}, the manifest says {}", e.entry.size))
                }
                Ok(Some((_, etag))) if !e.etag.is_empty() && etag != e.etag => {
                    Some(format!("ETag {etag}, the manifest says {}: the object was replaced", e.etag))
                }
                Ok(Some(_)) => match object_crc(&p) {
                    Err(err) => Some(err.to_string()),
                    Ok((_, crc)) if crc != e.entry.crc32 => Some(format!(
                        "crc32 {crc:#010x}, the manifest says {:#010x}: the object changed or is damaged",
                        e.entry.crc32
                    )),
                    Ok(_) => crate::checkpoint::CheckpointFile::open(&p, crate::checkpoint::ReadOptions::default())
                        .err()
                        .map(|err| err.to_string()),
                },
            };
            match problem {
                Some(why) => report.bad.push((p, why)),
                None => report.ok.push(p),
            }
        }
    }
    for (url, _) in &objects {
        let in_merged = url.parent().and_then(|d| d.file_name()).is_some_and(|n| n == "merged_strategy");
        if crate::checkpoint::Format::from_path(url).is_some() && !listed.contains(url) && !in_merged {
            report.bad.push((
                url.clone(),
                "not listed in any reshard manifest (not written by reshard, or its run did not finish)".into(),
            ));
        }
    }
    for ((dir, plan_fingerprint), (rank_count, seen)) in jobs {
        let ranks: Vec<u32> = (0..rank_count).filter(|r| !seen.contains(r)).collect();
        if !ranks.is_empty() {
            report.missing.push(crate::manifest::MissingRanks { dir, plan_fingerprint, rank_count, ranks });
        }
    }
    if report.manifests == 0 && report.bad.is_empty() {
        return Err(Error::Source {
            path: root.to_path_buf(),
            detail: format!("no {MANIFEST_NAME} under this prefix: nothing written by reshard to verify"),
        });
    }
    report.ok.sort();
    report.bad.sort();
    Ok(report)
}
