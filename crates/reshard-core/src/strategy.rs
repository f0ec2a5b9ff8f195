//! MindSpore strategy files (`node_strategy.proto`, protobuf or JSON): parsing, the per-parameter
//! layouts they describe, and merging one file per pipeline stage into one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The protobuf messages of `node_strategy.proto` (package `mindspore.straspb`, proto2).
pub mod proto {
    #![allow(missing_docs)]
    // A message of one unpacked `repeated <kind> dim = 1`, as five of the schema's are.
    macro_rules! dims_message {
        ($name:ident, $kind:ident, $ty:ty) => {
            #[derive(Clone, PartialEq, prost::Message)]
            pub struct $name {
                #[prost($kind, repeated, packed = "false", tag = "1")]
                pub dim: Vec<$ty>,
            }
        };
    }
    dims_message!(ParallelStrategy, uint32, u32);
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ParallelStrategys {
        #[prost(uint32, required, tag = "1")]
        pub stage: u32,
        #[prost(message, repeated, tag = "2")]
        pub parallel_strategy: Vec<ParallelStrategy>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ParallelStrategyItem {
        #[prost(string, required, tag = "1")]
        pub node_name: String,
        #[prost(message, required, tag = "2")]
        pub parallel_strategys: ParallelStrategys,
    }
    dims_message!(DevMatrix, uint32, u32);
    dims_message!(TensorMap, int32, i32);
    dims_message!(ParamSplitShape, int64, i64);
    dims_message!(IndicesOffset, int64, i64);
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ParallelLayouts {
        #[prost(message, repeated, tag = "1")]
        pub dev_matrix: Vec<DevMatrix>,
        #[prost(message, repeated, tag = "2")]
        pub tensor_map: Vec<TensorMap>,
        #[prost(message, repeated, tag = "3")]
        pub param_split_shape: Vec<ParamSplitShape>,
        #[prost(message, repeated, tag = "4")]
        pub indices_offset: Vec<IndicesOffset>,
        #[prost(int32, required, tag = "5")]
        pub field: i32,
        #[prost(int32, required, tag = "6")]
        pub opt_weight_shard_step: i32,
        #[prost(int32, required, tag = "7")]
        pub opt_weight_shard_size: i32,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ParallelLayoutItem {
        #[prost(string, required, tag = "1")]
        pub param_name: String,
        #[prost(message, required, tag = "2")]
        pub parallel_layouts: ParallelLayouts,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ParallelStrategyMap {
        #[prost(uint32, required, tag = "1")]
        pub current_stage: u32,
        #[prost(message, repeated, tag = "2")]
        pub parallel_strategy_item: Vec<ParallelStrategyItem>,
        #[prost(message, repeated, tag = "3")]
        pub parallel_layout_item: Vec<ParallelLayoutItem>,
    }
}

/// How one parameter is laid out over the devices of one pipeline stage.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct ParamLayout {
    /// Device matrix of the stage (row-major, last axis fastest).
    pub dev_matrix: Vec<u64>,
    /// Per tensor dim, the device axes (counted from the right) splitting it; `[-1]` = not split.
    pub tensor_map: Vec<Vec<i64>>,
    /// Whether the file used the nested form (one TensorMap per dim). MindSpore builds the
    /// optimizer-shard layout differently for it.
    pub nested: bool,
    /// `opt_weight_shard_step`.
    pub opt_shard_step: i64,
    /// `opt_weight_shard_size` (-1 = all replicas).
    pub opt_shard_size: i64,
    /// `tensor_shape` when a JSON file gives it.
    pub tensor_shape: Option<Vec<u64>>,
}

impl ParamLayout {
    /// Devices in the stage.
    pub fn device_num(&self) -> u64 {
        self.dev_matrix.iter().product()
    }

    /// The complete (unsplit) layout of a tensor of `ndim` dims.
    pub fn complete(ndim: usize) -> ParamLayout {
        ParamLayout {
            dev_matrix: vec![1],
            tensor_map: vec![vec![-1]; ndim],
            nested: false,
            opt_shard_step: 0,
            opt_shard_size: 0,
            tensor_shape: None,
        }
    }
}

impl ParamLayout {
    /// Whether this is MindSpore's flattened JSON form for a tensor of `ndim` dims: its JSON
    /// writer lists a dim split over several device axes as several dims, one per axis, in both
    /// `tensor_shape` and `tensor_map` (a `[32, 64]` weight with dim 1 over axes (1, 0) becomes
    /// `tensor_shape [32, 2, 32]`, `tensor_map [-1, 1, 0]`; protobuf gives `[[-1], [1, 0]]`).
    /// Only the checkpoint's shape tells which dims to merge, so this is undone at plan time.
    pub fn is_flattened(&self, ndim: usize) -> bool {
        !self.nested
            && self.tensor_map.len() > ndim
            && self.tensor_shape.as_ref().is_some_and(|ts| !ts.is_empty() && ts.len() == self.tensor_map.len())
    }

    /// Undoes the flattened form (see [`ParamLayout::is_flattened`]) for a tensor of `ndim`
    /// dims: consecutive flattened dims are merged into one real dim when `fits(dim, product of
    /// their tensor_shape, product of their device splits)` says so; a merged run never holds a
    /// `-1` (a dim is either unsplit or split over device axes). The result is the nested
    /// layout, with `tensor_shape` the merged shape. `what` describes the shape `fits` checks
    /// against, for the message when no merge or more than one fits.
    pub fn unflatten(
        &self,
        ndim: usize,
        what: &str,
        fits: impl Fn(usize, u64, u64) -> bool,
    ) -> std::result::Result<ParamLayout, String> {
        let ts = self.tensor_shape.clone().unwrap_or_default();
        let map: Vec<i64> = self.tensor_map.iter().map(|a| a.first().copied().unwrap_or(-1)).collect();
        let n = ts.len();
        if map.len() != n || self.tensor_map.iter().any(|a| a.len() != 1) {
            return Err(format!("tensor_map {:?} does not match tensor_shape {ts:?}", self.tensor_map));
        }
        let nd = self.dev_matrix.len() as i64;
        // Only runs of distinct device axes merge (`push` refuses an axis used twice), so a
        // dim gains at most `dev_matrix.len()` flattened dims: this also bounds the work below.
        if n > ndim + self.dev_matrix.len() {
            return Err(format!(
                "the JSON strategy's tensor_shape {ts:?} with tensor_map {map:?} has {n} dims, too many to merge back \
                 into {what} ({ndim} dims plus at most one per device axis of dev_matrix {:?})",
                self.dev_matrix
            ));
        }
        let split = |a: i64| if a >= 0 && a < nd { self.dev_matrix[(nd - 1 - a) as usize] } else { 1 };
        // ways[i][j]: how many ways (capped at 2) the first i flattened dims make the first j real
        // dims; from[i][j]: where the last run starts in one of them.
        let mut ways = vec![vec![0u8; ndim + 1]; n + 1];
        let mut from = vec![vec![0usize; ndim + 1]; n + 1];
        ways[0][0] = 1;
        for i in 1..=n {
            for j in 1..=ndim.min(i) {
                let (mut prod, mut parts) = (Some(1u64), 1u64);
                for start in (0..i).rev() {
                    if i - start > 1 && map[start..i].contains(&-1) {
                        break;
                    }
                    prod = prod.and_then(|p| p.checked_mul(ts[start]));
                    parts = parts.saturating_mul(split(map[start]));
                    let Some(prod) = prod else { break };
                    if ways[start][j - 1] > 0 && fits(j - 1, prod, parts) {
                        if ways[i][j] == 0 {
                            from[i][j] = start;
                        }
                        ways[i][j] = ways[i][j].saturating_add(ways[start][j - 1]).min(2);
                    }
                }
            }
        }
        let context = || {
            format!(
                "the JSON strategy's tensor_shape {ts:?} with tensor_map {map:?} is MindSpore's flattened form of a dim \
                 split over several device axes (dev_matrix {:?}), to be merged back into {what}",
                self.dev_matrix
            )
        };
        match ways[n][ndim] {
            0 => return Err(format!("{}, but no runs of consecutive dims multiply to it", context())),
            1 => {}
            _ => return Err(format!("{}, and there is more than one way to merge them; refusing to guess", context())),
        }
        let mut runs = Vec::with_capacity(ndim);
        let mut i = n;
        for j in (1..=ndim).rev() {
            let start = from[i][j];
            runs.push(start..i);
            i = start;
        }
        runs.reverse();
        let tensor_map = runs.iter().map(|r| map[r.clone()].to_vec()).collect();
        let shape = runs.iter().map(|r| ts[r.clone()].iter().product()).collect();
        Ok(ParamLayout { tensor_map, nested: true, tensor_shape: Some(shape), ..self.clone() })
    }
}

/// One layout item of a parameter, with the pipeline stage it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct StageLayout {
    /// Pipeline stage (0 for files that are not merged).
    pub stage: u32,
    /// The layout.
    pub layout: ParamLayout,
}

/// A parsed strategy: for each parameter, its layout items in file order.
///
/// Kept compact: a strategy of 300,000 small parameters held every name four times and every
/// layout item in five allocations of its own (190 MB for the benchmark's 45 MB file). The
/// names now sit in one string, each distinct layout item is stored once (a model's
/// parameters share a few), and a parameter is four integers. [`Strategy::params`] gives the
/// parameters in order of first appearance, each with its layout items.
#[derive(Clone)]
pub struct Strategy {
    /// Where it came from (a file, or a folder of stage files).
    pub path: PathBuf,
    /// `parallel_strategy_item[0].stage` of the file (the stage a single-stage file was saved by).
    pub file_stage: Option<u32>,
    /// Every parameter name, one after the other.
    names: String,
    /// Parameters in order of first appearance.
    params: Vec<ParamRec>,
    /// The distinct layout items.
    items: Vec<StageLayout>,
    /// The items after the first of parameters with several (one per pipeline stage sharing
    /// it), as entry words (see [`ParamRec::first`]).
    more: Vec<Vec<u32>>,
    /// Boxed: a `Strategy` is passed around by value.
    lookup: Box<Lookup>,
}

/// What finds the parts of a [`Strategy`].
#[derive(Debug, Clone, Default)]
struct Lookup {
    /// Finds a parameter by name.
    by_name: HashIndex,
    /// Finds a layout item.
    item_ids: HashIndex,
    /// The spelling of a (parameter, stage) item whose name was neither `name` nor
    /// `"{stage}-{name}"` ("00-w"), to name both of two items for one stage.
    odd_spellings: HashMap<(u32, u32), String>,
}

/// A parameter of a [`Strategy`].
#[derive(Debug, Clone, Copy)]
struct ParamRec {
    /// Its name: `names[name_start..name_start + name_len]`.
    name_start: u32,
    name_len: u32,
    /// Its first layout item, as an entry word: the item's position in `items`, with
    /// [`PREFIXED`] set when the item was named `"{stage}-{name}"`.
    first: u32,
    /// Its further items: a position in `more`, or `u32::MAX`.
    more: u32,
}

/// The bit of an entry word that says its item was named with a stage prefix.
const PREFIXED: u32 = 1 << 31;

/// Positions found by a hash of what they hold: a hash taken by another value (a few of
/// 300,000 names) sends later ones to a list searched in full. Keyed by 32 bits of the hash:
/// 9 bytes a slot where 64 bits took 17 (8.9 -> 4.7 MB for 300,000 parameters).
#[derive(Debug, Clone, Default)]
struct HashIndex {
    first: HashMap<u32, u32>,
    collided: Vec<u32>,
}

impl HashIndex {
    fn hash(x: &(impl std::hash::Hash + ?Sized)) -> u64 {
        use std::hash::Hasher;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        x.hash(&mut h);
        h.finish()
    }

