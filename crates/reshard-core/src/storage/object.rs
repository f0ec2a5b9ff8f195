//! Objects in S3-compatible stores (Amazon S3, Huawei OBS, SeaweedFS, MinIO) through Apache
//! Arrow's `object_store` crate: `s3://bucket/key` and `obs://bucket/key` URLs.
//!
//! The crate is async; its tokio runtime lives here, private, and every function of this module
//! blocks until its requests are done, so the rest of the core (and the C ABI) stays synchronous.
//!
//! Reads: [`ObjectSource`] is a [`ByteSource`] whose `prefetch` starts a ranged GET of exactly
//! the announced run (the executor joins the runs of its blocks, per object, into GETs of up to
//! 8 MiB and starts them ahead of the copy: `exec::object_prefetch`) and whose `read_at` takes
//! its bytes from those responses as their chunks arrive (responses never overlap; one is freed
//! once all its announced bytes were read, or the fills that announced it ended), and the bytes
//! no response holds from ranged GETs of exactly those bytes. GETs in flight are bounded per
//! store; every GET carries `If-Match` with the ETag seen when the object was opened, so a run
//! never mixes two versions of an object. `object_store` retries 5xx answers, timeouts and broken connections
//! with exponential backoff.
//!
//! Writes: an [`Upload`] is a multipart upload fed with parts of [`PART_BYTES`] as the
//! executor fills them (a bounded number in flight) and completed only when every part is in;
//! any failure, or a cancel, aborts it, so no object appears under its final name unless it is
//! whole.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as Key;
use object_store::{ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};
use tokio::sync::Semaphore;

use super::{ByteSource, Version};
use crate::error::{Error, Result};
use crate::toc_predict::PredictCheck;

/// Size of each part of a multipart upload but the last (S3 needs 5 MiB or more).
pub const PART_BYTES: usize = 8 << 20;
/// Parts of one upload in flight at once (memory: this many parts).
const PARTS_IN_FLIGHT: usize = 4;
/// Threads of the private runtime.
const RUNTIME_THREADS: usize = 8;
/// Ranged GETs in flight at once per store.
const GETS_IN_FLIGHT: usize = 32;
/// A hint outside a job's read-ahead (`ByteSource::prefetch`) is dropped, and its reads fetch
/// their own ranges, while the source holds this many bytes read ahead (a job's included).
const PREFETCH_CAP: u64 = 128 << 20;

/// A parsed `s3://bucket/key` (or `obs://`) URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectUrl {
    /// `s3` or `obs`.
    pub scheme: String,
    /// The bucket.
    pub bucket: String,
    /// The key (or key prefix), without leading or trailing slashes.
    pub key: String,
}

impl ObjectUrl {
    /// Parses an `s3://` or `obs://` URL.
    pub fn parse(p: &Path) -> Result<ObjectUrl> {
        let s = p.to_str().ok_or_else(|| Error::Invalid(format!("{}: the URL is not UTF-8", p.display())))?;
        let (scheme, rest) = s
            .split_once("://")
            .filter(|(sc, _)| matches!(*sc, "s3" | "obs"))
            .ok_or_else(|| Error::Invalid(format!("{s}: not an s3:// or obs:// URL")))?;
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(Error::Invalid(format!("{s}: the URL names no bucket (expected {scheme}://BUCKET/KEY)")));
        }
        let key = key.trim_matches('/');
        if key.split('/').any(|c| c == "." || c == ".." || (c.is_empty() && !key.is_empty())) {
            return Err(Error::Invalid(format!("{s}: the key has an empty, '.' or '..' component")));
        }
        Ok(ObjectUrl { scheme: scheme.into(), bucket: bucket.into(), key: key.into() })
    }

    /// The key as `object_store` takes it.
    fn location(&self) -> Key {
        Key::from(self.key.as_str())
    }

    /// The URL of the object `key` in the same bucket.
    fn url_of(&self, key: &str) -> PathBuf {
        PathBuf::from(format!("{}://{}/{}", self.scheme, self.bucket, key))
    }
}

/// The private runtime. Its threads receive every fetched byte (hyper reads the responses on
/// them), so they are as many as the GETs they can usefully keep busy, not two: on the loopback
/// bench with other work on the machine, two threads received about 120 MB/s whatever the GETs
/// in flight (each 8 MiB GET took 1.1 s with 32 in flight), the server being able to send
/// 500 MB/s.
fn runtime() -> Result<&'static tokio::runtime::Runtime> {
    static RT: OnceLock<std::result::Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(RUNTIME_THREADS)
            .thread_name("reshard-s3")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| Error::Invalid(format!("cannot start the object storage runtime: {e}")))
}

/// Runs `f` on the private runtime and waits for it.
fn block_on<F: Future + Send + 'static>(f: F) -> Result<F::Output>
where
    F::Output: Send + 'static,
{
    let rt = runtime()?;
    // Spawned and awaited through a channel, so that a caller already inside some other
    // runtime (an embedding application's) does not nest runtimes.
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let _ = tx.send(f.await);
    });
    rx.recv().map_err(|_| Error::Invalid("internal error: an object storage request was dropped".into()))
}

/// One bucket's client, and the bound on its GETs in flight.
struct Store {
    s3: Arc<AmazonS3>,
    gets: Arc<Semaphore>,
}

