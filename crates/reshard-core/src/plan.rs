//! The plan: for every destination rank, its tensors and the copy pieces that fill them.
//!
//! A [`Plan`] is built once from the sources and strategies and answers, per destination rank,
//! with a [`RankPlan`]: the output tensors in order and, for each, either a raw copy of one
//! source tensor or a list of [`CopyPiece`]s (source rank, source box, overlap region). Rank
//! plans are computed on demand, so a plan for thousands of ranks is cheap to build.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use crate::checkpoint::{Format, ReadOptions, TensorInfo};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::{effective_opt_size, full_shape_from_slice, ResolvedLayout};
use crate::region::Region;
use crate::source::{discover, Catalogue};
pub use crate::source::{Source, SourceFile};
use crate::storage::IoMode;
use crate::strategy::{ParamsDebug, Strategy};

/// Settings for building a plan.
#[derive(Debug, Clone, Default)]
pub struct PlanOptions {
    /// Pick this file in every rank folder (`{rank}` = the rank number) when there are several.
    pub src_ckpt_name: Option<String>,
    /// Skip crc verification of the sources while indexing them.
    pub skip_crc: bool,
    /// How source files are read while indexing them (the executor takes its own).
    pub io: IoMode,
    /// Tables of contents of `.ckpt` objects taken from another object of the same size are
    /// checked by the executor, inside the GETs it makes for the copy, rather than before the
    /// plan (`toc_predict`): the plan is then only good for one execution, which fails with
    /// [`Error::PredictionMismatch`] (nothing read from that object committed) when an object
    /// differs; the caller makes the plan again without this and executes again. Off by default.
    pub defer_toc_checks: bool,
}

/// Where a parameter's data comes from.
#[derive(Debug, Clone)]
enum SrcKind {
    /// Sharded under the source strategy, in one pipeline stage. Boxed: most parameters of a
    /// large model are not sharded here, and `ParamInfo` is kept for each (300,000 of them in
    /// a model of many small tensors).
    Sharded(Box<Sharded>),
    /// The complete tensor in source rank 0.
    Complete,
    /// No layout: copied as it is from some rank holding it.
    Raw,
    /// Chunks described by a MindFormers Checkpoint 2.0 `metadata.json`. Boxed, as `Sharded`.
    Chunks(Box<Chunked>),
}

/// A parameter in chunks described by a MindFormers Checkpoint 2.0 `metadata.json`.
#[derive(Debug, Clone)]
struct Chunked {
    /// The full shape.
    full: Vec<u64>,
    /// Each box with the (catalogue) ranks whose files hold it.
    slices: Vec<(Region, Vec<u32>)>,
}

/// A parameter sharded under the source strategy.
#[derive(Debug, Clone)]
struct Sharded {
    /// The full shape the slices imply.
    full: Vec<u64>,
    stage: u32,
    layout: ResolvedLayout,
    /// Distinct boxes with a holder (local rank) each.
    slices: Vec<(Region, u64)>,
}

/// One of these is kept per parameter for the whole job: with many small tensors its size is
/// a good part of the memory (300,000 of them took 100 MB as 192 bytes and five allocations
/// each, then 71 MB as 144 bytes, a name and a shape each, then 24 MB as 80 bytes), hence 48
/// bytes and no allocation in the usual case: the name, and the full shape of a parameter
/// that is not sharded, are its first holder's in the sources' index ([`param_name`],
/// [`param_full`]); a single holder is inline; the destination stages and layouts are shared
/// with the parameters that have the same.
#[derive(Debug, Clone)]
struct ParamInfo {
    dtype: DType,
    kind: SrcKind,
    /// (global source rank, position in its file) of each rank whose files hold the
    /// parameter, by rank ascending.
    held: Held,
    /// What the destination strategy says of it, resolved once.
    dst: DstInfo,
}

/// The (rank, position) pairs of the source ranks holding a parameter: a complete source
/// has one, held without an allocation (and the list behind a thin pointer: 16 bytes).
#[derive(Debug, Clone)]
enum Held {
    One([(u32, u32); 1]),
    // A thin pointer: the enum is 16 bytes where a `Vec` makes it 32 (the rare case pays the
    // second allocation).
    #[allow(clippy::box_collection)]
    Many(Box<Vec<(u32, u32)>>),
}

impl Held {
    fn as_slice(&self) -> &[(u32, u32)] {
        match self {
            Held::One(x) => x,
            Held::Many(v) => v,
        }
    }

    fn push(&mut self, x: (u32, u32)) {
        match self {
            Held::One([first]) => *self = Held::Many(Box::new(vec![*first, x])),
            Held::Many(v) => v.push(x),
        }
    }

    /// Whether `rank` holds it.
    fn has(&self, rank: u32) -> bool {
        self.as_slice().binary_search_by_key(&rank, |x| x.0).is_ok()
    }

    /// The holding ranks, ascending.
    fn ranks(&self) -> impl Iterator<Item = u32> + '_ {
        self.as_slice().iter().map(|x| x.0)
    }
}

/// The tensor of a parameter's first holder (the first rank holding it, first position there).
fn first_tensor<'a>(sources: &'a BTreeMap<u32, Source>, p: &ParamInfo) -> &'a TensorInfo {
    let (rank, pos) = p.held.as_slice()[0];
    // Built from the sources' indexes: the rank and position exist.
    &sources[&rank].index.tensors[pos as usize]
}

/// A parameter's name: its first holder's.
fn param_name<'a>(sources: &'a BTreeMap<u32, Source>, p: &ParamInfo) -> &'a str {
    first_tensor(sources, p).name()
}

/// A parameter's full shape: as its sharded slices or chunks imply, else its first holder's.
fn param_full<'a>(sources: &'a BTreeMap<u32, Source>, p: &'a ParamInfo) -> &'a [u64] {
    match &p.kind {
        SrcKind::Sharded(s) => &s.full,
        SrcKind::Chunks(c) => &c.full,
        SrcKind::Complete | SrcKind::Raw => first_tensor(sources, p).shape(),
    }
}

/// The destination side of a parameter, resolved when the plan is built (so a layout that does
/// not fit the tensor is reported before anything is written): one allocation shared by the
/// parameters with the same (most of them, in a model of many small tensors), 8 bytes in each
/// parameter's record where its stages, both layouts and two flags took 40.
#[derive(Debug, Clone, Default)]
struct DstInfo(Option<std::sync::Arc<DstShared>>);

/// What [`DstInfo`] shares.
#[derive(Debug, Default, PartialEq, Eq, Hash)]
struct DstShared {
    /// The source strategy has a layout for it (or the source is complete).
    in_src: bool,
    /// The destination strategy has a layout for it.
    in_dst: bool,
    /// The destination stages it belongs to.
    stages: Vec<u32>,
    /// Resolved layout for ranks of stage 0, and for ranks of later stages (MindSpore may pick
    /// different layout items for a parameter shared by stages); each shared in turn between
    /// parameters with the same layout and shape.
    first: Option<std::sync::Arc<ResolvedLayout>>,
    later: Option<std::sync::Arc<ResolvedLayout>>,
}

impl DstInfo {
    /// The source strategy has a layout for it (or the source is complete).
    fn in_src(&self) -> bool {
        self.0.as_ref().is_some_and(|d| d.in_src)
    }

    /// The destination strategy has a layout for it.
    fn in_dst(&self) -> bool {
        self.0.as_ref().is_some_and(|d| d.in_dst)
    }

    /// The destination stages it belongs to.
    fn stages(&self) -> &[u32] {
        self.0.as_deref().map_or(&[], |d| &d.stages)
    }