    /// The position with hash `h` for which `is` holds.
    fn find(&self, h: u64, is: impl Fn(u32) -> bool) -> Option<u32> {
        match self.first.get(&(h as u32)) {
            Some(&i) if is(i) => Some(i),
            Some(_) => self.collided.iter().copied().find(|&i| is(i)),
            None => None,
        }
    }

    /// Records position `i` (not yet present) under hash `h`.
    fn insert(&mut self, h: u64, i: u32) {
        if let std::collections::hash_map::Entry::Vacant(e) = self.first.entry(h as u32) {
            e.insert(i);
        } else {
            self.collided.push(i);
        }
    }

    fn clear(&mut self) {
        self.first.clear();
        self.collided.clear();
    }
}

/// The layout items of one parameter of a [`Strategy`], in file order.
#[derive(Clone)]
pub struct Entries<'a> {
    items: &'a [StageLayout],
    first: Option<u32>,
    rest: std::slice::Iter<'a, u32>,
}

impl<'a> Iterator for Entries<'a> {
    type Item = &'a StageLayout;
    fn next(&mut self) -> Option<&'a StageLayout> {
        let w = self.first.take().or_else(|| self.rest.next().copied())?;
        self.items.get((w & !PREFIXED) as usize)
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = usize::from(self.first.is_some()) + self.rest.len();
        (n, Some(n))
    }
}

impl ExactSizeIterator for Entries<'_> {}

impl std::fmt::Debug for Entries<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.clone()).finish()
    }
}

impl serde::Serialize for Entries<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_seq(self.clone())
    }
}

/// The parameters of a strategy formatted as the list of `(name, items)` pairs it once was (the
/// plan fingerprint hashes this text, so it must not change).
pub(crate) struct ParamsDebug<'a>(pub(crate) &'a Strategy);

impl std::fmt::Debug for ParamsDebug<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.params()).finish()
    }
}

impl std::fmt::Debug for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Strategy")
            .field("path", &self.path)
            .field("params", &ParamsDebug(self))
            .field("file_stage", &self.file_stage)
            .finish()
    }
}

/// Equal when they come from the same path and give the same parameters, in the same order,
/// the same layout items.
impl PartialEq for Strategy {
    fn eq(&self, other: &Strategy) -> bool {
        self.path == other.path
            && self.file_stage == other.file_stage
            && self.params.len() == other.params.len()
            && self.params().zip(other.params()).all(|((a, x), (b, y))| a == b && x.eq(y))
    }
}

impl serde::Serialize for Strategy {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        struct Params<'a>(&'a Strategy);
        impl serde::Serialize for Params<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.collect_seq(self.0.params())
            }
        }
        let mut st = s.serialize_struct("Strategy", 3)?;
        st.serialize_field("path", &self.path)?;
        st.serialize_field("params", &Params(self))?;
        st.serialize_field("file_stage", &self.file_stage)?;
        st.end()
    }
}

/// Splits a merged layout name `"<stage>-<param>"`. Only a decimal prefix counts as a stage, so
/// parameter names that contain `-` survive (MindSpore splits on every `-` and fails on them).
pub fn split_stage_name(name: &str) -> (u32, &str) {
    if let Some((pre, rest)) = name.split_once('-') {
        if !pre.is_empty() && pre.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(stage) = pre.parse::<u32>() {
                return (stage, rest);
            }
        }
    }
    (0, name)
}

/// Devices per pipeline stage that a strategy may describe.
pub const MAX_DEVICES: u64 = 1 << 24;

/// Ranks (devices times pipeline stages) that a strategy may describe: rank numbers and counts
/// are 32-bit everywhere (plans, rank folders, the C API).
pub const MAX_RANKS: u64 = u32::MAX as u64;

fn bad(path: &Path, detail: impl Into<String>) -> Error {
    Error::Malformed { path: path.to_path_buf(), kind: "strategy", detail: detail.into() }
}

fn is_json(path: &Path) -> bool {
    path.to_string_lossy().ends_with(".json")
}

