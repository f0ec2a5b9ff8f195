//! Outputs that are not one file per destination rank: named safetensors files in one folder,
//! each holding some of the plan's tensors with its own `__metadata__` (the part files and
//! `hyper_param.safetensors` of a unified folder). Each is written as a rank is (the same fill,
//! temporary file, fsync, rename, manifest and resume), by one worker per file; into an object
//! store (`s3://`, `obs://`) each is an object written by the object sink.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicU64;

use rayon::prelude::*;

use super::file_sink::write_file;
use super::sources::OpenSources;
use super::{check_output, pool, ExecuteOptions, Job, WrittenFile};
use crate::error::Result;
use crate::formats::codec::{Codec, SafetensorsWithMetadata};
use crate::plan::{Plan, RankPlan, TensorPlan};

/// One named output file.
#[derive(Debug, Clone)]
pub struct NamedOutput {
    /// Its file name in the output folder.
    pub name: String,
    /// Its tensors (any order: the safetensors order is the codec's).
    pub tensors: Vec<TensorPlan>,
    /// Its `__metadata__`.
    pub metadata: BTreeMap<String, String>,
}

/// Writes `outputs` into `dst_dir` from the plan's sources. `tag` names the job in the
/// fingerprint that a rerun uses to keep finished files.
pub fn execute_named(
    plan: &Plan,
    dst_dir: &Path,
    outputs: &[NamedOutput],
    opts: &ExecuteOptions,
    tag: &str,
) -> Result<Vec<WrittenFile>> {
    check_output(&plan.src_dir, dst_dir, "")?;
    let codecs: Vec<SafetensorsWithMetadata> =
        outputs.iter().map(|o| SafetensorsWithMetadata { metadata: o.metadata.clone() }).collect();
    let mut total = 0;
    // The fingerprint covers which tensors go to which file with which metadata.
    let mut what = format!("named {tag}");
    for (o, c) in outputs.iter().zip(&codecs) {
        what.push_str(&format!("|{}:{:?}:", o.name, o.metadata));
        for t in &o.tensors {
            c.check(t)?;
            total += t.nbytes;
            what.push_str(&t.name);
            what.push(',');
        }
    }
    let fingerprint = plan.fingerprint(&what);
    let written = AtomicU64::new(0);
    let sources = OpenSources::new(plan, opts.io);
    let pool = pool(super::workers(plan, opts.threads))?;
    let job = Job::new(&sources, dst_dir, opts, &pool, &written, total, &fingerprint);
    pool.install(|| {
        outputs
            .par_iter()
            .zip(codecs.par_iter())
            .enumerate()
            .map(|(i, (o, c))| {
                let rp = RankPlan { rank: i as u32, stage: 0, tensors: o.tensors.clone() };
                // Into an object store, each file is an object written by the object sink.
                if crate::storage::is_url(dst_dir) {
                    #[cfg(feature = "s3")]
                    return super::object_sink::write_object(&job, c, &rp, dst_dir.join(&o.name), None);
                    #[cfg(not(feature = "s3"))]
                    return Err(crate::storage::no_object_storage(dst_dir));
                }
                write_file(&job, c, &rp, dst_dir.join(&o.name), None)
            })
            .collect::<Result<Vec<_>>>()
    })
}
