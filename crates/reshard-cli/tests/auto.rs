//! `reshard auto`, launched as W concurrent processes per case, on MindSpore-made fixtures.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod util;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};

use reshard_core::strategy::Strategy;
use util::{Scratch, BIN};

/// The conformance fixture `case`.
fn fixture(case: &str) -> PathBuf {
    util::fixture("conformance").join(case)
}

/// What the runtime leaves before loading weights: `ckpt_strategy_rank_{r}.ckpt` for every rank
/// (each rank writes its stage's file).
fn write_runtime_strategies(case: &Path, dir: &Path) -> u32 {
    std::fs::create_dir_all(dir).unwrap();
    let stages = case.join("dst_strategy_stages");
    let stage_files: Vec<PathBuf> = if stages.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&stages).unwrap().map(|e| e.unwrap().path()).collect();
        v.sort_by_key(|p| {
            let n = p.file_stem().unwrap().to_string_lossy().into_owned();
            n.rsplit('_').next().unwrap().parse::<u32>().unwrap()
        });
        v
    } else {
        vec![case.join("dst_strategy.ckpt")]
    };
    let per_stage = Strategy::load(&stage_files[0]).unwrap().stage_device_num().unwrap() as u32;
    let world = per_stage * stage_files.len() as u32;
    for r in 0..world {
        std::fs::copy(&stage_files[(r / per_stage) as usize], dir.join(format!("ckpt_strategy_rank_{r}.ckpt")))
            .unwrap();
    }
    world
}

fn spawn(case: &Path, out: &Path, rank: u32, world: u32, env: (&str, &str)) -> Child {
    let mut c = Command::new(BIN);
    c.args(["auto", "--timeout", "60", "--load_checkpoint"]).arg(case.join("src")).arg("--output_dir").arg(out);
    let src_stages = case.join("src_strategy_stages");
    if src_stages.is_dir() {
        c.arg("--src_strategy_path_or_dir").arg(&src_stages);
    }
    c.env(env.0, rank.to_string()).env(env.1, world.to_string());
    for (r, w) in reshard_core::auto::RANK_ENV {
        if r != env.0 {
            c.env_remove(r).env_remove(w);
        }
    }
    c.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap()
}

/// A new scratch folder tagged `tag` whose `output/strategy` holds what the runtime leaves for the
/// case `case_name`. Returns the case's folder, the scratch folder, the output folder and the
/// number of ranks.
fn prepared(case_name: &str, tag: &str) -> (PathBuf, Scratch, PathBuf, u32) {
    let case = fixture(case_name);
    let s = Scratch::new(tag);
    let out = s.join("output");
    let world = write_runtime_strategies(&case, &out.join("strategy"));
    (case, s, out, world)
}

/// `reshard auto --timeout SECONDS` as rank 0 of `world`, loading `load` with the source
/// strategy `src_strategy` and writing under `out`.
fn auto_rank0(seconds: &str, world: u32, load: &Path, src_strategy: &Path, out: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.args(["auto", "--timeout", seconds, "--rank", "0", "--world_size"]).arg(world.to_string());
    c.arg("--load_checkpoint")
        .arg(load)
        .arg("--src_strategy_path_or_dir")
        .arg(src_strategy)
        .arg("--output_dir")
        .arg(out);
    c
}

fn check(o: Output, rank: u32) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "rank {rank} failed:\n{err}");
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// Compares every output with `reference/` byte for byte.
fn same_files(out: &Path, reference: &Path, world: u32) {
    for r in 0..world {
        let f = format!("rank_{r}/checkpoint_{r}.ckpt");
        let (a, b) = (std::fs::read(out.join(&f)), std::fs::read(reference.join(&f)));
        assert!(a.is_ok() && a.unwrap() == b.unwrap(), "{f} differs from the reference");
    }
}