    /// The resolved layout for ranks of `stage`, if the destination splits it.
    fn layout(&self, stage: u32) -> Option<&std::sync::Arc<ResolvedLayout>> {
        let d = self.0.as_deref()?;
        if stage == 0 {
            d.first.as_ref()
        } else {
            d.later.as_ref()
        }
    }
}

/// What [`resolve_dst`] shares between parameters: each distinct layout, and each distinct set
/// of stages and layouts, once.
#[derive(Default)]
struct DstInterner {
    layouts: std::collections::HashSet<std::sync::Arc<ResolvedLayout>>,
    dsts: std::collections::HashSet<std::sync::Arc<DstShared>>,
}

impl DstInterner {
    fn layout(&mut self, r: ResolvedLayout) -> std::sync::Arc<ResolvedLayout> {
        intern(&mut self.layouts, r)
    }

    fn dst(&mut self, d: DstShared) -> std::sync::Arc<DstShared> {
        intern(&mut self.dsts, d)
    }
}

/// The shared copy of `v` in `set`, added if it has none.
fn intern<T: std::hash::Hash + Eq>(set: &mut std::collections::HashSet<std::sync::Arc<T>>, v: T) -> std::sync::Arc<T> {
    match set.get(&v) {
        Some(a) => a.clone(),
        None => {
            let a = std::sync::Arc::new(v);
            set.insert(a.clone());
            a
        }
    }
}

/// A box of a source slice to copy into a destination tensor.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CopyPiece {
    /// Global source rank whose file is read.
    pub src_rank: u32,
    /// The box of the full tensor that the source file holds.
    pub src_box: Region,
    /// The overlap to copy, in full-tensor coordinates.
    pub region: Region,
}

/// How one output tensor is filled.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TensorSource {
    /// The source tensor copied byte for byte.
    Raw {
        /// Global source rank.
        src_rank: u32,
    },
    /// Assembled from pieces.
    Pieces {
        /// The destination box in the full tensor.
        dst_box: Region,
        /// The pieces; they tile `dst_box` exactly.
        pieces: Vec<CopyPiece>,
    },
}

/// One output tensor.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TensorPlan {
    /// Parameter name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Dims to write.
    pub dims: Vec<u64>,
    /// Content bytes.
    pub nbytes: u64,
    /// Where the bytes come from.
    pub source: TensorSource,
}

/// Everything one destination rank gets.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RankPlan {
    /// Global destination rank.
    pub rank: u32,
    /// Pipeline stage of the rank.
    pub stage: u32,
    /// Output tensors in file order.
    pub tensors: Vec<TensorPlan>,
}

impl RankPlan {
    /// The source ranks this rank reads, ascending.
    pub fn src_ranks(&self) -> Vec<u32> {
        let mut s = BTreeSet::new();
        for t in &self.tensors {
            match &t.source {
                TensorSource::Raw { src_rank } => {
                    s.insert(*src_rank);
                }
                TensorSource::Pieces { pieces, .. } => s.extend(pieces.iter().map(|p| p.src_rank)),
            }
        }
        s.into_iter().collect()
    }

    /// Bytes this rank writes (tensor content).
    pub fn bytes_written(&self) -> u64 {
        self.tensors.iter().map(|t| t.nbytes).sum()
    }

    /// Content bytes read from each source rank.
    pub fn bytes_read(&self) -> BTreeMap<u32, u64> {
        let mut m = BTreeMap::new();
        for t in &self.tensors {
            match &t.source {
                TensorSource::Raw { src_rank } => *m.entry(*src_rank).or_insert(0) += t.nbytes,
                TensorSource::Pieces { pieces, .. } => {
                    for p in pieces {
                        *m.entry(p.src_rank).or_insert(0) += p.region.numel() * t.dtype.size();
                    }
                }
            }
        }
        m
    }
}

/// How a destination rank's tensor is made from its parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Make {
    /// Copied from a source rank as it is.
    Raw,
    /// Assembled whole.
    Whole,
    /// The rank's box under the destination layout, assembled.
    Box,
}

/// A destination rank's tensors as [`Plan::rank_order`] gives them: which and in what order,
/// not the tensors themselves.
#[derive(Debug, Clone)]
pub(crate) struct RankOrder {
    /// Global destination rank.
    pub(crate) rank: u32,
    /// Pipeline stage of the rank.
    pub(crate) stage: u32,
    /// (parameter, how) of each output tensor, in file order.
    pub(crate) tensors: Vec<(u32, Make)>,
    /// The source ranks read, ascending ([`RankPlan::src_ranks`]).
    pub(crate) src_ranks: Vec<u32>,
    /// [`RankPlan::bytes_written`].
    pub(crate) bytes_written: u64,
}

/// A compiled transform from the source checkpoints to a destination strategy.
#[derive(Debug)]
pub struct Plan {
    /// Source folder.
    pub src_dir: PathBuf,
    /// Source format.
    pub src_format: Format,
    /// Source files by global rank.
    pub sources: BTreeMap<u32, Source>,
    /// Whether a destination strategy was given (else the destination is complete).
    has_dst_strategy: bool,
    /// The destination strategy's file, for messages.
    dst_strategy_path: Option<PathBuf>,
    /// See [`fingerprint_state`]. The strategies themselves are not kept: what the plan needs of
    /// them is in `params`.
    fingerprint_state: u64,
    /// Devices per source pipeline stage (1 for a complete source).
    pub src_stage_devices: u64,
    /// Source pipeline stages.
    pub src_stages: u32,
    /// Devices per destination pipeline stage (1 for a complete destination).
    pub dst_stage_devices: u64,
    /// Destination pipeline stages.
    pub dst_stages: u32,
    params: Vec<ParamInfo>,
    /// Parameter positions sorted by name, for [`Plan::has_param`].
    param_index: Vec<u32>,
    /// First source rank read (non-zero only in MindSpore's by-stage mode).
    src_base: u32,
    /// In MindSpore's by-stage mode, the source stage: outputs are named `{prefix}{r}_part{stage}`.
    pub part: Option<u32>,
    /// The sources were saved with `remove_redundancy`: a slice is read from a rank of its
    /// replica group that holds it.
    sparse: bool,
    /// Things the user should know (differences from MindSpore, ignored files).
    pub warnings: Vec<String>,
    /// For a complete model of several files (a unified or index folder) and a destination
    /// strategy: each parameter's position in that strategy (`u32::MAX` if absent). MindSpore
    /// loads such a folder with `load_distributed_checkpoint`, in the strategy's order.
    folder_order: Option<Vec<u32>>,
}

/// FNV-1a over everything written to it, so that text is hashed as it is formatted rather than
/// built as one string first (the strategies' text is hundreds of MB for 300,000 parameters).
struct Fnv(u64);

impl std::fmt::Write for Fnv {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        for &x in s.as_bytes() {
            self.0 = (self.0 ^ u64::from(x)).wrapping_mul(0x0100_0000_01b3);
        }
        Ok(())
    }
}

/// The fingerprint's hash of the sources, both strategies and the by-stage mode, before the
/// output options: computed when the plan is built, so the strategies need not be kept.
fn fingerprint_state(
    sources: &BTreeMap<u32, Source>,
    src: Option<&Strategy>,
    dst: Option<&Strategy>,
    part: Option<u32>,
) -> u64 {
    use std::fmt::Write as _;
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    let _ = h.write_str(env!("CARGO_PKG_VERSION"));
    for s in sources.values() {
        for f in &s.files {
            let _ = writeln!(h, "{}|{}|{}", s.rank, f.path.display(), f.version.fingerprint_text());
        }
    }
    // The strategies' parameters as their `Debug` text (`ParamsDebug` keeps it as it was).
    let (src, dst) = (src.map(ParamsDebug), dst.map(ParamsDebug));
    let _ = write!(h, "{src:?}|{dst:?}|{part:?}|");
    h.0
}

