//! `reshard-bench`: generates a synthetic MindSpore-format llama-style model and times reshard
//! against `cp -r` of the same source (alternating, median of N) and, when MindSpore is
//! importable, against `mindspore.transform_checkpoints`. Prints a table; asserts nothing about
//! time (figures are for people), but checks that complete -> 8 -> complete gives back the
//! original bytes.
//!
//! Usage: cargo run --release -p reshard-bench -- [--size-mb 600] [--dir bench-out] [--runs 3]
//!        [--python PYTHON (default: $MINDSPORE_PYTHON or python3)] [--no-mindspore]
//!        [--cold (drop the source files from the page cache before every run)]
//!        [--many-small-only (only the 300,000-tensor case)]
//!        [--io mmap|pread|auto (how reshard reads its sources; default auto)]
//!        [--load-only (only loading one rank into memory, against transform + read, MindSpore
//!        and head -c of its share)]
//!        [--unify-only (only `reshard unify` of the 8-rank safetensors source)]
//!        [--distributed-only (only complete -> 8 spread over 1 and 2 processes: the split's overhead)]
//!        [--s3-only (only 8 -> 4 from a SeaweedFS store on loopback against download + transform)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reshard_core::checkpoint::TensorHeader;
use reshard_core::{ckpt, DType};
use serde_json::json;

mod load;
mod s3;

struct Args {
    size_mb: u64,
    dir: PathBuf,
    runs: usize,
    python: Option<String>,
    cold: bool,
    many_small_only: bool,
    io: String,
    load_only: bool,
    unify_only: bool,
    distributed_only: bool,
    s3_only: bool,
}

fn parse_args() -> Args {
    let mut a = Args {
        size_mb: 600,
        dir: PathBuf::from("bench-out"),
        runs: 3,
        python: Some(std::env::var("MINDSPORE_PYTHON").unwrap_or_else(|_| "python3".into())),
        cold: false,
        many_small_only: false,
        io: "auto".into(),
        load_only: false,
        unify_only: false,
        distributed_only: false,
        s3_only: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| die(&format!("{k} needs a value")));
        match k.as_str() {
            "--size-mb" => a.size_mb = val().parse().unwrap_or_else(|_| die("--size-mb takes a number")),
            "--dir" => a.dir = PathBuf::from(val()),
            "--runs" => a.runs = val().parse().unwrap_or_else(|_| die("--runs takes a number")),
            "--python" => a.python = Some(val()),
            "--no-mindspore" => a.python = None,
            "--cold" => a.cold = true,
            "--many-small-only" => a.many_small_only = true,
            "--io" => a.io = val(),
            "--load-only" => a.load_only = true,
            "--load-child" => {
                load::child(&it.collect::<Vec<_>>());
                std::process::exit(0);
            }
            "--pages-child" => {
                load::pages_child(&it.collect::<Vec<_>>());
                std::process::exit(0);
            }
            "--unify-only" => a.unify_only = true,
            "--distributed-only" => a.distributed_only = true,
            "--s3-only" => a.s3_only = true,
            "-h" | "--help" => {
                println!("{}", include_str!("main.rs").lines().take(16).collect::<Vec<_>>().join("\n"));
                std::process::exit(0);
            }
            other => die(&format!("unknown argument {other}")),
        }
    }
    a
}

fn die(msg: &str) -> ! {
    eprintln!("reshard-bench: {msg}");
    std::process::exit(2)
}

/// One parameter of the synthetic model.
struct Param {
    name: String,
    dtype: DType,
    shape: Vec<u64>,
    map: Vec<i64>,
    stage: u32,
    opt: bool,
}