impl Strategy {
    /// Reads a strategy file (a name ending in `.json` is JSON, anything else protobuf), or a
    /// folder of per-stage files, which is merged in memory first.
    pub fn load(path: &Path) -> Result<Strategy> {
        if crate::storage::is_url(path) {
            return Strategy::load_object(path);
        }
        if path.is_dir() {
            let merged = merge_dir(path)?;
            let mut s = match &merged {
                Merged::Proto(m) => Strategy::from_proto(path, m)?,
                Merged::Json(v) => Strategy::from_json(path, v)?,
            };
            s.path = path.to_path_buf();
            return Ok(s);
        }
        // Mapped rather than read: a strategy of 300,000 parameters is 45 MB of JSON. Only
        // regular files are mapped (a FIFO or /dev/zero is refused by name).
        let bytes = crate::sys::MappedFile::open(path)?;
        if bytes.len() as u64 > crate::input::MAX_STRATEGY_BYTES {
            return Err(bad(
                path,
                format!(
                    "the file holds {} bytes; a strategy file may hold at most {}",
                    bytes.len(),
                    crate::input::MAX_STRATEGY_BYTES
                ),
            ));
        }
        if bytes.is_empty() {
            return Err(bad(path, "the file is empty"));
        }
        let s = if is_json(path) {
            Strategy::from_json_slice(path, &bytes)?
        } else {
            let m = decode_proto(path, &bytes)?;
            Strategy::from_proto(path, &m)?
        };
        // A file truncated while it was parsed (its map read zeros) is reported as such. Not
        // `check()`: `auto`'s ranks rename identical merged strategies over each other, which
        // changes the mapped file's ctime but not its bytes.
        if bytes.faulted() {
            bytes.check()?;
            return Err(bad(path, "the file changed while it was read"));
        }
        Ok(s)
    }

