//! Kill test: a transform killed with SIGKILL midway leaves only complete files under final
//! names; a rerun finishes the job with the same bytes as a clean run; `verify` names a damaged
//! file.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod util;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reshard_core::checkpoint::{CheckpointFile, ReadOptions, TensorHeader};
use reshard_core::{ckpt, DType};
use util::{Scratch, BIN};

/// A complete checkpoint of `layers` x 4 MiB-ish fp32 weights, plus its 8-rank strategy.
fn make_source(dir: &Path, layers: usize) -> (PathBuf, PathBuf) {
    let mut headers = Vec::new();
    let mut items = serde_json::Map::new();
    for l in 0..layers {
        for (w, map) in [("wq", [0, -1]), ("wo", [-1, 0])] {
            let name = format!("layers.{l}.{w}.weight");
            headers.push(TensorHeader {
                name: name.clone(),
                dtype: DType::Float32,
                dims: vec![1024, 1024],
                nbytes: 4 << 20,
            });
            items.insert(
                name,
                serde_json::json!({"dev_matrix": [2, 4], "tensor_map": map, "field": 0,
                "opt_weight_shard_step": 0, "opt_weight_shard_size": 0}),
            );
        }
    }
    let layout = ckpt::layout(&headers, ckpt::CHUNK_BYTES);
    let path = dir.join("complete/rank_0/model.ckpt");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let contents: Vec<Vec<u8>> = (0..headers.len())
        .map(|i| (0..4u32 << 20).map(|k| (k as u8).wrapping_mul(7).wrapping_add(i as u8)).collect())
        .collect();
    let bytes = layout.render(&contents.iter().map(Vec::as_slice).collect::<Vec<_>>());
    std::fs::write(&path, bytes).unwrap();
    let strategy = dir.join("dst.json");
    let v = serde_json::json!({"current_stage": 0, "parallel_strategy_item": {"op": {"stage": 0, "parallel_strategy": [[8]]}},
        "parallel_layout_item": items});
    std::fs::write(&strategy, serde_json::to_vec(&v).unwrap()).unwrap();
    (dir.join("complete"), strategy)
}

fn transform(src: &Path, strategy: &Path, out: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.args(["transform", "-q", "--threads", "1", "--src_ckpt_dir"])
        .arg(src)
        .arg("--dst_ckpt_strategy")
        .arg(strategy)
        .arg("--dst_ckpt_dir")
        .arg(out);
    c
}

fn outputs(dir: &Path) -> Vec<PathBuf> {
    (0..8).map(|r| dir.join(format!("rank_{r}/checkpoint_{r}.ckpt"))).collect()
}

#[test]
fn killed_run_leaves_complete_files_and_rerun_matches_clean_run() {
    let s = Scratch::new("kill");
    let dir = s.path();
    let (src, strategy) = make_source(dir, 40); // 320 MiB
    let clean = dir.join("clean");
    assert!(transform(&src, &strategy, &clean).status().unwrap().success());

    let out = dir.join("killed");
    let mut killed_midway = false;
    for _attempt in 0..5 {
        let _ = std::fs::remove_dir_all(&out);
        let mut child = transform(&src, &strategy, &out).stderr(Stdio::null()).spawn().unwrap();
        // Kill as soon as the first output is under its final name.
        let start = Instant::now();
        while !outputs(&out)[0].exists() && start.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_micros(200));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let finished = outputs(&out).iter().filter(|p| p.exists()).count();
        if finished < 8 {
            killed_midway = true;
            break;
        }
    }
    assert!(killed_midway, "the transform always finished before it could be killed");
    // Every file under a final name is complete: it parses and matches the clean run.
    for (a, b) in outputs(&out).iter().zip(outputs(&clean)) {
        if a.exists() {
            CheckpointFile::open(a, ReadOptions::default())
                .unwrap_or_else(|e| panic!("partial file {}: {e}", a.display()));
            assert_eq!(std::fs::read(a).unwrap(), std::fs::read(&b).unwrap(), "{}", a.display());
        }
    }
    // Rerun: keeps what verifies, redoes the rest, ends identical to the clean run.
    let o = transform(&src, &strategy, &out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for (a, b) in outputs(&out).iter().zip(outputs(&clean)) {
        assert_eq!(std::fs::read(a).unwrap(), std::fs::read(&b).unwrap(), "{}", a.display());
    }
    // No temporary files left behind.
    for r in 0..8 {
        for e in std::fs::read_dir(out.join(format!("rank_{r}"))).unwrap() {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(!n.ends_with(".tmp"), "leftover {n}");
        }
    }
    let v = Command::new(BIN).arg("verify").arg(&out).output().unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));

    // One flipped byte: verify fails and names that file (and only it).
    let victim = outputs(&out)[5].clone();
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&victim, bytes).unwrap();
    let v = Command::new(BIN).arg("verify").arg(&out).output().unwrap();
    assert_eq!(v.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&v.stderr);
    assert!(stderr.contains("rank_5/checkpoint_5.ckpt"), "{stderr}");
    assert!(!stderr.contains("rank_4/checkpoint_4.ckpt"), "{stderr}");
    // And a rerun repairs exactly that file.
    assert!(transform(&src, &strategy, &out).status().unwrap().success());
    assert_eq!(std::fs::read(&victim).unwrap(), std::fs::read(outputs(&clean)[5].clone()).unwrap());
}

