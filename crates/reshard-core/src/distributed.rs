//! One transform spread over the processes of an existing launcher (mpirun, srun, torchrun,
//! msrun): `reshard transform --distributed`.
//!
//! Every process builds the same plan and derives from it the same split of the destination
//! ranks ([`split`]: contiguous shares balanced by bytes), writes its own share with
//! [`execute`], and records the outcome in `reshard_share_{i}_of_{n}.json` in the output folder
//! (atomically, like every output). Then it waits until every share is recorded as done and
//! verified, and fails if one is recorded as failed or falls silent for longer than the timeout.
//! The processes never talk to each other: the records are the only channel, so a folder that
//! all of them see is all they need, or an object store's prefix (`s3://`, `obs://`), where each
//! record is an object written with one PUT.
//!
//! ```no_run
//! # use reshard_core::{distributed, execute::ExecuteOptions, plan::{Plan, PlanOptions}};
//! # use std::path::Path;
//! let process = distributed::process_from_env(None, None)?; // OMPI_COMM_WORLD_RANK, SLURM_PROCID, ...
//! let plan = Plan::build(Path::new("src"), None, Some(Path::new("dst.ckpt")), &PlanOptions::default())?;
//! let d = distributed::DistributedOptions { process, timeout: std::time::Duration::from_secs(600) };
//! let report = distributed::execute_distributed(&plan, Path::new("out"), &[], &ExecuteOptions::default(), &d)?;
//! println!("this process wrote ranks {:?}; all {} shares verified", report.mine(), report.shares.ranks.len());
//! # Ok::<(), reshard_core::Error>(())
//! ```

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::execute::{execute, job_fingerprint, ExecuteOptions, WrittenFile};
use crate::manifest::Manifest;
use crate::plan::{fmt_rank_folders, Plan};

/// The environment variables a launcher sets for each process it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launcher {
    /// The launcher, for messages.
    pub name: &'static str,
    /// The variable holding the process index (0-based).
    pub index: &'static str,
    /// The variable holding the process count.
    pub count: &'static str,
}

/// Launchers in the order their variables are tried. A launcher started by another inherits the
/// outer one's variables, so the innermost (the one that started this process) comes first:
/// torchrun and msrun are started by srun or mpirun rather than the reverse, and mpirun inside a
/// Slurm job inherits `SLURM_PROCID` (0 for every process it starts from the batch script).
/// `RANK_ID`/`RANK_SIZE`, MindSpore's convention, often exported by hand, come last.
pub const LAUNCHERS: [Launcher; 6] = [
    Launcher { name: "torchrun", index: "RANK", count: "WORLD_SIZE" },
    Launcher { name: "msrun", index: "MS_NODE_ID", count: "MS_WORKER_NUM" },
    Launcher { name: "Open MPI", index: "OMPI_COMM_WORLD_RANK", count: "OMPI_COMM_WORLD_SIZE" },
    Launcher { name: "MPICH/Hydra", index: "PMI_RANK", count: "PMI_SIZE" },
    Launcher { name: "Slurm", index: "SLURM_PROCID", count: "SLURM_NTASKS" },
    Launcher { name: "RANK_ID/RANK_SIZE", index: "RANK_ID", count: "RANK_SIZE" },
];

/// Which process of the job this is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    /// This process's share, or `None` for msrun's scheduler process (`MS_ROLE=MS_SCHED`), which
    /// runs the command too: it takes no share and only waits for the job's result.
    pub index: Option<u32>,
    /// Number of processes (shares).
    pub count: u32,
    /// Where index and count came from, for the log.
    pub from: String,
}

/// The process index and count: `index`/`count` when given (`--process-index`,
/// `--process-count`), else from the first launcher of [`LAUNCHERS`] whose two variables are
/// set, as `env` reports them. No index and count at all is an error, not a one-process run.
pub fn detect_process(index: Option<u32>, count: Option<u32>, env: &dyn Fn(&str) -> Option<String>) -> Result<Process> {
    let var = |name: &str| env(name).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
    let parse = |name: &str, v: String| {
        v.parse::<u32>().map_err(|_| {
            Error::Invalid(format!("--distributed: {name}={v:?} is not a process index or count (a number)"))
        })
    };
    // msrun starts the command once more as its scheduler, without MS_NODE_ID.
    if index.is_none() && var("MS_ROLE").as_deref() == Some("MS_SCHED") {
        let count = match count {
            Some(c) => c,
            None => match var("MS_WORKER_NUM") {
                Some(v) => parse("MS_WORKER_NUM", v)?,
                None => return Err(Error::Invalid(
                    "--distributed: msrun's scheduler (MS_ROLE=MS_SCHED) without MS_WORKER_NUM; give --process-count"
                        .into(),
                )),
            },
        };
        if count == 0 {
            return Err(Error::Invalid("--distributed: the process count is 0".into()));
        }
        return Ok(Process { index: None, count, from: "msrun's scheduler (MS_ROLE=MS_SCHED): no share".into() });
    }
    let found = LAUNCHERS.iter().find(|l| var(l.index).is_some() && var(l.count).is_some());
    let (env_index, env_count) = match found {
        Some(l) => (
            Some(parse(l.index, var(l.index).unwrap_or_default())?),
            Some(parse(l.count, var(l.count).unwrap_or_default())?),
        ),
        None => (None, None),
    };
    let (Some(i), Some(c)) = (index.or(env_index), count.or(env_count)) else {
        let vars: Vec<String> = LAUNCHERS.iter().map(|l| format!("{}/{} ({})", l.index, l.count, l.name)).collect();
        return Err(Error::Invalid(format!(
            "--distributed needs this process's index and the process count, and none of the launcher variables \
             is set: {}; run it under mpirun, srun, torchrun or msrun, or give --process-index and --process-count",
            vars.join(", ")
        )));
    };
    let from = match (index, count, found) {
        (Some(_), Some(_), _) => "--process-index/--process-count".to_string(),
        (None, None, Some(l)) => format!("{}/{} ({})", l.index, l.count, l.name),
        (_, _, Some(l)) => format!("--process-index/--process-count and {}/{} ({})", l.index, l.count, l.name),
        (_, _, None) => "--process-index/--process-count".to_string(),
    };
    if c == 0 || i >= c {
        return Err(Error::Invalid(format!(
            "--distributed: process index {i} is not below the process count {c} (from {from})"
        )));
    }
    Ok(Process { index: Some(i), count: c, from })
}