/// Runs `case_name` with one `reshard auto` per rank in a new scratch folder and compares the
/// outputs with `reference` (default: the case's `expected/`). Returns the scratch folder, the
/// output folder in it and the number of ranks.
fn run_case(case_name: &str, reference: Option<&Path>) -> (Scratch, PathBuf, u32) {
    run_case_in(case_name, case_name, reference)
}

/// `run_case` in a scratch folder tagged `scratch_name`.
fn run_case_in(case_name: &str, scratch_name: &str, reference: Option<&Path>) -> (Scratch, PathBuf, u32) {
    let case = fixture(case_name);
    let s = Scratch::new(scratch_name);
    let out = s.join("output");
    let has_dst = case.join("dst_strategy.ckpt").exists();
    let world = if has_dst { write_runtime_strategies(&case, &out.join("strategy")) } else { 1 };
    let children: Vec<Child> = (0..world).map(|r| spawn(&case, &out, r, world, ("RANK_ID", "RANK_SIZE"))).collect();
    for (r, c) in children.into_iter().enumerate() {
        let path = check(c.wait_with_output().unwrap(), r as u32);
        assert!(path.ends_with(&format!("rank_{r}/checkpoint_{r}.ckpt")), "{path}");
    }
    let reference = reference.map(Path::to_path_buf).unwrap_or_else(|| case.join("expected"));
    same_files(&out.join("transformed_checkpoint"), &reference, world);
    (s, out, world)
}

#[test]
fn complete_to_8_ranks_dp2_mp1_pp4_opt_shard() {
    run_case("complete_to_dp2mp1pp4_opt", None);
}

#[test]
fn eight_ranks_to_4_dp1_mp2_pp2() {
    let (_s, out, _) = run_case("dp2mp2pp2_to_dp1mp2pp2", None);
    assert!(out.join("strategy/merged_ckpt_strategy.ckpt").is_file());
}

#[test]
fn eight_ranks_to_complete_for_one_card() {
    run_case("dp2mp2pp2_to_complete", None);
}

#[test]
fn complete_to_2_ranks_mp2_inference() {
    run_case("complete_to_mp2", None);
}

#[test]
fn eight_ranks_to_2_ranks_mp2_inference() {
    // The optimizer states have no layout in the inference strategy: MindSpore writes a source
    // slice under their name, reshard the complete tensor (README). Compare with `reshard
    // transform`, which the conformance suite checks against MindSpore for everything else.
    let case = fixture("dp2mp2pp2_to_mp2");
    let s = Scratch::new("mp2-reference");
    let reference = s.join("reference");
    let st = Command::new(BIN)
        .args(["transform", "-q", "--src_ckpt_dir"])
        .arg(case.join("src"))
        .arg("--src_ckpt_strategy")
        .arg(case.join("src_strategy.ckpt"))
        .arg("--dst_ckpt_strategy")
        .arg(case.join("dst_strategy.ckpt"))
        .arg("--dst_ckpt_dir")
        .arg(&reference)
        .status()
        .unwrap();
    assert!(st.success());
    run_case("dp2mp2pp2_to_mp2", Some(&reference));
}

#[test]
fn relaunch_with_fewer_ranks_replaces_old_results() {
    let case = fixture("dp2mp2pp2_to_dp1mp2pp2");
    let (_s, out, _) = run_case_in("complete_to_dp2mp1pp4_opt", "relaunch-fewer", None);
    // Same output folder, new launch: 4 ranks from an 8-rank checkpoint.
    std::fs::remove_dir_all(out.join("strategy")).unwrap();
    let world = write_runtime_strategies(&case, &out.join("strategy"));
    let children: Vec<Child> = (0..world).map(|r| spawn(&case, &out, r, world, ("RANK", "WORLD_SIZE"))).collect();
    let mut logs = String::new();
    for (r, c) in children.into_iter().enumerate() {
        let o = c.wait_with_output().unwrap();
        logs += &String::from_utf8_lossy(&o.stderr);
        check(o, r as u32);
    }
    same_files(&out.join("transformed_checkpoint"), &case.join("expected"), world);
    for r in world..8 {
        assert!(
            !out.join(format!("transformed_checkpoint/rank_{r}")).exists(),
            "rank_{r} of the old launch is still there"
        );
    }
    assert!(logs.contains("earlier launch"), "the log does not say what was replaced:\n{logs}");
    let v = Command::new(BIN).arg("verify").arg(out.join("transformed_checkpoint")).output().unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
}

