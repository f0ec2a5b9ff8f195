//! Loading one destination rank into memory (`load_rank`) against the other ways to get the
//! same tensors into a process: (a) `reshard transform --ranks R --no-sync` and reading the
//! output file, (b) MindSpore's `transform_checkpoint_by_rank` and `load_checkpoint` of its file,
//! (c) `head -c` of the rank's share of each source file it reads (sequential reads of the
//! same byte count: the limit), and (c') reading exactly the pages of the sources the load
//! touches (a strided share, a column slice of each tensor, touches more pages than its bytes,
//! spread over the file: the limit for that share through the page cache). (a)-(c) are
//! processes timed from start to exit, (c') inside its process; the load is
//! timed inside its process from the plan's start to the last byte in place, into buffers the
//! process allocated and touched before (the load column), and as the whole process (with fresh
//! buffers' first-touch page faults and exit). Medians of N, alternating; peak anonymous memory
//! of the load process beyond its buffers (RssAnon minus the bytes loaded).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use reshard_core::plan::{Plan, PlanOptions};
use reshard_core::storage::IoMode;
use reshard_core::{load_rank, rank_reads, LoadOptions, TensorMeta};

use super::{die, drop_from_cache, median, run, Case};

/// The child: `reshard-bench --load-child SRC SRC_STRATEGY|- DST_STRATEGY|- RANK IO`. Builds the
/// plan, allocates one `Vec<u8>` per tensor and touches it (a runtime's memory is usually
/// allocated ahead and reused: first-touch page faults are the allocator's cost, not the
/// load's), loads the rank into them, and prints "PLAN_S LOAD_S BYTES".
pub fn child(args: &[String]) {
    let [src, ss, ds, rank, io] = args else {
        die("--load-child SRC SRC_STRATEGY|- DST_STRATEGY|- RANK IO");
    };
    let opt = |s: &String| (s != "-").then(|| PathBuf::from(s));
    let (ss, ds) = (opt(ss), opt(ds));
    let t = Instant::now();
    let plan = Plan::build(Path::new(src), ss.as_deref(), ds.as_deref(), &PlanOptions::default())
        .unwrap_or_else(|e| die(&e.to_string()));
    let plan_s = t.elapsed().as_secs_f64();
    let rank: u32 = rank.parse().unwrap_or_else(|_| die("RANK"));
    let io = IoMode::parse(io).unwrap_or_else(|e| die(&e.to_string()));
    let rp = plan.rank_plan(rank).unwrap_or_else(|e| die(&e.to_string()));
    let mut buffers: Vec<Vec<u8>> = rp.tensors.iter().map(|t| vec![0xA5u8; t.nbytes as usize]).collect();
    drop(rp);
    let mut lend = buffers.iter_mut();
    let opts = LoadOptions { io, ..LoadOptions::default() };
    let t = Instant::now();
    load_rank(&plan, rank, &opts, &mut |_: &TensorMeta<'_>| Ok(lend.next().map(Vec::as_mut_slice)))
        .unwrap_or_else(|e| die(&e.to_string()));
    let load_s = t.elapsed().as_secs_f64();
    let total: usize = buffers.iter().map(Vec::len).sum();
    println!("{plan_s} {load_s} {total}");
    // The buffers are the caller's: not unmapped here (exit does it, outside the timing).
    std::mem::forget(buffers);
}

/// The fairer limit (c'): `reshard-bench --pages-child SRC SRC_STRATEGY|- DST_STRATEGY|- RANK`.
/// Finds the runs of the sources the load of the rank reads (joined where less than a page
/// apart, as its copy announces them), untimed; then, timed, reads exactly their pages: each
/// file without read-ahead (`POSIX_FADV_RANDOM`), every run announced (`POSIX_FADV_WILLNEED`),
/// then read in order with `pread` of up to 8 MiB. Prints "SECS PAGE_BYTES RUN_BYTES".
pub fn pages_child(args: &[String]) {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let [src, ss, ds, rank] = args else {
        die("--pages-child SRC SRC_STRATEGY|- DST_STRATEGY|- RANK");
    };
    let opt = |s: &String| (s != "-").then(|| PathBuf::from(s));
    let (ss, ds) = (opt(ss), opt(ds));
    let plan = Plan::build(Path::new(src), ss.as_deref(), ds.as_deref(), &PlanOptions::default())
        .unwrap_or_else(|e| die(&e.to_string()));
    let rank: u32 = rank.parse().unwrap_or_else(|_| die("RANK"));
    let reads = rank_reads(&plan, rank).unwrap_or_else(|e| die(&e.to_string()));
    // The page size rank_reads' runs are widened to (the core's `sys::page_size`).
    // SAFETY: sysconf only reads a system constant.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).ok().filter(|&n| n > 0).unwrap_or(4096);
    let pages: u64 = reads.iter().map(|f| f.page_bytes(page)).sum();
    let bytes: u64 = reads.iter().map(|f| f.bytes()).sum();
    let mut buf = vec![0u8; 8 << 20];
    let t = Instant::now();
    let files: Vec<std::fs::File> =
        reads.iter().map(|f| std::fs::File::open(&f.path).unwrap_or_else(|e| die(&e.to_string()))).collect();
    for (f, r) in files.iter().zip(&reads) {
        // SAFETY: plain system calls on a descriptor open for their duration.
        #[allow(unsafe_code)]
        unsafe {
            libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM);
            for &(at, n) in &r.runs {
                let (a, e) = (at / page * page, (at + n).div_ceil(page) * page);
                libc::posix_fadvise(f.as_raw_fd(), a as i64, (e - a) as i64, libc::POSIX_FADV_WILLNEED);
            }
        }
    }
    for (f, r) in files.iter().zip(&reads) {
        for &(at, n) in &r.runs {
            let (a, e) = (at / page * page, (at + n).div_ceil(page) * page);
            let mut pos = a;
            while pos < e {
                let k = ((e - pos) as usize).min(buf.len());
                match f.read_at(&mut buf[..k], pos) {
                    Ok(0) => break,
                    Ok(got) => pos += got as u64,
                    Err(e) => die(&e.to_string()),
                }
            }
        }
    }
    println!("{} {pages} {bytes}", t.elapsed().as_secs_f64());
}