    /// A strategy file in an object store (one GET of the whole object), or a folder of stage
    /// files there (a prefix with no object of its own name): its objects are fetched into a
    /// temporary folder and merged as a local folder would be.
    fn load_object(path: &Path) -> Result<Strategy> {
        #[cfg(not(feature = "s3"))]
        return Err(crate::storage::no_object_storage(path));
        #[cfg(feature = "s3")]
        {
            use crate::storage::object;
            if object::head(path)?.is_none() {
                let prefix = path.to_string_lossy().trim_end_matches('/').to_string();
                let stages: Vec<PathBuf> = object::list(path)?
                    .into_iter()
                    .map(|(u, _)| u)
                    .filter(|u| u.to_string_lossy().strip_prefix(&prefix).is_some_and(|r| r.rfind('/') == Some(0)))
                    .collect();
                if stages.is_empty() {
                    return Err(bad(path, "no such object, and no strategy files under this prefix"));
                }
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let tmp = std::env::temp_dir().join(format!("reshard-strategy-{}-{n}", std::process::id()));
                let _ = std::fs::remove_dir_all(&tmp);
                std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, "create folder", e))?;
                let loaded = (|| {
                    for u in &stages {
                        let bytes = object::read_all(u, crate::input::MAX_STRATEGY_BYTES, "strategy")?;
                        let name = u.file_name().unwrap_or_default();
                        std::fs::write(tmp.join(name), bytes).map_err(|e| Error::io(tmp.join(name), "write", e))?;
                    }
                    Strategy::load(&tmp)
                })();
                let _ = std::fs::remove_dir_all(&tmp);
                let mut s = loaded?;
                s.path = path.to_path_buf();
                return Ok(s);
            }
            let bytes = crate::storage::object::read_all(path, crate::input::MAX_STRATEGY_BYTES, "strategy")?;
            if bytes.is_empty() {
                return Err(bad(path, "the file is empty"));
            }
            if is_json(path) {
                Strategy::from_json_slice(path, &bytes)
            } else {
                Strategy::from_proto(path, &decode_proto(path, &bytes)?)
            }
        }
    }

    fn push(&mut self, path: &Path, raw_name: &str, layout: ParamLayout) -> Result<()> {
        let (stage, name) = split_stage_name(raw_name);
        if layout.dev_matrix.is_empty() {
            return Err(Error::BadLayout {
                path: path.to_path_buf(),
                param: name.into(),
                detail: "empty dev_matrix (a pipeline-only strategy cannot be transformed)".into(),
            });
        }
        // Bounded so that every product of device counts below fits in 64 bits.
        let devices = layout.dev_matrix.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).unwrap_or(u64::MAX);
        if devices > MAX_DEVICES || layout.dev_matrix.len() > 32 {
            return Err(Error::BadLayout {
                path: path.to_path_buf(),
                param: name.into(),
                detail: format!(
                    "dev_matrix {:?} describes {devices} devices; at most {MAX_DEVICES} are supported",
                    layout.dev_matrix
                ),
            });
        }
        if layout.dev_matrix.contains(&0) {
            return Err(Error::BadLayout {
                path: path.to_path_buf(),
                param: name.into(),
                detail: format!("dev_matrix {:?} has a zero", layout.dev_matrix),
            });
        }
        let n = layout.dev_matrix.len() as i64;
        for m in layout.tensor_map.iter().flatten() {
            if *m < -1 || *m >= n {
                return Err(Error::BadLayout {
                    path: path.to_path_buf(),
                    param: name.into(),
                    detail: format!(
                        "tensor_map {:?} names device axis {m}, but dev_matrix {:?} has {n} axes",
                        layout.tensor_map, layout.dev_matrix
                    ),
                });
            }
        }
        let mut used: Vec<i64> = layout.tensor_map.iter().flatten().copied().filter(|&m| m >= 0).collect();
        used.sort_unstable();
        if used.windows(2).any(|w| w[0] == w[1]) {
            return Err(Error::BadLayout {
                path: path.to_path_buf(),
                param: name.into(),
                detail: format!("tensor_map {:?} uses one device axis for two tensor dims", layout.tensor_map),
            });
        }
        if layout.opt_shard_size < -1 || layout.opt_shard_step < 0 {
            return Err(Error::BadLayout {
                path: path.to_path_buf(),
                param: name.into(),
                detail: format!(
                    "opt_weight_shard_size {} / opt_weight_shard_step {}: the size must be -1 (all replicas), 0 or \
                     positive, the step 0 or positive",
                    layout.opt_shard_size, layout.opt_shard_step
                ),
            });
        }
        let found = self.find(name);
        if let Some(i) = found {
            if let Some(w) = self.words(i).find(|&w| self.items[(w & !PREFIXED) as usize].stage == stage) {
                let first = self.spelling(i, w);
                return Err(Error::BadLayout {
                    path: path.to_path_buf(),
                    param: name.into(),
                    detail: format!(
                        "two layout items for pipeline stage {stage}, '{first}' and '{raw_name}': the strategy is \
                         ambiguous; keep one"
                    ),
                });
            }
        }
        let i = match found {
            Some(i) => i,
            None => self.add_name(path, name)?,
        };
        let prefixed = raw_name.len() != name.len();
        let canonical = raw_name.strip_suffix(name).and_then(|p| p.strip_suffix('-')).map(|p| p == stage.to_string());
        if prefixed && canonical != Some(true) {
            self.lookup.odd_spellings.insert((i, stage), raw_name.to_string());
        }
        let w = self.intern(StageLayout { stage, layout }) | if prefixed { PREFIXED } else { 0 };
        let rec = &mut self.params[i as usize];
        match (rec.first, rec.more) {
            (u32::MAX, _) => rec.first = w,
            (_, u32::MAX) => {
                rec.more = self.more.len() as u32;
                self.more.push(vec![w]);
            }
            (_, m) => self.more[m as usize].push(w),
        }
        Ok(())
    }

    /// Adds parameter `name`, with no layout item yet.
    fn add_name(&mut self, path: &Path, name: &str) -> Result<u32> {
        // A strategy file holds at most 1 GiB, so its names fit; one built in memory is
        // refused past 4 GiB of names rather than wrapped.
        let (Ok(name_start), Ok(name_len), Ok(i)) =
            (u32::try_from(self.names.len()), u32::try_from(name.len()), u32::try_from(self.params.len()))
        else {
            return Err(bad(path, "more than 4 GiB of parameter names"));
        };
        if name_start.checked_add(name_len).is_none() || i == u32::MAX {
            return Err(bad(path, "more than 4 GiB of parameter names"));
        }
        self.names.push_str(name);
        self.params.push(ParamRec { name_start, name_len, first: u32::MAX, more: u32::MAX });
        self.lookup.by_name.insert(HashIndex::hash(name), i);
        Ok(i)
    }

    /// The position of `item` in `items`, added if new.
    fn intern(&mut self, item: StageLayout) -> u32 {
        let h = HashIndex::hash(&item);
        if let Some(i) = self.lookup.item_ids.find(h, |i| self.items[i as usize] == item) {
            return i;
        }
        let i = self.items.len() as u32;
        self.items.push(item);
        self.lookup.item_ids.insert(h, i);
        i
    }

    /// Position of parameter `name`.
    fn find(&self, name: &str) -> Option<u32> {
        self.lookup.by_name.find(HashIndex::hash(name), |i| self.name_of(i) == name)
    }

    fn name_of(&self, i: u32) -> &str {
        let r = &self.params[i as usize];
        &self.names[r.name_start as usize..(r.name_start + r.name_len) as usize]
    }

    /// The entry words of parameter `i`, in file order.
    fn words(&self, i: u32) -> impl Iterator<Item = u32> + '_ {
        let r = self.params[i as usize];
        let more: &[u32] = self.more.get(r.more as usize).map_or(&[], Vec::as_slice);
        std::iter::once(r.first).filter(|&w| w != u32::MAX).chain(more.iter().copied())
    }

    /// How the item of entry word `w` of parameter `i` was named in the file.
    fn spelling(&self, i: u32, w: u32) -> String {
        let name = self.name_of(i);
        let stage = self.items[(w & !PREFIXED) as usize].stage;
        match self.lookup.odd_spellings.get(&(i, stage)) {
            Some(s) => s.clone(),
            None if w & PREFIXED != 0 => format!("{stage}-{name}"),
            None => name.to_string(),
        }
    }

    fn entries_of(&self, i: u32) -> Entries<'_> {
        let r = self.params[i as usize];
        Entries {
            items: &self.items,
            first: (r.first != u32::MAX).then_some(r.first),
            rest: self.more.get(r.more as usize).map_or(&[][..], Vec::as_slice).iter(),
        }
    }

    /// The parameters in order of first appearance, each with its layout items.
    pub fn params(&self) -> impl ExactSizeIterator<Item = (&str, Entries<'_>)> + Clone + '_ {
        (0..self.params.len() as u32).map(move |i| (self.name_of(i), self.entries_of(i)))
    }

    /// Number of parameters.
    pub fn param_count(&self) -> usize {
        self.params.len()
    }

    /// The parameters as owned values (a copy of every layout item: for comparisons and tests).
    pub fn to_params(&self) -> Vec<(String, Vec<StageLayout>)> {
        self.params().map(|(n, e)| (n.to_string(), e.cloned().collect())).collect()
    }

    fn clear_params(&mut self) {
        self.names.clear();
        self.params.clear();
        self.lookup.by_name.clear();
        self.items.clear();
        self.lookup.item_ids.clear();
        self.more.clear();
        self.lookup.odd_spellings.clear();
    }

    /// Gives back what the parse grew beyond its needs.
    fn shrink(&mut self) {
        self.names.shrink_to_fit();
        self.params.shrink_to_fit();
        self.items.shrink_to_fit();
        self.lookup.by_name.first.shrink_to_fit();
        self.lookup.item_ids.first.shrink_to_fit();
    }

    /// Every layout item must span the stage's devices, and every stage the same number: the
    /// ranks of a stage are numbered over one device count (the first parameter's, as in
    /// MindSpore), so a parameter on fewer devices would be planned from the wrong slices and
    /// one on more would leave slices that no rank reads or writes. All ranks must also be
    /// numbered in 32 bits (rank folders, plans, the C API), so `devices * stages` is bounded.
    /// Called once a strategy is complete, which is also when its storage is trimmed.
    fn check_devices(&mut self) -> Result<()> {
        self.shrink();
        let Some((first, entries)) = self.params().next() else {
            return Ok(());
        };
        let Some(reference) = entries.min_by_key(|x| x.stage) else {
            return Ok(());
        };
        let devices = reference.layout.device_num();
        let mut last_stage = 0u32;
        for (name, entries) in self.params() {
            for e in entries {
                last_stage = last_stage.max(e.stage);
                let n = e.layout.device_num();
                if n == devices {
                    continue;
                }
                let detail = if e.stage == reference.stage {
                    format!(
                        "laid out on {n} devices (dev_matrix {:?}) in stage {}, but parameter '{first}' of the same stage \
                         on {devices} (dev_matrix {:?}); every parameter of a stage must span the same devices, or part \
                         of the data would be read or written nowhere",
                        e.layout.dev_matrix, e.stage, reference.layout.dev_matrix
                    )
                } else {
                    format!(
                        "pipeline stage {} has {n} devices (dev_matrix {:?} of this parameter), but stage {} has \
                         {devices} (dev_matrix {:?} of parameter '{first}'); every pipeline stage must have the same \
                         number of devices, or part of the data would be read or written nowhere",
                        e.stage, e.layout.dev_matrix, reference.stage, reference.layout.dev_matrix
                    )
                };
                return Err(Error::BadLayout { path: self.path.clone(), param: name.to_string(), detail });
            }
        }
        // Stages are numbered from 0 (gaps are refused by `stage_num`), so the highest stage
        // bounds the rank numbers. Both factors are bounded (2^24 devices, 2^32 stages): no overflow.
        let ranks = devices * (u64::from(last_stage) + 1);
        if ranks > MAX_RANKS {
            return Err(bad(
                &self.path,
                format!(
                    "{} pipeline stage(s) (up to stage {last_stage}) of {devices} devices (parameter '{first}') make \
                     {ranks} ranks; at most {MAX_RANKS} are supported",
                    u64::from(last_stage) + 1
                ),
            ));
        }
        Ok(())
    }

    fn empty(path: &Path, file_stage: Option<u32>) -> Strategy {
        Strategy {
            path: path.to_path_buf(),
            file_stage,
            names: String::new(),
            params: Vec::new(),
            items: Vec::new(),
            more: Vec::new(),
            lookup: Box::default(),
        }
    }

    /// Builds from a decoded protobuf map.
    pub fn from_proto(path: &Path, m: &proto::ParallelStrategyMap) -> Result<Strategy> {
        let file_stage = m.parallel_strategy_item.first().map(|i| i.parallel_strategys.stage);
        let mut s = Strategy::empty(path, file_stage);
        for item in &m.parallel_layout_item {
            let l = &item.parallel_layouts;
            let name = &item.param_name;
            let dev = l.dev_matrix.first().ok_or_else(|| Error::BadLayout {
                path: path.to_path_buf(),
                param: name.clone(),
                detail: "no dev_matrix".into(),
            })?;
            // MindSpore: more than one TensorMap means one per tensor dim, empty ones dropped.
            let nested = l.tensor_map.len() > 1;
            let tensor_map: Vec<Vec<i64>> = if nested {
                l.tensor_map
                    .iter()
                    .filter(|t| !t.dim.is_empty())
                    .map(|t| t.dim.iter().map(|&d| i64::from(d)).collect())
                    .collect()
            } else {
                l.tensor_map.first().map(|t| t.dim.iter().map(|&d| vec![i64::from(d)]).collect()).unwrap_or_default()
            };
            let layout = ParamLayout {
                dev_matrix: dev.dim.iter().map(|&d| u64::from(d)).collect(),
                tensor_map,
                nested,
                opt_shard_step: i64::from(l.opt_weight_shard_step),
                opt_shard_size: i64::from(l.opt_weight_shard_size),
                tensor_shape: None,
            };
            s.push(path, name, layout)?;
        }
        s.check_devices()?;
        Ok(s)
    }

    /// Builds from layouts already in memory (one made from a MindFormers `metadata.json`):
    /// `(stage, parameter, layout)`, checked as a file's are.
    pub fn from_layouts(path: &Path, items: Vec<(u32, String, ParamLayout)>) -> Result<Strategy> {
        let mut s = Strategy::empty(path, None);
        for (stage, name, layout) in items {
            s.push(path, &format!("{stage}-{name}"), layout)?;
        }
        s.check_devices()?;
        Ok(s)
    }

    /// Builds from the JSON form.
    pub fn from_json(path: &Path, v: &Value) -> Result<Strategy> {
        let obj = v.as_object().ok_or_else(|| bad(path, "the top level is not a JSON object"))?;
        let file_stage = obj
            .get("parallel_strategy_item")
            .and_then(Value::as_object)
            .and_then(|m| m.values().next())
            .and_then(|i| i.get("stage"))
            .and_then(Value::as_u64)
            .map(|s| s as u32);
        let mut s = Strategy::empty(path, file_stage);
        let Some(items) = obj.get("parallel_layout_item") else {
            return Ok(s);
        };
        let items = items.as_object().ok_or_else(|| bad(path, "parallel_layout_item is not an object"))?;
        for (name, item) in items {
            s.push(path, name, json_layout(path, name, item)?)?;
        }
        s.check_devices()?;
        Ok(s)
    }

    /// Rewrites every flattened layout item of `name` (MindSpore's JSON form, see
    /// [`ParamLayout::is_flattened`]) into the nested form, for a tensor of shape `full`.
    pub fn unflatten_param(&mut self, name: &str, full: &[u64]) -> Result<()> {
        let Some(i) = self.find(name) else {
            return Ok(());
        };
        let words: Vec<u32> = self.words(i).collect();
        let mut changed = Vec::with_capacity(words.len());
        for &w in &words {
            let e = &self.items[(w & !PREFIXED) as usize];
            if !e.layout.is_flattened(full.len()) {
                changed.push(w);
                continue;
            }
            let what = format!("the tensor's shape {full:?}");
            let layout = e
                .layout
                .unflatten(full.len(), &what, |j, prod, _| prod == full[j])
                .map_err(|detail| Error::BadLayout { path: self.path.clone(), param: name.to_string(), detail })?;
            let stage = e.stage;
            changed.push(self.intern(StageLayout { stage, layout }) | (w & PREFIXED));
        }
        if changed != words {
            let r = self.params[i as usize];
            let mut it = changed.into_iter();
            self.params[i as usize].first = it.next().unwrap_or(u32::MAX);
            if let Some(m) = self.more.get_mut(r.more as usize) {
                *m = it.collect();
            }
        }
        Ok(())
    }

    /// Builds from the JSON form's bytes, one layout item at a time: the whole file as a
    /// `serde_json::Value` takes about 18 times its size (800 MB for 300,000 parameters).
    /// Same result as parsing it whole and calling [`Strategy::from_json`], except that a key
    /// given twice is refused (`from_json` sees only the last one).
    pub fn from_json_slice(path: &Path, bytes: &[u8]) -> Result<Strategy> {
        // Every value parsed in full (the stream below skips unknown keys' values, which would
        // let through what a parse into `Value` refuses), and no key given twice.
        crate::input::check_unique_json_keys(bytes).map_err(|e| bad(path, e))?;
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let mut failed = None;
        let seed = JsonStrategySeed { path, failed: &mut failed };
        let parsed = serde::de::DeserializeSeed::deserialize(seed, &mut de).and_then(|s| de.end().map(|()| s));
        if let Some(e) = failed {
            return Err(e);
        }
        match parsed.map_err(|e| bad(path, format!("not valid JSON: {e}")))? {
            Some(mut s) => {
                s.check_devices()?;
                Ok(s)
            }
            None => Err(bad(path, "the top level is not a JSON object")),
        }
    }

    /// Whether the strategy has a layout for `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.find(name).is_some()
    }

    /// All layout items of `name`.
    pub fn entries(&self, name: &str) -> Option<Entries<'_>> {
        self.find(name).map(|i| self.entries_of(i))
    }

    /// The stages a parameter belongs to.
    pub fn stages_of(&self, name: &str) -> Vec<u32> {
        self.entries(name).map(|e| e.map(|x| x.stage).collect()).unwrap_or_default()
    }

    /// The layout MindSpore uses for a parameter when it is not choosing for a particular rank:
    /// the item of the lowest stage.
    pub fn layout(&self, name: &str) -> Option<&ParamLayout> {
        let e = self.entries(name)?;
        e.min_by_key(|x| x.stage).map(|x| &x.layout)
    }

    /// The layout used for destination rank `rank` (MindSpore's `_convert_to_list(rank_id)`:
    /// a rank of stage 0 takes the stage-0 item, a rank of a later stage the last later item).
    pub fn layout_for_rank(&self, name: &str, rank: u64) -> Option<&ParamLayout> {
        let mut e = self.entries(name)?;
        let mut chosen = e.next()?;
        let stage_dev = self.stage_device_num().unwrap_or(1).max(1);
        let in_first = rank / stage_dev == 0;
        for x in e {
            if (in_first && x.stage == 0) || (!in_first && x.stage > 0) {
                chosen = x;
            }
        }
        Some(&chosen.layout)
    }

    /// Devices per pipeline stage: the first parameter's device count, as MindSpore takes it.
    pub fn stage_device_num(&self) -> Result<u64> {
        let first = self.params().next().ok_or_else(|| bad(&self.path, "the strategy has no parameter layouts"))?;
        Ok(first.1.min_by_key(|x| x.stage).map_or(1, |x| x.layout.device_num()))
    }

    /// Number of pipeline stages. Stages must be 0..n without gaps.
    pub fn stage_num(&self) -> Result<u32> {
        let mut stages: Vec<u32> = self.params().flat_map(|(_, e)| e.map(|x| x.stage)).collect();
        stages.sort_unstable();
        stages.dedup();
        for (i, s) in stages.iter().enumerate() {
            if *s != i as u32 {
                return Err(bad(
                    &self.path,
                    format!("the strategy does not contain all pipeline stages: found stages {stages:?}"),
                ));
            }
        }
        Ok(stages.len().max(1) as u32)
    }

    /// Total ranks: devices per stage times stages (at most [`MAX_RANKS`], checked at load).
    pub fn rank_num(&self) -> Result<u64> {
        let (devices, stages) = (self.stage_device_num()?, self.stage_num()?);
        devices.checked_mul(u64::from(stages)).filter(|&n| n <= MAX_RANKS).ok_or_else(|| {
            bad(
                &self.path,
                format!("{stages} pipeline stage(s) of {devices} devices; at most {MAX_RANKS} ranks are supported"),
            )
        })
    }
}

