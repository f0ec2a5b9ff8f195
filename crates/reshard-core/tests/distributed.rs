//! `distributed`: processes of one job, each a thread here with its own `Coordinator`, sharing
//! an output folder; the records in it are their only channel, as between real processes.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod util;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use reshard_core::distributed::{execute_distributed, record_path, DistributedOptions, DistributedReport, Process};
use reshard_core::execute::ExecuteOptions;
use reshard_core::plan::{Plan, PlanOptions};
use reshard_core::Error;
use util::{fixtures, Scratch};

const CASE: &str = "conformance/complete_to_dp2mp2pp2_opt";

fn plan() -> Plan {
    let case = fixtures().join(CASE);
    Plan::build(&case.join("src"), None, Some(&case.join("dst_strategy.ckpt")), &PlanOptions::default()).unwrap()
}

fn options(index: u32, count: u32, timeout_ms: u64) -> DistributedOptions {
    DistributedOptions {
        process: Process { index: Some(index), count, from: "test".into() },
        timeout: Duration::from_millis(timeout_ms),
    }
}

fn run(plan: &Plan, out: &Path, index: u32, count: u32, timeout_ms: u64) -> Result<DistributedReport, Error> {
    execute_distributed(
        plan,
        out,
        &[],
        &ExecuteOptions { threads: 1, ..ExecuteOptions::default() },
        &options(index, count, timeout_ms),
    )
}

/// Runs all `count` processes at once, one thread each.
fn run_all(plan: &Plan, out: &Path, count: u32) -> Vec<Result<DistributedReport, Error>> {
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..count).map(|i| s.spawn(move || run(plan, out, i, count, 30_000))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn assert_same_as_mindspore(out: &Path) {
    let expected = fixtures().join(CASE).join("expected");
    let files = util::files_under(&expected);
    assert_eq!(files.len(), 8);
    for f in files {
        let rel = f.strip_prefix(&expected).unwrap();
        assert!(std::fs::read(out.join(rel)).unwrap() == std::fs::read(&f).unwrap(), "{} differs", rel.display());
    }
}

#[test]
fn every_process_count_gives_mindspores_outputs() {
    let plan = plan();
    for count in [1, 2, 3, 8, 11] {
        let out = Scratch::new(&format!("n{count}"));
        let reports: Vec<DistributedReport> =
            run_all(&plan, out.path(), count).into_iter().map(|r| r.unwrap()).collect();
        assert_same_as_mindspore(out.path());
        // Every process agrees on the split, and the shares are disjoint and cover the 8 ranks.
        let mut all: Vec<u32> = reports.iter().flat_map(|r| r.mine().to_vec()).collect();
        all.sort_unstable();
        assert_eq!(all, (0..8).collect::<Vec<_>>(), "{count} processes");
        for r in &reports {
            assert_eq!(r.shares, reports[0].shares);
        }
        // More processes than ranks: the rest are idle and still succeed.
        assert_eq!(reports.iter().filter(|r| r.mine().is_empty()).count(), (count as usize).saturating_sub(8));
        for i in 0..count {
            assert!(record_path(out.path(), i, count).is_file());
        }
    }
}

#[test]
fn a_failing_share_fails_every_process_with_its_error() {
    let plan = plan();
    let out = Scratch::new("fail");
    // rank_7's folder cannot be made: the share holding rank 7 fails writing it.
    std::fs::write(out.join("rank_7"), b"not a folder").unwrap();
    let results = run_all(&plan, out.path(), 2);
    let own = results[1].as_ref().unwrap_err().to_string();
    assert!(own.contains("rank_7"), "{own}");
    match &results[0] {
        Err(e @ Error::Distributed { .. }) => {
            let m = e.to_string();
            assert!(m.contains("share 1 of 2") && m.contains("failed") && m.contains(&own), "{m}");
        }
        other => panic!("{other:?}"),
    }
}

/// A share still writing when another fails is stopped within a heartbeat, and reports the
/// failed share's error, rather than writing its whole share for nothing first (under mpirun the
/// failed process waits for it to say why before any exits). Process 0 is slowed down (each
/// progress report after the first, which waits for share 1's failure, takes a second); it stops
/// before it has written all four of its ranks, which it would otherwise finish.
#[test]
fn a_share_still_writing_stops_when_another_fails() {
    let plan = plan();
    let out = Scratch::new("stop");
    std::fs::write(out.join("rank_7"), b"not a folder").unwrap();
    let failed = {
        let rec = record_path(out.path(), 1, 2);
        move || std::fs::read_to_string(&rec).is_ok_and(|t| t.contains("\"failed\""))
    };
    let calls = std::sync::atomic::AtomicUsize::new(0);
    let progress = move |_: u64, _: u64| {
        if calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed) == 0 {
            while !failed() {
                std::thread::sleep(Duration::from_millis(10));
            }
        } else {
            std::thread::sleep(Duration::from_secs(1));
        }
    };
    let slow =
        ExecuteOptions { threads: 1, progress: Some(std::sync::Arc::new(progress)), ..ExecuteOptions::default() };
    let (first, second) = std::thread::scope(|s| {
        let a = s.spawn(|| execute_distributed(&plan, out.path(), &[], &slow, &options(0, 2, 2_000)));
        let b = s.spawn(|| run(&plan, out.path(), 1, 2, 2_000));
        (a.join().unwrap(), b.join().unwrap())
    });
    let own = second.unwrap_err().to_string();
    assert!(own.contains("rank_7"), "{own}");
    let m = first.unwrap_err().to_string();
    assert!(m.contains("share 1 of 2") && m.contains(&own), "{m}");
    let written = (0..4)
        .filter(|r| {
            util::files_under(&out.join(format!("rank_{r}"))).iter().any(|f| f.extension().is_some_and(|e| e == "ckpt"))
        })
        .count();
    assert!(written < 4, "process 0 wrote all its {written} ranks after share 1 had failed");
}