/// (source file, bytes the rank reads from it) and the rank's content bytes, from the plan.
fn share(c: &Case, rank: u32) -> (Vec<(PathBuf, u64)>, u64) {
    let plan = Plan::build(&c.src, c.src_strategy.as_deref(), c.dst_strategy.as_deref(), &PlanOptions::default())
        .unwrap_or_else(|e| die(&e.to_string()));
    let rp = plan.rank_plan(rank).unwrap_or_else(|e| die(&e.to_string()));
    let v = reshard_core::report::plan_json(&plan, Path::new("out"), &Default::default(), false)
        .unwrap_or_else(|e| die(&e.to_string()));
    let r = &v["ranks"][rank as usize];
    let files = r["sources"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| (PathBuf::from(s["path"].as_str().unwrap_or_default()), s["bytes"].as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default();
    (files, rp.tensors.iter().map(|t| t.nbytes).sum())
}

fn opt_arg(p: &Option<PathBuf>) -> String {
    p.as_ref().map_or("-".to_string(), |p| p.display().to_string())
}

/// Runs the comparison for `cases` (name, case, rank) and prints a table.
pub fn bench(dir: &Path, reshard: &Path, cases: &[(&str, &Case, u32)], runs: usize, cold: bool, py: Option<&str>) {
    let me = std::env::current_exe().unwrap_or_else(|e| die(&e.to_string()));
    println!(
        "\nLoad one destination rank into memory ({}, median of {runs}):\n",
        if cold { "--cold: sources dropped from the page cache before every run" } else { "warm page cache" }
    );
    println!(
        "| case | rank MB | load s (mmap: plan + load) | of which plan s | load s (pread) | process s (incl. fresh buffers, exit) | \
         peak anon beyond buffers MiB | (c) head -c share s | load/(c) | source pages the load touches MB | \
         (c') read exactly those pages s | load/(c') | (a) transform --ranks + read s | (a)/load | \
         (b) MindSpore by_rank + load_checkpoint s | (b)/load |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (name, c, rank) in cases {
        let (files, content) = share(c, *rank);
        let settle = || {
            let _ = Command::new("sync").status();
            if cold {
                drop_from_cache(&c.src);
            }
        };
        let out = dir.join("load_out");
        let (mut t_mmap, mut t_pread, mut t_cat, mut t_a, mut anon) = (vec![], vec![], vec![], vec![], 0u64);
        let (mut t_wall, mut t_plan, mut t_pages, mut page_bytes) = (vec![], vec![], vec![], 0f64);
        for _ in 0..runs {
            for io in ["mmap", "pread"] {
                settle();
                let said = dir.join("load_child.out");
                let m = run(Command::new(&me)
                    .arg("--load-child")
                    .arg(&c.src)
                    .arg(opt_arg(&c.src_strategy))
                    .arg(opt_arg(&c.dst_strategy))
                    .arg(rank.to_string())
                    .arg(io)
                    .stdout(std::fs::File::create(&said).unwrap_or_else(|e| die(&e.to_string()))));
                let text = std::fs::read_to_string(&said).unwrap_or_default();
                let v: Vec<f64> = text.split_whitespace().filter_map(|x| x.parse().ok()).collect();
                let [plan_s, load_s, _] = v[..] else { die(&format!("--load-child said {text:?}")) };
                anon = anon.max((m.peak_anon_kb * 1024).saturating_sub(content));
                (if io == "mmap" { &mut t_mmap } else { &mut t_pread }).push(plan_s + load_s);
                if io == "mmap" {
                    t_wall.push(m.secs);
                    t_plan.push(plan_s);
                }
            }
            settle();
            let mut script = String::from("exec >/dev/null");
            for (k, _) in files.iter().enumerate() {
                script += &format!("; head -c \"${{{}}}\" \"${{{}}}\"", 2 * k + 2, 2 * k + 1);
            }
            let mut cat = Command::new("sh");
            cat.arg("-c").arg(script).arg("sh");
            for (f, n) in &files {
                cat.arg(f).arg(n.to_string());
            }
            t_cat.push(run(&mut cat).secs);
            settle();
            let said = dir.join("pages_child.out");
            run(Command::new(&me)
                .arg("--pages-child")
                .arg(&c.src)
                .arg(opt_arg(&c.src_strategy))
                .arg(opt_arg(&c.dst_strategy))
                .arg(rank.to_string())
                .stdout(std::fs::File::create(&said).unwrap_or_else(|e| die(&e.to_string()))));
            let text = std::fs::read_to_string(&said).unwrap_or_default();
            let v: Vec<f64> = text.split_whitespace().filter_map(|x| x.parse().ok()).collect();
            let [secs, pages, _] = v[..] else { die(&format!("--pages-child said {text:?}")) };
            t_pages.push(secs);
            page_bytes = pages;
            let _ = std::fs::remove_dir_all(&out);
            settle();
            let mut a = Command::new("sh");
            a.arg("-c").arg("\"$@\" && cat \"$OUTFILE\" >/dev/null").arg("sh");
            a.env("OUTFILE", out.join(format!("rank_{rank}/checkpoint_{rank}.ckpt")));
            a.arg(reshard).args(["transform", "-q", "--no-sync", "--ranks", &rank.to_string(), "--src_ckpt_dir"]);
            a.arg(&c.src).arg("--dst_ckpt_dir").arg(&out);
            if let Some(s) = &c.src_strategy {
                a.arg("--src_ckpt_strategy").arg(s);
            }
            if let Some(s) = &c.dst_strategy {
                a.arg("--dst_ckpt_strategy").arg(s);
            }
            t_a.push(run(&mut a).secs);
        }
        let (load, pread, cat, ta) = (median(t_mmap), median(t_pread), median(t_cat), median(t_a));
        let (wall, plan_s, pages) = (median(t_wall), median(t_plan), median(t_pages));
        let mut b_cols = "n/a | n/a".to_string();
        if let Some(py) = py {
            let msout = dir.join("ms_load_out/rank.ckpt");
            let _ = std::fs::remove_dir_all(msout.parent().unwrap_or(dir));
            let _ = std::fs::create_dir_all(msout.parent().unwrap_or(dir));
            settle();
            let arg =
                |p: &Option<PathBuf>| p.as_ref().map_or("None".into(), |p| format!("{:?}", p.display().to_string()));
            let script = format!(
                "import glob, mindspore as ms\nsrc, dst = {ss}, {ds}\n\
                 ranks = ms.rank_list_for_transform({rank}, src, dst)\n\
                 files = {{r: sorted(glob.glob({dir:?} + f'/rank_{{r}}/*.ckpt'))[-1] for r in ranks}}\n\
                 ms.transform_checkpoint_by_rank({rank}, files, {out:?}, src, dst)\n\
                 p = ms.load_checkpoint({out:?})\nassert p\n",
                ss = arg(&c.src_strategy),
                ds = arg(&c.dst_strategy),
                dir = c.src.display().to_string(),
                out = msout.display().to_string(),
            );
            let m = run(Command::new(py).args(["-c", &script]).stderr(std::process::Stdio::null()));
            b_cols = format!("{:.2} | {:.0}x", m.secs, m.secs / load);
        }
        println!(
            "| {name} | {:.0} | {load:.3} | {plan_s:.3} | {pread:.3} | {wall:.3} | {:.1} | {cat:.3} | {:.2} | {:.0} | {pages:.3} | {:.2} | {ta:.3} | {:.1}x | {b_cols} |",
            content as f64 / 1e6,
            anon as f64 / (1 << 20) as f64,
            load / cat,
            page_bytes / 1e6,
            load / pages,
            ta / load,
        );
        let _ = std::fs::remove_dir_all(&out);
    }
}