/// From this many parameters on, freed heap is handed back to the system after a plan is built
/// and after a job's ranks are counted (see [`crate::sys::trim_heap`]).
pub(crate) const TRIM_HEAP_PARAMS: usize = 50_000;

fn mismatch(src: &Source, param: &str, detail: String) -> Error {
    Error::ShapeMismatch { path: src.path_of(param).to_path_buf(), rank: src.rank, param: param.to_string(), detail }
}

impl Plan {
    /// Builds a plan. `src_strategy` / `dst_strategy` are strategy files or folders of stage
    /// files; `None` means complete weights.
    pub fn build(
        src_dir: &Path,
        src_strategy: Option<&Path>,
        dst_strategy: Option<&Path>,
        opts: &PlanOptions,
    ) -> Result<Plan> {
        let dst_strategy = dst_strategy.map(Strategy::load).transpose()?;
        Plan::build_to(src_dir, src_strategy, dst_strategy, opts)
    }

    /// [`Plan::build`] to a destination strategy already in memory (one made from a MindFormers
    /// `metadata.json`, say).
    pub fn build_to(
        src_dir: &Path,
        src_strategy: Option<&Path>,
        dst_strategy: Option<Strategy>,
        opts: &PlanOptions,
    ) -> Result<Plan> {
        // A MindFormers Checkpoint 2.0 root carries its layouts in metadata.json.
        if let Some(root) = crate::mindformers::detect(src_dir)? {
            if let Some(s) = src_strategy {
                return Err(Error::Invalid(format!(
                    "{} is a MindFormers Checkpoint 2.0 checkpoint, whose layouts come from its metadata.json; leave \
                     out the source strategy {}",
                    src_dir.display(),
                    s.display()
                )));
            }
            return crate::mindformers::plan(&root, dst_strategy, opts);
        }
        let src_strategy = src_strategy.map(Strategy::load).transpose()?;
        let set = discover(src_dir, opts.src_ckpt_name.as_deref())?;
        let plan = Plan::from_parts(set, src_strategy, dst_strategy, opts)?;
        // The strategies are freed by now (a few hundred bytes per parameter). Only worth it for
        // large models: malloc_trim walks every arena of the process (a library's host too), and
        // took 0.16 s in the benchmark's process for a 3,000-parameter plan built in 0.03 s.
        if plan.params.len() >= TRIM_HEAP_PARAMS {
            crate::sys::trim_heap();
        }
        Ok(plan)
    }

    /// Builds a plan from an already discovered source set and parsed strategies.
    pub fn from_parts(
        set: Catalogue,
        src_strategy: Option<Strategy>,
        dst_strategy: Option<Strategy>,
        opts: &PlanOptions,
    ) -> Result<Plan> {
        Plan::from_parts_inner(set, src_strategy, dst_strategy, opts, false, None)
    }

    /// [`Plan::from_parts`], reading the sources as saved with `remove_redundancy` when
    /// `assume_sparse` even if their metadata does not say so (`unify` with
    /// `merge_with_redundancy` false, as MindSpore's `unified_safetensors`).
    pub fn from_parts_with(
        set: Catalogue,
        src_strategy: Option<Strategy>,
        dst_strategy: Option<Strategy>,
        opts: &PlanOptions,
        assume_sparse: bool,
    ) -> Result<Plan> {
        Plan::from_parts_inner(set, src_strategy, dst_strategy, opts, assume_sparse, None)
    }

    /// Builds a plan from sources whose tensors are chunks a MindFormers `metadata.json`
    /// describes (every rank of `set` is read; no source strategy).
    pub fn from_chunks(
        set: Catalogue,
        chunks: &crate::mindformers::ChunkTable,
        dst_strategy: Option<Strategy>,
        opts: &PlanOptions,
    ) -> Result<Plan> {
        Plan::from_parts_inner(set, None, dst_strategy, opts, false, Some(chunks))
    }