/// A llama-style model sized to about `size_mb` (weights plus fp32 adam_m/adam_v).
fn model(size_mb: u64) -> Vec<Param> {
    let (h, ffn, vocab) = (512u64, 1536u64, 16000u64);
    let per_layer = (4 * h * h * 2 + 3 * h * ffn * 2) + 2 * (4 * h * h + 3 * h * ffn) * 4;
    let fixed = 2 * vocab * h * 4 * 3;
    let layers = ((size_mb << 20).saturating_sub(fixed) / per_layer).max(2) & !1;
    let mut ps = Vec::new();
    let mut add = |name: String, dtype, shape: Vec<u64>, map: Vec<i64>, stage, opt| {
        ps.push(Param { name, dtype, shape, map, stage, opt })
    };
    add("model.tok_embeddings.embedding_weight".into(), DType::Float32, vec![vocab, h], vec![0, -1], 0, true);
    for l in 0..layers {
        let stage = u32::from(l >= layers / 2);
        let p = format!("model.layers.{l}");
        for w in ["wq", "wk", "wv"] {
            add(format!("{p}.attention.{w}.weight"), DType::BFloat16, vec![h, h], vec![0, -1], stage, true);
        }
        add(format!("{p}.attention.wo.weight"), DType::BFloat16, vec![h, h], vec![-1, 0], stage, true);
        add(format!("{p}.feed_forward.w1.weight"), DType::BFloat16, vec![ffn, h], vec![0, -1], stage, true);
        add(format!("{p}.feed_forward.w3.weight"), DType::BFloat16, vec![ffn, h], vec![0, -1], stage, true);
        add(format!("{p}.feed_forward.w2.weight"), DType::BFloat16, vec![h, ffn], vec![-1, 0], stage, true);
        add(format!("{p}.attention_norm.weight"), DType::Float16, vec![h], vec![-1], stage, false);
        add(format!("{p}.ffn_norm.weight"), DType::Float16, vec![h], vec![-1], stage, false);
    }
    add("model.norm_out.weight".into(), DType::Float16, vec![h], vec![-1], 1, false);
    add("lm_head.weight".into(), DType::Float32, vec![vocab, h], vec![0, -1], 1, true);
    let n = ps.len();
    for i in 0..n {
        if ps[i].shape.len() == 2 {
            for m in ["adam_m", "adam_v"] {
                let (name, shape, map, stage, opt) =
                    (format!("{m}.{}", ps[i].name), ps[i].shape.clone(), ps[i].map.clone(), ps[i].stage, ps[i].opt);
                ps.push(Param { name, dtype: DType::Float32, shape, map, stage, opt });
            }
        }
    }
    ps
}

fn nbytes(p: &Param) -> u64 {
    p.shape.iter().product::<u64>() * p.dtype.size()
}

/// Writes the complete checkpoint with pseudo-random content, in bounded memory.
fn write_model(path: &Path, ps: &[Param]) {
    let mut headers: Vec<TensorHeader> = ps
        .iter()
        .map(|p| TensorHeader { name: p.name.clone(), dtype: p.dtype, dims: p.shape.clone(), nbytes: nbytes(p) })
        .collect();
    headers.push(TensorHeader { name: "global_step".into(), dtype: DType::Int32, dims: vec![], nbytes: 4 });
    let layout = ckpt::layout(&headers, ckpt::CHUNK_BYTES);
    std::fs::create_dir_all(path.parent().unwrap_or(Path::new("."))).unwrap_or_else(|e| die(&e.to_string()));
    let f = File::create(path).unwrap_or_else(|e| die(&format!("{}: {e}", path.display())));
    for (off, b) in &layout.fixed {
        f.write_all_at(b, *off).unwrap_or_else(|e| die(&e.to_string()));
    }
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut buf = vec![0u8; 8 << 20];
    for (i, runs) in layout.content.iter().enumerate() {
        for r in runs {
            let mut done = 0;
            while done < r.len {
                let n = ((r.len - done) as usize).min(buf.len());
                for c in buf[..n].chunks_mut(8) {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let b = state.to_le_bytes();
                    c.copy_from_slice(&b[..c.len()]);
                }
                if i == headers.len() - 1 {
                    buf[..4].copy_from_slice(&1000i32.to_le_bytes());
                }
                f.write_all_at(&buf[..n], r.file_offset + done).unwrap_or_else(|e| die(&e.to_string()));
                done += n as u64;
            }
        }
    }
}

/// Writes per-stage JSON strategies and the merged file for dev [dp, mp] x pp.
fn write_strategy(dir: &Path, ps: &[Param], dp: u64, mp: u64, pp: u32, opt: bool) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| die(&e.to_string()));
    for stage in 0..pp {
        let mut items = serde_json::Map::new();
        for p in ps.iter().filter(|p| pp == 1 || p.stage == stage) {
            let shard = opt && p.opt && dp > 1;
            let step = if p.map.contains(&0) { mp } else { 1 };
            items.insert(
                p.name.clone(),
                json!({"dev_matrix": [dp, mp], "tensor_map": p.map, "tensor_shape": p.shape, "field": 0,
                       "opt_weight_shard_step": if shard { step } else { 0 },
                       "opt_weight_shard_size": if shard { -1 } else { 0 }}),
            );
        }
        let v = json!({"current_stage": stage,
                       "parallel_strategy_item": {format!("op_stage{stage}"): {"stage": stage, "parallel_strategy": [[dp, mp]]}},
                       "parallel_layout_item": items});
        let f = dir.join(format!("ckpt_strategy_rank_{}.json", u64::from(stage) * dp * mp));
        std::fs::write(&f, serde_json::to_vec(&v).unwrap_or_default()).unwrap_or_else(|e| die(&e.to_string()));
    }
    let merged = reshard_core::strategy::merge_dir(dir).unwrap_or_else(|e| die(&e.to_string()));
    let out = dir.with_extension("merged.json");
    std::fs::write(&out, merged.to_bytes()).unwrap_or_else(|e| die(&e.to_string()));
    out
}