/// One JSON layout item as a [`ParamLayout`].
fn json_layout(path: &Path, name: &str, item: &Value) -> Result<ParamLayout> {
    let err = |d: &str| Error::BadLayout { path: path.to_path_buf(), param: name.to_string(), detail: d.into() };
    let ints = |key: &str| -> Result<Vec<i64>> {
        item.get(key)
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(Value::as_i64).collect::<Option<Vec<_>>>())
            .ok_or_else(|| err(&format!("'{key}' is missing or not a list of integers")))
    };
    let dev = ints("dev_matrix")?;
    if dev.iter().any(|&d| d < 0) {
        return Err(err("dev_matrix has a negative entry"));
    }
    let tm = item.get("tensor_map").and_then(Value::as_array).ok_or_else(|| err("'tensor_map' is missing"))?;
    let mut nested = false;
    let mut tensor_map = Vec::new();
    for e in tm {
        match e {
            Value::Array(a) => {
                nested = true;
                let v: Option<Vec<i64>> = a.iter().map(Value::as_i64).collect();
                tensor_map.push(v.ok_or_else(|| err("tensor_map entry is not a list of integers"))?);
            }
            other => tensor_map.push(vec![other.as_i64().ok_or_else(|| err("tensor_map entry is not an integer"))?]),
        }
    }
    let num = |key: &str| -> Result<i64> {
        match item.get(key) {
            None => Ok(0),
            Some(v) => v.as_i64().ok_or_else(|| err(&format!("'{key}' is not an integer"))),
        }
    };
    // MindSpore's transform ignores an empty tensor_shape: it means "not given".
    let tensor_shape = match item.get("tensor_shape") {
        None => None,
        Some(_) => {
            let ts = ints("tensor_shape")?;
            if ts.iter().any(|&d| d < 0) {
                return Err(err(&format!("tensor_shape {ts:?} has a negative dim")));
            }
            Some(ts.into_iter().map(|d| d as u64).collect::<Vec<u64>>()).filter(|ts| !ts.is_empty())
        }
    };
    Ok(ParamLayout {
        dev_matrix: dev.into_iter().map(|d| d as u64).collect(),
        tensor_map,
        nested,
        opt_shard_step: num("opt_weight_shard_step")?,
        opt_shard_size: num("opt_weight_shard_size")?,
        tensor_shape,
    })
}