    fn from_parts_inner(
        set: Catalogue,
        mut src_strategy: Option<Strategy>,
        mut dst_strategy: Option<Strategy>,
        opts: &PlanOptions,
        assume_sparse: bool,
        chunks: Option<&crate::mindformers::ChunkTable>,
    ) -> Result<Plan> {
        let mut warnings = Vec::new();
        let (src_stage_devices, src_stages) = match &src_strategy {
            Some(s) => (s.stage_device_num()?, s.stage_num()?),
            None => (1, 1),
        };
        let (dst_stage_devices, dst_stages) = match &dst_strategy {
            Some(s) => (s.stage_device_num()?, s.stage_num()?),
            None => (1, 1),
        };
        // MindSpore's special case (`_transform_checkpoint_by_stage`): a single stage's strategy
        // file as source, a single-stage destination with strictly more parameters. The source
        // ranks are that stage's, and outputs are named `..._part{stage}`.
        let by_stage = match (&src_strategy, &dst_strategy) {
            (Some(s), Some(d)) if src_stages == 1 && dst_stages == 1 => {
                let keys = |st: &Strategy| -> BTreeSet<String> {
                    st.params()
                        .map(|(n, _)| n.to_string())
                        .filter(|n| !["accu_grads", "adam_v", "adam_m"].iter().any(|p| n.starts_with(p)))
                        .collect()
                };
                let (sk, dk) = (keys(s), keys(d));
                (sk.is_subset(&dk) && sk.len() < dk.len()).then(|| s.file_stage.unwrap_or(0))
            }
            _ => None,
        };
        // Rank numbers are 32-bit: every product below is checked rather than cast (a wrapped
        // count once planned 2^32 destination ranks as 0 and wrote nothing, successfully).
        if let Some(d) = &dst_strategy {
            d.rank_num()?;
        }
        if let Some(s) = &src_strategy {
            s.rank_num()?;
        }
        // Both factors are bounded (devices by MAX_DEVICES, stages by u32): no u64 overflow.
        let src_base = by_stage.map_or(0, |st| u64::from(st) * src_stage_devices);
        let src_total = src_stage_devices * u64::from(src_stages);
        let src_end = src_base + src_total;
        let (Ok(src_base), Ok(src_end)) = (u32::try_from(src_base), u32::try_from(src_end)) else {
            let path = src_strategy.as_ref().map_or_else(|| set.dir.clone(), |s| s.path.clone());
            return Err(Error::Source {
                path,
                detail: format!(
                    "the source strategy is the file of pipeline stage {} with {src_stage_devices} devices, so its \
                     ranks would be {src_base}..{}; rank numbers must stay below {}",
                    by_stage.unwrap_or(0),
                    src_end - 1,
                    u32::MAX
                ),
            });
        };
        // Which ranks to read: a complete source is rank 0 only.
        let wanted: Vec<u32> = match chunks {
            Some(_) => set.files.keys().copied().collect(),
            None => (src_base..src_end).collect(),
        };
        let missing: Vec<u32> = wanted.iter().copied().filter(|r| !set.files.contains_key(r)).collect();
        if !missing.is_empty() {
            let what = if src_strategy.is_some() {
                format!(
                    "the source strategy has {src_stages} stage(s) of {src_stage_devices} devices, so rank_{src_base}..rank_{} \
                     are needed, but these rank folders are missing: {}",
                    u64::from(src_base) + src_total - 1,
                    fmt_rank_folders(&missing)
                )
            } else {
                "no source strategy was given (complete weights), so rank_0 must hold the complete checkpoint, but it is \
                 missing"
                    .to_string()
            };
            return Err(Error::Source { path: set.dir.clone(), detail: what });
        }
        let extra: Vec<u32> = set.files.keys().copied().filter(|r| !wanted.contains(r)).collect();
        if !extra.is_empty() && by_stage.is_none() {
            warnings.push(format!(
                "{}: rank folders {} are beyond the {} source ranks and are ignored",
                set.dir.display(),
                fmt_rank_folders(&extra),
                src_total
            ));
        }
        let read = ReadOptions { verify_crc: !opts.skip_crc };
        let sources: Vec<Source> = set.open_ranks_deferring(&wanted, opts.io, read, opts.defer_toc_checks)?;
        let sources: BTreeMap<u32, Source> = sources.into_iter().map(|s| (s.rank, s)).collect();
        // What parsing the indexes freed (a tensor vector's earlier capacities as it doubled)
        // is given back before the plan's records are made.
        if sources.values().map(|s| s.index.tensors.len()).sum::<usize>() >= TRIM_HEAP_PARAMS {
            crate::sys::trim_heap();
        }
        // Saved with MindSpore's `remove_redundancy`: each slice is in one rank of its replica
        // group only, so a rank may lack parameters that others of its stage hold.
        let sparse = assume_sparse
            || sources
                .values()
                .any(|s| s.index.metadata.get("remove_redundancy").is_some_and(|v| v.eq_ignore_ascii_case("true")));

        // The chunks metadata.json describes, checked against the files.
        let chunked = chunks.map(|t| crate::mindformers::resolve_all(t, &sources)).transpose()?;
        let mut undescribed: Vec<String> = Vec::new();
        // Every parameter of every source file, in order of first appearance by rank.
        let mut params: Vec<ParamInfo> =
            Vec::with_capacity(sources.values().next().map_or(0, |s| s.index.tensors.len()));
        // Which parameter a name already is. Several sources: a map borrowing the names from
        // their indexes. One source (a complete checkpoint, however many tensors): no map (it
        // took 20 MB for 300,000 names), the index's own lookup finds a repeated name's first
        // position, and `ids` that position's parameter.
        let mut across: HashMap<&str, u32> = HashMap::new();
        let single = sources.len() == 1;
        for s in sources.values() {
            let mut ids: Vec<u32> = if single { Vec::with_capacity(s.index.tensors.len()) } else { Vec::new() };
            for (pos, t) in s.index.tensors.iter().enumerate() {
                // A tensor metadata.json does not describe is not part of the checkpoint
                // (MindFormers' loader never reads it either).
                if chunked.as_ref().is_some_and(|c| !c.contains_key(t.name().as_str())) {
                    undescribed.push(t.name().to_string());
                    if single {
                        ids.push(u32::MAX);
                    }
                    continue;
                }
                let known = if single {
                    s.index.first_position(t.name()).filter(|&f| f < pos).map(|f| ids[f])
                } else {
                    across.get(t.name().as_str()).copied()
                };
                if single {
                    ids.push(known.unwrap_or(params.len() as u32));
                }
                match known {
                    Some(i) => {
                        let p = &mut params[i as usize];
                        if p.dtype != t.dtype {
                            return Err(mismatch(
                                s,
                                t.name(),
                                format!("dtype {} differs from {} in another source rank", t.dtype, p.dtype),
                            ));
                        }
                        p.held.push((s.rank, pos as u32));
                    }
                    None => {
                        if !single {
                            across.insert(t.name(), params.len() as u32);
                        }
                        params.push(ParamInfo {
                            dtype: t.dtype,
                            kind: SrcKind::Raw,
                            held: Held::One([(s.rank, pos as u32)]),
                            dst: DstInfo::default(),
                        });
                    }
                }
            }
        }
        drop(across);
        // Parameter positions sorted by name, for [`Plan::has_param`] and the lookups below.
        let mut param_index: Vec<u32> = (0..params.len() as u32).collect();
        // Unstable (no buffer of half the positions), with ties by position as a stable sort.
        param_index.sort_unstable_by(|&a, &b| {
            param_name(&sources, &params[a as usize]).cmp(param_name(&sources, &params[b as usize])).then(a.cmp(&b))
        });
        for p in &mut params {
            let name = param_name(&sources, p);
            p.kind = match &mut src_strategy {
                // A string is one value, never sliced: its content and dims are copied whole.
                _ if p.dtype == DType::Str => SrcKind::Raw,
                _ if chunked.is_some() => {
                    let c = chunked
                        .as_ref()
                        .and_then(|c| c.get(name))
                        .ok_or_else(|| Error::Invalid(format!("tensor '{name}' has no chunks in metadata.json")))?;
                    SrcKind::Chunks(Box::new(Chunked { full: c.full.clone(), slices: c.slices.clone() }))
                }
                None => SrcKind::Complete,
                Some(st) if st.contains(name) => {
                    resolve_sharded(p, name, st, &sources, src_base, src_stage_devices, sparse)?
                }
                Some(_) => SrcKind::Raw,
            };
        }
        if !undescribed.is_empty() {
            undescribed.sort();
            undescribed.dedup();
            warnings.push(format!(
                "{}: the files hold {} that metadata.json does not describe; they are left out",
                set.dir.display(),
                fmt_names(&undescribed)
            ));
        }
        // Parameters a strategy names that no source file holds.
        let lacking = |st: &Strategy| -> Vec<String> {
            st.params()
                .map(|(n, _)| n)
                .filter(|n| {
                    param_index.binary_search_by(|&i| param_name(&sources, &params[i as usize]).cmp(n)).is_err()
                })
                .map(str::to_string)
                .collect()
        };
        let warn_lacking = |warnings: &mut Vec<String>, st: &Strategy, side: &str, consequence: &str| {
            let missing = lacking(st);
            if !missing.is_empty() {
                warnings.push(format!(
                    "the {side} strategy {} names {} that no source checkpoint holds; {consequence}",
                    st.path.display(),
                    fmt_names(&missing)
                ));
            }
        };
        if let Some(st) = &src_strategy {
            if !params.iter().any(|p| matches!(p.kind, SrcKind::Sharded(_))) {
                let held: Vec<String> = params.iter().map(|p| param_name(&sources, p).to_string()).collect();
                return Err(Error::Source {
                    path: set.dir.clone(),
                    detail: format!(
                        "none of the parameters in the source checkpoints has a layout in the source strategy {}; is it \
                         the strategy these checkpoints were saved with? The strategy names {} the checkpoints lack, and \
                         the checkpoints hold {}",
                        st.path.display(),
                        fmt_names(&lacking(st)),
                        fmt_names(&held)
                    ),
                });
            }
            warn_lacking(&mut warnings, st, "source", "they are left out");
        }
        // (In the by-stage mode the destination names the other stages' parameters on purpose.)
        if let Some(d) = dst_strategy.as_ref().filter(|_| by_stage.is_none()) {
            warn_lacking(&mut warnings, d, "destination", "the outputs will lack them");
        }
        if let Some(d) = &dst_strategy {
            let odd: Vec<&str> = params
                .iter()
                .filter(|p| match &p.kind {
                    SrcKind::Sharded(_) => true,
                    // One chunk: complete in the source too.
                    SrcKind::Chunks(c) => c.slices.len() > 1,
                    _ => false,
                })
                .map(|p| param_name(&sources, p))
                .filter(|n| !d.contains(n))
                .collect();
            if !odd.is_empty() {
                warnings.push(format!(
                    "{} parameter(s) have a source layout but none in the destination strategy ({}{}); they are written complete to every destination rank (MindSpore would copy one source slice, which is not the parameter)",
                    odd.len(),
                    odd.iter().take(5).copied().collect::<Vec<_>>().join(", "),
                    if odd.len() > 5 { ", ..." } else { "" }
                ));
            }
        }
        if let Some(d) = &mut dst_strategy {
            // MindSpore's flattened JSON form needs the tensor's shape, known only now.
            for p in params.iter().filter(|p| !matches!(p.kind, SrcKind::Raw)) {
                d.unflatten_param(param_name(&sources, p), param_full(&sources, p))?;
            }
        }
        let mut shared = DstInterner::default();
        for p in &mut params {
            let (name, full) = (param_name(&sources, p), param_full(&sources, p));
            p.dst = resolve_dst(
                p,
                name,
                full,
                src_strategy.as_ref(),
                dst_strategy.as_ref(),
                dst_stage_devices,
                &mut shared,
            )?;
        }
        let folder_order = match (&src_strategy, &dst_strategy) {
            (None, Some(d)) if chunks.is_none() && sources.get(&0).is_some_and(|s| s.files.len() > 1) => {
                let at: HashMap<&str, u32> = d.params().enumerate().map(|(i, (n, _))| (n, i as u32)).collect();
                Some(params.iter().map(|p| at.get(param_name(&sources, p)).copied().unwrap_or(u32::MAX)).collect())
            }
            _ => None,
        };
        Ok(Plan {
            src_dir: set.dir,
            src_format: set.format,
            fingerprint_state: {
                let mut h = Fnv(fingerprint_state(&sources, src_strategy.as_ref(), dst_strategy.as_ref(), by_stage));
                if let Some(t) = chunks {
                    let _ = std::fmt::Write::write_str(&mut h, &t.fingerprint_text());
                }
                h.0
            },
            has_dst_strategy: dst_strategy.is_some(),
            dst_strategy_path: dst_strategy.as_ref().map(|d| d.path.clone()),
            sources,
            src_stage_devices,
            src_stages,
            dst_stage_devices,
            dst_stages,
            params,
            param_index,
            src_base,
            part: by_stage,
            sparse,
            warnings,
            folder_order,
        })
    }