/// [`detect_process`] on this process's environment.
pub fn process_from_env(index: Option<u32>, count: Option<u32>) -> Result<Process> {
    detect_process(index, count, &|k| std::env::var(k).ok())
}

/// Splits items of the given weights (bytes) into `count` contiguous shares balanced by weight:
/// an item goes to the share its weight's midpoint falls in (item `r` with `s` bytes before it
/// goes to share `floor((s + w/2) * count / total)`), so no share exceeds `total / count` by more
/// than one item's weight. With at least as many shares as items, item `i` is share `i`'s only
/// one and the shares beyond are empty (idle processes). Items of no weight count as one byte
/// each when all are empty. The result is a pure function of the weights and the count.
pub fn split_by_bytes(weights: &[u64], count: u32) -> Vec<Range<usize>> {
    let n = weights.len();
    let c = count as usize;
    if c >= n {
        return (0..c).map(|i| if i < n { i..i + 1 } else { n..n }).collect();
    }
    let all_empty = weights.iter().all(|&w| w == 0);
    let w = |i: usize| if all_empty { 1u128 } else { u128::from(weights[i]) };
    let total: u128 = (0..n).map(w).sum();
    let mut shares = vec![0..0; c];
    let mut before = 0u128;
    let mut share_start = 0usize;
    let mut current = 0usize;
    for i in 0..n {
        let s = (((2 * before + w(i)) * c as u128) / (2 * total)).min(c as u128 - 1) as usize;
        // Non-decreasing in i: close the shares before it.
        while current < s {
            shares[current] = share_start..i;
            share_start = i;
            current += 1;
        }
        before += w(i);
    }
    shares[current] = share_start..n;
    for sh in shares.iter_mut().skip(current + 1) {
        *sh = n..n;
    }
    shares
}

/// The destination ranks of each process: `ranks` (all when empty) split by [`split_by_bytes`]
/// over the bytes each rank writes. Every process of a job computes the same shares.
pub fn split(plan: &Plan, ranks: &[u32], count: u32) -> Result<Shares> {
    let ranks = crate::exec::job_ranks(plan, ranks);
    let weights: Vec<u64> =
        ranks.par_iter().map(|&r| plan.rank_plan(r).map(|p| p.bytes_written())).collect::<Result<_>>()?;
    let ranges = split_by_bytes(&weights, count);
    Ok(Shares {
        bytes: ranges.iter().map(|g| weights[g.clone()].iter().sum()).collect(),
        ranks: ranges.into_iter().map(|g| ranks[g].to_vec()).collect(),
    })
}

/// The split of a job's destination ranks over its processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shares {
    /// Destination ranks of each process, ascending; empty for an idle process.
    pub ranks: Vec<Vec<u32>>,
    /// Content bytes each process writes.
    pub bytes: Vec<u64>,
}

/// Settings of a distributed transform.
#[derive(Debug, Clone)]
pub struct DistributedOptions {
    /// Which process this is ([`process_from_env`]).
    pub process: Process,
    /// How long a share may stay silent (no record, or a record that does not change) before the
    /// others give up on it. A working process rewrites its record several times per timeout.
    pub timeout: Duration,
}

/// What a distributed transform did.
#[derive(Debug, Clone)]
pub struct DistributedReport {
    /// This process.
    pub process: Process,
    /// Every process's ranks and bytes.
    pub shares: Shares,
    /// The outputs this process wrote or kept.
    pub files: Vec<WrittenFile>,
    /// Time spent computing the split (every rank's size).
    pub split_time: Duration,
    /// Time spent waiting for, and verifying, the other shares after this process's own.
    pub wait_time: Duration,
}

impl DistributedReport {
    /// This process's destination ranks.
    pub fn mine(&self) -> &[u32] {
        self.process.index.and_then(|i| self.shares.ranks.get(i as usize)).map_or(&[], Vec::as_slice)
    }
}

/// Where a share's record lives.
pub fn record_path(dst_dir: &Path, share: u32, count: u32) -> PathBuf {
    dst_dir.join(format!("reshard_share_{share}_of_{count}.json"))
}

