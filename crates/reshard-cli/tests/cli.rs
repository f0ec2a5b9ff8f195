//! CLI-level tests of the `reshard` binary.
//!
//! - The bad-input corpus (`tests/corpus`, made by `tests/corpus/make_corpus.py`): one table per
//!   kind of entry (checkpoint file, strategy file, source folder case), each row a corpus path
//!   and the needles the message must name, checked by one test that reports every failing row.
//!   Each row runs the real binary and checks exit status 1, exactly one `reshard: error:` line
//!   on stderr naming the file (and rank, parameter, shapes where relevant), no panic text, and
//!   that nothing was written under the output folder. Entries that need more have their own test.
//! - Output-folder refusals: inside the source, not writable, a file-size limit hit mid-write.
//! - Positive runs on MindSpore-made fixtures: `inspect --json`, `merge-strategy`, `transform`
//!   (byte-identical to MindSpore), `plan --json`, `rank-list`, `--help`.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod util;

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use util::{
    argv, assert_nothing_written, assert_refused, check_rows, copy_dir, corpus, files_under, fixture, repo, reshard,
    text, transform, Scratch, BIN,
};

// ------------------------------------------------------------------ corpus: checkpoint files

/// Corrupt checkpoint files (`.ckpt` and `.safetensors`) and what the refusal must name besides
/// the file.
const CHECKPOINT_FILES: &[(&str, &[&str])] = &[
    ("ckpt/truncated.ckpt", &["malformed checkpoint", "past the end"]),
    ("ckpt/garbage.ckpt", &["malformed checkpoint"]),
    ("ckpt/crc_mismatch.ckpt", &["crc"]),
    ("ckpt/size_mismatch.ckpt", &["'w'", "60 bytes", "[4, 4]", "64"]),
    ("ckpt/dims_overflow.ckpt", &["'w'", "[4294967296, 4294967296, 2]", "overflow"]),
    ("ckpt/dims_absurd.ckpt", &["'w'", "16 bytes", "[1099511627776, 1024]"]),
    ("ckpt/dims_negative.ckpt", &["'w'", "negative"]),
    ("ckpt/unknown_dtype.ckpt", &["'w'", "Float128"]),
    ("ckpt/encrypted.ckpt", &["encrypted"]),
    ("ckpt/repeated_tag.ckpt", &["'w'", "not consecutively"]),
    ("ckpt/maptensor.ckpt", &["embedding_table", "MapTensor"]),
    // A 0-byte `.ckpt` (what a crashed copy leaves) used to read as a checkpoint with no
    // tensors, and transform wrote an empty output with exit status 0.
    ("ckpt/empty.ckpt", &[]),
    // `08 05 08 07` (every fuzz artifact): fields that parse, but no Value. It used to be
    // accepted and written as 0-byte outputs, and `inspect` called it a malformed strategy file.
    ("ckpt/no_tensors.ckpt", &["malformed checkpoint", "no tensors"]),
    // A NUL in tensor_type used to be printed raw (`'Float32'` on a terminal): it is escaped.
    ("ckpt/dtype_with_nul.ckpt", &["'w'", r#""Float32\0""#]),
    ("safetensors/header_past_eof.safetensors", &["malformed safetensors", "4096"]),
    ("safetensors/overlapping_offsets.safetensors", &["'a'", "'b'", "overlap"]),
    ("safetensors/header_not_json.safetensors", &["malformed safetensors", "JSON"]),
    ("safetensors/offsets_past_eof.safetensors", &["'w'", "[0, 64]", "16 data bytes"]),
    ("safetensors/size_mismatch.safetensors", &["'w'", "16 bytes", "[4, 4]", "64"]),
    ("safetensors/unknown_dtype.safetensors", &["'w'", "F128"]),
    ("safetensors/crc_mismatch.safetensors", &["crc"]),
    ("safetensors/no_tensors.safetensors", &["malformed safetensors", "no tensors"]),
    ("safetensors/duplicate_key.safetensors", &["malformed safetensors", r#""w""#, "twice"]),
    ("safetensors/data_gap.safetensors", &["'b'", "[8, 16)"]),
    ("safetensors/trailing_bytes.safetensors", &["4 trailing"]),
    // Found by fuzzing: with overflow checks (debug builds) the crc of a 0-d U64 of 2^64 - 1
    // used to panic inside crc32fast (`safetensors::update_zeros` doubled its block once more
    // than it needed). Refused on its crc, in debug and release builds.
    ("safetensors/scalar_u64_max_crc.safetensors", &["crc"]),
];

/// `SCRATCH/src` holding `file` as `rank_0/NAME`: a complete source of one file. Returns the
/// source folder.
fn one_rank_source(s: &Scratch, file: &Path, name: &str) -> PathBuf {
    let src = s.join("src");
    std::fs::create_dir_all(src.join("rank_0")).unwrap();
    std::fs::copy(file, src.join("rank_0").join(name)).unwrap();
    src
}

/// `transform` of `file` as the complete source `SCRATCH/src/rank_0/NAME` into `SCRATCH/out`,
/// which must succeed. Returns the file written.
fn complete_to_complete(s: &Scratch, file: &Path, name: &str) -> PathBuf {
    let src = one_rank_source(s, file, name);
    let dst = s.join("out");
    let out = transform(&src, &dst, vec![]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    dst.join("rank_0/checkpoint_0.ckpt")
}

/// The corpus file `rel` (which must exist) and its file name.
fn corpus_file(rel: &str) -> (PathBuf, String) {
    let file = corpus(rel);
    assert!(file.is_file(), "missing corpus file {}", file.display());
    let name = file.file_name().unwrap().to_str().unwrap().to_string();
    (file, name)
}

#[test]
fn corpus_checkpoint_files() {
    check_rows(CHECKPOINT_FILES, |r| r.0.to_string(), |&(rel, needles)| refuse_checkpoint_file(rel, needles));
}

/// A corrupt checkpoint file: `reshard transform` with it as the complete source in `rank_0`,
/// and `reshard inspect` (table and JSON) on it, are refused naming it.
fn refuse_checkpoint_file(rel: &str, needles: &[&str]) {
    let (file, name) = corpus_file(rel);
    let s = Scratch::new(rel);
    let src = one_rank_source(&s, &file, &name);
    let dst = s.join("out");

    assert_refused(&transform(&src, &dst, vec![]), &[&[name.as_str(), "rank_0"], needles].concat());
    assert_nothing_written(&dst);
    // Read with pread instead of a map, the table of contents is read the same way and the
    // file refused for the same reason.
    assert_refused(&transform(&src, &dst, argv!["--io", "pread"]), &[&[name.as_str(), "rank_0"], needles].concat());
    assert_nothing_written(&dst);
    // The source folder is left as it was.
    assert_eq!(files_under(&src), vec![src.join("rank_0").join(&name)]);

    let all = [&[name.as_str()], needles].concat();
    assert_refused(&reshard(argv!["inspect", &file]), &all);
    assert_refused(&reshard(argv!["inspect", "--json", &file]), &all);
}

/// Found by fuzzing (round trip of the `ckpt` target): a sound file whose last tensor's content
/// ends with `crc_num` + 10 bytes, which MindSpore's rule reads as a crc trailer. reshard reads it
/// as content (a real trailer never parses as protobuf), and a complete-to-complete transform
/// writes it back byte for byte and reads its own output.
#[test]
fn corpus_ckpt_content_ends_like_crc_trailer() {
    let file = corpus("ckpt/content_ends_like_crc_trailer.ckpt");
    let v = inspect_json(&file);
    let names: Vec<&str> = v["tensors"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["w", "b", "bytes"]);
    assert_eq!(v["tensors"][2]["shape"], serde_json::json!([17]));
    let s = Scratch::new("crc_like");
    let written = complete_to_complete(&s, &file, "model.ckpt");
    assert!(std::fs::read(&written).unwrap() == std::fs::read(&file).unwrap());
    assert_eq!(inspect_json(&written), v);
}

// ------------------------------------------------------------------ corpus: strategy files

/// Bad strategy files and what the refusal must name besides the file.
const STRATEGY_FILES: &[(&str, &[&str])] = &[
    ("strategy/garbage.ckpt", &["malformed strategy"]),
    ("strategy/empty.ckpt", &["malformed strategy", "empty"]),
    ("strategy/garbage.json", &["malformed strategy", "JSON"]),
    ("strategy/no_layouts.ckpt", &["no parameter layouts"]),
    ("strategy/duplicate_key.json", &["malformed strategy", r#""w""#, "twice"]),
    ("strategy/tensor_shape_negative.json", &["'w'", "tensor_shape", "negative"]),
    // Found by fuzzing (strategy targets): opt_weight_shard_size -2 used to be accepted (see
    // `corpus_strategy_opt_shard_size_negative`).
    ("strategy/opt_shard_size_negative.json", &["'w'", "opt_weight_shard_size", "-2"]),
    // Found by fuzzing: 2^64 devices wrapped to 0, so the destination had 0 ranks and transform
    // "succeeded" writing nothing; as a source strategy the message blamed the checkpoints.
    ("strategy/dev_matrix_overflow.json", &["'w'", "dev_matrix"]),
    // Issue 13 item 4: parameters of one stage on different device counts used to be planned
    // over the first parameter's count (b's slices for ranks 2 and 3 read and written nowhere),
    // exit 0.
    ("strategy/devices_differ_in_stage.ckpt", &["'b'", "4 devices", "'w'", "on 2", "same stage"]),
    // Issue 13 item 4: pipeline stages with different device counts (stage 0 on 2, stage 1 on 4).
    ("strategy/stage_devices_differ.ckpt", &["'b'", "stage 1 has 4 devices", "stage 0 has 2", "'w'"]),
    // Issue 13 item 8: 256 stages x 2^24 devices = 2^32 destination ranks wrapped to 0: "wrote 0
    // file(s)", exit 0 (`inspect`: `INSPECTED_STRATEGY_FILES`).
    ("strategy/ranks_2pow32.json", &["256 pipeline stage(s)", "16777216 devices", "4294967296 ranks"]),
    // Issue 13 item 21: a flattened JSON layout whose dims cannot be merged back (the plans:
    // `corpus_strategy_flattened_unmergeable`).
    ("strategy/flattened_unmergeable.json", &["'w'", "[2, 3, 4]", "flattened", "no runs"]),
    // 256 stages x 2^24 devices = 2^32 ranks wrapped to a destination of 0 ranks: transform
    // wrote nothing and exited 0; a rank given with --ranks was refused naming no file.
    ("strategy/rank_count_overflow.json", &["256 pipeline stage(s)", "16777216", "4294967296 ranks"]),
    // Merged layout items "0-w" and "00-w" are two layouts of w for stage 0: refused naming both
    // (the second used to be taken as another layout item of stage 0).
    ("strategy/stage_name_spelled_twice.json", &["'w'", "'0-w'", "'00-w'", "stage 0"]),
];

#[test]
fn corpus_strategy_files() {
    check_rows(STRATEGY_FILES, |r| r.0.to_string(), |&(rel, needles)| refuse_strategy_file(rel, needles));
}

/// A bad strategy file is refused as the destination strategy (complete source) and as the
/// source strategy (two-rank source), naming it; nothing is written.
fn refuse_strategy_file(rel: &str, needles: &[&str]) {
    let (file, name) = corpus_file(rel);
    let all = [&[name.as_str()], needles].concat();
    let s = Scratch::new(rel);

    let dst = s.join("as_dst");
    assert_refused(&transform(&corpus("good/complete"), &dst, argv!["--dst_ckpt_strategy", &file]), &all);
    assert_nothing_written(&dst);

    let dst = s.join("as_src");
    assert_refused(&transform(&corpus("good/dp2/src"), &dst, argv!["--src_ckpt_strategy", &file]), &all);
    assert_nothing_written(&dst);

    let complete = corpus("good/complete");
    let out = reshard(argv!["plan", "--src_ckpt_dir", complete, "--dst_ckpt_strategy", &file, "--json"]);
    assert_refused(&out, &all);
}

/// MindSpore's transform ignores an empty `tensor_shape []`; so does reshard (it used to compare
/// it with the full shape and refuse).
#[test]
fn empty_tensor_shape_counts_as_not_given() {
    let s = Scratch::new("ts_empty");
    let layout = |tm: serde_json::Value| {
        serde_json::json!({"dev_matrix": [2], "tensor_map": tm, "tensor_shape": [], "field": 0,
            "opt_weight_shard_step": 0, "opt_weight_shard_size": 0})
    };
    let v = serde_json::json!({"current_stage": 0, "parallel_layout_item": {
        "w": layout(serde_json::json!([0, -1])), "b": layout(serde_json::json!([-1]))}});
    let strategy = s.join("src_strategy.json");
    std::fs::write(&strategy, serde_json::to_vec(&v).unwrap()).unwrap();
    let both = argv!["--src_ckpt_strategy", &strategy, "--dst_ckpt_strategy", &strategy];
    let out = transform(&corpus("good/dp2/src"), &s.join("out"), both);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let outputs: Vec<PathBuf> =
        files_under(&s.join("out")).into_iter().filter(|p| p.extension().is_some_and(|e| e == "ckpt")).collect();
    assert_eq!(outputs.len(), 2, "{outputs:?}");
}

/// Found by fuzzing (strategy targets): opt_weight_shard_size -2 used to be accepted; the
/// optimizer-shard math then overflowed (a panic with overflow checks) and the refusal read
/// "cannot be split evenly 18446744073709551614 ways". (Its refusals: `STRATEGY_FILES`.)
#[test]
fn corpus_strategy_opt_shard_size_negative() {
    let file = corpus("strategy/opt_shard_size_negative.json");
    let out = reshard(argv![
        "transform",
        "--src_ckpt_dir",
        corpus("good/complete"),
        "--dst_ckpt_strategy",
        file,
        "--dst_ckpt_dir",
        Scratch::new("k1").join("out"),
    ]);
    assert!(!text(&out.stderr).contains("18446744073709551614"));
}

/// A billion destination ranks: `plan` and `transform` used to build every rank's plan up front
/// and abort on a failed allocation (SIGABRT, backtrace on stderr). Run under `ulimit -v` (4 GB)
/// so that the test cannot take the machine's memory.
#[test]
fn corpus_strategy_dev_matrix_huge() {
    let file = corpus("strategy/dev_matrix_huge.json");
    let s = Scratch::new("huge");
    let dst = s.join("out");
    for sub in ["transform", "plan"] {
        let job =
            argv![sub, "--src_ckpt_dir", corpus("good/complete"), "--dst_ckpt_strategy", &file, "--dst_ckpt_dir", &dst];
        let out = reshard_under_ulimit("-v 4000000", job);
        assert!(!text(&out.stderr).contains("memory allocation"), "{sub}: {}", text(&out.stderr));
        assert_refused(&out, &["dev_matrix_huge.json"]);
        assert_nothing_written(&dst);
    }
}

/// Strategy files `inspect` refuses, and what it must name (their other refusals are in
/// `STRATEGY_FILES`).
const INSPECTED_STRATEGY_FILES: &[(&str, &[&str])] = &[
    // Issue 13 item 8: `inspect` refuses 2^32 ranks too.
    ("strategy/ranks_2pow32.json", &["ranks_2pow32.json", "4294967296 ranks"]),
    ("strategy/garbage.json", &["garbage.json", "JSON"]),
];

#[test]
fn corpus_strategy_inspect_refusals() {
    check_rows(
        INSPECTED_STRATEGY_FILES,
        |r| r.0.to_string(),
        |&(rel, needles)| {
            assert_refused(&reshard(argv!["inspect", corpus(rel)]), needles);
        },
    );
}

/// Issue 13 item 21: a flattened JSON layout (MindSpore's JSON writer) is merged back using the
/// checkpoint's shapes; dims that cannot be merged are refused naming both shapes, against the
/// full tensor (destination) and against the stored slice (source). (Its other refusals:
/// `STRATEGY_FILES`.)
#[test]
fn corpus_strategy_flattened_unmergeable() {
    let file = corpus("strategy/flattened_unmergeable.json");
    let out = reshard(argv!["plan", "--src_ckpt_dir", corpus("good/complete"), "--dst_ckpt_strategy", &file]);
    assert_refused(&out, &["tensor's shape [4, 4]"]);
    let out = reshard(argv!["plan", "--src_ckpt_dir", corpus("good/dp2/src"), "--src_ckpt_strategy", &file]);
    assert_refused(&out, &["rank_0/model.ckpt", "rank 0", "shape [2, 4] rank 0 stores"]);
}

/// Two stage files for stage 0 whose layouts differ: `transform` (as the destination strategy
/// folder), `inspect` and `merge-strategy` refuse naming both; MindSpore (and reshard before)
/// silently took the first in name order.
#[test]
fn corpus_strategy_two_files_for_one_stage() {
    let dir = corpus("strategy/two_files_for_one_stage");
    let needles = ["stage0_a.ckpt", "stage0_b.ckpt", "stage 0", "ambiguous"];
    let s = Scratch::new("two-for-one-stage");
    let dst = s.join("out");
    assert_refused(&transform(&corpus("good/complete"), &dst, argv!["--dst_ckpt_strategy", &dir]), &needles);
    assert_nothing_written(&dst);
    assert_refused(&reshard(argv!["inspect", &dir]), &needles);
    let merged = s.join("merged.ckpt");
    assert_refused(&reshard(argv!["merge-strategy", &dir, &merged]), &needles);
    assert!(!merged.exists());
}

// ------------------------------------------------------------------ corpus: source folders

/// Source folder cases `sources/<case>` and what the refusal must name.
const SOURCE_FOLDERS: &[(&str, &[&str])] = &[
    ("missing_rank_folder", &["missing_rank_folder/src", "rank_0..rank_3", "missing: rank_3"]),
    ("noncontiguous_rank_folders", &["noncontiguous_rank_folders/src", "missing: rank_2"]),
    ("rank_folder_spelled_twice", &["rank_folder_spelled_twice/src", "rank_0 and rank_00", "rank 0"]),
    ("rank_folder_symlink", &["rank_folder_symlink/src", "rank_0 and rank_1", "symlink"]),
    ("no_rank_folders", &["no_rank_folders/src", "rank_"]),
    ("empty_rank_folder", &["empty_rank_folder/src/rank_1", "no .ckpt or .safetensors"]),
    ("ambiguous_candidates", &["src/rank_0", "model_a.ckpt", "model_b.ckpt", "--src_ckpt_name"]),
    ("ambiguous_no_common_step", &["src/rank_0", "tiny_rank_0-1_10.ckpt", "tiny_rank_0-1_20.ckpt", "--src_ckpt_name"]),
    ("mixed_formats", &["mixed_formats/src", ".ckpt", ".safetensors"]),
    ("strategy_shape_mismatch", &["src/rank_1/model.ckpt", "rank 1", "'w'", "[3, 4]", "[2, 4]", "[4, 4]"]),
    ("strategy_ndim_mismatch", &["src/rank_0/model.ckpt", "rank 0", "'w'", "[2, 4]", "has 3"]),
    ("strategy_missing_param", &["src/rank_1/model.ckpt", "rank 1", "'w'", "missing"]),
    // The parameters the strategy names and the checkpoints lack are named.
    ("strategy_wrong_model", &["strategy_wrong_model/src", "src_strategy.ckpt", "(other.weight)"]),
    // Found by fuzzing: a tensor_map naming one device axis for both dims of w used to be
    // accepted; the two ranks then hold only the diagonal blocks of the [4, 4] tensor and
    // transform wrote zeros for the rest, exiting 0.
    ("strategy_axis_twice", &["src_strategy.ckpt", "'w'", "tensor_map"]),
    // Issue 13 item 8: by-stage mode with the file of stage 2^31 (2 devices per stage) computed
    // its first source rank as 2^32, wrapped to 0, and read rank_0 and rank_1 as if they were
    // its ranks.
    ("stage_file_rank_overflow", &["src_strategy.ckpt", "stage 2147483648", "4294967296"]),
    ("dst_strategy_indivisible", &["dst_strategy.ckpt", "'w'", "[4, 4]", "8 ways"]),
    ("dst_tensor_shape_mismatch", &["dst_strategy.json", "'w'", "[8, 4]", "[4, 4]"]),
    // Issue 15: maps that disagree with their files, a stray file beside a map, a slice no rank
    // of a remove_redundancy source holds.
    ("unified_map_lists_absent_tensor", &["param_name_map.json", "'c'", "part0.safetensors", "does not contain"]),
    ("unified_map_wrong_file", &["param_name_map.json", "'w'", "part1.safetensors", "part0.safetensors"]),
    (
        "index_tensor_in_two_files",
        &["model.safetensors.index.json", "'b'", "model-00001-of-00002", "model-00002-of-00002", "both"],
    ),
    ("index_unlisted_tensor", &["model.safetensors.index.json", "'global_step'", "does not list"]),
    ("index_names_a_path", &["model.safetensors.index.json", "'w'", "../model.safetensors"]),
    ("rank_map_with_stray_file", &["rank_1/old.safetensors", "not named by"]),
    ("remove_redundancy_slice_missing", &["'w'", "[2, 0]", "[2, 4]", "no source rank holds", "rank_2..rank_3"]),
];

#[test]
fn corpus_source_folders() {
    check_rows(
        SOURCE_FOLDERS,
        |r| format!("sources/{}", r.0),
        |&(case, needles)| {
            refuse_source_folder(case, needles);
        },
    );
}

/// A source folder case `sources/<case>`: `transform` and `plan` with its `src/` and its
/// strategies are refused naming what is wrong; nothing is written. Returns the message.
fn refuse_source_folder(case: &str, needles: &[&str]) -> String {
    let dir = corpus(&format!("sources/{case}"));
    assert!(dir.join("src").is_dir(), "missing corpus folder {}", dir.display());
    let mut job: Vec<PathBuf> = vec!["--src_ckpt_dir".into(), dir.join("src")];
    for (flag, file) in [
        ("--src_ckpt_strategy", "src_strategy.ckpt"),
        ("--dst_ckpt_strategy", "dst_strategy.ckpt"),
        ("--src_ckpt_strategy", "src_strategy.json"),
        ("--dst_ckpt_strategy", "dst_strategy.json"),
    ] {
        if dir.join(file).is_file() {
            job.push(flag.into());
            job.push(dir.join(file));
        }
    }
    let s = Scratch::new(case);
    let dst = s.join("out");
    let before = files_under(&dir);
    let mut args: Vec<PathBuf> = vec!["transform".into()];
    args.extend(job.iter().cloned());
    args.extend(["--dst_ckpt_dir".into(), dst.clone(), "-q".into()]);
    let msg = assert_refused(&reshard(&args), needles);
    assert_nothing_written(&dst);

    let mut args: Vec<PathBuf> = vec!["plan".into()];
    args.extend(job.iter().cloned());
    args.extend(["--json".into()]);
    let plan_msg = assert_refused(&reshard(&args), needles);
    assert_eq!(msg, plan_msg, "plan and transform disagree");
    assert_eq!(files_under(&dir), before, "the corpus folder changed: {}", dir.display());
    msg
}

/// 65534 missing rank folders: the message must stay one readable line, not list them all
/// (with the largest strategies accepted, 2^24 devices, the list was a 156 MB line).
#[test]
fn corpus_sources_many_missing_rank_folders() {
    let msg = refuse_source_folder("many_missing_rank_folders", &["many_missing_rank_folders/src", "missing"]);
    assert!(msg.len() < 1000, "a {}-byte message", msg.len());
}

/// Found while probing the layout math: the full shape implied by the stored slice overflowed
/// (wrapped to [0, 0] in release, panicked with overflow checks).
#[test]
fn corpus_sources_slice_dim_overflow() {
    let msg = refuse_source_folder("slice_dim_overflow", &["'w'", "4 ways"]);
    assert!(!msg.contains("[0, 0]"), "{msg}");
}

/// Every entry the README lists has a test above (keeps corpus and tests in step).
#[test]
fn corpus_readme_lists_only_tested_entries() {
    let readme = std::fs::read_to_string(corpus("README.md")).unwrap();
    let this = std::fs::read_to_string(file!())
        .or_else(|_| std::fs::read_to_string(repo().join("crates/reshard-cli/tests/cli.rs")))
        .unwrap();
    let mut n = 0;
    for line in readme.lines().filter(|l| l.starts_with("| `")) {
        let rel = line[3..].split('`').next().unwrap();
        let (kind, rest) = rel.split_once('/').unwrap();
        let stem = Path::new(rest).file_stem().unwrap().to_str().unwrap();
        let key = if kind == "sources" { format!("\"{stem}\"") } else { format!("\"{rel}\"") };
        assert!(this.contains(&key), "corpus entry {rel} has no test");
        assert!(corpus(rel).exists(), "corpus entry {rel} does not exist");
        n += 1;
    }
    assert!(n >= 30, "only {n} entries in tests/corpus/README.md");
}

// ------------------------------------------------------------------ the test helpers themselves

/// A table test reports every failing row, by name and with its assertion, not only the first.
#[test]
fn check_rows_names_every_failing_row() {
    let rows = [("a", 1), ("b", 2), ("c", 3)];
    let failed = std::panic::catch_unwind(|| {
        check_rows(&rows, |r| format!("row {}", r.0), |r| assert!(r.1 == 2, "{} is not 2", r.1));
    });
    let e = failed.expect_err("two rows fail");
    let msg = e.downcast_ref::<String>().unwrap();
    assert!(msg.contains("2 of 3 rows failed"), "{msg}");
    assert!(msg.contains("row a: 1 is not 2") && msg.contains("row c: 3 is not 2"), "{msg}");
    assert!(!msg.contains("row b"), "{msg}");
    check_rows(&rows, |r| r.0.to_string(), |r| assert!(r.1 > 0));
}

/// A scratch folder is removed after a passing test and kept after a failing one.
#[test]
fn scratch_folders_are_kept_only_when_the_test_fails() {
    let passed = Scratch::new("passes");
    let kept = passed.path().to_path_buf();
    drop(passed);
    assert!(!kept.exists(), "{} left after a passing test", kept.display());
    let failed = std::thread::spawn(|| {
        let s = Scratch::new("fails");
        std::fs::write(s.join("evidence"), b"what the failed run left").unwrap();
        let path = s.path().to_path_buf();
        std::panic::panic_any(path);
    })
    .join()
    .expect_err("the thread panics");
    let kept = failed.downcast_ref::<PathBuf>().unwrap();
    assert!(kept.join("evidence").is_file(), "{} removed after a failing test", kept.display());
    std::fs::remove_dir_all(kept).unwrap();
}

// ------------------------------------------------------------------ inputs that are not regular files

/// Runs reshard and kills it if it has not finished after a minute (a hang guard, not a timing
/// assertion: the inputs below used to block for ever or grow without bound).
fn reshard_or_hang<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut child = Command::new(BIN)
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..600 {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("reshard did not finish within a minute");
}

fn mkfifo(p: &Path) {
    assert!(Command::new("mkfifo").arg(p).status().unwrap().success());
}

/// `inspect /dev/zero` and `/dev/zero` as a strategy used to read without end (about 1 GB/s),
/// and a FIFO blocked `open` for ever: anything but a regular file is refused at once.
#[test]
fn devices_and_fifos_as_inputs_are_refused() {
    let s = Scratch::new("fifo");
    let fifo_ckpt = s.join("model.ckpt");
    let fifo_json = s.join("strategy.json");
    mkfifo(&fifo_ckpt);
    mkfifo(&fifo_json);
    let complete = corpus("good/complete");
    for (file, kind) in [(Path::new("/dev/zero"), "character device"), (&fifo_ckpt, "FIFO"), (&fifo_json, "FIFO")] {
        let name = file.to_str().unwrap();
        assert_refused(&reshard_or_hang([OsStr::new("inspect"), file.as_os_str()]), &[name, kind]);
        let dst = s.join("out");
        let out = reshard_or_hang(argv![
            "transform",
            "--src_ckpt_dir",
            &complete,
            "--dst_ckpt_strategy",
            &file,
            "--dst_ckpt_dir",
            &dst,
            "-q"
        ]);
        assert_refused(&out, &[name, kind]);
        assert_nothing_written(&dst);
    }
}

/// A dangling symlink, a FIFO or a device named `model.ckpt` in a rank folder used to be
/// skipped, and the refusal read "no .ckpt or .safetensors file in this rank folder".
#[test]
fn rank_folder_checkpoint_that_is_not_a_regular_file_is_named() {
    for what in ["dangling symlink", "fifo", "device"] {
        let s = Scratch::new(what);
        let rank0 = s.join("src/rank_0");
        std::fs::create_dir_all(&rank0).unwrap();
        let model = rank0.join("model.ckpt");
        let kind = match what {
            "fifo" => {
                mkfifo(&model);
                "FIFO"
            }
            "device" => {
                std::os::unix::fs::symlink("/dev/zero", &model).unwrap();
                "character device"
            }
            _ => {
                std::os::unix::fs::symlink(s.join("gone.ckpt"), &model).unwrap();
                "symbolic link"
            }
        };
        let dst = s.join("out");
        let out = reshard_or_hang(argv!["transform", "--src_ckpt_dir", s.join("src"), "--dst_ckpt_dir", &dst, "-q"]);
        let msg = assert_refused(&out, &["rank_0/model.ckpt", kind]);
        assert!(!msg.contains("no .ckpt"), "{msg}");
        assert_nothing_written(&dst);
    }
}

/// Names of 64 KiB or more made `inspect`'s table panic (a format width beyond 65535).
#[test]
fn inspect_tables_take_names_of_64_kib() {
    let s = Scratch::new("longname");
    let name = "n".repeat(70_000);
    let ckpt = s.join("long.ckpt");
    std::fs::write(&ckpt, ckpt_bytes(&[(&name, &[1], &[0; 4])])).unwrap();
    let strategy = s.join("long.json");
    let layout = serde_json::json!({"dev_matrix": [2], "tensor_map": [0], "field": 0,
        "opt_weight_shard_step": 0, "opt_weight_shard_size": 0});
    let v = serde_json::json!({"current_stage": 0, "parallel_layout_item": {name.clone(): layout}});
    std::fs::write(&strategy, serde_json::to_vec(&v).unwrap()).unwrap();
    for f in [&ckpt, &strategy] {
        let out = reshard([OsStr::new("inspect"), f.as_os_str()]);
        assert!(out.status.success(), "inspect {}: {}", f.display(), text(&out.stderr));
        assert!(text(&out.stdout).contains(&name));
    }
}

/// A destination strategy naming parameters no source holds: the outputs lack them, and the
/// warning says which.
#[test]
fn dst_strategy_parameters_the_sources_lack_are_named() {
    let s = Scratch::new("lacking");
    let strategy = s.join("dst.json");
    let layout = |tm: serde_json::Value| {
        serde_json::json!({"dev_matrix": [2], "tensor_map": tm, "field": 0,
            "opt_weight_shard_step": 0, "opt_weight_shard_size": 0})
    };
    let v = serde_json::json!({"current_stage": 0, "parallel_layout_item": {
        "w": layout(serde_json::json!([0, -1])), "b": layout(serde_json::json!([-1])),
        "not_in_the_model": layout(serde_json::json!([-1]))}});
    std::fs::write(&strategy, serde_json::to_vec(&v).unwrap()).unwrap();
    let out = reshard(argv![
        "transform",
        "--src_ckpt_dir",
        corpus("good/complete"),
        "--dst_ckpt_strategy",
        &strategy,
        "--dst_ckpt_dir",
        s.join("out"),
        "-q"
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("warning") && stderr.contains("1 parameter(s) (not_in_the_model)"), "{stderr}");
}

// ------------------------------------------------------------------ output folder refusals

#[test]
fn output_inside_source_is_refused() {
    let s = Scratch::new("inside");
    let src = s.join("src");
    copy_dir(&corpus("good/complete"), &src);
    let before = files_under(&src);
    for dst in [src.join("out"), src.clone(), src.join("rank_0"), src.join("./out")] {
        let out = transform(&src, &dst, vec![]);
        assert_refused(&out, &["inside the source folder", src.to_str().unwrap()]);
        assert_eq!(files_under(&src), before, "dst {}", dst.display());
    }
}

/// The output folder inside the source, spelled through `..` or through a symlink to the source.
#[test]
fn output_inside_source_through_dotdot_or_symlink_is_refused() {
    for (how, dst) in [("inside_dotdot", "other/../src/out"), ("inside_symlink", "link/out")] {
        let s = Scratch::new(how);
        let src = s.join("src");
        copy_dir(&corpus("good/complete"), &src);
        std::fs::create_dir_all(s.join("other")).unwrap();
        std::os::unix::fs::symlink(&src, s.join("link")).unwrap();
        let before = files_under(&src);
        let out = transform(&src, &s.join(dst), vec![]);
        assert_refused(&out, &["inside the source folder"]);
        assert_eq!(files_under(&src), before, "{how}");
    }
}

#[test]
fn output_under_a_regular_file_is_refused() {
    let s = Scratch::new("under_file");
    std::fs::write(s.join("file"), b"not a folder").unwrap();
    let dst = s.join("file/out");
    let out = transform(&corpus("good/complete"), &dst, vec![]);
    assert_refused(&out, &[dst.to_str().unwrap(), "Not a directory"]);
    assert_eq!(std::fs::read(s.join("file")).unwrap(), b"not a folder");
}

/// `chmod 555` on the output folder. Root ignores permissions, so as root the binary is run as
/// `nobody` with `setpriv`; without setpriv the test is skipped with a message.
#[test]
fn output_not_writable_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let s = Scratch::new("readonly");
    std::fs::set_permissions(&s.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let src = s.join("src");
    copy_dir(&corpus("good/complete"), &src);
    let ro = s.join("ro");
    std::fs::create_dir(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    let privileged = std::fs::write(ro.join("probe"), b"").is_ok();
    let _ = std::fs::remove_file(ro.join("probe"));
    let dst = ro.join("out");
    let args = argv!["transform", "--src_ckpt_dir", &src, "--dst_ckpt_dir", &dst, "-q"];
    let out = if privileged {
        let setpriv = ["/usr/bin/setpriv", "/bin/setpriv"].into_iter().find(|p| Path::new(p).exists());
        let Some(setpriv) = setpriv else {
            eprintln!("skipped: running as root (permissions are not enforced) and no setpriv to drop them");
            return;
        };
        // The scratch folder and sources must be readable by nobody (they are: 0755 / 0644),
        // and the binary reachable.
        Command::new(setpriv)
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN])
            .args(&args)
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap()
    } else {
        reshard(&args)
    };
    if privileged && text(&out.stderr).contains("setpriv:") {
        eprintln!("skipped: setpriv could not drop privileges: {}", text(&out.stderr));
        return;
    }
    assert_refused(&out, &[dst.to_str().unwrap(), "Permission denied"]);
    assert_nothing_written(&ro);
}

/// A minimal `.ckpt` writer (independent of the core): one Float32 tensor per entry.
fn ckpt_bytes(tensors: &[(&str, &[u64], &[u8])]) -> Vec<u8> {
    fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    fn ld(out: &mut Vec<u8>, field: u64, payload: &[u8]) {
        varint(out, field << 3 | 2);
        varint(out, payload.len() as u64);
        out.extend_from_slice(payload);
    }
    let mut file = Vec::new();
    for (name, dims, content) in tensors {
        let mut tp = Vec::new();
        for &d in *dims {
            varint(&mut tp, 1 << 3);
            varint(&mut tp, d);
        }
        ld(&mut tp, 2, b"Float32");
        ld(&mut tp, 3, content);
        let mut v = Vec::new();
        ld(&mut v, 1, name.as_bytes());
        ld(&mut v, 2, &tp);
        ld(&mut file, 1, &v);
    }
    file
}

/// `SCRATCH/src/rank_0/big.ckpt`: a 1 MiB fp32 `w` [512, 512] (bytes `i % modulus`) and a `b` [4]
/// of `b_byte`s. Returns the source folder.
fn big_source(s: &Scratch, modulus: u32, b_byte: u8) -> PathBuf {
    let src = s.join("src");
    std::fs::create_dir_all(src.join("rank_0")).unwrap();
    let w: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % modulus) as u8).collect();
    let file = ckpt_bytes(&[("w", &[512, 512], &w), ("b", &[4], &[b_byte; 16])]);
    std::fs::write(src.join("rank_0/big.ckpt"), file).unwrap();
    src
}

/// `SCRATCH/dst.json`: a strategy splitting `w` 4 ways by rows (256 KiB per rank of `big_source`),
/// `b` whole. Returns its path.
fn four_ways(s: &Scratch) -> PathBuf {
    let path = s.join("dst.json");
    std::fs::write(
        &path,
        br#"{"current_stage": 0, "parallel_layout_item": {
            "w": {"dev_matrix": [4], "tensor_map": [0, -1], "field": 0, "opt_weight_shard_step": 0, "opt_weight_shard_size": 0},
            "b": {"dev_matrix": [4], "tensor_map": [-1], "field": 0, "opt_weight_shard_step": 0, "opt_weight_shard_size": 0}}}"#,
    )
    .unwrap();
    path
}

/// Runs the binary with `args` under `ulimit LIMIT` (e.g. `-f 64`), through `sh`.
fn reshard_under_ulimit(limit: &str, args: Vec<OsString>) -> Output {
    Command::new("sh")
        .args(["-c", &format!("ulimit {limit} && exec \"$0\" \"$@\""), BIN])
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

/// The disk filling up mid-write, simulated with a file-size limit (`ulimit -f 64`, 32 KiB in
/// dash's 512-byte blocks, 64 KiB in bash's) on a 1 MiB output: the write fails with EFBIG
/// (the CLI ignores SIGXFSZ), the run exits 1 naming the file, and neither a file under the
/// final name nor a temporary file is left.
#[test]
fn disk_full_during_write_leaves_nothing() {
    let s = Scratch::new("efbig");
    let src = big_source(&s, 251, 0);
    let dst = s.join("out");
    let out = reshard_under_ulimit("-f 64", argv!["transform", "--src_ckpt_dir", &src, "--dst_ckpt_dir", &dst, "-q"]);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), None, "killed by a signal (SIGXFSZ = 25): {:?}", out.status);
    assert_refused(&out, &["rank_0", "File too large"]);
    assert_nothing_written(&dst);

    // The same job without the limit succeeds (the source is sound).
    let out = transform(&src, &dst, vec![]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(dst.join("rank_0/checkpoint_0.ckpt").is_file());
}

/// Same, with several destination ranks: the ranks whose files fit may be complete, but no
/// file under a final name is partial and no temporary file is left.
#[test]
fn disk_full_with_several_ranks_leaves_only_complete_files() {
    let s = Scratch::new("efbig_ranks");
    let src = big_source(&s, 253, 0);
    let strategy = four_ways(&s); // 256 KiB of w per rank, over the limit
    let dst = s.join("out");
    let job =
        argv!["transform", "--src_ckpt_dir", &src, "--dst_ckpt_strategy", &strategy, "--dst_ckpt_dir", &dst, "-q"];
    let out = reshard_under_ulimit("-f 64", job);
    assert_refused(&out, &["File too large"]);
    for f in files_under(&dst) {
        let name = f.file_name().unwrap().to_str().unwrap();
        assert!(!name.ends_with(".tmp"), "temporary file left: {}", f.display());
        if name.ends_with(".ckpt") {
            let out = reshard([OsStr::new("inspect"), f.as_os_str()]);
            assert!(out.status.success(), "partial file {}", f.display());
        }
    }
}

/// A tmpfs of `size` mounted on a new folder, unmounted when dropped. `None` when mounting is not
/// permitted (not root, no CAP_SYS_ADMIN).
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(at: &Path, size: &str) -> Option<SmallFs> {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .is_ok_and(|o| o.status.success());
        ok.then(|| SmallFs(at.to_path_buf()))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// The disk really filling up: a 640 KiB tmpfs and four outputs of about 256 KiB each. The
/// outputs are pre-sized sparse files, so the failure comes from a write (ENOSPC), not from
/// the resize. The run exits 1 naming a file; every file left under a final name is
/// byte-identical to a clean run's; no temporary file is left. Skipped when tmpfs cannot be
/// mounted.
#[test]
fn disk_full_on_a_small_filesystem_leaves_only_complete_files() {
    let s = Scratch::new("enospc");
    let src = big_source(&s, 241, 1);
    let strategy = four_ways(&s);
    let job = |dst: &Path, threads: &str| {
        reshard(argv![
            "transform",
            "--src_ckpt_dir",
            &src,
            "--dst_ckpt_strategy",
            &strategy,
            "--dst_ckpt_dir",
            &dst,
            "--threads",
            threads,
            "-q"
        ])
    };
    let clean = s.join("clean");
    let out = job(&clean, "0");
    assert!(out.status.success(), "{}", text(&out.stderr));

    let Some(fs) = SmallFs::mount(&s.join("small"), "640k") else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN)");
        return;
    };
    for threads in ["1", "0"] {
        let dst = fs.0.join(format!("out{threads}"));
        let out = job(&dst, threads);
        assert_refused(&out, &["No space left on device"]);
        let mut complete = 0;
        for f in files_under(&dst) {
            let rel = f.strip_prefix(&dst).unwrap();
            let name = rel.file_name().unwrap().to_str().unwrap();
            let lock = name == reshard_core::manifest::MANIFEST_LOCK_NAME;
            assert!(!name.ends_with(".tmp") && (!name.starts_with('.') || lock), "leftover {}", rel.display());
            if name.ends_with(".ckpt") {
                assert!(
                    std::fs::read(&f).unwrap() == std::fs::read(clean.join(rel)).unwrap(),
                    "partial {}",
                    rel.display()
                );
                complete += 1;
            }
        }
        assert!(complete < 4, "all four outputs fit: make the filesystem smaller");
        let _ = std::fs::remove_dir_all(&dst);
    }
}

// ------------------------------------------------------------------ positive runs

fn inspect_json(path: &Path) -> serde_json::Value {
    let out = reshard([OsStr::new("inspect"), "--json".as_ref(), path.as_os_str()]);
    assert!(out.status.success(), "inspect {}: {}", path.display(), text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `(name, dtype, shape, bytes)` of each tensor MindSpore saw.
fn expected_tensors(expected: &Path) -> Vec<(String, String, Vec<u64>, u64)> {
    let e: serde_json::Value = serde_json::from_slice(&std::fs::read(expected).unwrap()).unwrap();
    e["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let dtype = t["dtype"].as_str().unwrap().to_string();
            // Strings included: MindSpore reports the dims stored ([0]), and so does reshard.
            let shape: Vec<u64> = t["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect();
            let bytes = t["hex"].as_str().unwrap().len() as u64 / 2;
            (t["name"].as_str().unwrap().to_string(), dtype, shape, bytes)
        })
        .collect()
}

fn got_tensors(v: &serde_json::Value) -> Vec<(String, String, Vec<u64>, u64)> {
    v["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap().to_string(),
                t["dtype"].as_str().unwrap().to_string(),
                t["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect(),
                t["bytes"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn inspect_json_basic_ckpt_matches_mindspore() {
    let got = got_tensors(&inspect_json(&fixture("formats/basic.ckpt")));
    let want = expected_tensors(&fixture("formats/basic.ckpt.expected.json"));
    assert_eq!(got, want);
}

/// A `str` tensor (`note` in basic.ckpt: dims `[0]`, 20 bytes of UTF-32) used to come out of a
/// complete source as 4 bytes with shape `[]`, and `verify` passed. It is copied whole with its
/// dims, in its place: complete -> complete gives the file back byte for byte.
#[test]
fn transform_keeps_string_tensors_whole() {
    let file = fixture("formats/basic.ckpt");
    let s = Scratch::new("str");
    let written = complete_to_complete(&s, &file, "basic.ckpt");
    let note =
        |v: &serde_json::Value| v["tensors"].as_array().unwrap().iter().find(|t| t["name"] == "note").cloned().unwrap();
    assert_eq!(
        note(&inspect_json(&written)),
        serde_json::json!({"name": "note", "dtype": "str", "shape": [0], "bytes": 20})
    );
    assert!(std::fs::read(&written).unwrap() == std::fs::read(&file).unwrap());
}

/// 0-d tensors stay 0-d in safetensors outputs (they were written as [1], so ckpt -> safetensors
/// -> ckpt changed every scalar's shape), and with `--crc` the crc counts a 0-d integer as
/// MindSpore does (that many zero bytes), so the output passes its own check.
#[test]
fn safetensors_outputs_keep_scalars_0d() {
    let s = Scratch::new("st0d");
    let st = s.join("st");
    let out = reshard(argv![
        "transform",
        "--src_ckpt_dir",
        corpus("good/complete"),
        "--dst_ckpt_dir",
        &st,
        "--output_format",
        "safetensors",
        "--crc",
        "-q"
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v = inspect_json(&st.join("rank_0/checkpoint_0.safetensors"));
    let step = v["tensors"].as_array().unwrap().iter().find(|t| t["name"] == "global_step").unwrap();
    assert_eq!(step["shape"], serde_json::json!([]));
    let back = s.join("back");
    let out = transform(&st, &back, vec![]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shapes = |p: &Path| {
        let mut t: Vec<(String, serde_json::Value)> = inspect_json(p)["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| (t["name"].as_str().unwrap().to_string(), t["shape"].clone()))
            .collect();
        t.sort_by(|a, b| a.0.cmp(&b.0));
        t
    };
    assert_eq!(shapes(&back.join("rank_0/checkpoint_0.ckpt")), shapes(&corpus("good/complete/rank_0/model.ckpt")));
}

/// Every format fixture: same tensors as MindSpore saw (file order for .ckpt, by name for
/// safetensors); the damaged `crc_bad.*` ones are refused.
#[test]
fn inspect_json_every_format_fixture() {
    let dir = fixture("formats");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let p = e.path();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        if !(name.ends_with(".ckpt") || name.ends_with(".safetensors")) {
            continue;
        }
        n += 1;
        if name.starts_with("crc_bad") {
            let out = reshard([OsStr::new("inspect"), "--json".as_ref(), p.as_os_str()]);
            assert_refused(&out, &[&name, "crc"]);
            continue;
        }
        let mut got = got_tensors(&inspect_json(&p));
        let mut want = expected_tensors(&dir.join(format!("{name}.expected.json")));
        if name.ends_with(".safetensors") {
            got.sort();
            want.sort();
        }
        assert_eq!(got, want, "{name}");
    }
    assert!(n >= 6, "only {n} format fixtures");
}

/// `SCRATCH/stages`: the files of the fixture folder `from` whose names `keep` accepts.
fn copy_stage_files(s: &Scratch, from: &str, keep: impl Fn(&str) -> bool) -> PathBuf {
    let stages = s.join("stages");
    std::fs::create_dir_all(&stages).unwrap();
    for e in std::fs::read_dir(fixture(from)).unwrap().flatten() {
        if keep(e.file_name().to_str().unwrap()) {
            std::fs::copy(e.path(), stages.join(e.file_name())).unwrap();
        }
    }
    stages
}

#[test]
fn merge_strategy_pp2_proto_equals_mindspore() {
    let s = Scratch::new("merge");
    let stages = copy_stage_files(&s, "strategies/pp2_proto", |n| n.ends_with(".ckpt"));
    let merged = s.join("merged/merged.ckpt");
    let out = reshard([OsStr::new("merge-strategy"), stages.as_os_str(), merged.as_os_str()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(files_under(&s.join("merged")), vec![merged.clone()], "leftover files");
    let got = inspect_json(&merged);
    let want = inspect_json(&fixture("strategies/pp2_proto.merged.ckpt"));
    assert_eq!(got, want);
    assert_eq!(got["stages"], 2);
}

#[test]
fn merge_strategy_pp2_json_equals_mindspore() {
    let s = Scratch::new("merge_json");
    let stages =
        copy_stage_files(&s, "strategies/pp2_json", |n| n.ends_with(".json") && !n.ends_with(".expected.json"));
    let merged = s.join("merged.json");
    let out = reshard([OsStr::new("merge-strategy"), stages.as_os_str(), merged.as_os_str()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(inspect_json(&merged), inspect_json(&fixture("strategies/pp2_json.merged.json")));
}

#[test]
fn merge_strategy_of_a_missing_folder_is_refused() {
    let s = Scratch::new("merge_missing");
    let out = reshard([OsStr::new("merge-strategy"), s.join("nope").as_os_str(), s.join("m.ckpt").as_os_str()]);
    assert_refused(&out, &["nope"]);
    assert_nothing_written(&s.0);
}

fn conformance_transform(case: &str) {
    for io in ["mmap", "pread"] {
        conformance_transform_io(case, io);
    }
}

fn conformance_transform_io(case: &str, io: &str) {
    let dir = fixture(&format!("conformance/{case}"));
    let c: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("case.json")).unwrap()).unwrap();
    let s = Scratch::new(&format!("{case}-{io}"));
    let dst = s.join("out");
    let mut args: Vec<PathBuf> = vec![
        "transform".into(),
        "--src_ckpt_dir".into(),
        dir.join("src"),
        "--dst_ckpt_dir".into(),
        dst.clone(),
        "--prefix".into(),
        c["prefix"].as_str().unwrap().into(),
        "--output_format".into(),
        c["output_format"].as_str().unwrap().into(),
        "--io".into(),
        io.into(),
        "-q".into(),
    ];
    for key in ["src_strategy", "dst_strategy"] {
        if let Some(p) = c[key].as_str() {
            args.push(format!("--{key}").replace("_strategy", "_ckpt_strategy").into());
            args.push(dir.join(p));
        }
    }
    let out = reshard(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let expected = files_under(&dir.join("expected"));
    assert!(!expected.is_empty());
    for e in &expected {
        let rel = e.strip_prefix(dir.join("expected")).unwrap();
        let got = std::fs::read(dst.join(rel)).unwrap_or_else(|err| panic!("{}: {err}", dst.join(rel).display()));
        assert!(got == std::fs::read(e).unwrap(), "{case} (--io {io}): {} differs from MindSpore's", rel.display());
    }
    // Nothing else under a checkpoint name, and no temporary file.
    for f in files_under(&dst) {
        let rel = f.strip_prefix(&dst).unwrap();
        let name = rel.file_name().unwrap().to_str().unwrap();
        let lock = name == reshard_core::manifest::MANIFEST_LOCK_NAME;
        assert!(!name.ends_with(".tmp") && (!name.starts_with('.') || lock), "leftover {}", rel.display());
        if name.ends_with(".ckpt") || name.ends_with(".safetensors") {
            assert!(dir.join("expected").join(rel).is_file(), "unexpected output {}", rel.display());
        }
    }
}

#[test]
fn transform_complete_to_dp2mp2_is_byte_identical() {
    conformance_transform("complete_to_dp2mp2");
}

#[test]
fn transform_safetensors_dp2mp2_to_dp1mp4_is_byte_identical() {
    conformance_transform("safetensors_dp2mp2_to_dp1mp4");
}

/// `SUB --src_ckpt_dir SRC --dst_ckpt_strategy STRATEGY` of the `complete_to_dp2mp2` fixture (4
/// destination ranks), then `more`.
fn dp2mp2(sub: &str, more: Vec<OsString>) -> Vec<OsString> {
    let dir = fixture("conformance/complete_to_dp2mp2");
    let mut args = argv![sub, "--src_ckpt_dir", dir.join("src"), "--dst_ckpt_strategy", dir.join("dst_strategy.ckpt")];
    args.extend(more);
    args
}

#[test]
fn transform_kebab_case_flags_work() {
    let dir = fixture("conformance/complete_to_dp2mp2");
    let s = Scratch::new("kebab");
    let dst = s.join("out");
    let (src, strategy) = (dir.join("src"), dir.join("dst_strategy.ckpt"));
    let kebab = argv!["--src-ckpt-dir", src, "--dst-ckpt-strategy", strategy, "--dst-ckpt-dir", &dst, "-q"];
    let out = reshard([argv!["transform"], kebab].concat());
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        std::fs::read(dst.join("rank_3/checkpoint_3.ckpt")).unwrap(),
        std::fs::read(dir.join("expected/rank_3/checkpoint_3.ckpt")).unwrap()
    );
}

#[test]
fn plan_json_lists_four_ranks_with_outputs_and_sources() {
    let s = Scratch::new("plan");
    let dst = s.join("planned");
    let out = reshard(dp2mp2("plan", argv!["--dst_ckpt_dir", &dst, "--json"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["dst_ranks"], 4);
    let ranks = v["ranks"].as_array().unwrap();
    assert_eq!(ranks.len(), 4);
    for (r, rank) in ranks.iter().enumerate() {
        assert_eq!(rank["rank"], r as u64);
        let output = rank["output"].as_str().unwrap();
        assert!(output.ends_with(&format!("rank_{r}/checkpoint_{r}.ckpt")), "{output}");
        assert!(output.starts_with(dst.to_str().unwrap()), "{output}");
        let sources = rank["sources"].as_array().unwrap();
        assert_eq!(sources.len(), 1, "{rank}");
        assert_eq!(sources[0]["rank"], 0);
        assert!(sources[0]["path"].as_str().unwrap().ends_with("src/rank_0/llama_tiny.ckpt"));
        assert!(sources[0]["bytes"].as_u64().unwrap() > 0);
        assert!(rank["bytes_written"].as_u64().unwrap() > 0);
    }
    assert!(!dst.exists(), "plan created the output folder");
}

/// `rank-list` names the source ranks the plan reads for that destination rank, highest first
/// (MindSpore's order), and they are among those MindSpore's `rank_list_for_transform` names
/// (MindSpore's list can be longer: it lists ranks it does not need, e.g. `[1, 0]` for rank 0 of
/// dp2mp2 -> dp1mp4, where reshard reads only rank 0).
#[test]
fn rank_list_is_what_the_plan_reads_and_within_mindspores_list() {
    let mut checked = 0;
    for case in ["dp2mp2_to_dp1mp4", "dp2mp2pp2_to_dp1mp2pp2", "nested_to_dp2mp2", "dp1mp4_to_dp4mp2"] {
        let dir = fixture(&format!("conformance/{case}"));
        let c: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("case.json")).unwrap()).unwrap();
        let job = [
            OsStr::new("--src_ckpt_dir"),
            dir.join("src").as_os_str(),
            "--src_ckpt_strategy".as_ref(),
            dir.join(c["src_strategy"].as_str().unwrap()).as_os_str(),
            "--dst_ckpt_strategy".as_ref(),
            dir.join(c["dst_strategy"].as_str().unwrap()).as_os_str(),
        ]
        .map(|a| a.to_os_string());
        let mut args = vec![OsStr::new("plan").to_os_string(), "--json".into()];
        args.extend(job.iter().cloned());
        let out = reshard(&args);
        assert!(out.status.success(), "{case}: {}", text(&out.stderr));
        let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        for (rank, ms) in c["rank_lists"].as_object().unwrap() {
            let mut args = vec![OsStr::new("rank-list").to_os_string(), "--rank".into(), rank.into()];
            args.extend(job.iter().cloned());
            let out = reshard(&args);
            assert!(out.status.success(), "{case}: {}", text(&out.stderr));
            let got: Vec<u64> = serde_json::from_slice(&out.stdout).unwrap();
            let r: usize = rank.parse().unwrap();
            let mut read: Vec<u64> =
                plan["ranks"][r]["sources"].as_array().unwrap().iter().map(|s| s["rank"].as_u64().unwrap()).collect();
            read.sort_unstable_by(|a, b| b.cmp(a));
            assert_eq!(got, read, "{case} rank {rank}: rank-list vs plan");
            let ms: Vec<u64> = ms.as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
            assert!(
                !got.is_empty() && got.iter().all(|x| ms.contains(x)),
                "{case} rank {rank}: reshard {got:?}, MindSpore {ms:?}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 12, "{checked}");
}

#[test]
fn rank_list_of_a_rank_beyond_the_destination_is_refused() {
    let out = reshard(dp2mp2("rank-list", argv!["--rank", "4"]));
    assert_refused(&out, &["rank 4", "4 rank"]);
}

#[test]
fn help_of_each_subcommand() {
    let cases: &[(&str, &[&str])] = &[
        ("inspect", &["--json"]),
        ("merge-strategy", &["SRC_DIR", "DST_FILE"]),
        (
            "transform",
            &[
                "--src_ckpt_dir",
                "--dst_ckpt_dir",
                "--src_ckpt_strategy",
                "--dst_ckpt_strategy",
                "--prefix",
                "--output_format",
                "--src_ckpt_name",
                "--no-sync",
                "--crc",
                "--quiet",
            ],
        ),
        ("plan", &["--src_ckpt_dir", "--src_ckpt_strategy", "--dst_ckpt_strategy", "--json", "--detail"]),
        ("rank-list", &["--rank", "--src_ckpt_dir", "--dst_ckpt_strategy"]),
        ("verify", &["--json", "DIR"]),
    ];
    for (sub, flags) in cases {
        for args in [vec![*sub, "--help"], vec!["help", *sub]] {
            let out = reshard(&args);
            assert_eq!(out.status.code(), Some(0), "{args:?}: {}", text(&out.stderr));
            let help = text(&out.stdout);
            for f in *flags {
                assert!(help.contains(f), "{args:?} does not mention {f}:\n{help}");
            }
        }
    }
    let out = reshard(["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = text(&out.stdout);
    for (sub, _) in cases {
        assert!(help.contains(sub), "--help does not list {sub}");
    }
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        vec!["transform"],
        vec!["transform", "--src_ckpt_dir", "x"],
        vec!["inspect"],
        vec!["no-such-command"],
        vec!["transform", "--src_ckpt_dir", "x", "--dst_ckpt_dir", "y", "--bogus"],
        vec!["transform", "--src_ckpt_dir", "x", "--dst_ckpt_dir", "y", "--output_format", "npz"],
        vec!["rank-list", "--rank", "minus-one", "--src_ckpt_dir", "x"],
    ] {
        let out = reshard(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out.stderr));
        assert!(!text(&out.stderr).contains("panicked"));
    }
}

#[test]
fn missing_source_folder_is_refused() {
    let s = Scratch::new("nosrc");
    let dst = s.join("out");
    let out = reshard(argv!["transform", "--src_ckpt_dir", s.join("does_not_exist"), "--dst_ckpt_dir", &dst]);
    assert_refused(&out, &["does_not_exist"]);
    assert_nothing_written(&dst);
}

/// A rerun over finished outputs says what it kept and what it wrote, each with its bytes (it
/// used to say "wrote 0 file(s), 32144 bytes").
#[test]
fn resumed_run_says_what_it_kept_and_what_it_wrote() {
    let s = Scratch::new("resumed");
    let dst = s.join("out");
    let run = || reshard(dp2mp2("transform", argv!["--dst_ckpt_dir", &dst]));
    let first = run();
    assert!(first.status.success(), "{}", text(&first.stderr));
    let total: u64 =
        (0..4).map(|r| std::fs::metadata(dst.join(format!("rank_{r}/checkpoint_{r}.ckpt"))).unwrap().len()).sum();
    assert!(text(&first.stderr).contains(&format!("wrote 4 file(s), {total} bytes")), "{}", text(&first.stderr));
    std::fs::remove_file(dst.join("rank_2/checkpoint_2.ckpt")).unwrap();
    let second = run();
    let err = text(&second.stderr);
    assert!(second.status.success(), "{err}");
    let two = std::fs::metadata(dst.join("rank_2/checkpoint_2.ckpt")).unwrap().len();
    assert!(err.contains(&format!("kept 3 file(s), {} bytes", total - two)), "{err}");
    assert!(err.contains(&format!("wrote 1 file(s), {two} bytes")), "{err}");
}

/// `--ranks 99` names the destination strategy and the valid range.
#[test]
fn ranks_beyond_the_destination_name_the_valid_range() {
    let s = Scratch::new("ranks99");
    let dst = s.join("out");
    let out = reshard(dp2mp2("transform", argv!["--dst_ckpt_dir", &dst, "--ranks", "99"]));
    assert_refused(&out, &["rank 99", "dst_strategy.ckpt", "4 rank(s)", "valid ranks are 0 to 3"]);
    assert_nothing_written(&dst);
}

/// `transform -q` of the `complete_to_dp2mp2` fixture (4 destination ranks) into `dst`.
fn transform_complete_to_dp2mp2(dst: &Path, extra: &[&str]) -> Output {
    let mut more = argv!["-q", "--dst_ckpt_dir", dst];
    more.extend(extra.iter().map(OsString::from));
    reshard(dp2mp2("transform", more))
}

/// `verify` of a job that wrote 2 of its 4 ranks names the missing rank folders (it passed).
#[test]
fn verify_names_the_ranks_an_unfinished_job_did_not_write() {
    let s = Scratch::new("verify-half");
    let dst = s.join("out");
    assert!(transform_complete_to_dp2mp2(&dst, &["--ranks", "0,1"]).status.success());
    let v = reshard([OsStr::new("verify"), dst.as_os_str()]);
    let msg = assert_refused_with_stdout(&v, &["has 4 rank(s)", "missing: rank_2..rank_3 (2 ranks)"]);
    assert!(msg.contains(dst.to_str().unwrap()), "{msg}");
    // One rank folder on its own is not a job: nothing is missing there.
    assert!(reshard([OsStr::new("verify"), dst.join("rank_0").as_os_str()]).status.success());
    assert!(transform_complete_to_dp2mp2(&dst, &["--ranks", "2,3"]).status.success());
    assert_verifies(&dst);
    // A whole rank folder gone.
    std::fs::remove_dir_all(dst.join("rank_1")).unwrap();
    let v = reshard([OsStr::new("verify"), dst.as_os_str()]);
    assert_refused_with_stdout(&v, &["missing: rank_1"]);
}

/// Symbolic links to folders that lead back up the tree: `verify` enters each folder once,
/// names the links it did not follow again, and passes (it followed them for ever).
#[test]
fn verify_ends_on_symlink_loops_and_names_them() {
    let s = Scratch::new("verify-loop");
    let dst = s.join("out");
    assert!(transform_complete_to_dp2mp2(&dst, &[]).status.success());
    std::os::unix::fs::symlink("..", dst.join("rank_0/up")).unwrap();
    std::os::unix::fs::symlink(".", dst.join("rank_1/here")).unwrap();
    std::os::unix::fs::symlink("../rank_3", dst.join("rank_2/sibling")).unwrap();
    let v = reshard_or_hang([OsStr::new("verify"), dst.as_os_str()]);
    assert!(v.status.success(), "{}", text(&v.stderr));
    let out = text(&v.stdout);
    for (link, why) in [("rank_0/up", "a symlink loop"), ("rank_1/here", "a symlink loop"), ("rank_2/sibling", "")] {
        let line = out.lines().find(|l| l.starts_with(&format!("SKIP {}", dst.join(link).display())));
        let line = line.unwrap_or_else(|| panic!("no SKIP line for {link}: {out}"));
        assert!(line.contains("a symbolic link to the folder") && line.contains(why), "{line}");
    }
    assert_eq!(out.lines().filter(|l| l.starts_with("ok   ")).count(), 4, "{out}");
}

/// Like `assert_refused`, for `verify`, which also lists what it checked on stdout.
#[track_caller]
fn assert_refused_with_stdout(out: &Output, needles: &[&str]) -> String {
    let quiet = Output { status: out.status, stdout: Vec::new(), stderr: out.stderr.clone() };
    assert_refused(&quiet, needles)
}

/// `reshard verify DST` passes; returns what it printed.
#[track_caller]
fn assert_verifies(dst: &Path) -> Output {
    let v = reshard(argv!["verify", dst]);
    assert!(v.status.success(), "{}{}", text(&v.stderr), text(&v.stdout));
    v
}

/// A manifest naming `../rank_1/checkpoint_1.ckpt` or an absolute path: `verify` reports the
/// manifest and reads neither (it used to check the file outside the folder and pass).
#[test]
fn verify_refuses_manifest_names_outside_the_folder() {
    let s = Scratch::new("verify-names");
    let dst = s.join("out");
    assert!(transform_complete_to_dp2mp2(&dst, &[]).status.success());
    let manifest = dst.join("rank_0/reshard_manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    let other: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dst.join("rank_1/reshard_manifest.json")).unwrap()).unwrap();
    let mut outside = other["files"][0].clone();
    outside["name"] = "../rank_1/checkpoint_1.ckpt".into();
    m["files"].as_array_mut().unwrap().push(outside);
    std::fs::write(&manifest, serde_json::to_vec(&m).unwrap()).unwrap();
    let v = reshard([OsStr::new("verify"), dst.as_os_str()]);
    assert_refused_with_stdout(&v, &["rank_0/reshard_manifest.json"]);
    let out = text(&v.stdout);
    assert!(out.contains("\"../rank_1/checkpoint_1.ckpt\", which is not a file name in this folder"), "{out}");
    assert!(!out.contains("ok   ") || !out.contains("rank_0/../rank_1"), "{out}");

    let mut abs = other["files"][0].clone();
    abs["name"] = dst.join("rank_1/checkpoint_1.ckpt").to_str().unwrap().into();
    m["files"].as_array_mut().unwrap().pop();
    m["files"].as_array_mut().unwrap().push(abs);
    std::fs::write(&manifest, serde_json::to_vec(&m).unwrap()).unwrap();
    let v = reshard([OsStr::new("verify"), dst.as_os_str()]);
    assert_refused_with_stdout(&v, &["rank_0/reshard_manifest.json"]);
    assert!(text(&v.stdout).contains("which is not a file name in this folder"), "{}", text(&v.stdout));
}

/// Six jobs with different prefixes write into one folder at once: every rank folder's manifest
/// lists all six files, and `verify` passes. Without the manifest lock, entries were lost (7 to
/// 16 of the 24 listed in 10 runs of 6 jobs).
#[test]
fn concurrent_jobs_with_other_prefixes_lose_no_manifest_entry() {
    let s = Scratch::new("concurrent-prefixes");
    let dst = s.join("out");
    let prefixes = ["a_", "b_", "c_", "d_", "e_", "f_"];
    let jobs: Vec<std::process::Child> = prefixes
        .iter()
        .map(|p| {
            Command::new(BIN)
                .args(dp2mp2("transform", argv!["-q", "--prefix", p, "--dst_ckpt_dir", &dst]))
                .spawn()
                .unwrap()
        })
        .collect();
    for mut j in jobs {
        assert!(j.wait().unwrap().success());
    }
    assert_verifies(&dst);
    for r in 0..4 {
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dst.join(format!("rank_{r}/reshard_manifest.json"))).unwrap())
                .unwrap();
        let mut names: Vec<&str> = m["files"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
        names.sort_unstable();
        let want: Vec<String> = prefixes.iter().map(|p| format!("{p}{r}.ckpt")).collect();
        assert_eq!(names, want, "rank_{r}");
    }
}

/// A strategy folder that is OUT/merged_strategy (directly or through a symlink), or a merged
/// file the job would rewrite: refused, with nothing written. The merged source strategy used to
/// be written into the destination's folder and read back as one of its stage files.
#[test]
fn strategy_folder_that_is_the_merge_folder_is_refused() {
    let case = fixture("conformance/dp2mp2pp2_to_dp1mp2pp2");
    let s = Scratch::new("merge-folder");
    let dst = s.join("out");
    let stages = dst.join("merged_strategy");
    copy_dir(&case.join("dst_strategy_stages"), &stages);
    let link = s.join("link");
    std::os::unix::fs::symlink(&stages, &link).unwrap();
    let job = |dst_strategy: &Path| {
        reshard(argv![
            "transform",
            "-q",
            "--src_ckpt_dir",
            case.join("src"),
            "--src_ckpt_strategy",
            case.join("src_strategy_stages"),
            "--dst_ckpt_strategy",
            &dst_strategy,
            "--dst_ckpt_dir",
            &dst
        ])
    };
    let before = files_under(&dst);
    for p in [&stages, &link] {
        assert_refused(&job(p), &["destination strategy", "merged_strategy", "where this job writes"]);
        assert_eq!(files_under(&dst), before, "{}", p.display());
    }
    // A merged file of an earlier run that this run would rewrite.
    std::fs::remove_dir_all(&dst).unwrap();
    assert!(job(&case.join("dst_strategy_stages")).status.success());
    let merged = stages.join("src_merged_ckpt_strategy.ckpt");
    let out = job(&merged);
    assert_refused(&out, &["destination strategy", "src_merged_ckpt_strategy.ckpt", "which this job rewrites"]);
}

/// Checks one plain progress line: `reshard:  45% 1.20 GiB of 2.67 GiB (850.30 MiB/s, ETA 2s)`.
/// Returns the percentage.
#[track_caller]
fn progress_line_pct(l: &str) -> u64 {
    let rest = l.strip_prefix("reshard: ").unwrap_or_else(|| panic!("no prefix: {l}"));
    let (pct, rest) = rest.trim_start().split_once("% ").unwrap_or_else(|| panic!("no percentage: {l}"));
    let pct: u64 = pct.parse().unwrap_or_else(|_| panic!("bad percentage: {l}"));
    let (amounts, rest) = rest.split_once(" (").unwrap_or_else(|| panic!("no rate: {l}"));
    let (done, total) = amounts.split_once(" of ").unwrap_or_else(|| panic!("no total: {l}"));
    let unit = |s: &str| {
        let (n, u) = s.split_once(' ').unwrap_or_else(|| panic!("no unit in {s:?}: {l}"));
        assert!(n.parse::<f64>().is_ok() && ["B", "KiB", "MiB", "GiB", "TiB"].contains(&u), "{s:?}: {l}");
    };
    unit(done);
    unit(total);
    let (rate, eta) = rest.split_once("/s, ETA ").unwrap_or_else(|| panic!("no rate or ETA: {l}"));
    unit(rate);
    let eta = eta.strip_suffix(')').unwrap_or_else(|| panic!("unclosed: {l}"));
    assert!(eta == "?" || eta.ends_with('s') || eta.ends_with('m'), "bad ETA: {l}");
    assert!(pct <= 100, "{l}");
    pct
}

#[test]
fn transform_prints_plain_progress_lines_when_stderr_is_not_a_terminal() {
    let s = Scratch::new("progress-lines");
    for (interval, name) in [("0", "every"), ("5", "default")] {
        let dst = s.join(name);
        let out = reshard(dp2mp2("transform", argv!["--dst_ckpt_dir", &dst, "--progress-interval", interval]));
        let stderr = text(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        let (last, progress) = lines.split_last().unwrap_or_else(|| panic!("nothing on stderr"));
        assert!(last.starts_with("reshard: wrote 4 file(s)"), "{stderr}");
        assert!(!progress.is_empty(), "no progress line:\n{stderr}");
        assert!(!stderr.contains('\r'), "a terminal bar in a pipe:\n{stderr}");
        let pcts: Vec<u64> = progress.iter().map(|l| progress_line_pct(l)).collect();
        assert!(pcts.windows(2).all(|w| w[0] <= w[1]), "{stderr}");
        assert_eq!(pcts.last(), Some(&100), "{stderr}");
    }
}

#[test]
fn transform_quiet_prints_nothing_on_success() {
    let dir = fixture("conformance/complete_to_dp2mp2");
    let s = Scratch::new("quiet");
    // A strategy folder, so that there is a merge to report.
    let strategy = s.join("dst_strategy");
    std::fs::create_dir_all(&strategy).unwrap();
    std::fs::copy(dir.join("dst_strategy.ckpt"), strategy.join("stage0.ckpt")).unwrap();
    let src = dir.join("src");
    for quiet in [false, true] {
        let dst = s.join(if quiet { "quiet" } else { "loud" });
        let mut args =
            argv!["transform", "--src_ckpt_dir", &src, "--dst_ckpt_strategy", &strategy, "--dst_ckpt_dir", &dst];
        if quiet {
            args.push("-q".into());
        }
        let out = reshard(&args);
        let stderr = text(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        if quiet {
            assert_eq!(stderr, "", "-q printed on stderr");
        } else {
            assert!(stderr.contains("merged") && stderr.contains("reshard: wrote 4 file(s)"), "{stderr}");
        }
        assert!(out.stdout.is_empty());
    }
}

/// `strategy show` of a JSON strategy in MindSpore's flattened form: without `--from` a note
/// names the parameters whose shapes may be the flattened ones and says how to get the real
/// ones; with `--from` they are merged back into the checkpoint's dims. (Both showed the
/// flattened slices, `[2, 8, 16]` for a `[16, 16]` weight, without a word.)
#[test]
fn strategy_show_of_a_flattened_json_strategy_says_so_or_merges_it_back() {
    let flat = fixture("flat_json/nested_to_dp2mp2/src_strategy.json");
    let out = reshard([OsStr::new("strategy"), OsStr::new("show"), flat.as_os_str()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let note = stdout.lines().find(|l| l.starts_with("note: ")).unwrap_or_else(|| panic!("no note: {stdout}"));
    for needle in ["18 parameter(s)", "flattened form", "model.layers.0.attention.wk.weight", "--from CKPT"] {
        assert!(note.contains(needle), "{needle:?} not in {note}");
    }
    assert!(!note.contains("lm_head.weight"), "{note}");
    let json = reshard([OsStr::new("strategy"), OsStr::new("show"), OsStr::new("--json"), flat.as_os_str()]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let row = |v: &serde_json::Value, name: &str| {
        v["rows"].as_array().unwrap().iter().find(|r| r["name"] == name).unwrap().clone()
    };
    assert_eq!(row(&v, "model.layers.0.attention.wk.weight")["maybe_flattened"], true);
    assert_eq!(row(&v, "lm_head.weight")["maybe_flattened"], false);
    assert_eq!(v["notes"].as_array().unwrap().len(), 1);

    let complete = fixture("conformance/complete_to_dp2mp2/src");
    let args = |json: bool| {
        let mut a = argv!["strategy", "show", &flat, "--from", &complete];
        if json {
            a.push("--json".into());
        }
        a
    };
    let out = reshard(args(false));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(!stdout.contains("note: "), "{stdout}");
    let wk = stdout.lines().find(|l| l.starts_with("model.layers.0.attention.wk.weight ")).unwrap();
    assert!(wk.contains("[16, 16]") && wk.contains("[4, 16]") && wk.contains("axis2(2)*axis1(2)"), "{wk}");
    let v: serde_json::Value = serde_json::from_slice(&reshard(args(true)).stdout).unwrap();
    let wk = row(&v, "model.layers.0.attention.wk.weight");
    assert_eq!(wk["shape"], serde_json::json!([16, 16]));
    assert_eq!(wk["tensor_map"], serde_json::json!([[2, 1], [-1]]));
    assert_eq!(wk["maybe_flattened"], false);
}

// ------------------------------------------------------------------ unify (issue 15)

/// `reshard unify -q --src_ckpt_dir SRC --src_ckpt_strategy STRATEGY --dst_dir OUT` followed by
/// `extra`.
fn unify(src: &Path, strategy: &Path, out: &Path, extra: Vec<OsString>) -> Output {
    let mut args = argv!["unify", "--src_ckpt_dir", src, "--src_ckpt_strategy", strategy, "--dst_dir", out, "-q"];
    args.extend(extra);
    reshard(args)
}

/// `reshard unify` on MindSpore-made sources writes MindSpore's unified folder: the map and the
/// hyper-parameters byte for byte, the part tensor for tensor (byte for byte when its metadata
/// has one key, which the safetensors library orders by hash otherwise).
#[test]
fn unify_writes_what_mindspore_unified_safetensors_writes() {
    let case = fixture("st_era/dp2mp2");
    for (src, want) in [("full", "unified_full"), ("rr", "unified_rr")] {
        let s = Scratch::new("unify-cli");
        let out = s.join("out");
        let r = unify(&case.join(src), &case.join("src_strategy.ckpt"), &out, vec![]);
        assert!(r.status.success(), "{}", text(&r.stderr));
        for f in ["param_name_map.json", "hyper_param.safetensors"] {
            assert_eq!(std::fs::read(out.join(f)).unwrap(), std::fs::read(case.join(want).join(f)).unwrap(), "{f}");
        }
        let part = |d: &Path| inspect_json(&d.join("part0.safetensors"));
        assert_eq!(got_tensors(&part(&out)), got_tensors(&part(&case.join(want))), "{src}");
        if src == "full" {
            assert_eq!(
                std::fs::read(out.join("part0.safetensors")).unwrap(),
                std::fs::read(case.join(want).join("part0.safetensors")).unwrap()
            );
        }
        assert_verifies(&out);
    }
}

/// A remove_redundancy source missing a slice: `unify` is refused like `transform`, naming the
/// parameter and the ranks, and writes nothing.
#[test]
fn unify_refuses_a_slice_no_rank_holds_and_writes_nothing() {
    let dir = corpus("sources/remove_redundancy_slice_missing");
    let s = Scratch::new("unify-refused");
    let out = s.join("out");
    let r = unify(&dir.join("src"), &dir.join("src_strategy.ckpt"), &out, vec![]);
    assert_refused(&r, &["'w'", "[2, 0]", "no source rank holds", "rank_2..rank_3"]);
    assert_nothing_written(&out);
}

/// `--split_dst_file 2,2` writes only the second task's parts (MindSpore's split); a malformed
/// value is refused before anything is written.
#[test]
fn unify_split_dst_file_writes_one_tasks_share() {
    let case = fixture("st_era/dp2mp2");
    let s = Scratch::new("unify-split-cli");
    let run = |out: &Path, split: &str| {
        unify(&case.join("full"), &case.join("src_strategy.ckpt"), out, argv!["--split_dst_file", split])
    };
    // One part: task 2 of 2 has none of it, and no hyper-parameters or map.
    let out = s.join("task2");
    let r = run(&out, "2,2");
    assert!(r.status.success(), "{}", text(&r.stderr));
    assert!(!out.join("part0.safetensors").exists() && !out.join("param_name_map.json").exists());
    let out = s.join("task1");
    assert!(run(&out, "1,2").status.success());
    assert_eq!(
        std::fs::read(out.join("param_name_map.json")).unwrap(),
        std::fs::read(case.join("unified_full/param_name_map.json")).unwrap()
    );
    let out = s.join("bad");
    assert_refused(&run(&out, "1,2,3"), &["--split_dst_file", "3 value(s)"]);
    assert_nothing_written(&out);
}

// ------------------------------------------------------------------ MindFormers Checkpoint 2.0

/// A Checkpoint 2.0 root (made by MindFormers 2.1, `tests/gen/make_mindformers.py`) through the
/// CLI: transform to complete and to a Checkpoint 2.0 root in another layout, inspect, verify,
/// rank-list, auto; a source strategy and `--ranks` with `--output_format mindformers` refused.
#[test]
fn mindformers_roots_through_the_cli() {
    let s = Scratch::new("mf-cli");
    let root = fixture("mindformers/dp2mp2/root");
    let legacy = fixture("mindformers/written/legacy_dp2mp2_opt.json");
    assert!(transform(&root, &s.join("complete"), argv!["--output_format", "safetensors"]).status.success());
    assert!(s.join("complete/rank_0/checkpoint_0.safetensors").is_file());
    let out = s.join("mf");
    let t = transform(&root, &out, argv!["--output_format", "mindformers", "--dst_ckpt_strategy", &legacy, "--dedup"]);
    assert!(t.status.success(), "{}", text(&t.stderr));
    assert_eq!(std::fs::read_to_string(out.join("latest_checkpointed_iteration.txt")).unwrap(), "20");
    // The source root's common.json is carried over.
    assert_eq!(
        std::fs::read(out.join("iteration_00000020/common.json")).unwrap(),
        std::fs::read(root.join("iteration_00000020/common.json")).unwrap()
    );
    let v = assert_verifies(&out);
    assert!(text(&v.stderr).contains("metadata.json agrees"), "{}", text(&v.stderr));
    let i = reshard(argv!["inspect", &root]);
    assert!(i.status.success() && text(&i.stdout).contains("model.embed"), "{}", text(&i.stderr));
    let r = reshard(argv!["rank-list", "--rank", "1", "--src_ckpt_dir", &root, "--dst_ckpt_layout", &out]);
    assert!(r.status.success(), "{}", text(&r.stderr));
    let a = reshard(argv![
        "auto",
        "--load_checkpoint",
        &root,
        "--output_dir",
        s.join("auto"),
        "--rank",
        "0",
        "--world_size",
        "1"
    ]);
    assert!(a.status.success(), "{}", text(&a.stderr));
    assert!(s.join("auto/transformed_checkpoint/rank_0/checkpoint_0.ckpt").is_file());
    let refused = s.join("refused");
    let t = transform(&root, &refused, argv!["--src_ckpt_strategy", &legacy]);
    assert_refused(&t, &["MindFormers Checkpoint 2.0", "leave out the source strategy"]);
    assert_nothing_written(&refused);
    let t = transform(
        &root,
        &refused,
        argv!["--output_format", "mindformers", "--dst_ckpt_strategy", &legacy, "--ranks", "0"],
    );
    assert_refused(&t, &["--ranks", "mindformers"]);
    assert_nothing_written(&refused);
}

/// A root whose metadata.json names a file that holds another shape for a chunk is refused by
/// transform and verify, naming the tensor, the chunk and the file, and nothing is written.
#[test]
fn mindformers_metadata_disagreeing_with_files_is_refused() {
    let s = Scratch::new("mf-cli-bad");
    let root = s.join("root");
    copy_dir(&fixture("mindformers/dp2mp2/root"), &root);
    let m = root.join("iteration_00000020/metadata.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&m).unwrap()).unwrap();
    let e = &mut v["storage_data"]["('model.embed', (1,))"][0];
    e["file_name"] = "opt-0000003-0000004.safetensors".into();
    e["storage_rank"] = 3.into();
    std::fs::write(&m, serde_json::to_vec(&v).unwrap()).unwrap();
    let dst = s.join("out");
    let t = transform(&root, &dst, argv![]);
    assert_refused(&t, &["model.embed", "chunk 1", "opt-0000003-0000004.safetensors", "does not hold"]);
    assert_nothing_written(&dst);
    let v = reshard(argv!["verify", &root]);
    assert_refused(&v, &["model.embed", "chunk 1", "opt-0000003-0000004.safetensors"]);
}

// ------------------------------------------------------------------ transform --distributed

/// `reshard ARGS` with none of the launchers' variables set, and `vars` added.
fn reshard_with_env(args: Vec<OsString>, vars: &[(&str, &str)]) -> Output {
    let mut c = Command::new(BIN);
    c.args(args).env("RUST_BACKTRACE", "0");
    for l in reshard_core::distributed::LAUNCHERS {
        c.env_remove(l.index).env_remove(l.count);
    }
    c.env_remove("MS_ROLE").envs(vars.iter().copied()).output().unwrap()
}

/// `--distributed` with no launcher variable and no `--process-index` is refused before anything
/// is written (it is not a silent one-process run); the flags of a process share need it.
#[test]
fn distributed_without_a_process_index_is_refused() {
    let s = Scratch::new("dist-noenv");
    let dst = s.join("out");
    let out = reshard_with_env(dp2mp2("transform", argv!["--dst_ckpt_dir", &dst, "--distributed"]), &[]);
    assert_refused(&out, &["--distributed", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID", "--process-index"]);
    assert!(!dst.exists(), "a refused run created {}", dst.display());
    let out = reshard(dp2mp2("transform", argv!["--dst_ckpt_dir", &dst, "--process-index", "0"]));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("--distributed"), "{}", text(&out.stderr));
    let out = reshard_with_env(
        dp2mp2("transform", argv!["--dst_ckpt_dir", &dst, "--distributed"]),
        &[("OMPI_COMM_WORLD_RANK", "2"), ("OMPI_COMM_WORLD_SIZE", "2")],
    );
    assert_refused(&out, &["process index 2 is not below the process count 2", "OMPI_COMM_WORLD_RANK"]);
    assert!(!dst.exists());
}

/// Two processes started by hand as torchrun would (RANK/WORLD_SIZE), at once: MindSpore's
/// outputs, each rank written by one of them, and a record per share.
#[test]
fn distributed_torchrun_environment_by_hand() {
    let s = Scratch::new("dist-torchrun");
    let dst = s.join("out");
    let case = fixture("conformance/complete_to_dp2mp2");
    let children: Vec<_> = (0..2)
        .map(|r| {
            let mut c = Command::new(BIN);
            c.args(dp2mp2("transform", argv!["--dst_ckpt_dir", &dst, "--distributed", "--timeout", "60"]));
            for l in reshard_core::distributed::LAUNCHERS {
                c.env_remove(l.index).env_remove(l.count);
            }
            c.env("RANK", r.to_string()).env("WORLD_SIZE", "2");
            c.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap()
        })
        .collect();
    for (r, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        let err = text(&out.stderr);
        assert!(out.status.success(), "process {r}: {err}");
        let mine = if r == 0 { "rank_0..rank_1 (2 ranks)" } else { "rank_2..rank_3 (2 ranks)" };
        assert!(err.contains(&format!("process {r} of 2 (RANK/WORLD_SIZE (torchrun)): {mine}")), "{err}");
        assert!(dst.join(format!("reshard_share_{r}_of_2.json")).is_file());
    }
    for f in files_under(&case.join("expected")) {
        let rel = f.strip_prefix(case.join("expected")).unwrap();
        assert!(std::fs::read(dst.join(rel)).unwrap() == std::fs::read(&f).unwrap(), "{} differs", rel.display());
    }
}