    /// A fingerprint of everything that decides the outputs: the sources (path and version),
    /// both strategies and `extra` (the output options). Stored in manifests so a rerun can
    /// tell its own finished outputs from anything else.
    pub fn fingerprint(&self, extra: &str) -> String {
        let mut h = Fnv(self.fingerprint_state);
        let _ = std::fmt::Write::write_str(&mut h, extra);
        format!("{:016x}", h.0)
    }

    /// The output file of destination rank `rank`, relative to the output folder.
    pub fn output_name(&self, rank: u32, prefix: &str, format: Format) -> PathBuf {
        let part = self.part.map(|s| format!("_part{s}")).unwrap_or_default();
        PathBuf::from(format!("rank_{rank}")).join(format!("{prefix}{rank}{part}.{}", format.extension()))
    }

    /// Number of destination ranks (1 for a complete destination).
    pub fn dst_rank_count(&self) -> u32 {
        // `from_parts` checked that the product fits (`Strategy::rank_num`).
        u32::try_from(self.dst_stage_devices * u64::from(self.dst_stages)).unwrap_or(u32::MAX)
    }

    /// Number of source ranks read.
    pub fn src_rank_count(&self) -> u32 {
        self.sources.len() as u32
    }

    /// Whether the destination is one complete checkpoint.
    pub fn dst_is_complete(&self) -> bool {
        !self.has_dst_strategy
    }

    /// The plan of destination rank `rank`.
    pub fn rank_plan(&self, rank: u32) -> Result<RankPlan> {
        let stage = self.check_rank(rank)?;
        // (param index, tensor) for the transformed and the copied parameters.
        // Sized up front: grown by doubling they held up to twice the rank's tensors.
        let mut transformed = Vec::with_capacity(self.params.len());
        let mut copied = Vec::new();
        self.each_tensor(rank, |i, _, into_transformed, t| {
            let list = if into_transformed { &mut transformed } else { &mut copied };
            list.push((i, t));
        })?;
        let mut used: Vec<u32> = Vec::new();
        for (_, t) in transformed.iter().chain(copied.iter()) {
            match &t.source {
                TensorSource::Raw { src_rank } => used.push(*src_rank),
                TensorSource::Pieces { pieces, .. } => used.extend(pieces.iter().map(|p| p.src_rank)),
            }
        }
        self.order_like_mindspore(&mut used, &mut transformed, &mut copied);
        // In place (one allocation for the rank's tensors, not two at once).
        transformed.append(&mut copied);
        let tensors = transformed.into_iter().map(|(_, t)| t).collect();
        Ok(RankPlan { rank, stage, tensors })
    }

    /// [`Plan::rank_plan`] without its tensors: their order and how each is made, 8 bytes a
    /// tensor where a [`TensorPlan`] takes a few hundred (with many small tensors a rank's
    /// plan was the largest thing in memory). [`Plan::tensor_plans`] makes them, a window at a
    /// time, identical to the rank plan's.
    pub(crate) fn rank_order(&self, rank: u32) -> Result<RankOrder> {
        let stage = self.check_rank(rank)?;
        // The parameters' order as it is kept, 8 bytes a tensor, sized once and sorted in place:
        // grown by doubling as (usize, Make) pairs and sorted with a cache of keys, the list took
        // 15.6 MB for a rank of 300,000 tensors where it keeps 2.4 MB, and the worker that wrote
        // the rank kept those 16 MB of heap resident for the rest of the job.
        let mut transformed: Vec<(u32, Make)> = Vec::with_capacity(self.params.len());
        let mut copied: Vec<(u32, Make)> = Vec::new();
        let mut used = std::collections::BTreeSet::new();
        let mut bytes_written = 0;
        self.each_tensor(rank, |i, how, into_transformed, t| {
            let list = if into_transformed { &mut transformed } else { &mut copied };
            // `params.len()` fits in u32 (positions are u32 in the index).
            list.push((i as u32, how));
            bytes_written += t.nbytes;
            match &t.source {
                TensorSource::Raw { src_rank } => {
                    used.insert(*src_rank);
                }
                TensorSource::Pieces { pieces, .. } => used.extend(pieces.iter().map(|p| p.src_rank)),
            }
        })?;
        // Ascending, as `RankOrder::src_ranks` keeps them; the order reads them highest first.
        let src_ranks: Vec<u32> = used.into_iter().collect();
        let used: Vec<u32> = src_ranks.iter().rev().copied().collect();
        // Both lists are in parameter order: ties broken by it sort as a stable sort would,
        // without its buffer. The keys are computed as compared (a cache took 24 bytes a
        // tensor); the lists are usually in order already, which the sort finds in one pass.
        transformed.sort_unstable_by_key(|&(i, _)| (self.appearance_key(&used, i as usize), i));
        copied.sort_unstable_by_key(|&(i, _)| (self.appearance_key(&used, i as usize), i));
        // Within the capacity: each parameter is in one of the lists at most once.
        transformed.append(&mut copied);
        transformed.shrink_to_fit();
        Ok(RankOrder { rank, stage, tensors: transformed, src_ranks, bytes_written })
    }

    /// The tensor plans of `entries` (consecutive entries of `order`).
    pub(crate) fn tensor_plans(&self, order: &RankOrder, entries: &[(u32, Make)]) -> Result<Vec<TensorPlan>> {
        let local = u64::from(order.rank) % self.dst_stage_devices;
        entries.iter().map(|&(i, how)| self.make(&self.params[i as usize], how, order.stage, local)).collect()
    }

    /// The stage of destination rank `rank`, or the error naming the valid ranks.
    fn check_rank(&self, rank: u32) -> Result<u32> {
        let count = self.dst_rank_count();
        if rank >= count {
            let what = match &self.dst_strategy_path {
                Some(d) => format!("the destination strategy {} has {count} rank(s)", d.display()),
                None => "the destination is one complete checkpoint (no destination strategy), 1 rank".to_string(),
            };
            return Err(Error::Invalid(format!(
                "destination rank {rank} does not exist: {what}; valid ranks are 0 to {}",
                count.saturating_sub(1)
            )));
        }
        Ok((u64::from(rank) / self.dst_stage_devices) as u32)
    }