/// Streams the top-level JSON object of a strategy file into a [`Strategy`]. `None` when the
/// top level is valid JSON but not an object; errors of the strategy's content go to `failed`
/// (serde's error type cannot carry them).
struct JsonStrategySeed<'a> {
    path: &'a Path,
    failed: &'a mut Option<Error>,
}

impl<'de> serde::de::DeserializeSeed<'de> for JsonStrategySeed<'_> {
    type Value = Option<Strategy>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for JsonStrategySeed<'_> {
    type Value = Option<Strategy>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a strategy object")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> std::result::Result<Self::Value, A::Error> {
        use serde::de::Error as _;
        let mut s = Strategy::empty(self.path, None);
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "parallel_strategy_item" => {
                    // Small (one entry per operator): only the first entry's stage is used.
                    let v: Value = map.next_value()?;
                    s.file_stage = v
                        .as_object()
                        .and_then(|m| m.values().next())
                        .and_then(|i| i.get("stage"))
                        .and_then(Value::as_u64)
                        .map(|x| x as u32);
                }
                "parallel_layout_item" => {
                    // A repeated key replaces the earlier one, as in a parsed `Value`.
                    s.clear_params();
                    let items = LayoutItems { strategy: &mut s, failed: &mut *self.failed };
                    map.next_value_seed(items)?;
                    if self.failed.is_some() {
                        return Err(A::Error::custom("invalid layout item"));
                    }
                }
                _ => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(Some(s))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Self::Value, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(None)
    }
    fn visit_bool<E>(self, _: bool) -> std::result::Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> std::result::Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> std::result::Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> std::result::Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E>(self, _: &str) -> std::result::Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> std::result::Result<Self::Value, E> {
        Ok(None)
    }
}

/// `parallel_layout_item`: each item parsed and checked as it is read.
struct LayoutItems<'a> {
    strategy: &'a mut Strategy,
    failed: &'a mut Option<Error>,
}

impl<'de> serde::de::DeserializeSeed<'de> for LayoutItems<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for LayoutItems<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an object of layout items")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> std::result::Result<(), A::Error> {
        use serde::de::Error as _;
        let path = self.strategy.path.clone();
        while let Some(name) = map.next_key::<String>()? {
            let item: Value = map.next_value()?;
            let pushed = json_layout(&path, &name, &item).and_then(|l| self.strategy.push(&path, &name, l));
            if let Err(e) = pushed {
                *self.failed = Some(e);
                return Err(A::Error::custom("invalid layout item"));
            }
        }
        Ok(())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, _: A) -> std::result::Result<(), A::Error> {
        self.not_object()
    }
    fn visit_bool<E: serde::de::Error>(self, _: bool) -> std::result::Result<(), E> {
        self.not_object()
    }
    fn visit_i64<E: serde::de::Error>(self, _: i64) -> std::result::Result<(), E> {
        self.not_object()
    }
    fn visit_u64<E: serde::de::Error>(self, _: u64) -> std::result::Result<(), E> {
        self.not_object()
    }
    fn visit_f64<E: serde::de::Error>(self, _: f64) -> std::result::Result<(), E> {
        self.not_object()
    }
    fn visit_str<E: serde::de::Error>(self, _: &str) -> std::result::Result<(), E> {
        self.not_object()
    }
    fn visit_unit<E: serde::de::Error>(self) -> std::result::Result<(), E> {
        self.not_object()
    }
}

impl LayoutItems<'_> {
    fn not_object<E: serde::de::Error>(self) -> std::result::Result<(), E> {
        *self.failed = Some(bad(&self.strategy.path, "parallel_layout_item is not an object"));
        Err(E::custom("parallel_layout_item is not an object"))
    }
}

fn decode_proto(path: &Path, bytes: &[u8]) -> Result<proto::ParallelStrategyMap> {
    use prost::Message;
    proto::ParallelStrategyMap::decode(bytes).map_err(|e| {
        bad(path, format!("not a protobuf ParallelStrategyMap ({e}); a JSON strategy file must end in .json"))
    })
}

/// A merged strategy, in the format of its inputs.
#[derive(Debug, Clone)]
pub enum Merged {
    /// Protobuf inputs.
    Proto(proto::ParallelStrategyMap),
    /// JSON inputs.
    Json(Value),
}

impl Merged {
    /// Serialises as MindSpore writes the merged file.
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            Merged::Proto(m) => prost::Message::encode_to_vec(m),
            Merged::Json(v) => to_python_json(v),
        }
    }

    /// The conventional extension for the merged file.
    pub fn extension(&self) -> &'static str {
        match self {
            Merged::Proto(_) => "ckpt",
            Merged::Json(_) => "json",
        }
    }
}

/// JSON as Python's `json.dump` writes it (`", "` and `": "` separators, non-ASCII escaped),
/// so merged JSON strategies are byte-identical to MindSpore's.
pub fn to_python_json(v: &Value) -> Vec<u8> {
    struct PyFormatter;
    impl serde_json::ser::Formatter for PyFormatter {
        fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
            if first {
                Ok(())
            } else {
                w.write_all(b", ")
            }
        }
        fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
            if first {
                Ok(())
            } else {
                w.write_all(b", ")
            }
        }
        fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
            w.write_all(b": ")
        }
        fn write_string_fragment<W: ?Sized + std::io::Write>(&mut self, w: &mut W, s: &str) -> std::io::Result<()> {
            for c in s.chars() {
                if c.is_ascii() {
                    w.write_all(&[c as u8])?;
                } else {
                    let mut buf = [0u16; 2];
                    for u in c.encode_utf16(&mut buf) {
                        write!(w, "\\u{u:04x}")?;
                    }
                }
            }
            Ok(())
        }
    }
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, PyFormatter);
    let _ = serde::Serialize::serialize(v, &mut ser);
    out
}

/// The strategy files of a folder: every `*.ckpt`, or every `*.json`, sorted by name.
pub fn stage_files(dir: &Path) -> Result<(Vec<PathBuf>, bool)> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, "read folder", e))?;
    let (mut pb, mut js) = (Vec::new(), Vec::new());
    for e in rd {
        let e = e.map_err(|e| Error::io(dir, "read folder", e))?;
        let p = e.path();
        let ext = p.extension().and_then(|x| x.to_str());
        if !matches!(ext, Some("ckpt" | "json")) {
            continue;
        }
        if let Some(why) = crate::input::not_regular(&p) {
            return Err(Error::Source {
                path: p,
                detail: format!("{why}; a strategy folder's .ckpt and .json files must be regular files"),
            });
        }
        match ext {
            Some("ckpt") => pb.push(p),
            Some("json") => js.push(p),
            _ => {}
        }
    }
    if !pb.is_empty() && !js.is_empty() {
        return Err(Error::Source {
            path: dir.to_path_buf(),
            detail: "the strategy folder mixes .ckpt and .json files; they must be all one or the other".into(),
        });
    }
    if pb.is_empty() && js.is_empty() {
        return Err(Error::Source {
            path: dir.to_path_buf(),
            detail: "no strategy files (*.ckpt or *.json) in the folder".into(),
        });
    }
    let json = pb.is_empty();
    let mut files = if json { js } else { pb };
    files.sort();
    Ok((files, json))
}