/// The client of `url`'s bucket (made once per bucket), configured from the standard environment.
fn store(url: &ObjectUrl, shown: &Path) -> Result<Arc<Store>> {
    static STORES: OnceLock<Mutex<HashMap<String, Arc<Store>>>> = OnceLock::new();
    let stores = STORES.get_or_init(Default::default);
    let mut map = stores.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(s) = map.get(&url.bucket) {
        return Ok(s.clone());
    }
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let anonymous = env("AWS_SKIP_SIGNATURE").is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
    // Without keys object_store would ask the instance metadata service (a link-local address)
    // for credentials; that is a surprise on a laptop and a hang off the cloud, so keys are
    // required unless the bucket is read anonymously or a web identity is configured.
    if !anonymous && env("AWS_ACCESS_KEY_ID").is_none() && env("AWS_WEB_IDENTITY_TOKEN_FILE").is_none() {
        return Err(Error::Invalid(format!(
            "{}: no credentials for the object store: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and \
             AWS_SESSION_TOKEN for temporary keys), or AWS_SKIP_SIGNATURE=true for a public bucket",
            shown.display()
        )));
    }
    let retries = env("RESHARD_S3_RETRIES").and_then(|v| v.parse().ok()).unwrap_or(5);
    let retry = RetryConfig {
        max_retries: retries,
        retry_timeout: Duration::from_secs(env("RESHARD_S3_RETRY_SECONDS").and_then(|v| v.parse().ok()).unwrap_or(60)),
        ..RetryConfig::default()
    };
    let mut client =
        ClientOptions::new().with_connect_timeout(Duration::from_secs(10)).with_timeout(Duration::from_secs(120));
    // Plain http (a local server, an OBS endpoint inside a VPC) only when asked for.
    if env("AWS_ALLOW_HTTP").is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1") {
        client = client.with_allow_http(true);
    }
    let mut b = AmazonS3Builder::from_env().with_bucket_name(&url.bucket).with_retry(retry).with_client_options(client);
    if env("AWS_REGION").is_none() {
        if let Some(r) = env("AWS_DEFAULT_REGION") {
            b = b.with_region(r);
        }
    }
    if anonymous {
        b = b.with_skip_signature(true);
    }
    let s3 = b.build().map_err(|e| store_error(shown, "configure the client", &e))?;
    let s = Arc::new(Store { s3: Arc::new(s3), gets: Arc::new(Semaphore::new(GETS_IN_FLIGHT)) });
    map.insert(url.bucket.clone(), s.clone());
    Ok(s)
}

/// The store's error, with its code (`AccessDenied`, `NoSuchBucket`, `InvalidAccessKeyId`...)
/// and HTTP status when the answer carried them, as an I/O error on the URL.
fn store_error(url: &Path, op: &'static str, e: &object_store::Error) -> Error {
    use std::io::ErrorKind;
    let mut text = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        let t = s.to_string();
        if !text.contains(&t) {
            text.push_str(": ");
            text.push_str(&t);
        }
        src = s.source();
    }
    let tag = |t: &str| {
        let open = format!("<{t}>");
        text.split(open.as_str()).nth(1).and_then(|r| r.split("</").next()).map(str::to_string)
    };
    let code = tag("Code");
    // The store's XML answer is summed up by its code and message.
    if let Some(at) = text.find("<?xml").or_else(|| text.find("<Error>")) {
        let message = tag("Message").unwrap_or_default();
        text.truncate(at);
        text.push_str(&message);
    }
    let kind = match e {
        object_store::Error::NotFound { .. } => ErrorKind::NotFound,
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
            ErrorKind::PermissionDenied
        }
        _ => ErrorKind::Other,
    };
    let code = match (code, kind) {
        (Some(c), _) => c,
        (None, ErrorKind::NotFound) => "NoSuchKey".into(),
        (None, ErrorKind::PermissionDenied) => "AccessDenied".into(),
        (None, _) if text.contains("connect") || text.contains("error sending request") => {
            "no answer (connection failed)".into()
        }
        (None, _) => "unknown".into(),
    };
    let text: String = text.chars().take(600).collect();
    Error::io(url, op, std::io::Error::new(kind, format!("store error code {code}: {text}")))
}

/// Bytes fetched by ranged GETs in this process (tables of contents and content), for `plan`'s
/// report and the tests.
static FETCHED: AtomicU64 = AtomicU64::new(0);

/// Bytes fetched from object stores so far by this process.
pub fn bytes_fetched() -> u64 {
    FETCHED.load(Ordering::Relaxed)
}

/// GETs started by prefetches, and made on demand by reads, in this process.
static GETS_AHEAD: AtomicU64 = AtomicU64::new(0);
static GETS_ON_DEMAND: AtomicU64 = AtomicU64::new(0);

/// Ranged GETs made so far by this process: (started ahead by a prefetch, made on demand).
pub fn gets_made() -> (u64, u64) {
    (GETS_AHEAD.load(Ordering::Relaxed), GETS_ON_DEMAND.load(Ordering::Relaxed))
}

/// Prefetched bytes held or awaited by every object source of this process (what the executor's
/// read-ahead keeps within the job's memory budget), and the most there ever were.
static PREFETCHED: AtomicU64 = AtomicU64::new(0);
static PREFETCHED_PEAK: AtomicU64 = AtomicU64::new(0);

/// Bytes prefetched by object sources and not yet read (or still on their way), in this process.
pub fn prefetched_bytes() -> u64 {
    PREFETCHED.load(Ordering::Relaxed)
}

/// The most bytes [`prefetched_bytes`] has counted since the last [`reset_prefetched_peak`].
pub fn prefetched_peak() -> u64 {
    PREFETCHED_PEAK.load(Ordering::Relaxed)
}

/// Starts a new measure of [`prefetched_peak`] (tests, benches).
pub fn reset_prefetched_peak() {
    PREFETCHED_PEAK.store(PREFETCHED.load(Ordering::Relaxed), Ordering::Relaxed);
}

/// The options of a ranged GET of `range`, pinned to `etag` (`If-Match`).
fn pinned(range: Range<u64>, etag: Option<String>) -> GetOptions {
    GetOptions::new().with_range(Some(GetRange::Bounded(range))).with_if_match(etag)
}

/// A ranged GET of `range`, pinned to `etag`.
async fn get_range(
    store: Arc<Store>,
    key: Key,
    etag: Option<String>,
    range: Range<u64>,
) -> object_store::Result<Bytes> {
    let _permit = store.gets.clone().acquire_owned().await.ok();
    let bytes = store.s3.get_opts(&key, pinned(range, etag)).await?.bytes().await?;
    FETCHED.fetch_add(bytes.len() as u64, Ordering::Relaxed);
    Ok(bytes)
}