    /// Calls `f(parameter, how, transformed, tensor)` for each tensor of destination rank
    /// `rank`, in parameter order (`transformed`: among the transformed parameters, which are
    /// written before the copied ones).
    fn each_tensor(&self, rank: u32, mut f: impl FnMut(usize, Make, bool, TensorPlan)) -> Result<()> {
        let stage = self.check_rank(rank)?;
        let local = u64::from(rank) % self.dst_stage_devices;
        for (i, p) in self.params.iter().enumerate() {
            let d = &p.dst;
            let (how, into_transformed) = if self.has_dst_strategy && d.in_dst() && !d.stages().contains(&stage) {
                // Outside this rank's stage: MindSpore drops it unless the source strategy lacks it.
                if d.in_src() {
                    continue;
                }
                (Make::Raw, false)
            } else if self.has_dst_strategy && !d.in_dst() {
                // Not in the destination strategy: MindSpore copies the source slice as it is;
                // a sharded one would be a wrong tensor, so write the complete tensor.
                match p.kind {
                    SrcKind::Sharded(_) | SrcKind::Chunks { .. } => (Make::Whole, false),
                    _ => (Make::Raw, false),
                }
            } else if !d.in_src() || matches!(p.kind, SrcKind::Raw) {
                // A string the source strategy covers is copied whole only because it cannot be
                // sliced: it keeps its place among the transformed parameters, so a complete
                // source comes back in its own order.
                (Make::Raw, d.in_src() && p.dtype == DType::Str)
            } else {
                (Make::Box, true)
            };
            f(i, how, into_transformed, self.make(p, how, stage, local)?);
        }
        Ok(())
    }

    /// The tensor of parameter `p` for local rank `local` of destination stage `stage`.
    fn make(&self, p: &ParamInfo, how: Make, stage: u32, local: u64) -> Result<TensorPlan> {
        match how {
            Make::Raw => self.raw(p, local),
            Make::Whole => self.pieces(p, Region::full(self.full(p)), local),
            Make::Box => {
                let layout = p.dst.layout(stage);
                let dst_box = layout.map_or_else(|| Region::full(self.full(p)), |l| l.rank_box(local));
                self.pieces(p, dst_box, local)
            }
        }
    }

    /// MindSpore loads the needed source files from the highest rank down and writes parameters
    /// in order of first appearance, transformed ones before copied ones. `used` (the source
    /// ranks read, in any order) is left highest first.
    fn order_like_mindspore<T>(&self, used: &mut Vec<u32>, transformed: &mut [(usize, T)], copied: &mut [(usize, T)]) {
        used.sort_unstable_by(|a, b| b.cmp(a));
        used.dedup();
        transformed.sort_by_cached_key(|(i, _)| self.appearance_key(used, *i));
        copied.sort_by_cached_key(|(i, _)| self.appearance_key(used, *i));
    }

    /// Where parameter `i` comes in [`Plan::order_like_mindspore`]'s order, given the source
    /// ranks read highest first: (its place in a folder's strategy order, the first of `used`
    /// holding it, its position there). Files of one stage list their parameters in the same
    /// order, so this is the order of first appearance.
    fn appearance_key(&self, used: &[u32], i: usize) -> (u32, usize, u32) {
        let p = &self.params[i];
        let h = p.held.as_slice();
        let (k, pos) = used
            .iter()
            .enumerate()
            .find_map(|(k, u)| h.binary_search_by_key(u, |x| x.0).ok().map(|j| (k, h[j].1)))
            .unwrap_or((usize::MAX, u32::MAX));
        (self.folder_order.as_ref().map_or(0, |o| o[i]), k, pos)
    }

    fn raw(&self, p: &ParamInfo, local: u64) -> Result<TensorPlan> {
        let want_local = local % self.src_stage_devices;
        let held = p.held.as_slice();
        let j = held
            .iter()
            .position(|&(h, _)| u64::from(h - self.src_base) % self.src_stage_devices == want_local)
            .unwrap_or(0);
        let (src_rank, pos) = held[j];
        let t = &self.sources[&src_rank].index.tensors[pos as usize];
        let dims = if t.dtype == DType::Str { t.raw_dims().to_vec() } else { t.shape().to_vec() };
        Ok(TensorPlan {
            name: self.name(p).to_string(),
            dtype: t.dtype,
            dims,
            nbytes: t.nbytes(),
            source: TensorSource::Raw { src_rank },
        })
    }

    fn pieces(&self, p: &ParamInfo, dst_box: Region, local: u64) -> Result<TensorPlan> {
        let pieces = match &p.kind {
            SrcKind::Complete | SrcKind::Raw => {
                let src_rank = p.held.as_slice()[0].0;
                vec![CopyPiece { src_rank, src_box: Region::full(self.full(p)), region: dst_box.clone() }]
            }
            SrcKind::Sharded(sh) => {
                let Sharded { stage, layout, slices, .. } = &**sh;
                let base = local % self.src_stage_devices;
                let stage_start = u64::from(self.src_base) + u64::from(*stage) * self.src_stage_devices;
                slices
                    .iter()
                    .filter_map(|(b, holder)| {
                        let region = b.intersect(&dst_box)?;
                        let replica = layout.replica_near(*holder, base) % self.src_stage_devices;
                        let mut src_rank = (stage_start + replica) as u32;
                        // Redundancy removed: the replica MindSpore would read may not hold it.
                        if self.sparse && !p.held.has(src_rank) {
                            src_rank = (stage_start + holder) as u32;
                        }
                        Some(CopyPiece { src_rank, src_box: b.clone(), region })
                    })
                    .collect()
            }
            // Several holders: destination ranks take turns, so reads spread over them.
            SrcKind::Chunks(c) => c
                .slices
                .iter()
                .filter_map(|(b, holders)| {
                    let region = b.intersect(&dst_box)?;
                    let src_rank = *holders.get((local % holders.len().max(1) as u64) as usize)?;
                    Some(CopyPiece { src_rank, src_box: b.clone(), region })
                })
                .collect(),
        };
        let nbytes = dst_box.numel() * p.dtype.size();
        Ok(TensorPlan {
            name: self.name(p).to_string(),
            dtype: p.dtype,
            dims: dst_box.shape.clone(),
            nbytes,
            source: TensorSource::Pieces { dst_box, pieces },
        })
    }

    /// A parameter's name ([`param_name`]).
    fn name<'a>(&'a self, p: &ParamInfo) -> &'a str {
        param_name(&self.sources, p)
    }

    /// A parameter's full shape ([`param_full`]).
    fn full<'a>(&'a self, p: &'a ParamInfo) -> &'a [u64] {
        param_full(&self.sources, p)
    }

    /// The stored tensor `name` in source rank `rank`.
    pub fn tensor_info(&self, rank: u32, name: &str) -> Result<&TensorInfo> {
        let s = self.sources.get(&rank).ok_or_else(|| Error::Invalid(format!("source rank {rank} is not loaded")))?;
        s.index.get(name).ok_or_else(|| Error::ShapeMismatch {
            path: s.path().to_path_buf(),
            rank,
            param: name.to_string(),
            detail: "the parameter is missing from this rank's checkpoint".into(),
        })
    }

    /// The source ranks destination rank `rank` reads, highest first (MindSpore's order).
    pub fn src_ranks_for(&self, rank: u32) -> Result<Vec<u32>> {
        let mut v = self.rank_plan(rank)?.src_ranks();
        v.reverse();
        Ok(v)
    }

    /// How many parameters the sources hold.
    pub fn param_count(&self) -> usize {
        self.params.len()
    }

    /// Names of all parameters found in the sources.
    pub fn param_names(&self) -> impl Iterator<Item = &str> {
        self.params.iter().map(|p| self.name(p))
    }

    /// The full shape of parameter `name` and, for destination pipeline stage `stage`, the
    /// resolved destination layout (`None` when the destination does not split it).
    pub fn dst_layout(&self, name: &str, stage: u32) -> Option<(&[u64], Option<&ResolvedLayout>)> {
        let i = self.param_index.binary_search_by(|&i| self.name(&self.params[i as usize]).cmp(name)).ok()?;
        let p = &self.params[self.param_index[i] as usize];
        let l = p.dst.layout(stage).map(|l| &**l);
        Some((self.full(p), l))
    }

    /// Whether a parameter exists in the sources.
    pub fn has_param(&self, name: &str) -> bool {
        self.param_index.binary_search_by(|&i| self.name(&self.params[i as usize]).cmp(name)).is_ok()
    }
}