/// The state of a share, as its record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
enum State {
    /// Started, planning.
    Starting,
    /// Writing its ranks.
    Running,
    /// Every rank written (or kept) and recorded in the manifests.
    Done,
    /// Failed; `error` says why.
    Failed,
}

/// One output as a share's record lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct RecordedFile {
    rank: u32,
    /// Relative to the output folder.
    path: PathBuf,
    size: u64,
    crc32: u32,
}

/// `reshard_share_{i}_of_{n}.json`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct ShareRecord {
    version: u32,
    /// The job's fingerprint (that of its manifest entries); empty before the plan is made.
    job: String,
    share: u32,
    shares: u32,
    state: State,
    ranks: Vec<u32>,
    host: String,
    pid: u32,
    /// Incremented at each heartbeat, so that a live process's record keeps changing.
    beat: u64,
    bytes_done: u64,
    bytes_total: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(default)]
    files: Vec<RecordedFile>,
    /// Set by the process once it has reported a failure of the job (its own or another
    /// share's) and is about to exit: see [`FailureAck`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    failure_seen: bool,
}

impl ShareRecord {
    fn who(&self, path: &Path) -> String {
        let ranks = if self.ranks.is_empty() { "no ranks".to_string() } else { fmt_rank_folders(&self.ranks) };
        format!(
            "share {} of {} ({}; host {}, pid {}; {})",
            self.share,
            self.shares,
            ranks,
            self.host,
            self.pid,
            path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
        )
    }
}

/// Whether a share other than `me` recorded a failure in this run.
fn other_failed(dir: &Path, epoch: &Epoch, me: u32, count: u32) -> bool {
    (0..count).filter(|&j| j != me).any(|j| {
        read_share(dir, j, count)
            .is_some_and(|(path, bytes, r)| r.state == State::Failed && epoch.fresh(j, &path, &bytes))
    })
}

/// Share `j`'s record in `dir`: its path, bytes and contents (None when absent or unreadable).
fn read_share(dir: &Path, j: u32, count: u32) -> Option<(PathBuf, Vec<u8>, ShareRecord)> {
    let path = record_path(dir, j, count);
    let bytes = read_record(&path).ok()??;
    let r = serde_json::from_slice::<ShareRecord>(&bytes).ok()?;
    Some((path, bytes, r))
}