/// The GET of `slot` (from `start`), pinned to `etag`: its chunks are handed to the slot as they
/// arrive (and to the deferred table-of-contents check, in order), until the slot is freed.
async fn stream_into(
    store: Arc<Store>,
    key: Key,
    etag: Option<String>,
    start: u64,
    slot: Arc<Slot>,
    predicted: Option<Arc<PredictCheck>>,
) {
    let _permit = store.gets.clone().acquire_owned().await.ok();
    let failed = |e| Fetched::Failed(Arc::new(e));
    let outcome = async {
        let mut body = store.s3.get_opts(&key, pinned(start..slot.end, etag)).await.map_err(failed)?.into_stream();
        let mut pos = start;
        while let Some(chunk) = body.next().await {
            let b = chunk.map_err(failed)?;
            FETCHED.fetch_add(b.len() as u64, Ordering::Relaxed);
            if pos + b.len() as u64 > slot.end {
                return Err(Fetched::Short(pos + b.len() as u64 - start));
            }
            if let Some(p) = &predicted {
                p.see(pos, &b);
            }
            let mut data = slot.data.lock().unwrap_or_else(|p| p.into_inner());
            // Freed (its fills ended): the rest is not fetched.
            let Fetched::Arriving(a) = &mut *data else { return Ok(()) };
            pos += b.len() as u64;
            a.chunks.push((a.pos, b));
            a.pos = pos;
            if a.pos >= a.want {
                a.want = u64::MAX;
                drop(data);
                slot.ready.notify_all();
            }
        }
        if pos == slot.end {
            Ok(())
        } else {
            Err(Fetched::Short(pos - start))
        }
    }
    .await;
    if let Err(f) = outcome {
        let mut data = slot.data.lock().unwrap_or_else(|p| p.into_inner());
        // A slot freed before its GET failed stays freed.
        if matches!(*data, Fetched::Arriving(_)) {
            *data = f;
        }
        drop(data);
        slot.ready.notify_all();
    }
}

/// A prefetched range: filled by the runtime as its response arrives, read as it does.
struct Slot {
    end: u64,
    /// Bytes of it still to be read: the slot is freed when they all were.
    unread: AtomicU64,
    /// Fills whose announced runs it serves: the slot is freed when they all ended, read or not
    /// (an error, a cancel), so that no bytes stay counted after their fills.
    holders: AtomicU64,
    /// The read-ahead count of the job that started it (see [`prefetched_bytes`] for the process).
    count: Arc<AtomicU64>,
    data: Mutex<Fetched>,
    ready: Condvar,
}

/// What a slot's GET brought.
enum Fetched {
    /// The response's bytes so far: a read takes its bytes as soon as they are in, not when the
    /// whole GET is (with 8 MiB GETs a copy waited for each whole response, and every response
    /// was copied once more into one buffer of its length, on fresh pages).
    Arriving(Arrived),
    Failed(Arc<object_store::Error>),
    /// The GET answered with this many bytes, not the slot's length.
    Short(u64),
    /// The slot was freed and its bytes dropped with it: a fill's holds keep the `Slot` until the
    /// fill ends, and when they kept its bytes too, every GET of an 8 -> 4 rank stayed in memory
    /// (600 MB on the bench model, whatever the budget), although counted as freed. A read that
    /// finds the slot freed fetches its bytes on its own.
    Freed,
}

/// The chunks of a response received so far, in order and back to back from the slot's start.
struct Arrived {
    chunks: Vec<(u64, Bytes)>,
    /// Where the next chunk starts.
    pos: u64,
    /// The smallest end a waiting read needs (`u64::MAX`: none waits), so that the chunks in
    /// between wake nobody.
    want: u64,
}

impl Arrived {
    fn at(start: u64) -> Fetched {
        Fetched::Arriving(Arrived { chunks: Vec::new(), pos: start, want: u64::MAX })
    }

    /// Copies the bytes at `offset` into `buf`: they arrived (`offset + buf.len() <= pos`), and
    /// the slot starts at or before `offset`.
    fn copy(&self, offset: u64, buf: &mut [u8]) {
        let mut k = self.chunks.partition_point(|(s, _)| *s <= offset).saturating_sub(1);
        let mut done = 0;
        while done < buf.len() {
            let (s, b) = &self.chunks[k];
            let from = (offset + done as u64 - s) as usize;
            let n = (b.len() - from).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&b[from..from + n]);
            done += n;
            k += 1;
        }
    }
}

/// The prefetched ranges of one object, by start. They never overlap: each part of a read is
/// served by the slot holding it and charged to it, as each part of an announced run is (with two
/// overlapping slots a read was charged to the later one, and the other's count never reached
/// 0: on a complete -> 8 column split 25 MB stayed counted until the job's end and read-ahead
/// stopped).
#[derive(Default)]
struct Slots {
    map: Mutex<BTreeMap<u64, Arc<Slot>>>,
    /// Bytes held or awaited in `map`.
    held: AtomicU64,
}

/// The slots a fill's announcement joined or started: released when the fill ends.
struct SlotHolds {
    slots: Arc<Slots>,
    held: Vec<(u64, Arc<Slot>)>,
}

impl Drop for SlotHolds {
    fn drop(&mut self) {
        for (start, slot) in self.held.drain(..) {
            if slot.holders.fetch_sub(1, Ordering::AcqRel) <= 1 {
                self.slots.remove(start, &slot);
            }
        }
    }
}