#[test]
fn missing_stage_file_times_out_naming_it() {
    let (case, _s, out, world) = prepared("dp2mp2pp2_to_dp1mp2pp2", "missing");
    std::fs::remove_file(out.join("strategy/ckpt_strategy_rank_3.ckpt")).unwrap();
    let o = auto_rank0("1", world, &case.join("src"), &case.join("src_strategy_stages"), &out).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("timed out") && err.contains("ckpt_strategy_rank_3.ckpt") && !err.contains("rank_2.ckpt"),
        "{err}"
    );
    assert!(!out.join("transformed_checkpoint/rank_0/checkpoint_0.ckpt").exists());
}

/// A FIFO (or a folder) where the runtime writes a rank's strategy file is refused at once by
/// name; it used to be taken for a file not written yet and waited for until the timeout.
#[test]
fn a_strategy_file_that_is_not_a_regular_file_is_refused_at_once() {
    let (case, _s, out, world) = prepared("dp2mp2pp2_to_dp1mp2pp2", "fifo-strategy");
    let victim = out.join("strategy/ckpt_strategy_rank_3.ckpt");
    std::fs::remove_file(&victim).unwrap();
    assert!(Command::new("mkfifo").arg(&victim).status().unwrap().success());
    // With a timeout of 30 s the old behaviour fails this test ("timed out" names no FIFO).
    let o = auto_rank0("30", world, &case.join("src"), &case.join("src_strategy_stages"), &out).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(victim.to_str().unwrap())
            && err.contains("FIFO")
            && err.contains("rank 3")
            && !err.contains("timed out"),
        "{err}"
    );
    assert!(!out.join("transformed_checkpoint/rank_0/checkpoint_0.ckpt").exists());
    // This rank's own file, and a folder.
    std::fs::remove_file(&victim).unwrap();
    std::fs::copy(out.join("strategy/ckpt_strategy_rank_2.ckpt"), &victim).unwrap();
    let own = out.join("strategy/ckpt_strategy_rank_0.ckpt");
    std::fs::remove_file(&own).unwrap();
    std::fs::create_dir(&own).unwrap();
    let o = auto_rank0("30", world, &case.join("src"), &case.join("src_strategy_stages"), &out).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(own.to_str().unwrap()) && err.contains("a folder") && !err.contains("timed out"), "{err}");
}