/// A flag raised when either `user` (a caller's cancel flag) or `stop` (the heartbeat's) is:
/// `stop` itself, raised now if `user` already is, else by a thread that watches `user` while
/// `stop` is down and the relay is alive.
fn relay_cancel(user: Arc<AtomicBool>, stop: Arc<AtomicBool>) -> Arc<AtomicBool> {
    if user.load(Ordering::Acquire) {
        stop.store(true, Ordering::Release);
        return stop;
    }
    let watch = stop.clone();
    std::thread::spawn(move || {
        while Arc::strong_count(&watch) > 1 && !watch.load(Ordering::Acquire) {
            if user.load(Ordering::Acquire) {
                watch.store(true, Ordering::Release);
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    stop
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "?".into())
}

/// This process's side of the job: its record, kept alive by a heartbeat thread while it works.
pub struct Coordinator {
    dst_dir: PathBuf,
    options: DistributedOptions,
    /// This process's record (`None` for msrun's scheduler, which has no share).
    own: Option<(PathBuf, Arc<Mutex<ShareRecord>>)>,
    /// What tells this run's records from an earlier run's.
    epoch: Epoch,
    bytes_done: Arc<AtomicU64>,
    heartbeat: Option<(mpsc::Sender<()>, std::thread::JoinHandle<()>)>,
    /// Set by the heartbeat when another share of this run recorded a failure: this share's
    /// writing is then stopped (through `stop`) rather than finished for nothing, and the
    /// process reports that share's error within a beat.
    peer_failed: Arc<AtomicBool>,
    /// The cancel flag this share's writing watches; the heartbeat raises it on a peer's failure.
    stop: Arc<AtomicBool>,
}

impl Coordinator {
    /// Records this process as started (before it plans, so that a failure to plan is recorded
    /// too) and starts its heartbeat.
    pub fn start(dst_dir: &Path, options: &DistributedOptions) -> Result<Coordinator> {
        if options.timeout.is_zero() {
            return Err(Error::Invalid("--distributed: the timeout must be at least 1 second".into()));
        }
        let mut c = Coordinator {
            dst_dir: dst_dir.to_path_buf(),
            options: options.clone(),
            own: None,
            epoch: Epoch::Since(SystemTime::now()),
            bytes_done: Arc::new(AtomicU64::new(0)),
            heartbeat: None,
            peer_failed: Arc::new(AtomicBool::new(false)),
            stop: Arc::new(AtomicBool::new(false)),
        };
        if crate::storage::is_url(dst_dir) {
            c.epoch = Epoch::before(dst_dir, options.process.index, options.process.count)?;
        }
        let Some(index) = options.process.index else {
            return Ok(c);
        };
        let path = record_path(dst_dir, index, options.process.count);
        let record = ShareRecord {
            version: 1,
            job: String::new(),
            share: index,
            shares: options.process.count,
            state: State::Starting,
            ranks: Vec::new(),
            host: host_name(),
            pid: std::process::id(),
            beat: 0,
            bytes_done: 0,
            bytes_total: 0,
            error: None,
            files: Vec::new(),
            failure_seen: false,
        };
        write_record(&path, &record, false)?;
        if let Epoch::Since(t) = &mut c.epoch {
            *t = std::fs::metadata(&path).and_then(|m| m.modified()).unwrap_or_else(|_| SystemTime::now());
        }
        let record = Arc::new(Mutex::new(record));
        // Several beats per timeout, so that a live process is never taken for a dead one.
        let period = (options.timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(10));
        let (tx, rx) = mpsc::channel::<()>();
        let (beat_path, beat_record, done) = (path.clone(), record.clone(), c.bytes_done.clone());
        let (dir, epoch, count) = (dst_dir.to_path_buf(), c.epoch.clone(), options.process.count);
        let (peer_failed, stop) = (c.peer_failed.clone(), c.stop.clone());
        let handle = std::thread::spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(period) {
                {
                    let Ok(mut r) = beat_record.lock() else { return };
                    r.beat += 1;
                    r.bytes_done = done.load(Ordering::Relaxed);
                    // A missed beat is harmless; the next one, or the final record, follows.
                    let _ = write_record(&beat_path, &r, false);
                }
                // Another share of this run failed: stop writing this one, which cannot
                // complete the job (under mpirun the failed process waits for this one to say
                // why the job failed before any exits; see `FailureAck`).
                if !peer_failed.load(Ordering::Acquire) && other_failed(&dir, &epoch, index, count) {
                    peer_failed.store(true, Ordering::Release);
                    stop.store(true, Ordering::Release);
                }
            }
        });
        c.own = Some((path, record));
        c.heartbeat = Some((tx, handle));
        Ok(c)
    }

    /// Stops the heartbeat: after this, only the final record is written.
    fn stop_heartbeat(&mut self) {
        if let Some((tx, handle)) = self.heartbeat.take() {
            drop(tx);
            let _ = handle.join();
        }
    }

    /// Updates this process's record under its lock and writes it.
    fn update(&self, sync: bool, f: impl FnOnce(&mut ShareRecord)) -> Result<()> {
        let Some((path, record)) = &self.own else {
            return Ok(());
        };
        let mut r = record.lock().map_err(|_| Error::Invalid("internal error: share record lock poisoned".into()))?;
        f(&mut r);
        write_record(path, &r, sync)
    }

    /// Records `e` as this share's failure (the other processes stop with it) and returns it.
    pub fn fail(mut self, e: Error) -> Error {
        self.stop_heartbeat();
        match self.update(true, |r| {
            r.state = State::Failed;
            r.error = Some(e.to_string());
        }) {
            Ok(()) => e,
            // The others will time out on this share; say that its failure could not be recorded.
            Err(w) => {
                Error::Invalid(format!("{e} (and the failure could not be recorded for the other processes: {w})"))
            }
        }
    }

    /// Splits the job, writes this process's share, records the outcome and waits for every
    /// other share to be recorded as done and verified.
    pub fn run(mut self, plan: &Plan, ranks: &[u32], opts: &ExecuteOptions) -> Result<DistributedReport> {
        let t0 = Instant::now();
        let count = self.options.process.count;
        let shares = match split(plan, ranks, count) {
            Ok(s) => s,
            Err(e) => return Err(self.fail(e)),
        };
        let split_time = t0.elapsed();
        let job = job_fingerprint(plan, opts);
        let index = self.options.process.index;
        let mine: Vec<u32> = index.and_then(|i| shares.ranks.get(i as usize).cloned()).unwrap_or_default();
        let total = index.and_then(|i| shares.bytes.get(i as usize).copied()).unwrap_or(0);
        self.update(false, |r| {
            r.job = job.clone();
            r.ranks = mine.clone();
            r.state = State::Running;
            r.bytes_total = total;
        })?;
        let written = if mine.is_empty() {
            Ok(Vec::new())
        } else {
            let mut o = opts.clone();
            // The heartbeat stops this share when another fails (through `stop`, never through
            // the caller's cancel flag, which stops it too).
            o.cancel = Some(match opts.cancel.clone() {
                None => self.stop.clone(),
                Some(u) => relay_cancel(u, self.stop.clone()),
            });
            let done = self.bytes_done.clone();
            let user = opts.progress.clone();
            o.progress = Some(Arc::new(move |d: u64, t: u64| {
                done.store(d, Ordering::Relaxed);
                if let Some(p) = &user {
                    p(d, t);
                }
            }));
            execute(plan, &self.dst_dir, &mine, &o)
        };
        let files = match written {
            Ok(f) => f,
            // Stopped because another share failed: report that share's failure (its record
            // says what failed: rank, file, parameter), and record it as this share's outcome.
            Err(e) if self.peer_failed.load(Ordering::Acquire) => {
                let why = self.wait_for_others(&job, &shares, opts).err().unwrap_or(e);
                return Err(self.fail(why));
            }
            Err(e) => return Err(self.fail(e)),
        };
        let recorded: Vec<RecordedFile> = files
            .iter()
            .map(|f| RecordedFile {
                rank: f.rank,
                path: f.path.strip_prefix(&self.dst_dir).map(Path::to_path_buf).unwrap_or_else(|_| f.path.clone()),
                size: f.len,
                crc32: f.crc32,
            })
            .collect();
        if let Err(why) = check_files(&self.dst_dir, &job, &mine, &recorded) {
            let e = Error::Distributed {
                path: self.dst_dir.clone(),
                detail: format!("this process's own outputs do not verify after writing them: {why}"),
            };
            return Err(self.fail(e));
        }
        self.stop_heartbeat();
        self.update(opts.sync, |r| {
            r.state = State::Done;
            r.bytes_done = total;
            r.files = recorded;
        })?;
        let t1 = Instant::now();
        self.wait_for_others(&job, &shares, opts)?;
        Ok(DistributedReport {
            process: self.options.process.clone(),
            shares,
            files,
            split_time,
            wait_time: t1.elapsed(),
        })
    }

    /// Waits until every other share is recorded as done and its outputs verify.
    fn wait_for_others(&self, job: &str, shares: &Shares, opts: &ExecuteOptions) -> Result<()> {
        let count = self.options.process.count;
        let timeout = self.options.timeout;
        let start = Instant::now();
        // share -> (last bytes of its record, when they last changed, what to say about it).
        let mut pending: BTreeMap<u32, (Option<Vec<u8>>, Instant, String)> = (0..count)
            .filter(|&j| Some(j) != self.options.process.index)
            .map(|j| {
                (
                    j,
                    (
                        None,
                        start,
                        "no record yet (the process has not started, or died before its first record)".into(),
                    ),
                )
            })
            .collect();
        loop {
            let now = Instant::now();
            let mut finished = Vec::new();
            for (&j, (last, changed, note)) in pending.iter_mut() {
                let path = record_path(&self.dst_dir, j, count);
                let bytes = match read_record(&path) {
                    Ok(b) => b,
                    // An unreadable record (the store did not answer this poll) is not news.
                    Err(e) => {
                        *note = format!("its record cannot be read: {e}");
                        continue;
                    }
                };
                if bytes != *last {
                    *changed = now;
                    last.clone_from(&bytes);
                }
                let Some(bytes) = bytes else { continue };
                let Ok(r) = serde_json::from_slice::<ShareRecord>(&bytes) else {
                    *note = "its record is not readable JSON".into();
                    continue;
                };
                let expected = shares.ranks.get(j as usize).map_or(&[][..], Vec::as_slice);
                let fresh = self.epoch.fresh(j, &path, &bytes);
                let same_job = r.job == job && r.ranks == expected && r.share == j && r.shares == count;
                match r.state {
                    // A failure of this run: before its plan (no job yet) or in this very job.
                    State::Failed if fresh && (r.job.is_empty() || same_job) => {
                        return Err(Error::Distributed {
                            detail: format!(
                                "{} failed, so the job cannot complete: {}",
                                r.who(&path),
                                r.error.as_deref().unwrap_or("(no message)")
                            ),
                            path,
                        });
                    }
                    State::Failed => {
                        *note = format!(
                            "it recorded a failure before this process started (an earlier run's?), waiting for it to \
                             be run again: {}",
                            r.error.as_deref().unwrap_or("(no message)")
                        )
                    }
                    _ if !r.job.is_empty() && !same_job => {
                        *note = format!(
                            "its record is for another job (fingerprint {}, ranks {:?}; this process: {job}, {:?}): \
                             every process must run the same command",
                            r.job, r.ranks, expected
                        )
                    }
                    State::Done => match check_files(&self.dst_dir, job, expected, &r.files) {
                        Ok(()) => finished.push(j),
                        Err(why) => *note = format!("recorded as done, but {why}"),
                    },
                    State::Starting => *note = format!("started on host {} (pid {}), planning", r.host, r.pid),
                    State::Running => {
                        *note = format!(
                            "running on host {} (pid {}), {} of {} bytes written",
                            r.host, r.pid, r.bytes_done, r.bytes_total
                        )
                    }
                }
            }
            for j in finished {
                pending.remove(&j);
            }
            if pending.is_empty() {
                return Ok(());
            }
            let silent: Vec<String> = pending
                .iter()
                .filter(|(_, (_, changed, _))| now.duration_since(*changed) >= timeout)
                .map(|(&j, (_, _, note))| {
                    let ranks = shares.ranks.get(j as usize).map_or(String::new(), |r| fmt_rank_folders(r));
                    format!(
                        "share {j} of {count} ({}): {note}",
                        if ranks.is_empty() { "no ranks".into() } else { ranks }
                    )
                })
                .collect();
            if !silent.is_empty() {
                return Err(Error::Distributed {
                    path: self.dst_dir.clone(),
                    detail: format!(
                        "gave up after {}s without news from {} share(s) (the process died or never started?): {}; \
                         this process's own share is complete, and a rerun of the same command finishes the job, \
                         keeping the ranks that verify",
                        timeout.as_secs_f64(),
                        silent.len(),
                        silent.join("; ")
                    ),
                });
            }
            if let Some(c) = &opts.cancel {
                if c.load(Ordering::Acquire) {
                    return Err(Error::Cancelled { path: self.dst_dir.clone() });
                }
            }
            // Polls grow with the wait (a fiftieth of it, 2 ms to 1 s), so that noticing the
            // last share adds at most about 2% to the wait, and a long wait of many processes
            // on a network filesystem reads each record about once a second.
            // (Each poll of an object store is a request per share: 50 ms at least.)
            let least = if crate::storage::is_url(&self.dst_dir) { 50 } else { 2 };
            let pause = (start.elapsed() / 50).clamp(Duration::from_millis(least), Duration::from_secs(1));
            std::thread::sleep(pause);
        }
    }
}

impl Coordinator {
    /// What this process needs, once it has reported the job's failure, to tell the others and
    /// wait for them ([`FailureAck::acknowledge`]); taken at the start, it outlives the
    /// coordinator.
    pub fn failure_ack(&self) -> FailureAck {
        FailureAck { dst_dir: self.dst_dir.clone(), options: self.options.clone(), epoch: self.epoch.clone() }
    }
}

/// The last step of a failed distributed job. A launcher such as Open MPI's mpirun kills every
/// other process as soon as one exits non-zero, so a process that exits at once after a failure
/// takes the others down before they have said why the job failed. So each process, once it has
/// printed its error, marks its record `failure_seen` and waits (up to the timeout) until every
/// other share's record of this run carries the mark too; then all exit, each having printed.
#[derive(Debug, Clone)]
pub struct FailureAck {
    dst_dir: PathBuf,
    options: DistributedOptions,
    epoch: Epoch,
}

impl FailureAck {
    /// When a share of this run recorded a failure: marks this process's record as having
    /// reported it, then, with `wait`, waits until every other share's record of this run is
    /// marked, or the timeout passes, or `stop` says so (a signal). Does nothing when no failure
    /// is recorded (a job given up on a silent share, a bad command line) or for a process with
    /// no share (msrun's scheduler). Errors are ignored: the job has failed already, and this
    /// only orders the exits.
    pub fn acknowledge(&self, wait: bool, stop: &dyn Fn() -> bool) {
        let Some(me) = self.options.process.index else { return };
        let count = self.options.process.count;
        let read = |j: u32| read_share(&self.dst_dir, j, count);
        let this_run = |j: u32, path: &Path, bytes: &[u8]| j == me || self.epoch.fresh(j, path, bytes);
        let Some((own, _, mut record)) = read(me) else { return };
        if record.state != State::Failed && !other_failed(&self.dst_dir, &self.epoch, me, count) {
            return;
        }
        record.failure_seen = true;
        if write_record(&own, &record, false).is_err() || !wait {
            return;
        }
        let start = Instant::now();
        let mut pending: Vec<u32> = (0..count).filter(|&j| j != me).collect();
        while !pending.is_empty() && start.elapsed() < self.options.timeout && !stop() {
            pending.retain(|&j| !read(j).is_some_and(|(path, bytes, r)| r.failure_seen && this_run(j, &path, &bytes)));
            if pending.is_empty() {
                break;
            }
            let least = if crate::storage::is_url(&self.dst_dir) { 50 } else { 5 };
            std::thread::sleep((start.elapsed() / 50).clamp(Duration::from_millis(least), Duration::from_secs(1)));
        }
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.stop_heartbeat();
    }
}

/// Writes a share record whole: atomically in a folder, as one PUT in an object store (which
/// shows an object only complete).
fn write_record(path: &Path, r: &ShareRecord, sync: bool) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(r).map_err(|e| Error::Invalid(format!("share record: {e}")))?;
    crate::storage::small::write(path, &bytes, sync)
}