#[test]
fn a_silent_share_times_out_by_name_and_a_rerun_completes() {
    let plan = plan();
    let out = Scratch::new("silent");
    // Process 1 never starts.
    let e = run(&plan, out.path(), 0, 2, 300).unwrap_err();
    let m = e.to_string();
    assert!(matches!(e, Error::Distributed { .. }), "{m}");
    assert!(m.contains("share 1 of 2 (rank_4..rank_7 (4 ranks)): no record yet"), "{m}");
    // Process 1 dies while running: its record stays "running" and stops changing.
    let rec = record_path(out.path(), 1, 2);
    std::fs::write(&rec, br#"{"version":1,"job":"","share":1,"shares":2,"state":"running","ranks":[],"host":"h","pid":1,"beat":3,"bytes_done":5,"bytes_total":9}"#).unwrap();
    let m = run(&plan, out.path(), 0, 2, 300).unwrap_err().to_string();
    assert!(m.contains("share 1 of 2 (rank_4..rank_7 (4 ranks)): running on host h (pid 1), 5 of 9 bytes"), "{m}");
    // The rerun of both keeps process 0's ranks.
    let reports: Vec<_> = run_all(&plan, out.path(), 2).into_iter().map(|r| r.unwrap()).collect();
    assert!(reports[0].files.iter().all(|f| f.reused), "{:?}", reports[0].files);
    assert!(reports[1].files.iter().all(|f| !f.reused));
    assert_same_as_mindspore(out.path());
}

#[test]
fn an_earlier_runs_failure_is_not_taken_for_this_runs() {
    let plan = plan();
    let out = Scratch::new("stale");
    let rec: PathBuf = record_path(out.path(), 1, 2);
    std::fs::write(&rec, br#"{"version":1,"job":"","share":1,"shares":2,"state":"failed","ranks":[],"host":"h","pid":1,"beat":0,"bytes_done":0,"bytes_total":0,"error":"disk full"}"#).unwrap();
    let hour_ago = SystemTime::now() - Duration::from_secs(3600);
    std::fs::File::options().write(true).open(&rec).unwrap().set_modified(hour_ago).unwrap();
    // Alone, process 0 waits for share 1 to run again, and says what it last recorded.
    let m = run(&plan, out.path(), 0, 2, 300).unwrap_err().to_string();
    assert!(
        m.contains("gave up")
            && m.contains("recorded a failure before this process started")
            && m.contains("disk full"),
        "{m}"
    );
    // Run again with process 1 too: the job completes.
    for r in run_all(&plan, out.path(), 2) {
        r.unwrap();
    }
    assert_same_as_mindspore(out.path());
}

#[test]
fn a_record_of_another_job_is_not_accepted() {
    let plan = plan();
    let out = Scratch::new("other-job");
    for r in run_all(&plan, out.path(), 2) {
        r.unwrap();
    }
    // The same folder and process count, another prefix: process 1's record is for another job.
    let opts = ExecuteOptions { prefix: "other_".into(), threads: 1, ..ExecuteOptions::default() };
    let e = execute_distributed(&plan, out.path(), &[], &opts, &options(0, 2, 300)).unwrap_err().to_string();
    assert!(e.contains("share 1 of 2") && e.contains("another job"), "{e}");
}