#[test]
fn two_nodes_with_different_launchers_and_local_rank_sets() {
    // "Node" A runs ranks 0-3 under MindSpore's variables, node B ranks 4-7 under Open MPI's,
    // started one after the other; they share only the filesystem.
    let (case, _s, out, world) = prepared("complete_to_dp2mp1pp4_opt", "two-nodes");
    assert_eq!(world, 8);
    let a: Vec<Child> = (0..4).map(|r| spawn(&case, &out, r, world, ("RANK_ID", "RANK_SIZE"))).collect();
    std::thread::sleep(std::time::Duration::from_millis(50));
    let b: Vec<Child> =
        (4..8).map(|r| spawn(&case, &out, r, world, ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"))).collect();
    for (r, c) in a.into_iter().chain(b).enumerate() {
        check(c.wait_with_output().unwrap(), r as u32);
    }
    same_files(&out.join("transformed_checkpoint"), &case.join("expected"), world);
}

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(snapshot(&p));
        } else {
            out.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
    out.sort();
    out
}

/// A relaunch on 4 ranks whose `--load_checkpoint` is the 8-rank result of the earlier launch
/// (OUT/transformed_checkpoint, directly or through a symlink): refused before anything is
/// removed, saying what to do. Rank 0 used to remove rank_4..rank_7 of its own source, and the
/// job then failed with "stat: No such file". A source strategy inside OUT/strategy, which the
/// runtime and reshard rewrite, is refused too.
#[test]
fn relaunch_from_the_earlier_result_is_refused_and_deletes_nothing() {
    let (_s, out, _) = run_case_in("complete_to_dp2mp1pp4_opt", "relaunch-from-result", None);
    let old_result = out.join("transformed_checkpoint");
    let old_strategy = out.parent().unwrap().join("old_merged_strategy.ckpt");
    std::fs::copy(out.join("strategy/merged_ckpt_strategy.ckpt"), &old_strategy).unwrap();
    let before = snapshot(&old_result);
    assert_eq!(before.iter().filter(|(p, _)| p.extension().is_some_and(|e| e == "ckpt")).count(), 8);
    std::fs::remove_dir_all(out.join("strategy")).unwrap();
    let world = write_runtime_strategies(&fixture("dp2mp2pp2_to_dp1mp2pp2"), &out.join("strategy"));
    let link = out.parent().unwrap().join("link_to_result");
    std::os::unix::fs::symlink(&old_result, &link).unwrap();
    let relaunch = |load: &Path, strategy: &Path| auto_rank0("5", world, load, strategy, &out).output().unwrap();
    // A folder whose rank folders are symlinks into the old result.
    let links = out.parent().unwrap().join("rank_links");
    std::fs::create_dir_all(&links).unwrap();
    for r in 0..8 {
        std::os::unix::fs::symlink(old_result.join(format!("rank_{r}")), links.join(format!("rank_{r}"))).unwrap();
    }
    for load in [&old_result, &link, &old_result.join("rank_0"), &links] {
        let o = relaunch(load, &old_strategy);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{}: {err}", load.display());
        assert!(err.contains("move it aside") && err.contains("transformed_checkpoint"), "{err}");
        assert_eq!(snapshot(&old_result), before, "the relaunch changed its source {}", load.display());
    }
    let aside = out.parent().unwrap().join("aside");
    std::fs::rename(&old_result, &aside).unwrap();
    std::fs::copy(&old_strategy, out.join("strategy/old_merged.ckpt")).unwrap();
    let o = relaunch(&aside, &out.join("strategy/old_merged.ckpt"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("old_merged.ckpt") && err.contains("copy it elsewhere"), "{err}");
    assert!(!out.join("transformed_checkpoint").exists());
}

/// Whether process `pid` has a handler for signal `sig` (the SigCgt mask of /proc/PID/status).
fn catches(pid: u32, sig: i32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let mask = status.lines().find_map(|l| l.strip_prefix("SigCgt:")).map(str::trim).unwrap_or("0");
    u64::from_str_radix(mask, 16).is_ok_and(|m| m & (1 << (sig - 1)) != 0)
}

#[test]
fn sigterm_while_waiting_for_strategy_files_stops_with_143() {
    let (case, _s, out, world) = prepared("dp2mp2pp2_to_dp1mp2pp2", "sigterm");
    std::fs::remove_file(out.join("strategy/ckpt_strategy_rank_3.ckpt")).unwrap();
    let mut c = auto_rank0("600", world, &case.join("src"), &case.join("src_strategy_stages"), &out);
    let child = c.stderr(std::process::Stdio::piped()).spawn().unwrap();
    // Once its handler is installed (it then waits for the missing file, up to 600 s).
    let start = std::time::Instant::now();
    while !catches(child.id(), libc::SIGTERM) && start.elapsed() < std::time::Duration::from_secs(30) {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // SAFETY: kill(2) on the pid of a child we have not waited for yet.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(143), "{:?}\n{err}", o.status);
    assert!(err.contains("stopped"), "{err}");
    assert!(!out.join("transformed_checkpoint/rank_0/checkpoint_0.ckpt").exists());
}