/// Wall time, peak RSS and peak anonymous memory of a child process, sampled from /proc.
struct Measured {
    secs: f64,
    peak_rss_kb: u64,
    peak_anon_kb: u64,
}

fn status_kb(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn run(cmd: &mut Command) -> Measured {
    measure(cmd, true)
}

/// Wall time of a child process only: no sampler reading its `/proc` status every 2 ms, which
/// slowed both sides of the S3 bench by about 0.1 s.
fn run_unsampled(cmd: &mut Command) -> f64 {
    measure(cmd, false).secs
}

fn measure(cmd: &mut Command, sample: bool) -> Measured {
    let start = Instant::now();
    let mut child = cmd.spawn().unwrap_or_else(|e| die(&format!("cannot start {cmd:?}: {e}")));
    let pid = child.id();
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let sampler = sample.then(|| {
        std::thread::spawn(move || {
            let (mut rss, mut anon) = (0, 0);
            while !s2.load(Ordering::Relaxed) {
                rss = rss.max(status_kb(pid, "VmHWM:").unwrap_or(0));
                anon = anon.max(status_kb(pid, "RssAnon:").unwrap_or(0));
                std::thread::sleep(Duration::from_millis(2));
            }
            (rss, anon)
        })
    });
    let status = child.wait().unwrap_or_else(|e| die(&e.to_string()));
    let secs = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let (peak_rss_kb, peak_anon_kb) = sampler.map_or((0, 0), |s| s.join().unwrap_or((0, 0)));
    if !status.success() {
        die(&format!("{cmd:?} failed: {status}"));
    }
    Measured { secs, peak_rss_kb, peak_anon_kb }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn du(p: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let m = e.metadata().map(|m| (m.is_dir(), m.len())).unwrap_or((false, 0));
            total += if m.0 { du(&e.path()) } else { m.1 };
        }
    }
    total
}

/// Drops the files under `dir` from the page cache (clean pages only; the caller syncs first).
fn drop_from_cache(dir: &Path) {
    use std::os::fd::AsRawFd;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            drop_from_cache(&p);
        } else if let Ok(f) = File::open(&p) {
            // SAFETY: a plain system call on a descriptor that is open for its duration.
            #[allow(unsafe_code)]
            unsafe {
                libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
            }
        }
    }
}

/// Syncs, and with `cold` drops `src` from the page cache: what runs before each timed command.
fn settle(src: &Path, cold: bool) {
    let _ = Command::new("sync").status();
    if cold {
        drop_from_cache(src);
    }
}

/// `reshard transform FLAGS --src_ckpt_dir SRC --dst_ckpt_strategy DST_STRATEGY --dst_ckpt_dir OUT`.
fn transform(reshard: &Path, flags: &[&str], src: &Path, dst_strategy: &Path, out: &Path) -> Command {
    let mut c = Command::new(reshard);
    c.arg("transform").args(flags).arg("--src_ckpt_dir").arg(src);
    c.arg("--dst_ckpt_strategy").arg(dst_strategy).arg("--dst_ckpt_dir").arg(out);
    c
}

/// Medians of a reshard command against `cp -r` of its source, each without and with a final
/// sync (reshard's `--no-sync` and its default fsync), and the command's peak memory.
struct AgainstCopy {
    cp: f64,
    rs: f64,
    cps: f64,
    rss_t: f64,
    peak_rss_kb: u64,
    peak_anon_kb: u64,
}