/// Merges the per-stage strategy files of `dir` as MindSpore's `merge_pipeline_strategys`
/// does: byte-identical files and stages already seen are skipped, layout items are renamed
/// `"<stage>-<param>"`, items are concatenated and `current_stage` is set to 1.
pub fn merge_dir(dir: &Path) -> Result<Merged> {
    let (files, json) = stage_files(dir)?;
    merge_files(&files, json)
}

/// Merges the given stage files (all protobuf, or all JSON when `json`).
pub fn merge_files(files: &[PathBuf], json: bool) -> Result<Merged> {
    let mut seen_bytes = std::collections::HashSet::new();
    let mut merged_stages = Vec::new();
    // MindSpore skips a later file for a stage already merged. When both are stage files and
    // their layouts differ, which one is meant cannot be told: refuse, naming both. (A merged
    // file next to its stage files, as in MindFormers' output/strategy/, is skipped as before:
    // its items are all named "<stage>-<param>".)
    let merged_names = |mut names: std::slice::Iter<'_, String>| {
        names.len() > 0 && names.all(|n| n.split_once('-').is_some_and(|(p, _)| p.bytes().all(|b| b.is_ascii_digit())))
    };
    let two_for_one_stage = |first: &Path, f: &Path, stage: u64| Error::Source {
        path: f.to_path_buf(),
        detail: format!(
            "this file and {} are both for pipeline stage {stage} but their layouts differ: the strategy folder is \
             ambiguous; keep one file per stage",
            first.display()
        ),
    };
    if json {
        let mut strategy_items = Map::new();
        let mut layout_items = Map::new();
        let mut firsts: HashMap<u64, (&PathBuf, Map<String, Value>)> = HashMap::new();
        for f in files {
            let bytes = crate::input::read_capped(f, crate::input::MAX_STRATEGY_BYTES, "strategy")?;
            if !seen_bytes.insert(bytes.clone()) {
                continue;
            }
            let v: Value = serde_json::from_slice(&bytes).map_err(|e| bad(f, format!("not valid JSON: {e}")))?;
            crate::input::check_unique_json_keys(&bytes).map_err(|e| bad(f, e))?;
            let si = v.get("parallel_strategy_item").and_then(Value::as_object).filter(|m| !m.is_empty());
            let li = v.get("parallel_layout_item").and_then(Value::as_object).filter(|m| !m.is_empty());
            let (Some(si), Some(li)) = (si, li) else {
                return Err(bad(f, "the strategy file is empty (no strategy or layout items)"));
            };
            let stage = si.values().next().and_then(|i| i.get("stage")).and_then(Value::as_u64).unwrap_or(0);
            let names: Vec<String> = li.keys().cloned().collect();
            if !merged_names(names.iter()) {
                let (first, items) = firsts.entry(stage).or_insert_with(|| (f, li.clone()));
                if items != li {
                    return Err(two_for_one_stage(first, f, stage));
                }
            }
            if merged_stages.contains(&stage) {
                continue;
            }
            for (name, item) in li {
                layout_items.insert(format!("{stage}-{name}"), item.clone());
            }
            for (k, item) in si {
                strategy_items.insert(k.clone(), item.clone());
            }
            merged_stages.push(stage);
        }
        let mut out = Map::new();
        out.insert("current_stage".into(), Value::from(1));
        out.insert("parallel_strategy_item".into(), Value::Object(strategy_items));
        out.insert("parallel_layout_item".into(), Value::Object(layout_items));
        return Ok(Merged::Json(Value::Object(out)));
    }
    let mut out = proto::ParallelStrategyMap::default();
    let mut firsts: HashMap<u64, (&PathBuf, Vec<proto::ParallelLayoutItem>)> = HashMap::new();
    for f in files {
        let bytes = crate::input::read_capped(f, crate::input::MAX_STRATEGY_BYTES, "strategy")?;
        if !seen_bytes.insert(bytes.clone()) {
            continue;
        }
        if bytes.is_empty() {
            return Err(bad(f, "the strategy file is empty"));
        }
        let mut m = decode_proto(f, &bytes)?;
        if m.parallel_strategy_item.is_empty() || m.parallel_layout_item.is_empty() {
            return Err(bad(f, "the strategy file is empty (no strategy or layout items)"));
        }
        let stage = m.parallel_strategy_item[0].parallel_strategys.stage;
        let names: Vec<String> = m.parallel_layout_item.iter().map(|i| i.param_name.clone()).collect();
        if !merged_names(names.iter()) {
            let (first, items) = firsts.entry(u64::from(stage)).or_insert_with(|| (f, m.parallel_layout_item.clone()));
            if *items != m.parallel_layout_item {
                return Err(two_for_one_stage(first, f, u64::from(stage)));
            }
        }
        if merged_stages.contains(&u64::from(stage)) {
            continue;
        }
        for item in &mut m.parallel_layout_item {
            item.param_name = format!("{stage}-{}", item.param_name);
        }
        out.parallel_strategy_item.append(&mut m.parallel_strategy_item);
        out.parallel_layout_item.append(&mut m.parallel_layout_item);
        merged_stages.push(u64::from(stage));
    }
    out.current_stage = 1;
    Ok(Merged::Proto(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_whose_hashes_share_the_key_are_both_found() {
        // Two names with the same 32 bits of hash (a birthday search: about 80,000 names).
        let mut seen: HashMap<u32, String> = HashMap::new();
        let (a, b) = (0u32..)
            .find_map(|i| {
                let n = format!("model.p{i}.weight");
                let key = HashIndex::hash(n.as_str()) as u32;
                seen.insert(key, n.clone()).map(|other| (other, n))
            })
            .unwrap();
        let names = [a.as_str(), b.as_str(), "w"];
        let mut idx = HashIndex::default();
        for (i, n) in names.iter().enumerate() {
            idx.insert(HashIndex::hash(*n), i as u32);
        }
        for (i, n) in names.iter().enumerate() {
            assert_eq!(idx.find(HashIndex::hash(*n), |j| names[j as usize] == *n), Some(i as u32), "{n}");
        }
        assert_eq!(idx.find(HashIndex::hash("x"), |j| names[j as usize] == "x"), None);
    }

    #[test]
    fn stage_names_split_only_on_numeric_prefix() {
        assert_eq!(split_stage_name("1-model.w"), (1, "model.w"));
        assert_eq!(split_stage_name("12-a-b"), (12, "a-b"));
        assert_eq!(split_stage_name("attention-norm.weight"), (0, "attention-norm.weight"));
        assert_eq!(split_stage_name("-x"), (0, "-x"));
    }

    #[test]
    fn json_layouts_parse_including_nested() {
        let v: Value = serde_json::json!({
            "current_stage": 0,
            "parallel_strategy_item": {"op": {"stage": 0, "parallel_strategy": [[2, 1]]}},
            "parallel_layout_item": {
                "w": {"dev_matrix": [2, 2], "tensor_map": [0, -1], "tensor_shape": [4, 4], "field": 0,
                       "opt_weight_shard_step": 2, "opt_weight_shard_size": -1},
                "n": {"dev_matrix": [2, 1, 2], "tensor_map": [[2, 1], [-1]], "field": 0,
                       "opt_weight_shard_step": 0, "opt_weight_shard_size": 0}
            }
        });
        let s = Strategy::from_json(Path::new("s.json"), &v).unwrap();
        let w = s.layout("w").unwrap();
        assert_eq!(w.tensor_map, vec![vec![0], vec![-1]]);
        assert_eq!(w.opt_shard_size, -1);
        assert_eq!(w.tensor_shape, Some(vec![4, 4]));
        assert!(s.layout("n").unwrap().nested);
        assert_eq!(s.stage_device_num().unwrap(), 4);
    }

    fn flat(dev: &[u64], map: &[i64], shape: &[u64]) -> ParamLayout {
        ParamLayout {
            dev_matrix: dev.to_vec(),
            tensor_map: map.iter().map(|&m| vec![m]).collect(),
            nested: false,
            opt_shard_step: 0,
            opt_shard_size: 0,
            tensor_shape: Some(shape.to_vec()),
        }
    }

    #[test]
    fn flattened_json_layouts_merge_back_into_the_nested_form() {
        // The issue's example: [32, 64], dim 1 split over axes (1, 0).
        let l = flat(&[2, 2], &[-1, 1, 0], &[32, 2, 32]);
        assert!(l.is_flattened(2) && !l.is_flattened(3));
        let n = l.unflatten(2, "[32, 64]", |j, prod, _| prod == [32, 64][j]).unwrap();
        assert_eq!(n.tensor_map, vec![vec![-1], vec![1, 0]]);
        assert!(n.nested);
        assert_eq!(n.tensor_shape, Some(vec![32, 64]));
        // A run never holds -1, so [16, 2, 8] with [-1, 1, 0] is [[-1], [1, 0]] for [16, 16].
        let l = flat(&[2, 2], &[-1, 1, 0], &[16, 2, 8]);
        assert_eq!(l.unflatten(2, "", |j, p, _| p == [16, 16][j]).unwrap().tensor_map, vec![vec![-1], vec![1, 0]]);
        // An empty tensor_shape means "not given": nothing to merge.
        assert!(!flat(&[2, 2], &[-1, 1, 0], &[]).is_flattened(2));
    }

    #[test]
    fn flattened_json_layouts_that_do_not_merge_are_refused() {
        // No run of [2, 3, 4] multiplies to 4.
        let err = flat(&[2, 1], &[1, 0, -1], &[2, 3, 4]).unwrap_err_for(&[4, 4]);
        assert!(err.contains("[2, 3, 4]") && err.contains("[4, 4]") && err.contains("no runs"), "{err}");
        // [2, 2, 1, 4] over axes that may all be merged: [2, 2] + [1, 4] or [2, 2, 1] + [4].
        let err = flat(&[1, 2, 2, 1], &[2, 1, 0, 3], &[2, 2, 1, 4]).unwrap_err_for(&[4, 4]);
        assert!(err.contains("more than one way"), "{err}");
        // A -1 run of two dims would be a dim both split and unsplit.
        let err = flat(&[2], &[0, -1], &[2, 8]).unwrap_err_for(&[16]);
        assert!(err.contains("no runs"), "{err}");
    }

    impl ParamLayout {
        fn unwrap_err_for(&self, full: &[u64]) -> String {
            let what = format!("{full:?}");
            self.unflatten(full.len(), &what, |j, prod, _| prod == full[j]).unwrap_err()
        }
    }

    /// Streaming the JSON form gives what parsing it whole gives, repeated keys and errors included.
    #[test]
    fn streamed_json_equals_parsed_json() {
        let p = Path::new("s.json");
        let item =
            r#"{"dev_matrix": [2, 2], "tensor_map": [0, -1], "opt_weight_shard_step": 2, "opt_weight_shard_size": -1}"#;
        let cases = [
            format!(
                r#"{{"current_stage": 1, "parallel_strategy_item": {{"op": {{"stage": 1}}}}, "parallel_layout_item": {{"0-w": {item}, "1-w": {{"dev_matrix": [4], "tensor_map": [0, -1]}}, "n": {{"dev_matrix": [2, 2], "tensor_map": [[1, 0], [-1]]}}}}}}"#
            ),
            r#"{"parallel_strategy_item": {"a": {"stage": 3}}}"#.to_string(),
            r#"{"parallel_layout_item": {"w": {"dev_matrix": [2, 0], "tensor_map": [0]}}}"#.to_string(),
            r#"{"parallel_layout_item": {"w": {"dev_matrix": [2], "tensor_map": "x"}}}"#.to_string(),
            r#"{"parallel_layout_item": [1, 2]}"#.to_string(),
            r#"[1, {"a": 2}]"#.to_string(),
            "7".to_string(),
        ];
        for text in &cases {
            let whole: Result<Strategy> = serde_json::from_str::<Value>(text)
                .map_err(|e| bad(p, format!("not valid JSON: {e}")))
                .and_then(|v| Strategy::from_json(p, &v));
            let streamed = Strategy::from_json_slice(p, text.as_bytes());
            match (whole, streamed) {
                (Ok(a), Ok(b)) => {
                    assert_eq!(a, b, "{text}");
                    assert!(a.params().all(|(n, _)| b.contains(n)), "{text}");
                }
                (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "{text}"),
                (a, b) => panic!("{text}: parsed whole {a:?}, streamed {b:?}"),
            }
        }
        // A parameter given twice for one stage is ambiguous: streamed, it is refused naming both
        // spellings (`load` refuses a repeated key before that, with the key named).
        let twice = format!(
            r#"{{"parallel_layout_item": {{"w": {item}, "x": {item}, "0-w": {{"dev_matrix": [4], "tensor_map": [-1, 0]}}}}}}"#
        );
        let err = Strategy::from_json_slice(p, twice.as_bytes()).unwrap_err().to_string();
        assert!(err.contains("'w' and '0-w'") && err.contains("ambiguous"), "{err}");
        // Both spellings as written, a stage with leading zeros and a later stage's too.
        let odd = format!(r#"{{"parallel_layout_item": {{"1-v": {item}, "00-w": {item}, "0-w": {item}}}}}"#);
        let err = Strategy::from_json_slice(p, odd.as_bytes()).unwrap_err().to_string();
        assert!(err.contains("'00-w' and '0-w'"), "{err}");
        let later = format!(r#"{{"parallel_layout_item": {{"w": {item}, "1-w": {item}, "01-w": {item}}}}}"#);
        let err = Strategy::from_json_slice(p, later.as_bytes()).unwrap_err().to_string();
        assert!(err.contains("'1-w' and '01-w'"), "{err}");
        // A repeated key, at any depth, is refused (a parse into `Value` keeps the last one).
        let repeated =
            format!(r#"{{"parallel_layout_item": {{"w": {item}}}, "parallel_layout_item": {{"x": {item}}}}}"#);
        let err = Strategy::from_json_slice(p, repeated.as_bytes()).unwrap_err().to_string();
        assert!(err.contains("parallel_layout_item") && err.contains("twice"), "{err}");
        // Values of keys the reader skips are still parsed in full.
        let err = Strategy::from_json_slice(p, br#"{"x": 1e400, "parallel_layout_item": {}}"#).unwrap_err();
        assert!(err.to_string().contains("not valid JSON"), "{err}");
        // Broken JSON is reported as such.
        let err = Strategy::from_json_slice(p, br#"{"parallel_layout_item": {"w": "#).unwrap_err();
        assert!(err.to_string().contains("not valid JSON"), "{err}");
    }

    #[test]
    fn absurd_device_counts_are_refused() {
        let v: Value = serde_json::json!({"parallel_layout_item": {
            "w": {"dev_matrix": [4294967295u64, 4294967295u64, 4294967295u64], "tensor_map": [0, -1]}}});
        let err = Strategy::from_json(Path::new("s.json"), &v).unwrap_err();
        assert!(err.to_string().contains("at most"), "{err}");
    }

    #[test]
    fn bad_axes_are_refused() {
        let v: Value = serde_json::json!({"parallel_layout_item": {
            "w": {"dev_matrix": [2, 2], "tensor_map": [5, -1]}}});
        let err = Strategy::from_json(Path::new("s.json"), &v).unwrap_err();
        assert!(err.to_string().contains("'w'") && err.to_string().contains("axis 5"), "{err}");
    }
}
