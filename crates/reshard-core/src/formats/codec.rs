//! Output format codecs: what a checkpoint file of a format looks like around the tensor
//! content that the executor moves. A codec owns the tensor order, the headers (the 0-d and
//! string rules), the byte layout, and the crc (a `.ckpt` trailer, a safetensors `crc_num`).
//! A new output format implements [`Codec`] and is returned by [`codec_for`].

use std::collections::BTreeMap;

use crate::checkpoint::{FileLayout, Format, TensorHeader};
use crate::error::{Error, Result};
use crate::plan::TensorPlan;
use crate::{ckpt, safetensors};

/// The crc of a run of file bytes, by file offset.
pub type RunCrc = (u64, crc32fast::Hasher);

/// What a codec sees once the content is written.
pub struct Finish<'a> {
    /// Headers of the whole file, in file order (for a codec that lays out whole files).
    pub headers: &'a [TensorHeader],
    /// The whole file's layout (same condition).
    pub layout: Option<&'a FileLayout>,
    /// crc of every run written (fixed bytes and content), sorted by offset; they tile the file.
    pub runs: &'a [RunCrc],
    /// crc32 of the file as written.
    pub file_crc: u32,
    /// Length of the file as laid out.
    pub file_len: u64,
    /// Reads bytes of the file back (a few bytes: 0-d values for MindSpore's crc).
    pub read_back: &'a dyn Fn(u64, &mut [u8]) -> Result<()>,
}

/// A format's writer side.
pub trait Codec: Send + Sync {
    /// The format written.
    fn format(&self) -> Format;

    /// Puts a rank's tensors in the order the format's own writer uses.
    fn order(&self, tensors: &mut [&TensorPlan]);

    /// The header a tensor is written with.
    fn header(&self, t: &TensorPlan) -> TensorHeader {
        // Dims as the plan says: 0-d tensors stay 0-d (shape []) in every format, as MindSpore
        // writes them; strings keep the dims they were stored with.
        TensorHeader { name: t.name.clone(), dtype: t.dtype, dims: t.dims.clone(), nbytes: t.nbytes }
    }

    /// Refuses tensors the format cannot hold, naming them.
    fn check(&self, t: &TensorPlan) -> Result<()> {
        let _ = t;
        Ok(())
    }

    /// How many consecutive tensors are laid out at once (`usize::MAX`: the whole file, when
    /// the header names every tensor).
    fn window(&self) -> usize;

    /// Whether [`Codec::order`] leaves the plan's order: the executor may then make a rank's
    /// tensor plans one window at a time.
    fn keeps_plan_order(&self) -> bool {
        false
    }

    /// The file's length (before any trailer) for these tensors, in this order. By default the
    /// file is laid out whole and its length taken.
    fn file_len(&self, tensors: &[&TensorPlan]) -> Result<u64> {
        let headers: Vec<TensorHeader> = tensors.iter().map(|t| self.header(t)).collect();
        Ok(self.layout(&headers, 0)?.len)
    }

    /// Lays out consecutive tensors starting at file offset `base`.
    fn layout(&self, headers: &[TensorHeader], base: u64) -> Result<FileLayout>;