impl AgainstCopy {
    /// `runs` times, alternately without and with the final sync: `cp -r src copy`, then
    /// `reshard()` (given `--no-sync` here for the first) writing `out`; each after `settle`.
    fn measure(src: &Path, copy: &Path, out: &Path, runs: usize, cold: bool, reshard: &dyn Fn() -> Command) -> Self {
        let (mut t_cp, mut t_rs, mut t_cps, mut t_rss, mut rss, mut anon) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), 0, 0);
        for _ in 0..runs {
            for synced in [false, true] {
                let _ = std::fs::remove_dir_all(copy);
                settle(src, cold);
                let mut cp = Command::new("sh");
                cp.arg("-c").arg(if synced { "cp -r \"$0\" \"$1\" && sync" } else { "cp -r \"$0\" \"$1\"" });
                let t = run(cp.arg(src).arg(copy)).secs;
                if synced {
                    t_cps.push(t)
                } else {
                    t_cp.push(t)
                }
                let _ = std::fs::remove_dir_all(out);
                settle(src, cold);
                let mut cmd = reshard();
                if !synced {
                    cmd.arg("--no-sync");
                }
                let m = run(&mut cmd);
                if synced {
                    t_rss.push(m.secs)
                } else {
                    t_rs.push(m.secs)
                }
                rss = rss.max(m.peak_rss_kb);
                anon = anon.max(m.peak_anon_kb);
            }
        }
        let (cp, rs, cps, rss_t) = (median(t_cp), median(t_rs), median(t_cps), median(t_rss));
        AgainstCopy { cp, rs, cps, rss_t, peak_rss_kb: rss, peak_anon_kb: anon }
    }

    /// The table's columns `cp -r s | reshard --no-sync s | ratio | cp -r + sync s | reshard s
    /// (fsync) | ratio`.
    fn times(&self) -> String {
        format!(
            "{:.3} | {:.3} | {:.2} | {:.3} | {:.3} | {:.2}",
            self.cp,
            self.rs,
            self.rs / self.cp,
            self.cps,
            self.rss_t,
            self.rss_t / self.cps
        )
    }

    /// The table's columns `peak RSS MB | peak anon MB`.
    fn memory(&self) -> String {
        format!("{:.0} | {:.0}", self.peak_rss_kb as f64 / 1024.0, self.peak_anon_kb as f64 / 1024.0)
    }

    /// The table's MindSpore columns for MindSpore's run `m`: `MindSpore s | MindSpore peak RSS
    /// MB | speed-up (no fsync, as MindSpore) | speed-up (reshard fsync)`. MindSpore does not
    /// fsync what it writes: the like-for-like figure is against reshard --no-sync; the second
    /// is against reshard's default, durable, run.
    fn mindspore(&self, m: &Measured) -> String {
        format!(
            "{:.2} | {:.0} | {:.1}x | {:.1}x",
            m.secs,
            m.peak_rss_kb as f64 / 1024.0,
            m.secs / self.rs,
            m.secs / self.rss_t
        )
    }
}

/// The table's MindSpore columns when MindSpore is not there.
const NO_MINDSPORE: &str = "n/a | n/a | n/a | n/a";

struct Case {
    name: &'static str,
    src: PathBuf,
    src_strategy: Option<PathBuf>,
    dst_strategy: Option<PathBuf>,
}