/// Temporary files (`.tmp`) anywhere under `dir`.
fn temp_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(temp_files(&p));
        } else if p.to_string_lossy().ends_with(".tmp") {
            out.push(p);
        }
    }
    out
}

#[test]
fn sigterm_and_sigint_remove_the_temporary_files_and_exit_128_plus_the_signal() {
    let s = Scratch::new("signal");
    let dir = s.path();
    let (src, strategy) = make_source(dir, 16); // 128 MiB, 8 outputs of 16 MiB
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let out = dir.join(format!("out-{sig}"));
        let mut stopped = None;
        for _attempt in 0..5 {
            let _ = std::fs::remove_dir_all(&out);
            let child = transform(&src, &strategy, &out).stderr(Stdio::piped()).spawn().unwrap();
            // Signal it once the first output is finished and another one is being written
            // under its temporary name.
            let start = Instant::now();
            while (!outputs(&out)[0].exists() || temp_files(&out).is_empty())
                && start.elapsed() < Duration::from_secs(30)
            {
                std::thread::sleep(Duration::from_micros(200));
            }
            // SAFETY: kill(2) on the pid of a child we have not waited for yet.
            assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
            let o = child.wait_with_output().unwrap();
            if o.status.success() {
                continue; // finished before the signal landed: try again
            }
            stopped = Some(o);
            break;
        }
        let o = stopped.expect("the transform always finished before the signal");
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(128 + sig), "signal {sig}: {:?}\n{stderr}", o.status);
        assert!(stderr.contains("stopped"), "{stderr}");
        let left = temp_files(&out);
        assert!(left.is_empty(), "signal {sig}: temporary files left: {left:?}");
        let finished: Vec<PathBuf> = outputs(&out).into_iter().filter(|p| p.exists()).collect();
        assert!(finished.len() < 8, "signal {sig}: every output was finished");
        // What is under a final name is complete, and listed with its crc in a manifest.
        for p in &finished {
            CheckpointFile::open(p, ReadOptions::default())
                .unwrap_or_else(|e| panic!("partial file {}: {e}", p.display()));
        }
        assert!(!finished.is_empty(), "signal {sig}: rank 0 finished before the signal but is not there");
        // verify checks what is there and names the ranks the stopped job did not write.
        let v = Command::new(BIN).arg("verify").arg(&out).output().unwrap();
        let said = format!("{}{}", String::from_utf8_lossy(&v.stdout), String::from_utf8_lossy(&v.stderr));
        assert_eq!(v.status.code(), Some(1), "{said}");
        assert!(said.contains("ok ") && said.contains("MISSING") && said.contains("rank_7"), "{said}");
        assert!(!said.contains("BAD"), "{said}");
        // A rerun finishes the job, and then verify passes.
        let o = transform(&src, &strategy, &out).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v = Command::new(BIN).arg("verify").arg(&out).output().unwrap();
        assert!(v.status.success(), "{}{}", String::from_utf8_lossy(&v.stdout), String::from_utf8_lossy(&v.stderr));
        assert!(outputs(&out).iter().all(|p| p.exists()));
    }
}