    /// Bytes to write once all content is: (offset, bytes), each either replacing a fixed run
    /// of the same offset and length or appended at the end of the file.
    fn finish(&self, f: &Finish<'_>) -> Result<Vec<(u64, Vec<u8>)>>;

    /// Whether [`Codec::finish`] reads bytes back ([`Finish::read_back`]): a sink that cannot
    /// read its output (an upload) then keeps the few bytes it would read. Required, so that a
    /// new codec decides (a wrong `false` would fail only on upload).
    fn reads_back(&self) -> bool;
}

/// The codec writing `format`, with or without MindSpore's crc.
pub fn codec_for(format: Format, crc: bool) -> Box<dyn Codec> {
    match format {
        Format::Ckpt => Box::new(CkptCodec { crc }),
        Format::Safetensors => Box::new(SafetensorsCodec { crc }),
    }
}

/// Lays out a whole output file for the given tensors (no crc).
pub fn file_layout(headers: &[TensorHeader], format: Format) -> Result<FileLayout> {
    codec_for(format, false).layout(headers, 0)
}

/// MindSpore's `.ckpt`: values in the plan's order, each cut into values of at most
/// [`ckpt::CHUNK_BYTES`]; with `crc`, the 17-byte `crc_num` trailer.
struct CkptCodec {
    crc: bool,
}

/// A `.ckpt` rank of many tensors is laid out and written this many at a time (a whole layout,
/// its headers and blocks took about 500 bytes per tensor: 150 MB for 300,000 small tensors).
const CKPT_WINDOW: usize = 8192;

impl Codec for CkptCodec {
    fn format(&self) -> Format {
        Format::Ckpt
    }
    fn order(&self, _tensors: &mut [&TensorPlan]) {}
    fn window(&self) -> usize {
        CKPT_WINDOW
    }
    fn keeps_plan_order(&self) -> bool {
        true
    }
    fn file_len(&self, tensors: &[&TensorPlan]) -> Result<u64> {
        Ok(tensors.iter().map(|t| ckpt::tensor_len(&t.name, t.dtype, &t.dims, t.nbytes, ckpt::CHUNK_BYTES)).sum())
    }
    fn layout(&self, headers: &[TensorHeader], base: u64) -> Result<FileLayout> {
        Ok(ckpt::layout_at(headers, ckpt::CHUNK_BYTES, base))
    }
    fn finish(&self, f: &Finish<'_>) -> Result<Vec<(u64, Vec<u8>)>> {
        Ok(if self.crc { vec![(f.file_len, ckpt::crc_trailer(f.file_crc).to_vec())] } else { Vec::new() })
    }
    fn reads_back(&self) -> bool {
        // The crc is computed while writing.
        false
    }
}

/// safetensors as MindSpore writes it: data in the `safetensors` library's order (dtype, then
/// name), `__metadata__` `{"format": "ms"}`, and with `crc` a `crc_num`. The crc is only known
/// after the data is written, so the header is laid out with the widest value ("4294967295")
/// and rewritten, padded with spaces to the same length, at the end.
struct SafetensorsCodec {
    crc: bool,
}

/// A safetensors header names every tensor: its files are laid out whole, from offset 0.
fn st_whole_file(base: u64) -> Result<()> {
    match base {
        0 => Ok(()),
        _ => Err(Error::Invalid("internal error: a safetensors file is laid out whole".into())),
    }
}

fn st_metadata(crc: Option<u32>) -> BTreeMap<String, String> {
    let mut m = BTreeMap::from([("format".to_string(), "ms".to_string())]);
    if let Some(c) = crc {
        m.insert("crc_num".to_string(), c.to_string());
    }
    m
}

impl Codec for SafetensorsCodec {
    fn format(&self) -> Format {
        Format::Safetensors
    }
    fn order(&self, tensors: &mut [&TensorPlan]) {
        tensors.sort_by(|a, b| safetensors::data_order(a.dtype, &a.name, b.dtype, &b.name));
    }
    fn check(&self, t: &TensorPlan) -> Result<()> {
        match t.dtype.safetensors_name() {
            Some(_) => Ok(()),
            None => Err(Error::Invalid(format!(
                "parameter '{}' is a {} and cannot be written to safetensors; use --output_format ckpt",
                t.name, t.dtype
            ))),
        }
    }
    fn window(&self) -> usize {
        usize::MAX
    }
    fn reads_back(&self) -> bool {
        self.crc
    }
    fn layout(&self, headers: &[TensorHeader], base: u64) -> Result<FileLayout> {
        st_whole_file(base)?;
        safetensors::layout(headers, &st_metadata(self.crc.then_some(u32::MAX)))
    }
    fn finish(&self, f: &Finish<'_>) -> Result<Vec<(u64, Vec<u8>)>> {
        if !self.crc {
            return Ok(Vec::new());
        }
        let layout = f.layout.ok_or_else(|| Error::Invalid("internal error: no safetensors layout".into()))?;
        let crc = st_crc(f.headers, layout, f.runs, f.read_back)?;
        let real = safetensors::layout(f.headers, &st_metadata(Some(crc)))?;
        // Same header length as laid out (the first 8 bytes say it): pad the JSON with spaces.
        let old = &layout.fixed[0].1;
        let text = std::str::from_utf8(&real.fixed[0].1[8..]).unwrap_or_default().trim_end();
        let mut head = old[..8].to_vec();
        head.extend_from_slice(text.as_bytes());
        head.resize(old.len(), b' ');
        Ok(vec![(0, head)])
    }
}

/// MindSpore's safetensors crc (see [`safetensors`]): crc32 chained over each name, then its
/// data, names sorted; computed from the crcs of the runs written.
fn st_crc(
    headers: &[TensorHeader],
    layout: &FileLayout,
    runs: &[RunCrc],
    read_back: &dyn Fn(u64, &mut [u8]) -> Result<()>,
) -> Result<u32> {
    let mut order: Vec<usize> = (0..headers.len()).collect();
    order.sort_by(|&a, &b| headers[a].name.cmp(&headers[b].name));
    let mut h = crc32fast::Hasher::new();
    for i in order {
        h.update(headers[i].name.as_bytes());
        let (start, len) = layout.content[i].first().map_or((0, 0), |r| (r.file_offset, r.len));
        // A 0-d integer counts as that many zero bytes (MindSpore's `bytes(ndarray)`): read its
        // few bytes back from the output.
        if headers[i].dims.is_empty() && len <= 8 {
            let mut raw = vec![0u8; len as usize];
            read_back(start, &mut raw)?;
            if let Some(n) = safetensors::scalar_int_value(headers[i].dtype, &[], &raw) {
                safetensors::update_zeros(&mut h, n);
                continue;
            }
        }
        // Runs are sorted by offset; those inside this tensor's data are its content.
        let from = runs.partition_point(|(o, _)| *o < start);
        for (o, rh) in &runs[from..] {
            if *o >= start + len {
                break;
            }
            h.combine(rh);
        }
    }
    Ok(h.finalize())
}

/// safetensors with a given `__metadata__` and no crc: the files of a unified folder
/// (`reshard unify`), whose metadata MindSpore takes from the sources.
pub struct SafetensorsWithMetadata {
    /// The `__metadata__` to write.
    pub metadata: BTreeMap<String, String>,
}

impl Codec for SafetensorsWithMetadata {
    fn format(&self) -> Format {
        Format::Safetensors
    }
    fn order(&self, tensors: &mut [&TensorPlan]) {
        SafetensorsCodec { crc: false }.order(tensors)
    }
    fn check(&self, t: &TensorPlan) -> Result<()> {
        SafetensorsCodec { crc: false }.check(t)
    }
    fn window(&self) -> usize {
        usize::MAX
    }
    fn layout(&self, headers: &[TensorHeader], base: u64) -> Result<FileLayout> {
        st_whole_file(base)?;
        safetensors::layout(headers, &self.metadata)
    }
    fn finish(&self, _f: &Finish<'_>) -> Result<Vec<(u64, Vec<u8>)>> {
        Ok(Vec::new())
    }
    fn reads_back(&self) -> bool {
        false
    }
}