fn main() {
    let a = parse_args();
    let exe_dir = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf)).unwrap_or_default();
    let reshard = exe_dir.join("reshard");
    if !reshard.exists() {
        die("target/release/reshard is missing: run `cargo build --release -p reshard-cli` first");
    }
    let dir = a.dir.clone();
    let _ = std::fs::remove_dir_all(&dir);
    if a.many_small_only {
        many_small(&dir, &reshard, a.runs, &a.io);
        return;
    }
    let ps = model(a.size_mb);
    let complete = dir.join("complete");
    let t = Instant::now();
    write_model(&complete.join("rank_0/model.ckpt"), &ps);
    let size = du(&complete);
    eprintln!(
        "generated {} parameters ({} with adam states and global_step), {:.0} MB, in {:.1}s",
        ps.iter().filter(|p| !p.name.starts_with("adam")).count(),
        ps.len() + 1,
        size as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    let train = write_strategy(&dir.join("strategy/train_dp2mp2pp2"), &ps, 2, 2, 2, true);
    if a.distributed_only {
        distributed(&dir, &reshard, &complete, &train, a.runs);
        return;
    }
    let finetune = write_strategy(&dir.join("strategy/finetune_dp1mp2pp2"), &ps, 1, 2, 2, false);
    // The 8-rank source for the other cases, made by reshard itself.
    let sharded = dir.join("sharded8");
    run(Command::new(&reshard)
        .args(["transform", "-q", "--src_ckpt_dir"])
        .arg(&complete)
        .arg("--dst_ckpt_strategy")
        .arg(&train)
        .arg("--dst_ckpt_dir")
        .arg(&sharded));
    let _ = std::fs::remove_dir_all(sharded.join("merged_strategy"));
    if a.s3_only {
        s3::bench(&dir, &reshard, &sharded, &train, &finetune, a.runs);
        return;
    }
    let ms_python_for_unify = a.python.clone().filter(|py| {
        Command::new(py)
            .args(["-c", "import mindspore"])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if a.unify_only {
        unify_case(&dir, &reshard, &complete, &train, a.runs, a.cold, ms_python_for_unify.as_deref());
        return;
    }
    let cases = [
        Case {
            name: "complete -> 8 (dp2 mp2 pp2, opt shard)",
            src: complete.clone(),
            src_strategy: None,
            dst_strategy: Some(train.clone()),
        },
        Case {
            name: "8 -> 4 (dp1 mp2 pp2)",
            src: sharded.clone(),
            src_strategy: Some(train.clone()),
            dst_strategy: Some(finetune.clone()),
        },
        Case { name: "8 -> complete", src: sharded.clone(), src_strategy: Some(train.clone()), dst_strategy: None },
    ];
    let ms_python = a.python.filter(|py| {
        Command::new(py)
            .args(["-c", "import mindspore"])
            .stderr(std::process::Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    });
    let load_cases = [
        ("8 -> 4 (dp1 mp2 pp2), rank 0", &cases[1], 0),
        ("complete -> 8 (dp2 mp2 pp2, opt shard), rank 0", &cases[0], 0),
    ];
    if a.load_only {
        load::bench(&dir, &reshard, &load_cases, a.runs, a.cold, ms_python.as_deref());
        return;
    }
    println!(
        "| case | source MB | cp -r s | reshard --no-sync s | ratio | cp -r + sync s | reshard s (fsync) | ratio | GB/s | \
         peak RSS MB | peak anon MB | MindSpore s | MindSpore peak RSS MB | speed-up (no fsync, as MindSpore) | speed-up (reshard fsync) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for c in &cases {
        let out = dir.join("out");
        let copy = dir.join("copy");
        let src_mb = du(&c.src) as f64 / 1e6;
        let t = AgainstCopy::measure(&c.src, &copy, &out, a.runs, a.cold, &|| {
            let mut cmd = Command::new(&reshard);
            cmd.args(["transform", "-q", "--io", &a.io, "--src_ckpt_dir"]).arg(&c.src).arg("--dst_ckpt_dir").arg(&out);
            if let Some(s) = &c.src_strategy {
                cmd.arg("--src_ckpt_strategy").arg(s);
            }
            if let Some(s) = &c.dst_strategy {
                cmd.arg("--dst_ckpt_strategy").arg(s);
            }
            cmd
        });
        let written = du(&out) as f64;
        let mut ms_cols = NO_MINDSPORE.to_string();
        if let Some(py) = &ms_python {
            let msout = dir.join("ms_out");
            let _ = std::fs::remove_dir_all(&msout);
            settle(&c.src, a.cold);
            let arg = |p: &Option<PathBuf>| {
                p.as_ref().map_or("None".to_string(), |p| format!("{:?}", p.display().to_string()))
            };
            let script = format!(
                "import mindspore as ms\nms.transform_checkpoints({:?}, {:?}, 'checkpoint_', {}, {})",
                c.src.display().to_string(),
                msout.display().to_string(),
                arg(&c.src_strategy),
                arg(&c.dst_strategy)
            );
            let m = run(Command::new(py).args(["-c", &script]).stderr(std::process::Stdio::null()));
            ms_cols = t.mindspore(&m);
            let _ = std::fs::remove_dir_all(&msout);
        }
        println!(
            "| {} | {:.0} | {} | {:.2} | {} | {} |",
            c.name,
            src_mb,
            t.times(),
            (src_mb * 1e6 + written) / 1e9 / t.rs,
            t.memory(),
            ms_cols
        );
        if c.dst_strategy.is_none() {
            let back = std::fs::read(out.join("rank_0/checkpoint_0.ckpt")).unwrap_or_default();
            let orig = reshard_core::CheckpointFile::open(&complete.join("rank_0/model.ckpt"), Default::default());
            let got = reshard_core::CheckpointFile::open(&out.join("rank_0/checkpoint_0.ckpt"), Default::default());
            let same = match (orig, got) {
                (Ok(o), Ok(g)) => {
                    o.index().tensors.iter().all(|t| {
                        g.index().get(t.name()).is_some_and(|u| u.shape() == t.shape() && g.content(u) == o.content(t))
                    }) && o.index().tensors.len() == g.index().tensors.len()
                }
                _ => false,
            };
            println!(
                "\ncomplete -> 8 -> complete gives back the original tensors: {} ({} bytes)",
                if same { "yes" } else { "NO" },
                back.len()
            );
            if !same {
                std::process::exit(1);
            }
        }
        let _ = std::fs::remove_dir_all(&copy);
    }
    load::bench(&dir, &reshard, &load_cases, a.runs, a.cold, ms_python.as_deref());
    distributed(&dir, &reshard, &complete, &train, a.runs);
    many_small(&dir, &reshard, a.runs, &a.io);
    plan_4096(&dir);
    unify_case(&dir, &reshard, &complete, &train, a.runs, a.cold, ms_python_for_unify.as_deref());
}

/// `reshard unify` (MindSpore's `unified_safetensors`) of the model sharded 8 ways (dp2 mp2 pp2,
/// optimizer shard) as safetensors, against `cp -r` of the same source and against MindSpore;
/// checks that the unified folder holds the complete model's tensors.
fn unify_case(
    dir: &Path,
    reshard: &Path,
    complete: &Path,
    train: &Path,
    runs: usize,
    cold: bool,
    ms_python: Option<&str>,
) {
    let src = dir.join("sharded8_st");
    let _ = std::fs::remove_dir_all(&src);
    run(&mut transform(reshard, &["-q", "--output_format", "safetensors"], complete, train, &src));
    let _ = std::fs::remove_dir_all(src.join("merged_strategy"));
    for r in 0..8 {
        let _ = std::fs::remove_file(src.join(format!("rank_{r}/reshard_manifest.json")));
        let _ = std::fs::remove_file(src.join(format!("rank_{r}/.reshard_manifest.lock")));
    }
    let (out, copy) = (dir.join("unified"), dir.join("copy"));
    let t = AgainstCopy::measure(&src, &copy, &out, runs, cold, &|| {
        let mut cmd = Command::new(reshard);
        cmd.args(["unify", "-q", "--src_ckpt_dir"]).arg(&src).arg("--src_ckpt_strategy").arg(train);
        cmd.arg("--dst_dir").arg(&out);
        cmd
    });
    let src_mb = du(&src) as f64 / 1e6;
    let mut ms_cols = NO_MINDSPORE.to_string();
    if let Some(py) = ms_python {
        let msout = dir.join("ms_unified");
        let _ = std::fs::remove_dir_all(&msout);
        settle(&src, cold);
        // The bench model's layer weights are bf16: MindSpore's safetensors reader needs a numpy
        // bfloat16, which this MindSpore build only finds when its numpy matches; ml_dtypes
        // (on PYTHONPATH) stands in. Views are made contiguous before saving, as the safetensors
        // releases MindSpore was written against did (see tests/gen/make_fixtures.py).
        let script = format!(
            "import mindspore as ms\n\
             import mindspore.parallel.transform_safetensors as ts\n\
             import numpy as np\n\
             from mindspore.common import np_dtype\n\
             if not np_dtype.np_dtype_valid(False):\n\
             \x20   import ml_dtypes\n\
             \x20   np_dtype.np_dtype_valid = lambda *a: True\n\
             \x20   np_dtype.bfloat16 = ml_dtypes.bfloat16\n\
             real = ts.save_file\n\
             ts.save_file = lambda d, f, metadata=None: real({{k: v if v.flags['C_CONTIGUOUS'] else \
             np.ascontiguousarray(v) for k, v in d.items()}}, f, metadata=metadata)\n\
             ms.parallel.unified_safetensors({:?}, {:?}, {:?})",
            src.display().to_string(),
            train.display().to_string(),
            msout.display().to_string()
        );
        let m = run(Command::new(py).args(["-c", &script]).stderr(std::process::Stdio::null()));
        ms_cols = t.mindspore(&m);
        // The same folder as MindSpore's: the map byte for byte, every tensor the same.
        let map = |d: &Path| std::fs::read(d.join("param_name_map.json")).unwrap_or_default();
        let tensors = |d: &Path| {
            let mut v = Vec::new();
            for name in ["part0.safetensors", "hyper_param.safetensors"] {
                if let Ok(f) = reshard_core::CheckpointFile::open(&d.join(name), Default::default()) {
                    for t in &f.index().tensors {
                        v.push((t.name().clone(), t.shape().to_vec(), f.content(t).into_owned()));
                    }
                }
            }
            v.sort();
            v
        };
        let same = map(&out) == map(&msout) && tensors(&out) == tensors(&msout);
        println!("unified folder equals MindSpore's (map byte for byte, tensors): {}", if same { "yes" } else { "NO" });
        let _ = std::fs::remove_dir_all(&msout);
    }
    println!(
        "\n| unify | source MB | cp -r s | reshard --no-sync s | ratio | cp -r + sync s | reshard s (fsync) | ratio | \
         peak RSS MB | peak anon MB | MindSpore s | MindSpore peak RSS MB | speed-up (no fsync, as MindSpore) | speed-up \
         (reshard fsync) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| 8 (dp2 mp2 pp2, opt shard, safetensors) -> unified | {:.0} | {} | {} | {} |",
        src_mb,
        t.times(),
        t.memory(),
        ms_cols
    );
    // The unified folder holds the complete model: every tensor, the same bytes.
    let orig = reshard_core::CheckpointFile::open(&complete.join("rank_0/model.ckpt"), Default::default())
        .unwrap_or_else(|e| die(&e.to_string()));
    let mut found = 0;
    let mut same = true;
    for e in std::fs::read_dir(&out).into_iter().flatten().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            let f = reshard_core::CheckpointFile::open(&p, Default::default()).unwrap_or_else(|e| die(&e.to_string()));
            for t in &f.index().tensors {
                found += 1;
                same &= orig.index().get(t.name()).is_some_and(|o| orig.content(o) == f.content(t));
            }
        }
    }
    let same = same && found == orig.index().tensors.len();
    println!("\nunified folder holds the complete model's tensors: {}", if same { "yes" } else { "NO" });
    if !same {
        std::process::exit(1);
    }
    let _ = std::fs::remove_dir_all(&copy);
}

/// Spawns every command at once and waits for all: the wall time of the slowest, and the
/// `(split, waited)` seconds each `--distributed` process reported on stderr.
fn run_all(cmds: Vec<Command>) -> (f64, Vec<(f64, f64)>) {
    let start = Instant::now();
    let children: Vec<_> = cmds
        .into_iter()
        .map(|mut c| {
            c.stderr(std::process::Stdio::piped()).spawn().unwrap_or_else(|e| die(&format!("cannot start {c:?}: {e}")))
        })
        .collect();
    let mut reported = Vec::new();
    for ch in children {
        let out = ch.wait_with_output().unwrap_or_else(|e| die(&e.to_string()));
        let err = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            die(&format!("a process failed: {}: {err}", out.status));
        }
        // "... (split 0.012s, waited 0.003s)"
        let num = |key: &str| {
            let at = err.find(key)? + key.len();
            err[at..].split('s').next()?.parse::<f64>().ok()
        };
        if let (Some(s), Some(w)) = (num("(split "), num(", waited ")) {
            reported.push((s, w));
        }
    }
    (start.elapsed().as_secs_f64(), reported)
}

