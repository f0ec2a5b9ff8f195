//! `--output_format mindformers`: writing a MindFormers Checkpoint 2.0 root.

use std::path::Path;

use clap::Args;
use reshard_core::execute::mindformers::{execute_mindformers, MindFormersOptions};
use reshard_core::execute::{ExecuteOptions, WrittenFile};
use reshard_core::plan::Plan;
use reshard_core::Error;

/// Prints to stdout; a closed pipe is not an error (as main's).
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($t)*);
    }};
}

/// Options of a MindFormers Checkpoint 2.0 destination.
#[derive(Args, Debug, Default)]
pub struct MfArgs {
    /// With --output_format mindformers: the iteration written (iteration_%08d/ and the tracker);
    /// default the source's when it is a Checkpoint 2.0 root, else 0.
    #[arg(long)]
    iteration: Option<u64>,
    /// With --output_format mindformers: MindFormers' user_prefix of the file names
    /// ({user_prefix}-model-0000000-0000008.safetensors).
    #[arg(long = "user_prefix", visible_alias = "user-prefix")]
    user_prefix: Option<String>,
    /// With --output_format mindformers: write each chunk once (MindFormers' balanced
    /// de-duplicated saving; fewer files than ranks).
    #[arg(long)]
    dedup: bool,
}

/// `--ranks` is refused with `--output_format mindformers` (before anything is planned).
pub fn check_ranks(output_format: &str, ranks: &[u32]) -> Result<(), Error> {
    if output_format == "mindformers" && !ranks.is_empty() {
        return Err(Error::Invalid(
            "--ranks cannot be used with --output_format mindformers: metadata.json describes every rank, so all are \
             written"
                .into(),
        ));
    }
    Ok(())
}

/// Writes the plan's every destination rank as a Checkpoint 2.0 root under `dst`.
pub fn write(
    plan: &Plan,
    src: &Path,
    dst: &Path,
    ranks: &[u32],
    opts: &ExecuteOptions,
    mf: &MfArgs,
) -> Result<Vec<WrittenFile>, Error> {
    check_ranks("mindformers", ranks)?;
    if let Some(p) = &mf.user_prefix {
        if p.is_empty() || p.contains('/') || p.contains('\0') {
            return Err(Error::Invalid(format!("--user_prefix '{p}' must be a non-empty file name prefix")));
        }
    }
    // The source's iteration and common.json carry over when it is a Checkpoint 2.0 root.
    let root = reshard_core::mindformers::detect(src)?;
    let common_path = root.as_ref().map(|r| r.dir.join(reshard_core::formats::mindformers::COMMON));
    let common = match common_path.filter(|p| p.is_file()) {
        Some(p) => Some(reshard_core::input::read_capped(&p, 1 << 20, "common.json")?),
        None => None,
    };
    let iteration = mf.iteration.or(root.and_then(|r| r.iteration)).unwrap_or(0);
    let mfo = MindFormersOptions { iteration, prefix: mf.user_prefix.clone(), dedup: mf.dedup, common };
    execute_mindformers(plan, dst, opts, &mfo)
}

/// `reshard inspect ROOT` for a Checkpoint 2.0 root: its tensors and chunks, every file read and
/// metadata.json checked against them. `None` when `path` is not such a root.
pub fn inspect(path: &Path, json: bool) -> Result<Option<()>, Error> {
    let Some(root) = reshard_core::mindformers::detect(path)? else { return Ok(None) };
    let r = reshard_core::mindformers::check(&root)?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
        return Ok(Some(()));
    }
    let w = r.tensors.iter().map(|t| t.name.len()).max().unwrap_or(4).clamp(4, 80);
    outln!("{:<w$}  {:<9}  {:<20}  {:>6}  {:>6}", "name", "dtype", "global shape", "chunks", "copies");
    for t in &r.tensors {
        outln!(
            "{:<w$}  {:<9}  {:<20}  {:>6}  {:>6}",
            t.name,
            t.dtype,
            format!("{:?}", t.global_shape),
            t.chunks,
            t.copies
        );
    }
    outln!(
        "MindFormers Checkpoint 2.0 {}{}: {} tensors in {} files{}",
        r.dir.display(),
        r.iteration.map(|i| format!(" (iteration {i})")).unwrap_or_default(),
        r.tensors.len(),
        r.files.len(),
        if r.has_metadata { ", metadata.json checked against them" } else { " (single-card save, no metadata.json)" }
    );
    Ok(Some(()))
}

/// `reshard verify ROOT` for a Checkpoint 2.0 root: the files reshard's manifest lists match it,
/// and every file parses and holds what metadata.json says. `None` when `path` is not such a root.
pub fn verify(path: &Path, json: bool) -> Result<Option<()>, Error> {
    let Some(root) = reshard_core::mindformers::detect(path)? else { return Ok(None) };
    // Files written by reshard: size and crc32 against its manifest (de-duplicated roots have
    // fewer files than ranks, so no rank is "missing" here).
    let manifest = if root.dir.join(reshard_core::manifest::MANIFEST_NAME).exists() {
        Some(reshard_core::manifest::verify(&root.dir)?)
    } else {
        None
    };
    let checked = reshard_core::mindformers::check(&root);
    if json {
        let v = serde_json::json!({
            "manifest": manifest.as_ref().map(|m| serde_json::json!({"ok": m.ok, "bad": m.bad})),
            "check": match &checked { Ok(r) => serde_json::json!({"ok": true, "files": r.files}),
                                      Err(e) => serde_json::json!({"ok": false, "error": e.to_string()}) },
        });
        outln!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    }
    if let Some(m) = &manifest {
        if !json {
            for p in &m.ok {
                outln!("ok   {}", p.display());
            }
            for (p, why) in &m.bad {
                outln!("BAD  {}: {why}", p.display());
            }
        }
        if !m.bad.is_empty() {
            return Err(Error::Invalid(format!(
                "{} bad file(s) under {}: {}",
                m.bad.len(),
                root.dir.display(),
                m.bad.iter().map(|(p, _)| p.display().to_string()).collect::<Vec<_>>().join(", ")
            )));
        }
    }
    let r = checked?;
    eprintln!(
        "reshard: MindFormers Checkpoint 2.0 {}: {} file(s) read, {} tensors{}",
        r.dir.display(),
        r.files.len(),
        r.tensors.len(),
        if r.has_metadata { ", metadata.json agrees with them" } else { "" }
    );
    Ok(Some(()))
}