impl Slots {
    /// The prefetched slot holding [offset, end), if any.
    fn slot_for(&self, offset: u64, end: u64) -> Option<(u64, Arc<Slot>)> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let (&start, slot) = map.range(..=offset).next_back()?;
        (slot.end >= end).then(|| (start, slot.clone()))
    }

    /// Where the first slot after `offset` starts, if one does.
    fn next_start(&self, offset: u64) -> Option<u64> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.range(offset.saturating_add(1)..).next().map(|(&s, _)| s)
    }

    /// Frees `slot` (if still there) and its count.
    fn remove(&self, start: u64, slot: &Arc<Slot>) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(&start).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            map.remove(&start);
            *slot.data.lock().unwrap_or_else(|p| p.into_inner()) = Fetched::Freed;
            slot.ready.notify_all();
            let n = slot.end - start;
            self.held.fetch_sub(n, Ordering::Relaxed);
            slot.count.fetch_sub(n, Ordering::Relaxed);
            PREFETCHED.fetch_sub(n, Ordering::Relaxed);
        }
    }

    /// `n` bytes of `slot` were read (or failed to): frees it after its last announced byte.
    fn consumed(&self, start: u64, slot: &Arc<Slot>, n: u64, failed: bool) {
        let before =
            slot.unread.fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| Some(u.saturating_sub(n))).unwrap_or(0);
        if before <= n || failed {
            self.remove(start, slot);
        }
    }

    /// Announces `runs` (start, end, bytes read in it) inside [start, end): the parts of runs
    /// inside an existing slot are charged to it; the parts of [start, end) no slot holds become
    /// new slots (trimmed to the runs inside them), charged to `count`, which the caller
    /// fetches. (A run across a slot's edge was charged to none, while its reads took part of
    /// their bytes from the slot: freed early, the slot's own runs fetched theirs again.)
    /// Nothing new beyond `cap` bytes held.
    fn announce(
        self: &Arc<Self>,
        start: u64,
        end: u64,
        runs: &[(u64, u64, u64)],
        count: &Arc<AtomicU64>,
        cap: u64,
    ) -> (SlotHolds, Vec<(u64, Arc<Slot>)>) {
        let mut holds = SlotHolds { slots: self.clone(), held: Vec::new() };
        let mut fresh = Vec::new();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        // The existing slots meeting [start, end), in order.
        let mut existing: Vec<(u64, Arc<Slot>)> = Vec::new();
        if let Some((&s, slot)) = map.range(..start).next_back().filter(|(_, sl)| sl.end > start) {
            existing.push((s, slot.clone()));
        }
        existing.extend(map.range(start..end).map(|(&s, sl)| (s, sl.clone())));
        // Runs ascend and the slots do not overlap. Each part of a run inside a slot is charged
        // to it (a read takes those bytes from it, see `read_at`); the parts outside every slot
        // join the gap they are in (numbered by the slots before it), to be fetched.
        let mut charged = vec![0u64; existing.len()];
        let mut gaps: Vec<(usize, u64, u64, u64)> = Vec::new(); // (slots before, start, end, read)
        let mut gap = |before: usize, a: u64, e: u64, read: u64| match gaps.last_mut() {
            Some(g) if g.0 == before => {
                g.2 = e;
                g.3 += read;
            }
            _ => gaps.push((before, a, e, read)),
        };
        for &(rs, re, mut read) in runs {
            let mut at = rs;
            let mut k = existing.partition_point(|(_, sl)| sl.end <= rs);
            while at < re {
                match existing.get(k).filter(|(s, _)| *s < re) {
                    Some((s, _)) if *s > at => {
                        let here = read.min(s - at);
                        read -= here;
                        gap(k, at, *s, here);
                        at = *s;
                    }
                    Some((_, slot)) => {
                        let e = re.min(slot.end);
                        let here = read.min(e - at);
                        read -= here;
                        charged[k] += here;
                        at = e;
                        k += 1;
                    }
                    None => {
                        gap(k, at, re, read);
                        at = re;
                    }
                }
            }
        }
        for ((s, slot), read) in existing.into_iter().zip(charged) {
            if read > 0 {
                slot.unread.fetch_add(read, Ordering::AcqRel);
                slot.holders.fetch_add(1, Ordering::AcqRel);
                holds.held.push((s, slot));
            }
        }
        for (_, gs, ge, read) in gaps {
            let len = ge - gs;
            if self.held.load(Ordering::Relaxed) + len > cap {
                continue;
            }
            let slot = Arc::new(Slot {
                end: ge,
                unread: AtomicU64::new(read),
                holders: AtomicU64::new(1),
                count: count.clone(),
                data: Mutex::new(Arrived::at(gs)),
                ready: Condvar::new(),
            });
            map.insert(gs, slot.clone());
            self.held.fetch_add(len, Ordering::Relaxed);
            count.fetch_add(len, Ordering::Relaxed);
            let now = PREFETCHED.fetch_add(len, Ordering::Relaxed) + len;
            PREFETCHED_PEAK.fetch_max(now, Ordering::Relaxed);
            holds.held.push((gs, slot.clone()));
            fresh.push((gs, slot));
        }
        (holds, fresh)
    }
}

/// An object read through ranged GETs.
pub struct ObjectSource {
    path: PathBuf,
    store: Arc<Store>,
    key: Key,
    etag: Option<String>,
    version: Version,
    /// Prefetched ranges.
    slots: Arc<Slots>,
    /// A GET found the object changed (its ETag no longer matched).
    changed: AtomicBool,
    /// The deferred check of a table of contents taken from another object: fed every byte
    /// fetched, finished by `check`.
    predicted: OnceLock<Arc<PredictCheck>>,
}

impl ObjectSource {
    /// Opens the object at `url` (one HEAD request: its size and ETag).
    pub fn open(path: &Path) -> Result<ObjectSource> {
        let url = ObjectUrl::parse(path)?;
        let store = store(&url, path)?;
        let key = url.location();
        let s3 = store.s3.clone();
        let k = key.clone();
        let meta = block_on(async move { s3.head(&k).await })?.map_err(|e| store_error(path, "open (HEAD)", &e))?;
        let etag = meta.e_tag.clone();
        let version = Version::Remote { len: meta.size, etag: etag.clone().unwrap_or_default() };
        Ok(ObjectSource {
            path: path.to_path_buf(),
            store,
            key,
            etag,
            version,
            slots: Arc::new(Slots::default()),
            changed: AtomicBool::new(false),
            predicted: OnceLock::new(),
        })
    }

    /// A ranged GET of `range` made now (counted as on demand).
    fn fetch(&self, range: Range<u64>) -> Result<Bytes> {
        GETS_ON_DEMAND.fetch_add(1, Ordering::Relaxed);
        let f = get_range(self.store.clone(), self.key.clone(), self.etag.clone(), range.clone());
        self.received(range, block_on(f)?)
    }

    /// The answer to a ranged GET of `range`: its error as the object's, else its bytes, fed
    /// to the deferred table-of-contents check, and refused when not the range's length.
    fn received(&self, range: Range<u64>, got: object_store::Result<Bytes>) -> Result<Bytes> {
        let b = got.map_err(|e| self.read_error(&e))?;
        if let Some(p) = self.predicted.get() {
            p.see(range.start, &b);
        }
        if b.len() as u64 != range.end - range.start {
            return Err(self.short_get(range, b.len() as u64));
        }
        Ok(b)
    }

    /// The error for a ranged GET of `range` that returned `got` bytes.
    fn short_get(&self, range: Range<u64>, got: u64) -> Error {
        Error::Source {
            path: self.path.clone(),
            detail: format!("a ranged GET of bytes {}..{} returned {got} bytes", range.start, range.end),
        }
    }

    fn read_error(&self, e: &object_store::Error) -> Error {
        if matches!(e, object_store::Error::Precondition { .. }) {
            self.changed.store(true, Ordering::Relaxed);
            return self.changed_error();
        }
        store_error(&self.path, "ranged GET", e)
    }

    fn changed_error(&self) -> Error {
        Error::Source {
            path: self.path.clone(),
            detail: format!(
                "the object changed while reshard was reading it (its ETag is no longer {}); make the plan again",
                self.etag.as_deref().unwrap_or("?")
            ),
        }
    }