/// Resolves what the destination strategy says of a parameter.
fn resolve_dst(
    p: &ParamInfo,
    name: &str,
    full: &[u64],
    src: Option<&Strategy>,
    dst: Option<&Strategy>,
    dst_stage_dev: u64,
    shared: &mut DstInterner,
) -> Result<DstInfo> {
    let in_src = src.is_none_or(|s| s.contains(name));
    let outside = |shared: &mut DstInterner| DstInfo(Some(shared.dst(DstShared { in_src, ..DstShared::default() })));
    let Some(d) = dst else {
        return Ok(outside(shared));
    };
    if !d.contains(name) {
        return Ok(outside(shared));
    }
    if p.dtype != DType::Str {
        for e in d.entries(name).into_iter().flatten() {
            match &e.layout.tensor_shape {
                Some(ts) if ts.as_slice() != full => {
                    return Err(Error::BadLayout {
                        path: d.path.clone(),
                        param: name.to_string(),
                        detail: format!(
                            "tensor_shape {ts:?} (stage {}), but the source checkpoints hold a tensor of shape {:?}",
                            e.stage, full
                        ),
                    })
                }
                _ => {}
            }
        }
    }
    let mut dst = DstShared { in_src, in_dst: true, stages: d.stages_of(name), first: None, later: None };
    dst.stages.shrink_to_fit();
    if in_src && !matches!(p.kind, SrcKind::Raw) {
        let mut resolve = |rank: u64| -> Result<Option<std::sync::Arc<ResolvedLayout>>> {
            let Some(l) = d.layout_for_rank(name, rank) else {
                return Ok(None);
            };
            Ok(Some(shared.layout(ResolvedLayout::new(l, full, name, &d.path)?)))
        };
        if dst.stages.contains(&0) {
            dst.first = resolve(0)?;
        }
        if dst.stages.iter().any(|&s| s > 0) {
            dst.later = resolve(dst_stage_dev)?;
        }
    }
    Ok(DstInfo(Some(shared.dst(dst))))
}

/// The source layout of a sharded parameter, its slices, and the full shape they imply.
fn resolve_sharded(
    p: &ParamInfo,
    name: &str,
    st: &mut Strategy,
    sources: &BTreeMap<u32, Source>,
    base: u32,
    stage_dev: u64,
    sparse: bool,
) -> Result<SrcKind> {
    let no_layout = || Error::Invalid(format!("no layout for '{name}'"));
    let layout = st.layout(name).ok_or_else(no_layout)?;
    let mut stages = st.stages_of(name);
    stages.sort_unstable();
    // The lowest stage whose files hold the parameter (its first rank's, or with redundancy
    // removed any rank's).
    let holds = |s: u32| {
        let first = u64::from(base) + u64::from(s) * stage_dev;
        match sparse {
            false => p.held.has(first as u32),
            true => p.held.ranks().any(|h| (first..first + stage_dev).contains(&u64::from(h))),
        }
    };
    let stage = stages.iter().copied().find(|&s| holds(s)).ok_or_else(|| {
        let r = base + (u64::from(stages[0]) * stage_dev) as u32;
        let src = &sources[&r];
        mismatch(
            src,
            name,
            format!(
                "the source strategy puts it in stage(s) {stages:?}, but the checkpoint of rank {r} (first rank of \
                     stage {}) does not contain it",
                stages[0]
            ),
        )
    })?;
    let start = u64::from(base) + u64::from(stage) * stage_dev;
    // The stage's first rank holding it (the first rank, unless redundancy was removed).
    let first_holder =
        p.held.ranks().find(|&h| (start..start + stage_dev).contains(&u64::from(h))).unwrap_or(start as u32);
    let first = &sources[&first_holder];
    let stored0 = &first.index.get(name).map(|t| t.shape().to_vec()).unwrap_or_default();
    if layout.is_flattened(stored0.len()) {
        // MindSpore's flattened JSON form: merge dims back so that each run, split as the
        // layout says (and by the optimizer shard on dim 0), gives the stored slice.
        let opt = u64::try_from(effective_opt_size(layout)).unwrap_or(0);
        let what = format!("the shape {stored0:?} rank {} stores (each dim times its split)", first.rank);
        let nested = layout
            .unflatten(stored0.len(), &what, |j, prod, parts| {
                let slice = stored0[j].checked_mul(parts);
                let slice = if j == 0 && opt > 0 { slice.and_then(|x| x.checked_mul(opt)) } else { slice };
                slice == Some(prod)
            })
            .map_err(|d| mismatch(first, name, format!("{d} (source strategy {})", st.path.display())))?;
        st.unflatten_param(name, nested.tensor_shape.as_deref().unwrap_or_default())?;
    }
    let layout = st.layout(name).ok_or_else(no_layout)?;
    if stored0.len() != layout.tensor_map.len() {
        return Err(mismatch(
            first,
            name,
            format!(
                "stored shape {stored0:?} has {} dims but the source strategy's tensor_map {:?} has {}",
                stored0.len(),
                layout.tensor_map,
                layout.tensor_map.len()
            ),
        ));
    }
    let full = full_shape_from_slice(layout, stored0);
    if let Some(ts) = &layout.tensor_shape {
        if ts != &full {
            return Err(mismatch(
                first,
                name,
                format!(
                    "stored slice {stored0:?} implies full shape {full:?}, but the strategy says tensor_shape {ts:?}"
                ),
            ));
        }
    }
    let resolved = ResolvedLayout::new(layout, &full, name, &st.path)?;
    let mut slices: Vec<(Region, u64)> = Vec::new();
    // With redundancy removed: every box some rank should hold, and those ranks.
    let mut unheld: Vec<(Region, Vec<u32>)> = Vec::new();
    for local in 0..stage_dev {
        let r = (start + local) as u32;
        let src = &sources[&r];
        let b = resolved.rank_box(local);
        let Some(t) = src.index.get(name) else {
            if !sparse {
                return Err(mismatch(
                    src,
                    name,
                    format!("missing from this rank's checkpoint (stage {stage} holds it)"),
                ));
            }
            match unheld.iter_mut().find(|(x, _)| *x == b) {
                Some((_, ranks)) => ranks.push(r),
                None => unheld.push((b, vec![r])),
            }
            continue;
        };
        if t.shape() != b.shape.as_slice() {
            return Err(mismatch(
                src,
                name,
                format!(
                    "stored shape {:?}, but the source strategy (dev_matrix {:?}, tensor_map {:?}, opt shard size {}) gives \
                     this rank a slice of {:?} of the full {:?}",
                    t.shape(), layout.dev_matrix, layout.tensor_map, layout.opt_shard_size, b.shape, full
                ),
            ));
        }
        if !slices.iter().any(|(x, _)| *x == b) {
            slices.push((b, local));
        }
    }
    if let Some((b, ranks)) = unheld.iter().find(|(b, _)| !slices.iter().any(|(x, _)| x == b)) {
        return Err(Error::Source {
            path: first.path().to_path_buf(),
            detail: format!(
                "parameter '{}': no source rank holds its slice at offset {:?} of shape {:?} (saved with \
                 remove_redundancy, one of {} should hold it)",
                name,
                b.offset,
                b.shape,
                fmt_rank_folders(ranks)
            ),
        });
    }
    Ok(SrcKind::Sharded(Box::new(Sharded { full, stage, layout: resolved, slices })))
}