/// `transform --distributed` (issue 17): complete -> 8 with 1 and 2 processes, each against the
/// same processes writing the same ranks without coordination (`--ranks` of each share, started
/// at once), so that the difference is what `--distributed` adds: computing the split (every
/// rank's plan), the share records and heartbeat, the wait for the last share and the
/// verification of every share's outputs. `--no-sync`, so that the disk's write-back varies less;
/// the job is then shorter than with fsync, which makes the overhead's share larger.
fn distributed(dir: &Path, reshard: &Path, complete: &Path, train: &Path, runs: usize) {
    let plan = reshard_core::Plan::build(complete, None, Some(train), &Default::default())
        .unwrap_or_else(|e| die(&e.to_string()));
    let t = Instant::now();
    let shares2 = reshard_core::distributed::split(&plan, &[], 2).unwrap_or_else(|e| die(&e.to_string()));
    let split_secs = t.elapsed().as_secs_f64();
    drop(plan);
    let out = dir.join("dist_out");
    let base = |extra: &[String]| {
        let mut c = transform(reshard, &["--progress-interval", "100000", "--no-sync"], complete, train, &out);
        c.args(extra);
        c
    };
    let ranks = |r: &[u32]| r.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    // (name, commands): alternated within each run.
    type Commands<'a> = Box<dyn Fn() -> Vec<Command> + 'a>;
    let configs: Vec<(&str, Commands)> = vec![
        ("1 process, plain", Box::new(|| vec![base(&[])])),
        (
            "1 process, --distributed",
            Box::new(|| vec![base(&["--distributed".into(), "--process-index=0".into(), "--process-count=1".into()])]),
        ),
        (
            "2 processes, --ranks of each share",
            Box::new(|| shares2.ranks.iter().map(|r| base(&["--ranks".into(), ranks(r)])).collect()),
        ),
        (
            "2 processes, --distributed",
            Box::new(|| {
                (0..2)
                    .map(|i| {
                        base(&["--distributed".into(), format!("--process-index={i}"), "--process-count=2".into()])
                    })
                    .collect()
            }),
        ),
    ];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    // Per --distributed run: the longest split of its processes plus the shortest wait (that of
    // the process that finished last: reading the records and checking every share's outputs,
    // with nothing left to wait for), the coordination's own cost in that run.
    let mut inside: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    for run in 0..runs {
        // Every other run in reverse order, so that no configuration always follows another.
        let order: Vec<usize> = match run % 2 {
            0 => (0..configs.len()).collect(),
            _ => (0..configs.len()).rev().collect(),
        };
        for k in order {
            let cmds = &configs[k].1;
            let _ = std::fs::remove_dir_all(&out);
            let _ = Command::new("sync").status();
            let (secs, reported) = run_all(cmds());
            times[k].push(secs);
            if !reported.is_empty() {
                let split = reported.iter().map(|r| r.0).fold(0.0, f64::max);
                let wait = reported.iter().map(|r| r.1).fold(f64::INFINITY, f64::min);
                inside[k].push(split + wait);
            }
        }
    }
    // The overhead is a fixed cost under noise that only adds time (this machine's other jobs,
    // write-back): the fastest run of each configuration estimates it too.
    let fastest: Vec<f64> = times.iter().map(|v| v.iter().copied().fold(f64::INFINITY, f64::min)).collect();
    let m: Vec<f64> = times.into_iter().map(median).collect();
    println!(
        "\ntransform --distributed, complete -> 8 ({:.0} MB, --no-sync, median of {runs}); shares of 2 processes: {:?} \
         ({:?} bytes); the split alone took {:.4}s in this process",
        du(complete) as f64 / 1e6,
        shares2.ranks,
        shares2.bytes,
        split_secs
    );
    println!(
        "| processes | without coordination s (median, fastest) | --distributed s (median, fastest) | overhead s \
         (medians) | overhead % (medians) | overhead % (fastest runs) |"
    );
    println!("|---|---|---|---|---|---|");
    for (n, a, b) in [(1, 0, 1), (2, 2, 3)] {
        println!(
            "| {n} | {:.3}, {:.3} | {:.3}, {:.3} | {:.3} | {:.1}% | {:.1}% |",
            m[a],
            fastest[a],
            m[b],
            fastest[b],
            m[b] - m[a],
            100.0 * (m[b] - m[a]) / m[a],
            100.0 * (fastest[b] - fastest[a]) / fastest[a]
        );
    }
    for (n, k) in [(1, 1), (2, 3)] {
        let v = &inside[k];
        let worst = v.iter().copied().fold(0.0, f64::max);
        println!(
            "{n} process(es): split + last process's wait, as the processes report them: median {:.4}s, worst {:.4}s \
             ({:.2}% and {:.2}% of the median --distributed job)",
            median(v.clone()),
            worst,
            100.0 * median(v.clone()) / m[k],
            100.0 * worst / m[k]
        );
    }
    println!("speed-up of 2 processes (--distributed) over 1 plain process: {:.2}x", m[0] / m[3]);
    let _ = std::fs::remove_dir_all(&out);
}