    /// Reads `buf` at `offset` from `slot` (starting at `start`, holding those bytes), waiting
    /// for them to arrive; None when the slot was freed first.
    fn read_slot(&self, start: u64, slot: &Arc<Slot>, offset: u64, buf: &mut [u8]) -> Option<Result<()>> {
        let end = offset + buf.len() as u64;
        let mut data = slot.data.lock().unwrap_or_else(|p| p.into_inner());
        let got = loop {
            match &mut *data {
                Fetched::Arriving(a) if a.pos >= end => {
                    a.copy(offset, buf);
                    break Ok(());
                }
                Fetched::Arriving(a) => {
                    a.want = a.want.min(end);
                    data = slot.ready.wait(data).unwrap_or_else(|p| p.into_inner());
                }
                Fetched::Failed(e) => break Err(self.read_error(e)),
                Fetched::Short(got) => break Err(self.short_get(start..slot.end, *got)),
                Fetched::Freed => return None,
            }
        };
        drop(data);
        // Reads of a slot come from several workers in any order: the one that takes its last
        // announced bytes frees it.
        self.slots.consumed(start, slot, buf.len() as u64, got.is_err());
        Some(got)
    }

    /// Starts the GETs of the parts of [start, end) no slot holds yet (see [`Slots::announce`]).
    fn start_prefetch(
        &self,
        start: u64,
        end: u64,
        runs: &[(u64, u64, u64)],
        count: &Arc<AtomicU64>,
        cap: u64,
    ) -> Option<SlotHolds> {
        if start >= end || end > self.len() {
            return None;
        }
        let Ok(rt) = runtime() else { return None };
        let (holds, fresh) = self.slots.announce(start, end, runs, count, cap);
        for (s, slot) in fresh {
            GETS_AHEAD.fetch_add(1, Ordering::Relaxed);
            let predicted = self.predicted.get().cloned();
            rt.spawn(stream_into(self.store.clone(), self.key.clone(), self.etag.clone(), s, slot, predicted));
        }
        Some(holds)
    }
}

impl ByteSource for ObjectSource {
    fn path(&self) -> &Path {
        &self.path
    }