/// "N parameter(s) (a, b, c, d, e, ...)": the count and at most five names.
fn fmt_names(names: &[String]) -> String {
    let shown: Vec<&str> = names.iter().take(5).map(String::as_str).collect();
    let more = if names.len() > 5 { ", ..." } else { "" };
    format!("{} parameter(s) ({}{more})", names.len(), shown.join(", "))
}

/// Rank folders as short ranges ("rank_0, rank_2..rank_5, rank_9"), at most 16 of them, then
/// the count.
pub fn fmt_rank_folders(r: &[u32]) -> String {
    let mut runs: Vec<(u32, u32)> = Vec::new();
    for &x in r {
        match runs.last_mut() {
            Some((_, e)) if e.checked_add(1) == Some(x) => *e = x,
            _ => runs.push((x, x)),
        }
    }
    let mut parts: Vec<String> = runs
        .iter()
        .take(16)
        .map(|&(a, b)| if a == b { format!("rank_{a}") } else { format!("rank_{a}..rank_{b}") })
        .collect();
    if runs.len() > 16 {
        parts.push("...".into());
    }
    let text = parts.join(", ");
    if r.len() > 1 {
        format!("{text} ({} ranks)", r.len())
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_parameter_record_is_small() {
        // Kept per parameter for the whole job (300,000 in the benchmark's many small tensors):
        // 144 bytes plus a name and a shape of its own before.
        // 80 with the stages and both destination layouts in each record.
        assert!(std::mem::size_of::<super::ParamInfo>() <= 48, "{}", std::mem::size_of::<super::ParamInfo>());
    }

    /// The heap one thread allocates (the test's own, whatever other tests do meanwhile).
    mod thread_heap {
        use std::alloc::{GlobalAlloc, Layout, System};
        use std::cell::Cell;

        thread_local! {
            static LIVE: Cell<isize> = const { Cell::new(0) };
            static PEAK: Cell<isize> = const { Cell::new(0) };
        }

        fn grew(n: isize) {
            // `try_with`: nothing is counted while a thread's locals are torn down.
            let _ = LIVE.try_with(|l| {
                l.set(l.get() + n);
                let _ = PEAK.try_with(|p| p.set(p.get().max(l.get())));
            });
        }

        /// The system allocator, counting each thread's live bytes.
        struct Counting;

        // SAFETY: every call is passed on to the system allocator unchanged; only the calling
        // thread's counters (const-initialised, without destructors) are updated.
        #[allow(unsafe_code)]
        unsafe impl GlobalAlloc for Counting {
            unsafe fn alloc(&self, l: Layout) -> *mut u8 {
                grew(l.size() as isize);
                // SAFETY: the caller's layout, as GlobalAlloc::alloc requires.
                unsafe { System.alloc(l) }
            }
            unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
                grew(-(l.size() as isize));
                // SAFETY: `p` came from `alloc` with layout `l`.
                unsafe { System.dealloc(p, l) }
            }
            unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
                grew(new as isize - l.size() as isize);
                // SAFETY: `p` came from `alloc` with layout `l`, as the caller guarantees.
                unsafe { System.realloc(p, l, new) }
            }
        }

        #[global_allocator]
        static COUNTING: Counting = Counting;

        /// Bytes this thread allocated at its peak during `f`, beyond what it held before.
        pub(super) fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
            let before = LIVE.with(Cell::get);
            PEAK.with(|p| p.set(before));
            let out = f();
            (out, (PEAK.with(Cell::get) - before).max(0) as usize)
        }
    }

    /// A complete checkpoint of `n` tensors of 2 floats in `dir/src/rank_0`.
    fn complete_source(dir: &std::path::Path, n: usize) -> std::path::PathBuf {
        use crate::checkpoint::TensorHeader;
        let headers: Vec<TensorHeader> = (0..n)
            .map(|i| TensorHeader { name: format!("p{i}"), dtype: crate::DType::Float32, dims: vec![2], nbytes: 8 })
            .collect();
        let contents = vec![[0u8; 8]; n];
        let refs: Vec<&[u8]> = contents.iter().map(|c| &c[..]).collect();
        let src = dir.join("src");
        std::fs::create_dir_all(src.join("rank_0")).unwrap();
        let bytes = crate::ckpt::layout(&headers, crate::ckpt::CHUNK_BYTES).render(&refs);
        std::fs::write(src.join("rank_0/model.ckpt"), bytes).unwrap();
        src
    }

    #[test]
    fn a_rank_order_takes_8_bytes_a_tensor_while_it_is_made() {
        // A rank's order is made again for each rank written (and each counted): grown by
        // doubling as (usize, Make) pairs and sorted with a cache of keys it took 44 bytes a
        // tensor at its peak here (52, 15.6 MB, for 300,000), which the worker's heap kept
        // resident.
        const N: usize = 50_000;
        let dir = std::env::temp_dir().join(format!("reshard-rank-order-{}", std::process::id()));
        let plan = super::Plan::build(&complete_source(&dir, N), None, None, &Default::default()).unwrap();
        let (order, peak) = thread_heap::peak_during(|| plan.rank_order(0).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(order.tensors.len(), N);
        assert_eq!(std::mem::size_of_val(&order.tensors[0]), 8);
        assert!(peak <= 12 * N, "{} bytes a tensor", peak / N);
    }

    #[test]
    fn a_rank_order_makes_the_rank_plans_tensors_in_its_order() {
        // Several source ranks, two stages, transformed and copied parameters (the llama
        // example), and a complete folder of two files read in its strategy's order.
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let ex = root.join("examples/llama_tiny");
        let hf = root.join("tests/fixtures/st_era/hf");
        let plans = [
            super::Plan::build(
                &ex.join("train/checkpoint"),
                Some(&ex.join("train/strategy")),
                Some(&ex.join("finetune/strategy")),
                &Default::default(),
            ),
            super::Plan::build(
                &ex.join("train/checkpoint"),
                Some(&ex.join("train/strategy")),
                None,
                &Default::default(),
            ),
            super::Plan::build(&hf, None, Some(&hf.join("dst_strategy.ckpt")), &Default::default()),
        ];
        for plan in plans {
            let plan = plan.unwrap();
            for r in 0..plan.dst_rank_count() {
                let whole = plan.rank_plan(r).unwrap();
                let order = plan.rank_order(r).unwrap();
                assert_eq!(plan.tensor_plans(&order, &order.tensors).unwrap(), whole.tensors, "rank {r}");
                assert_eq!(order.src_ranks, whole.src_ranks(), "rank {r}");
                assert_eq!(order.bytes_written, whole.bytes_written(), "rank {r}");
            }
        }
    }

    #[test]
    fn rank_lists_stay_short() {
        assert_eq!(super::fmt_rank_folders(&[3]), "rank_3");
        assert_eq!(super::fmt_rank_folders(&[0, 2, 3, 4, 9]), "rank_0, rank_2..rank_4, rank_9 (5 ranks)");
        let many: Vec<u32> = (2..65536).collect();
        assert_eq!(super::fmt_rank_folders(&many), "rank_2..rank_65535 (65534 ranks)");
        let sparse: Vec<u32> = (0..1000).map(|x| x * 2).collect();
        assert!(super::fmt_rank_folders(&sparse).len() < 300);
    }
}