/// The bytes of a share record, `None` when there is none.
fn read_record(path: &Path) -> Result<Option<Vec<u8>>> {
    crate::storage::small::read(path, 64 << 20, "share record")
}

/// What tells this run's records from an earlier run's: in a folder, a record modified at or
/// after this process's first record (by the folder's clock, its mtime); in an object store,
/// whose times are the server's and to the second, a record whose bytes differ from those found
/// before this process wrote its first record (a record names its process's host and pid, and
/// counts its heartbeats, so a new one never repeats an old one).
#[derive(Debug, Clone)]
enum Epoch {
    Since(SystemTime),
    Before(BTreeMap<u32, Option<Vec<u8>>>),
}

impl Epoch {
    /// The other shares' records as they are before this process writes its own.
    fn before(dst_dir: &Path, index: Option<u32>, count: u32) -> Result<Epoch> {
        let mut seen = BTreeMap::new();
        for j in (0..count).filter(|&j| Some(j) != index) {
            seen.insert(j, read_record(&record_path(dst_dir, j, count))?);
        }
        Ok(Epoch::Before(seen))
    }

    /// Whether share `share`'s record (at `path`, now `bytes`) was written by this run.
    fn fresh(&self, share: u32, path: &Path, bytes: &[u8]) -> bool {
        match self {
            Epoch::Since(t) => std::fs::metadata(path).and_then(|m| m.modified()).is_ok_and(|m| m >= *t),
            Epoch::Before(found) => found.get(&share).is_none_or(|b| b.as_deref() != Some(bytes)),
        }
    }
}