/// Per-tensor overhead: a complete checkpoint of 300,000 tensors of 8 floats (about 10 MB)
/// onto dp2 x mp2 (half the tensors split by mp), timed and with its peak memory.
fn many_small(dir: &Path, reshard: &Path, runs: usize, io: &str) {
    let ps: Vec<Param> = (0..300_000)
        .map(|i| {
            let name = format!("model.layers.{}.p{}.weight", i / 100, i % 100);
            let map = if i % 2 == 0 { vec![0] } else { vec![-1] };
            Param { name, dtype: DType::Float32, shape: vec![8], map, stage: 0, opt: false }
        })
        .collect();
    let src = dir.join("many_small/src");
    write_model(&src.join("rank_0/model.ckpt"), &ps);
    let dst = write_strategy(&dir.join("many_small/strategy"), &ps, 2, 2, 1, false);
    let out = dir.join("many_small/out");
    let (mut secs, mut rss, mut anon) = (Vec::new(), 0, 0);
    for _ in 0..runs.max(1) {
        let _ = std::fs::remove_dir_all(&out);
        let m = run(&mut transform(reshard, &["-q", "--no-sync", "--io", io], &src, &dst, &out));
        secs.push(m.secs);
        rss = rss.max(m.peak_rss_kb);
        anon = anon.max(m.peak_anon_kb);
    }
    println!(
        "\n{} tensors of 8 floats ({:.1} MB) complete -> 4 (dp2 mp2), --no-sync: {:.2}s, peak RSS {:.0} MB, \
         peak anon {:.0} MB",
        ps.len(),
        du(&src) as f64 / 1e6,
        median(secs),
        rss as f64 / 1024.0,
        anon as f64 / 1024.0
    );
    let _ = std::fs::remove_dir_all(&out);
}