    fn len(&self) -> u64 {
        self.version.len()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.len())
            .ok_or_else(|| super::beyond_end(&self.path, offset, buf.len(), self.len()))?;
        if buf.is_empty() {
            return Ok(());
        }
        // A read takes its bytes from the slots holding them (GETs end at aligned offsets, not
        // where reads do), in order, and fetches those no slot holds itself, up to the next slot.
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            if let Some((start, slot)) = self.slots.slot_for(at, at + 1) {
                let n = (slot.end - at).min((buf.len() - done) as u64) as usize;
                // None: freed between finding it and reading it; fetched below.
                if let Some(got) = self.read_slot(start, &slot, at, &mut buf[done..done + n]) {
                    got?;
                    done += n;
                    continue;
                }
            }
            let stop = self.slots.next_start(at).map_or(end, |s| s.min(end));
            let b = self.fetch(at..stop)?;
            buf[done..done + b.len()].copy_from_slice(&b);
            done += b.len();
        }
        Ok(())
    }

    fn prefetch(&self, offset: u64, len: u64) {
        let Some(end) = offset.checked_add(len) else { return };
        // Held by no fill: freed by its reads (or with the source).
        let count = Arc::new(AtomicU64::new(0));
        if let Some(mut holds) = self.start_prefetch(offset, end, &[(offset, end, len)], &count, PREFETCH_CAP) {
            for (_, slot) in holds.held.drain(..) {
                slot.holders.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    fn prefetch_runs(
        &self,
        start: u64,
        end: u64,
        runs: &[(u64, u64, u64)],
        count: &Arc<AtomicU64>,
    ) -> Option<Box<dyn std::any::Any + Send + Sync>> {
        // A job's read-ahead is bounded by its budget (`exec::object_prefetch`); the source's
        // own cap is for hints outside any job. Under it, a job of a larger budget than the cap
        // had its GETs dropped and read every column slice of a complete -> 8 on its own: 40,000
        // GETs and 28 s with --memory-budget 1024, against 2.7 s with 256.
        Some(Box::new(self.start_prefetch(start, end, runs, count, u64::MAX)?))
    }
    fn exact_reads(&self) -> bool {
        true
    }

    fn read_ranges(&self, ranges: &[(u64, u64)]) -> Result<Vec<Vec<u8>>> {
        let mut gets = Vec::with_capacity(ranges.len());
        for &(at, n) in ranges {
            let end = at
                .checked_add(n)
                .filter(|&e| e <= self.len())
                .ok_or_else(|| super::beyond_end(&self.path, at, n as usize, self.len()))?;
            gets.push(get_range(self.store.clone(), self.key.clone(), self.etag.clone(), at..end));
        }
        GETS_ON_DEMAND.fetch_add(ranges.len() as u64, Ordering::Relaxed);
        // All in flight at once (the store's bound on GETs in flight still applies).
        let got = block_on(futures::future::join_all(gets))?;
        let mut out = Vec::with_capacity(got.len());
        for (r, &(at, n)) in got.into_iter().zip(ranges) {
            out.push(self.received(at..at + n, r)?.to_vec());
        }
        Ok(out)
    }

    fn version(&self) -> &Version {
        &self.version
    }

    fn check(&self) -> Result<()> {
        if self.changed.load(Ordering::Relaxed) {
            return Err(self.changed_error());
        }
        match self.predicted.get() {
            Some(p) => p.finish(self),
            None => Ok(()),
        }
    }

    fn check_predicted(&self, check: Arc<PredictCheck>) -> bool {
        self.predicted.set(check).is_ok()
    }
}

impl Drop for ObjectSource {
    fn drop(&mut self) {
        // Prefetched ranges never read to their end (a run that stopped early) stop counting.
        let map = std::mem::take(&mut *self.slots.map.lock().unwrap_or_else(|p| p.into_inner()));
        for (start, slot) in map {
            slot.count.fetch_sub(slot.end - start, Ordering::Relaxed);
            PREFETCHED.fetch_sub(slot.end - start, Ordering::Relaxed);
        }
    }
}

/// Opens an object as a byte source.
pub fn open(path: &Path) -> Result<Arc<dyn ByteSource>> {
    Ok(Arc::new(ObjectSource::open(path)?))
}

/// Every object under the folder `dir` (a key prefix), with its size: (URL, size), sorted.
pub fn list(dir: &Path) -> Result<Vec<(PathBuf, u64)>> {
    let url = ObjectUrl::parse(dir)?;
    let store = store(&url, dir)?;
    let prefix = (!url.key.is_empty()).then(|| url.location());
    let s3 = store.s3.clone();
    let metas = block_on(async move { s3.list(prefix.as_ref()).collect::<Vec<_>>().await })?;
    let mut out = Vec::with_capacity(metas.len());
    for m in metas {
        let m = m.map_err(|e| store_error(dir, "list", &e))?;
        out.push((url.url_of(m.location.as_ref()), m.size));
    }
    out.sort();
    Ok(out)
}

/// Size and ETag of the object at `path`, or None when there is none.
pub fn head(path: &Path) -> Result<Option<(u64, String)>> {
    let url = ObjectUrl::parse(path)?;
    let store = store(&url, path)?;
    let s3 = store.s3.clone();
    let key = url.location();
    match block_on(async move { s3.head(&key).await })? {
        Ok(m) => Ok(Some((m.size, m.e_tag.unwrap_or_default()))),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(store_error(path, "HEAD", &e)),
    }
}

/// The whole object at `path`, refused when larger than `cap` bytes (`what` names it).
pub fn read_all(path: &Path, cap: u64, what: &str) -> Result<Vec<u8>> {
    let src = ObjectSource::open(path)?;
    if src.len() > cap {
        return Err(Error::Unsupported {
            path: path.to_path_buf(),
            detail: format!("the {what} object holds {} bytes; at most {cap} are accepted", src.len()),
        });
    }
    let mut buf = vec![0u8; src.len() as usize];
    src.read_at(0, &mut buf)?;
    Ok(buf)
}

/// Writes a small object whole (one PUT; S3 makes it visible only when complete). Returns its ETag.
pub fn put(path: &Path, bytes: Vec<u8>) -> Result<String> {
    let url = ObjectUrl::parse(path)?;
    let store = store(&url, path)?;
    let s3 = store.s3.clone();
    let key = url.location();
    let r = block_on(async move { s3.put(&key, PutPayload::from(bytes)).await })?
        .map_err(|e| store_error(path, "PUT", &e))?;
    Ok(r.e_tag.unwrap_or_default())
}

/// Deletes the object at `path` (none there is not an error).
pub fn delete(path: &Path) -> Result<()> {
    let url = ObjectUrl::parse(path)?;
    let store = store(&url, path)?;
    let s3 = store.s3.clone();
    let key = url.location();
    match block_on(async move { s3.delete(&key).await })? {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(store_error(path, "DELETE", &e)),
    }
}

/// A multipart upload fed part by part as the parts are filled, in any order (the part number
/// sets its place): [`PARTS_IN_FLIGHT`] parts are sent at once, and [`send`](Upload::send)
/// waits for one of them to finish beyond that, so memory stays bounded whatever the object's
/// size. The upload is started by the first part and completed by [`finish`](Upload::finish),
/// only when every part is in; dropped unfinished (an error, a cancel), it is aborted, so no
/// object appears under its final name unless it is whole.
pub struct Upload {
    path: PathBuf,
    store: Arc<Store>,
    key: Key,
    id: Mutex<Option<String>>,
    shared: Arc<(Mutex<UploadState>, Condvar)>,
    completed: AtomicBool,
}

#[derive(Default)]
struct UploadState {
    in_flight: usize,
    parts: BTreeMap<usize, PartId>,
    /// The first failure, until someone reports it.
    failed: Option<Error>,
    broken: bool,
}

impl Upload {
    /// An upload to `path` (nothing is sent before the first part).
    pub fn new(path: &Path) -> Result<Upload> {
        let url = ObjectUrl::parse(path)?;
        let store = store(&url, path)?;
        Ok(Upload {
            path: path.to_path_buf(),
            store,
            key: url.location(),
            id: Mutex::new(None),
            shared: Arc::default(),
            completed: AtomicBool::new(false),
        })
    }

    /// The upload's id, starting it on first use.
    fn id(&self) -> Result<String> {
        let mut id = self.id.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = id.as_ref() {
            return Ok(i.clone());
        }
        let (s3, k) = (self.store.s3.clone(), self.key.clone());
        let new = block_on(async move { s3.create_multipart(&k).await })?
            .map_err(|e| store_error(&self.path, "start multipart upload", &e))?;
        *id = Some(new.clone());
        Ok(new)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, UploadState> {
        self.shared.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The failure of an earlier part, if any.
    fn failure(&self, st: &mut UploadState) -> Result<()> {
        match st.failed.take() {
            Some(e) => Err(e),
            None if st.broken => Err(Error::Source {
                path: self.path.clone(),
                detail: "an earlier part of the multipart upload failed".into(),
            }),
            None => Ok(()),
        }
    }

    /// Sends part `index` (0-based; every part but the last must hold [`PART_BYTES`] or more).
    /// Returns once the part is on its way; fails with an earlier part's error.
    pub fn send(&self, index: usize, bytes: Vec<u8>) -> Result<()> {
        let id = self.id()?;
        let rt = runtime()?;
        {
            let mut st = self.state();
            while st.in_flight >= PARTS_IN_FLIGHT && !st.broken {
                st = self.shared.1.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            self.failure(&mut st)?;
            st.in_flight += 1;
        }
        let (s3, k, shared, path) = (self.store.s3.clone(), self.key.clone(), self.shared.clone(), self.path.clone());
        rt.spawn(async move {
            let r = s3.put_part(&k, &id, index, PutPayload::from(bytes)).await;
            let mut st = shared.0.lock().unwrap_or_else(|p| p.into_inner());
            st.in_flight -= 1;
            match r {
                Ok(p) => {
                    st.parts.insert(index, p);
                }
                Err(e) if !st.broken => {
                    st.broken = true;
                    st.failed = Some(store_error(&path, "upload part", &e));
                }
                Err(_) => {}
            }
            shared.1.notify_all();
        });
        Ok(())
    }

    /// Waits for the parts in flight.
    fn drain(&self) -> std::sync::MutexGuard<'_, UploadState> {
        let mut st = self.state();
        while st.in_flight > 0 {
            st = self.shared.1.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st
    }

    /// Completes the upload once parts 0..`count` are all in (unless `cancelled` says so);
    /// returns the object's ETag.
    pub fn finish(&self, count: usize, cancelled: &dyn Fn() -> bool) -> Result<String> {
        let parts: Vec<PartId> = {
            let mut st = self.drain();
            self.failure(&mut st)?;
            if st.parts.len() != count || st.parts.keys().next_back().is_some_and(|&k| k + 1 != count) {
                return Err(Error::Invalid(format!(
                    "internal error: {} has {} of its {count} parts uploaded",
                    self.path.display(),
                    st.parts.len()
                )));
            }
            std::mem::take(&mut st.parts).into_values().collect()
        };
        if cancelled() {
            return Err(Error::Cancelled { path: self.path.clone() });
        }
        let id = self.id()?;
        let (s3, k) = (self.store.s3.clone(), self.key.clone());
        let r = block_on(async move { s3.complete_multipart(&k, &id, parts).await })?
            .map_err(|e| store_error(&self.path, "complete multipart upload", &e))?;
        self.completed.store(true, Ordering::Release);
        Ok(r.e_tag.unwrap_or_default())
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        let id = self.id.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let (Some(id), false) = (id, self.completed.load(Ordering::Acquire)) {
            // Parts still in flight would land after the abort: let them end first.
            drop(self.drain());
            let (s3, k) = (self.store.s3.clone(), self.key.clone());
            // Best effort: the error that made the upload stop is the one reported.
            let _ = block_on(async move { s3.abort_multipart(&k, &id).await });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Marks every slot of `slots` fetched (with zeros), as the runtime would.
    fn arrive(slots: &Slots) {
        let end = slots.map.lock().unwrap().values().map(|s| s.end).max().unwrap_or(0);
        arrive_from(slots, &vec![0u8; end as usize]);
    }

    /// Marks every slot of `slots` fetched with its bytes of `whole` (the object).
    fn arrive_from(slots: &Slots, whole: &[u8]) {
        for (start, slot) in slots.map.lock().unwrap().iter() {
            let b = Bytes::copy_from_slice(&whole[*start as usize..slot.end as usize]);
            *slot.data.lock().unwrap() =
                Fetched::Arriving(Arrived { chunks: vec![(*start, b)], pos: slot.end, want: u64::MAX });
        }
    }

    /// Reads `runs` as the fill would: from the slot holding each, else on demand (counted).
    fn read_runs(slots: &Slots, runs: &[(u64, u64, u64)]) -> usize {
        let mut on_demand = 0;
        for &(s, e, _) in runs {
            match slots.slot_for(s, e) {
                Some((start, slot)) => slots.consumed(start, &slot, e - s, false),
                None => on_demand += 1,
            }
        }
        on_demand
    }

    /// Each rank's runs of a column split: rows of 100 bytes, 4 ranks of 25 bytes each.
    fn column_runs(rank: u64, rows: u64) -> Vec<(u64, u64, u64)> {
        (0..rows).map(|r| (r * 100 + rank * 25, r * 100 + rank * 25 + 25, 25)).collect()
    }

    #[test]
    fn overlapping_read_ahead_is_freed_by_its_reads() {
        // Two fills join their column runs into GETs that overlap with different starts: the
        // second is charged to the first's slot where they overlap and fetches only the rest,
        // and once every announced byte is read nothing stays counted (two overlapping slots
        // left one's count above 0 until the source dropped).
        let slots = Arc::new(Slots::default());
        let count = Arc::new(AtomicU64::new(0));
        let (a, b) = (column_runs(0, 4), column_runs(1, 4));
        let (hold_a, fresh_a) = slots.announce(0, 325, &a, &count, u64::MAX);
        let (hold_b, fresh_b) = slots.announce(25, 350, &b, &count, u64::MAX);
        let starts: Vec<(u64, u64)> = fresh_a.iter().chain(&fresh_b).map(|(s, sl)| (*s, sl.end)).collect();
        assert_eq!(starts, [(0, 325), (325, 350)]);
        assert_eq!(count.load(Ordering::Relaxed), 350);
        arrive(&slots);
        assert_eq!(read_runs(&slots, &b), 0);
        assert_eq!(read_runs(&slots, &a), 0);
        assert_eq!(count.load(Ordering::Relaxed), 0);
        assert!(slots.map.lock().unwrap().is_empty());
        drop((hold_a, hold_b));
        assert_eq!(count.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_slot_read_to_its_end_drops_its_bytes_while_its_fill_goes_on() {
        // The fill's holds keep the slot itself until the fill ends; its bytes must go when its
        // last announced byte is read (they stayed: an 8 -> 4 rank kept every GET it made, 600 MB
        // from the store with a 64 MiB budget).
        let slots = Arc::new(Slots::default());
        let count = Arc::new(AtomicU64::new(0));
        let (hold, fresh) = slots.announce(0, 100, &[(0, 100, 100)], &count, u64::MAX);
        arrive(&slots);
        let slot = fresh[0].1.clone();
        assert!(matches!(*slot.data.lock().unwrap(), Fetched::Arriving(_)));
        assert_eq!(read_runs(&slots, &[(0, 100, 100)]), 0);
        assert!(matches!(*slot.data.lock().unwrap(), Fetched::Freed), "the bytes outlived the slot");
        assert_eq!(count.load(Ordering::Relaxed), 0);
        drop(hold);
    }

    #[test]
    fn read_ahead_a_fill_left_unread_is_freed_when_it_ends() {
        // A fill that stops (an error, a cancel) frees the slots only it announced; a slot
        // another fill still reads stays until that one is done too.
        let slots = Arc::new(Slots::default());
        let count = Arc::new(AtomicU64::new(0));
        let (a, b) = (column_runs(0, 4), column_runs(1, 4));
        let (hold_a, _) = slots.announce(0, 325, &a, &count, u64::MAX);
        let (hold_b, _) = slots.announce(25, 350, &b, &count, u64::MAX);
        arrive(&slots);
        assert_eq!(read_runs(&slots, &a[..1]), 0);
        drop(hold_a);
        assert_eq!(count.load(Ordering::Relaxed), 350, "b still reads both slots");
        assert_eq!(read_runs(&slots, &b[..2]), 0);
        drop(hold_b);
        assert_eq!(count.load(Ordering::Relaxed), 0);
        assert!(slots.map.lock().unwrap().is_empty());
    }

    #[test]
    fn read_ahead_counts_are_per_job() {
        // Two jobs reading one object count their own slots: one's bytes never count against
        // the other's budget.
        let slots = Arc::new(Slots::default());
        let (one, two) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (hold_1, _) = slots.announce(0, 100, &[(0, 100, 100)], &one, u64::MAX);
        let (hold_2, _) = slots.announce(200, 300, &[(200, 300, 100)], &two, u64::MAX);
        assert_eq!((one.load(Ordering::Relaxed), two.load(Ordering::Relaxed)), (100, 100));
        drop(hold_1);
        assert_eq!((one.load(Ordering::Relaxed), two.load(Ordering::Relaxed)), (0, 100));
        drop(hold_2);
        assert_eq!(two.load(Ordering::Relaxed), 0);
    }

    /// A read takes its bytes from the chunks of a response as they arrived, across their edges.
    #[test]
    fn reads_are_copied_across_the_chunks_of_a_response() {
        let whole: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let mut a = Arrived { chunks: Vec::new(), pos: 100, want: u64::MAX };
        for piece in whole[100..].chunks(37) {
            a.chunks.push((a.pos, Bytes::copy_from_slice(piece)));
            a.pos += piece.len() as u64;
        }
        for (at, n) in [(100, 1), (100, 900), (136, 2), (137, 37), (500, 400), (999, 1)] {
            let mut buf = vec![0u8; n];
            a.copy(at, &mut buf);
            assert_eq!(buf, whole[at as usize..at as usize + n], "{n} bytes at {at}");
        }
    }

    /// An object source of `len` bytes whose store is a port nothing listens on: its GETs fail
    /// at once, so a test sees whether a read was served by slots alone.
    fn unreachable(len: u64) -> ObjectSource {
        let s3 = AmazonS3Builder::new()
            .with_bucket_name("b")
            .with_endpoint("http://127.0.0.1:9")
            .with_allow_http(true)
            .with_access_key_id("k")
            .with_secret_access_key("s")
            .with_region("us-east-1")
            .with_retry(RetryConfig { max_retries: 0, ..RetryConfig::default() })
            .build()
            .unwrap();
        ObjectSource {
            path: "s3://b/k".into(),
            store: Arc::new(Store { s3: Arc::new(s3), gets: Arc::new(Semaphore::new(GETS_IN_FLIGHT)) }),
            key: Key::from("k"),
            etag: None,
            version: Version::Remote { len, etag: String::new() },
            slots: Arc::new(Slots::default()),
            changed: AtomicBool::new(false),
            predicted: OnceLock::new(),
        }
    }

    /// GETs end at aligned offsets, not where reads do: a read across two slots takes its bytes
    /// from both, charges each with its part, and fetches nothing (it fetched all its bytes on
    /// its own, and left both slots counted until its fill ended).
    #[test]
    fn a_read_across_two_slots_takes_its_bytes_from_both() {
        let whole: Vec<u8> = (0..=255u8).cycle().take(300).collect();
        let src = unreachable(300);
        let count = Arc::new(AtomicU64::new(0));
        let (h1, _) = src.slots.announce(0, 100, &[(0, 100, 100)], &count, u64::MAX);
        let (h2, _) = src.slots.announce(100, 200, &[(100, 200, 100)], &count, u64::MAX);
        assert_eq!(src.slots.map.lock().unwrap().len(), 2);
        arrive_from(&src.slots, &whole);
        // Served by the slots, or it would fail: the store is unreachable.
        let mut buf = vec![0u8; 100];
        src.read_at(50, &mut buf).unwrap();
        assert_eq!(buf, whole[50..150]);
        // The rest of each slot frees it.
        src.read_at(0, &mut buf[..50]).unwrap();
        src.read_at(150, &mut buf[..50]).unwrap();
        assert!(src.slots.map.lock().unwrap().is_empty());
        assert_eq!(count.load(Ordering::Relaxed), 0);
        // A read beyond the slots fetches its bytes (and the store is unreachable).
        assert!(src.read_at(150, &mut buf[..100]).is_err());
        drop((h1, h2));
    }

    /// A run across a slot's edge is charged in parts: to that slot for the bytes inside it,
    /// to a new slot for the rest; its read takes each part from its slot, and once every
    /// announced byte is read nothing stays held (charged to none, its read consumed the first
    /// slot's bytes, which was freed before its own run was read).
    #[test]
    fn a_run_across_a_slots_edge_is_charged_in_parts() {
        let whole: Vec<u8> = (0..=255u8).cycle().take(300).collect();
        let src = unreachable(300);
        let count = Arc::new(AtomicU64::new(0));
        let (h1, _) = src.slots.announce(0, 100, &[(0, 100, 100)], &count, u64::MAX);
        let (h2, fresh) = src.slots.announce(50, 200, &[(50, 200, 150)], &count, u64::MAX);
        assert_eq!(fresh.iter().map(|(s, sl)| (*s, sl.end)).collect::<Vec<_>>(), [(100, 200)]);
        arrive_from(&src.slots, &whole);
        let mut buf = vec![0u8; 150];
        src.read_at(50, &mut buf).unwrap();
        assert_eq!(buf, whole[50..200]);
        // The first slot still has the bytes of its own run.
        src.read_at(0, &mut buf[..100]).unwrap();
        assert_eq!(buf[..100], whole[..100]);
        assert!(src.slots.map.lock().unwrap().is_empty());
        assert_eq!(count.load(Ordering::Relaxed), 0);
        drop((h1, h2));
    }

    /// A job's read-ahead is bounded by the job's budget only: a GET beyond the source's own cap
    /// for hints (128 MiB) is still made (it was dropped, and a complete -> 8 with a budget of
    /// 1 GiB read every column slice with a GET of its own: 40,000 GETs, 28 s); a hint beyond it
    /// is not.
    #[test]
    fn a_jobs_read_ahead_is_not_held_to_the_cap_for_hints() {
        let len = 3 * PREFETCH_CAP;
        let src = unreachable(len);
        let count = Arc::new(AtomicU64::new(0));
        let big = 2 * PREFETCH_CAP;
        let hold = src.prefetch_runs(0, big, &[(0, big, big)], &count);
        assert!(hold.is_some());
        assert_eq!(count.load(Ordering::Relaxed), big, "the job's GET was dropped");
        src.prefetch(big, PREFETCH_CAP);
        assert!(src.slots.slot_for(big, big + 1).is_none(), "a hint went beyond the cap");
        drop(hold);
        assert_eq!(count.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn urls() {
        let u = ObjectUrl::parse(Path::new("obs://b/x/y/")).unwrap();
        assert_eq!((u.scheme.as_str(), u.bucket.as_str(), u.key.as_str()), ("obs", "b", "x/y"));
        assert_eq!(u.url_of("x/y/z"), PathBuf::from("obs://b/x/y/z"));
        let u = ObjectUrl::parse(Path::new("s3://b")).unwrap();
        assert_eq!(u.key, "");
        for bad in ["s3://", "s3:///k", "http://b/k", "s3://b/a/../k", "s3://b/a//k"] {
            assert!(ObjectUrl::parse(Path::new(bad)).is_err(), "{bad}");
        }
    }
}