/// Whether a share's recorded outputs are this job's, complete and listed in their folders'
/// manifests with the same size and crc32 (computed by the process that wrote them, or by
/// re-reading the file when an earlier run's was kept); the outputs are not read again.
fn check_files(dst_dir: &Path, job: &str, ranks: &[u32], files: &[RecordedFile]) -> std::result::Result<(), String> {
    let listed: Vec<u32> = files.iter().map(|f| f.rank).collect();
    if listed != ranks {
        return Err(format!("its record lists ranks {listed:?} where the share has {ranks:?}"));
    }
    for f in files {
        let path = dst_dir.join(&f.path);
        let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
            return Err(format!("its record names {}, not a file in a rank folder", f.path.display()));
        };
        let entry = read_manifest(dir)?.and_then(|m| m.files.into_iter().find(|e| e.name == name));
        match entry {
            None => return Err(format!("{} is not in its folder's manifest", path.display())),
            Some(e) if e.plan_fingerprint != job || e.size != f.size || e.crc32 != f.crc32 => {
                return Err(format!(
                    "the manifest lists {} as {} bytes, crc32 {:#010x} of job {}, not {} bytes, crc32 {:#010x} of job {job}",
                    path.display(),
                    e.size,
                    e.crc32,
                    e.plan_fingerprint,
                    f.size,
                    f.crc32
                ))
            }
            Some(_) => {}
        }
        match output_len(&path) {
            Ok(len) if len == f.size => {}
            Ok(len) => return Err(format!("{} has {len} bytes, not the {} recorded", path.display(), f.size)),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
    }
    Ok(())
}