/// Plan-only: 3,000 parameters onto 4,096 destination ranks (dp64 x mp64).
fn plan_4096(dir: &Path) {
    let ps: Vec<Param> = (0..3000)
        .map(|i| {
            let (name, map) = (format!("model.p{i}.weight"), if i % 2 == 0 { vec![0, -1] } else { vec![-1, 0] });
            Param { name, dtype: DType::Float16, shape: vec![64, 64], map, stage: 0, opt: true }
        })
        .collect();
    let src = dir.join("plan4096/src");
    write_model(&src.join("rank_0/model.ckpt"), &ps);
    let dst = write_strategy(&dir.join("plan4096/strategy"), &ps, 64, 64, 1, false);
    let t = Instant::now();
    let plan =
        reshard_core::Plan::build(&src, None, Some(&dst), &Default::default()).unwrap_or_else(|e| die(&e.to_string()));
    let build = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let one = plan.rank_plan(4095).unwrap_or_else(|e| die(&e.to_string()));
    let rank = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let pieces: usize = std::thread::scope(|s| {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        let handles: Vec<_> = (0..threads)
            .map(|k| {
                let plan = &plan;
                s.spawn(move || {
                    (k..plan.dst_rank_count())
                        .step_by(threads as usize)
                        .map(|r| plan.rank_plan(r).map(|p| p.tensors.len()).unwrap_or(0))
                        .sum::<usize>()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
    });
    let all = t.elapsed().as_secs_f64();
    println!(
        "\nplan for {} destination ranks x {} parameters: built in {:.3}s; one rank's plan ({} tensors) in {:.4}s; \
         all {} tensor plans (every rank, all cores) in {:.2}s",
        plan.dst_rank_count(),
        ps.len(),
        build,
        one.tensors.len(),
        rank,
        pieces,
        all
    );
}