/// The manifest of the output folder `dir` (in an object store, the manifest object, whose
/// entries carry ETags as well), `None` when there is no readable one; `Err` says why it could not
/// be read.
fn read_manifest(dir: &Path) -> std::result::Result<Option<Manifest>, String> {
    if !crate::storage::is_url(dir) {
        return Ok(Manifest::read(dir));
    }
    let bytes = crate::storage::small::read(&dir.join(crate::manifest::MANIFEST_NAME), 64 << 20, "manifest")
        .map_err(|e| e.to_string())?;
    Ok(bytes.and_then(|b| serde_json::from_slice(&b).ok()))
}

/// The size of an output file or object.
fn output_len(path: &Path) -> std::result::Result<u64, String> {
    if crate::storage::is_url(path) {
        #[cfg(feature = "s3")]
        return match crate::storage::object::head(path) {
            Ok(Some((len, _))) => Ok(len),
            Ok(None) => Err("no such object".into()),
            Err(e) => Err(e.to_string()),
        };
    }
    std::fs::metadata(path).map(|m| m.len()).map_err(|e| e.to_string())
}

/// Runs this process's share of the job and waits for the others: [`Coordinator::start`] then
/// [`Coordinator::run`].
pub fn execute_distributed(
    plan: &Plan,
    dst_dir: &Path,
    ranks: &[u32],
    opts: &ExecuteOptions,
    d: &DistributedOptions,
) -> Result<DistributedReport> {
    crate::execute::check_output(&plan.src_dir, dst_dir, &opts.prefix)?;
    Coordinator::start(dst_dir, d)?.run(plan, ranks, opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: BTreeMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    fn detect(vars: &[(&str, &str)]) -> Result<Process> {
        detect_process(None, None, &env(vars))
    }

    #[test]
    fn each_launcher_is_recognised() {
        for l in LAUNCHERS {
            let p = detect(&[(l.index, "2"), (l.count, "5")]).unwrap();
            assert_eq!((p.index, p.count), (Some(2), 5), "{}", l.name);
            assert!(p.from.contains(l.name), "{}", p.from);
        }
    }

    #[test]
    fn the_innermost_launcher_wins() {
        // torchrun under srun, msrun under srun, mpirun inside a Slurm batch script, Open MPI
        // over a hand-set RANK_ID: the launcher that started the process is taken.
        let slurm = [("SLURM_PROCID", "0"), ("SLURM_NTASKS", "4"), ("RANK_ID", "3"), ("RANK_SIZE", "8")];
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut v = slurm.to_vec();
            v.extend_from_slice(extra);
            detect(&v).unwrap()
        };
        assert_eq!(with(&[("RANK", "5"), ("WORLD_SIZE", "8")]).index, Some(5));
        assert_eq!(with(&[("MS_NODE_ID", "6"), ("MS_WORKER_NUM", "8")]).index, Some(6));
        assert_eq!(with(&[("OMPI_COMM_WORLD_RANK", "1"), ("OMPI_COMM_WORLD_SIZE", "2")]).index, Some(1));
        assert_eq!(with(&[("PMI_RANK", "2"), ("PMI_SIZE", "3")]).count, 3);
        assert_eq!(with(&[]).from, "SLURM_PROCID/SLURM_NTASKS (Slurm)");
        let p =
            with(&[("RANK", "1"), ("WORLD_SIZE", "2"), ("OMPI_COMM_WORLD_RANK", "0"), ("OMPI_COMM_WORLD_SIZE", "4")]);
        assert_eq!((p.index, p.count), (Some(1), 2));
        // Half a pair is skipped: RANK without WORLD_SIZE does not hide Open MPI's pair.
        let p = detect(&[("RANK", "7"), ("OMPI_COMM_WORLD_RANK", "1"), ("OMPI_COMM_WORLD_SIZE", "2")]).unwrap();
        assert_eq!((p.index, p.count), (Some(1), 2));
        assert_eq!(detect(&[("RANK_ID", "1"), ("RANK_SIZE", "2")]).unwrap().index, Some(1));
    }

    #[test]
    fn flags_override_the_environment_and_nothing_is_an_error() {
        let e = env(&[("OMPI_COMM_WORLD_RANK", "1"), ("OMPI_COMM_WORLD_SIZE", "2")]);
        let p = detect_process(Some(0), Some(3), &e).unwrap();
        assert_eq!((p.index, p.count, p.from.as_str()), (Some(0), 3, "--process-index/--process-count"));
        let p = detect_process(None, Some(4), &e).unwrap();
        assert_eq!((p.index, p.count), (Some(1), 4));
        assert!(p.from.contains("OMPI_COMM_WORLD_RANK"), "{}", p.from);
        let p = detect_process(Some(2), Some(3), &env(&[])).unwrap();
        assert_eq!(p.index, Some(2));
        let msg = detect(&[]).unwrap_err().to_string();
        for v in [
            "OMPI_COMM_WORLD_RANK",
            "PMI_RANK",
            "SLURM_PROCID",
            "RANK/WORLD_SIZE",
            "MS_NODE_ID",
            "RANK_ID",
            "--process-index",
        ] {
            assert!(msg.contains(v), "{msg}");
        }
        // Only a count: still no index.
        assert!(detect_process(None, Some(2), &env(&[])).is_err());
        let msg = detect(&[("SLURM_PROCID", "x"), ("SLURM_NTASKS", "2")]).unwrap_err().to_string();
        assert!(msg.contains("SLURM_PROCID=\"x\""), "{msg}");
        let msg = detect(&[("PMI_RANK", "2"), ("PMI_SIZE", "2")]).unwrap_err().to_string();
        assert!(msg.contains("index 2 is not below the process count 2") && msg.contains("PMI_RANK"), "{msg}");
        assert!(detect_process(Some(0), Some(0), &env(&[])).is_err());
    }

    #[test]
    fn msrun_scheduler_takes_no_share() {
        let p = detect(&[("MS_ROLE", "MS_SCHED"), ("MS_WORKER_NUM", "4"), ("RANK_ID", "0")]).unwrap();
        assert_eq!((p.index, p.count), (None, 4));
        let p = detect(&[("MS_ROLE", "MS_WORKER"), ("MS_NODE_ID", "3"), ("MS_WORKER_NUM", "4")]).unwrap();
        assert_eq!((p.index, p.count), (Some(3), 4));
    }

    /// Checks the properties every split must have and returns the shares' loads.
    fn check_split(w: &[u64], count: u32) -> Vec<u64> {
        let s = split_by_bytes(w, count);
        assert_eq!(s, split_by_bytes(w, count), "deterministic");
        assert_eq!(s.len(), count as usize);
        // Contiguous, disjoint and covering: each share starts where the previous ended.
        let mut next = 0;
        for r in &s {
            if !r.is_empty() {
                assert_eq!(r.start, next, "{s:?}");
                next = r.end;
            }
        }
        assert_eq!(next, w.len(), "{s:?}");
        let loads: Vec<u64> = s.iter().map(|r| w[r.clone()].iter().sum()).collect();
        let total: u64 = w.iter().sum();
        let max_item = w.iter().copied().max().unwrap_or(0);
        for &l in &loads {
            assert!(l <= total.div_ceil(u64::from(count)) + max_item, "{w:?} / {count}: {loads:?}");
        }
        loads
    }

    #[test]
    fn split_is_disjoint_covering_and_balanced_by_bytes() {
        assert_eq!(split_by_bytes(&[10; 8], 2), vec![0..4, 4..8]);
        assert_eq!(split_by_bytes(&[10; 8], 3), vec![0..3, 3..5, 5..8]);
        assert_eq!(split_by_bytes(&[10; 8], 1), vec![0..8]);
        // By bytes, not by rank count: one big rank is a share of its own.
        assert_eq!(split_by_bytes(&[100, 1, 1, 1, 1], 2), vec![0..1, 1..5]);
        assert_eq!(split_by_bytes(&[1, 1, 1, 1, 100], 2), vec![0..4, 4..5]);
        // Stage 0 with the embedding is twice as heavy as stage 1.
        assert_eq!(check_split(&[20, 20, 20, 20, 10, 10, 10, 10], 2), vec![60, 60]);
        // More processes than ranks: one rank each, the rest idle.
        assert_eq!(split_by_bytes(&[5, 7, 9], 5), vec![0..1, 1..2, 2..3, 3..3, 3..3]);
        assert_eq!(split_by_bytes(&[], 2), vec![0..0, 0..0]);
        // Empty ranks still go somewhere.
        assert_eq!(split_by_bytes(&[0; 4], 2), vec![0..2, 2..4]);
        let mut x = 12345u64;
        for _ in 0..500 {
            let n = (x % 40) as usize + 1;
            let w: Vec<u64> = (0..n)
                .map(|_| {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    (x >> 33) % 1000
                })
                .collect();
            let count = (x % 9) as u32 + 1;
            check_split(&w, count);
        }
        // Huge sizes do not overflow. (Share 1 stays idle: the second rank's midpoint is in share
        // 2's third of the bytes; no share could take less than one of the two big ranks.)
        assert_eq!(split_by_bytes(&[u64::MAX / 2, u64::MAX / 2, 1, 2], 3), vec![0..1, 1..1, 1..4]);
    }
}
