//! MindFormers Checkpoint 2.0 roots as sources. The fixtures (`tests/fixtures/mindformers/`) were
//! made by MindFormers 2.1's own code (`tests/gen/make_mindformers.py`): a single-card save by its
//! saver, a dp2mp2 root and a two-stage root saved with balanced de-duplication, each with
//! `expected.safetensors`, the full tensors the root was made from.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod util;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use reshard_core::checkpoint::{CheckpointFile, ReadOptions};
use reshard_core::execute::{execute, ExecuteOptions};
use reshard_core::plan::{Plan, PlanOptions};
use util::{fixtures, Scratch};

const CASES: [&str; 3] = ["single", "dp2mp2", "pp2_balanced"];

/// name -> (dtype, shape, bytes) of every tensor of every file given.
fn tensors(paths: &[PathBuf]) -> BTreeMap<String, (String, Vec<u64>, Vec<u8>)> {
    let mut out = BTreeMap::new();
    for p in paths {
        let f = CheckpointFile::open(p, ReadOptions::default()).unwrap();
        for t in &f.index().tensors {
            out.insert(t.name().to_string(), (t.dtype.to_string(), t.shape().to_vec(), f.content(t).into_owned()));
        }
    }
    out
}

fn case(name: &str) -> PathBuf {
    fixtures().join("mindformers").join(name)
}

fn complete(src: &Path, out: &Path) -> Vec<PathBuf> {
    let plan = Plan::build(src, None, None, &PlanOptions::default()).unwrap();
    let opts = ExecuteOptions { format: reshard_core::Format::Safetensors, ..ExecuteOptions::default() };
    execute(&plan, out, &[], &opts).unwrap().into_iter().map(|w| w.path).collect()
}

#[test]
fn roots_read_back_as_the_tensors_they_were_made_from() {
    let tmp = Scratch::new("mf-complete");
    for c in CASES {
        let want = tensors(&[case(c).join("expected.safetensors")]);
        // The root and its iteration folder both work.
        let it =
            std::fs::read_dir(case(c).join("root")).unwrap().flatten().map(|e| e.path()).find(|p| p.is_dir()).unwrap();
        for (k, src) in [case(c).join("root"), it].iter().enumerate() {
            let got = tensors(&complete(src, &tmp.join(format!("{c}-{k}"))));
            assert_eq!(got, want, "{c} from {}", src.display());
        }
    }
}

/// A legacy JSON strategy with every parameter of `params` split on dim 0 over 2 of 4 devices.
fn legacy_strategy(path: &Path, params: &BTreeMap<String, (String, Vec<u64>, Vec<u8>)>) {
    let mut items = serde_json::Map::new();
    for (name, (_, shape, _)) in params {
        let mut tensor_map = vec![-1i64; shape.len()];
        if shape.first().is_some_and(|d| d % 2 == 0) {
            tensor_map[0] = 0;
        }
        items.insert(
            name.clone(),
            serde_json::json!({"dev_matrix": [2, 2], "tensor_map": tensor_map, "tensor_shape": shape, "field": 0,
                "opt_weight_shard_step": 0, "opt_weight_shard_size": 0}),
        );
    }
    let s = serde_json::json!({"current_stage": 0, "parallel_strategy_item": {}, "parallel_layout_item": items});
    std::fs::write(path, serde_json::to_vec(&s).unwrap()).unwrap();
}

#[test]
fn roots_convert_to_a_legacy_layout_and_back() {
    let tmp = Scratch::new("mf-legacy");
    for c in CASES {
        let want = tensors(&[case(c).join("expected.safetensors")]);
        let strategy = tmp.join(format!("{c}.json"));
        legacy_strategy(&strategy, &want);
        let plan = Plan::build(&case(c).join("root"), None, Some(&strategy), &PlanOptions::default()).unwrap();
        assert_eq!(plan.dst_rank_count(), 4);
        let legacy = tmp.join(format!("{c}-legacy"));
        execute(&plan, &legacy, &[], &ExecuteOptions::default()).unwrap();
        let back = Plan::build(&legacy, Some(&strategy), None, &PlanOptions::default()).unwrap();
        let out = tmp.join(format!("{c}-back"));
        let files: Vec<PathBuf> =
            execute(&back, &out, &[], &ExecuteOptions::default()).unwrap().into_iter().map(|w| w.path).collect();
        assert_eq!(tensors(&files), want, "{c}");
    }
}

#[test]
fn a_source_strategy_is_refused_for_a_root() {
    let src = case("dp2mp2").join("root");
    let err = Plan::build(&src, Some(Path::new("x.ckpt")), None, &PlanOptions::default()).unwrap_err().to_string();
    assert!(err.contains("metadata.json") && err.contains("x.ckpt"), "{err}");
}

/// Copies the dp2mp2 root to `dst`, with `edit` applied to its metadata.json.
fn edited_root(dst: &Path, edit: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let src = case("dp2mp2").join("root");
    let it = dst.join("iteration_00000020");
    std::fs::create_dir_all(&it).unwrap();
    std::fs::copy(src.join("latest_checkpointed_iteration.txt"), dst.join("latest_checkpointed_iteration.txt"))
        .unwrap();
    for e in std::fs::read_dir(src.join("iteration_00000020")).unwrap().flatten() {
        std::fs::copy(e.path(), it.join(e.file_name())).unwrap();
    }
    let m = it.join("metadata.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&m).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&m, serde_json::to_vec(&v).unwrap()).unwrap();
    dst.to_path_buf()
}

#[test]
fn metadata_that_disagrees_with_the_files_is_refused_naming_tensor_chunk_and_file() {
    let tmp = Scratch::new("mf-bad");
    type Edit = fn(&mut serde_json::Value);
    let cases: [(&str, Edit, &[&str]); 7] = [
        (
            "two chunks from one rank",
            |v| {
                // Chunk 1 of model.embed said to be in rank 0's file, which holds chunk 0.
                let e = &mut v["storage_data"]["('model.embed', (1,))"][0];
                e["file_name"] = serde_json::json!("model-0000000-0000004.safetensors");
                e["storage_rank"] = serde_json::json!(0);
            },
            &["model.embed", "chunks 0 and 1", "model-0000000-0000004.safetensors"],
        ),
        (
            "a shape too large to address",
            |v| {
                v["state_dict_metadata"]["model.norm"]["global_shape"] = serde_json::json!([u64::MAX / 4]);
            },
            &["model.norm", "too large", "metadata.json"],
        ),
        (
            "missing chunk",
            |v| {
                v["state_dict_metadata"]["model.embed"]["chunk"].as_array_mut().unwrap().pop();
            },
            &["model.embed", "missing chunk(s) [1]", "metadata.json"],
        ),
        (
            "stored nowhere",
            |v| {
                v["storage_data"].as_object_mut().unwrap().shift_remove("('model.w1', (2,))");
            },
            &["model.w1", "chunk 2", "stored nowhere", "metadata.json"],
        ),
        (
            "shape mismatch",
            |v| {
                let t = &mut v["state_dict_metadata"]["model.w2"];
                t["global_shape"] = serde_json::json!([6, 8]);
                t["chunk"][0]["local_shape"] = serde_json::json!([3, 4]);
                t["chunk"][1]["local_shape"] = serde_json::json!([3, 4]);
                t["chunk"][2]["local_shape"] = serde_json::json!([3, 4]);
                t["chunk"][3]["local_shape"] = serde_json::json!([3, 4]);
            },
            &["model.w2", "chunk 0", "model-0000000-0000004.safetensors", "holds shape [3, 2]"],
        ),
        (
            "file without the tensor",
            |v| {
                let e = &mut v["storage_data"]["('adam_m.model.embed', (3,))"][0];
                e["file_name"] = serde_json::json!("model-0000003-0000004.safetensors");
            },
            &["adam_m.model.embed", "chunk 3", "model-0000003-0000004.safetensors", "does not hold"],
        ),
        (
            "a file that is not there",
            |v| {
                let e = &mut v["storage_data"]["('model.norm', (0,))"][0];
                e["file_name"] = serde_json::json!("model-0000009-0000004.safetensors");
            },
            &["model-0000009-0000004.safetensors", "metadata.json"],
        ),
    ];
    for (i, (what, edit, needles)) in cases.into_iter().enumerate() {
        let root = edited_root(&tmp.join(format!("bad{i}")), edit);
        let err = Plan::build(&root, None, None, &PlanOptions::default()).unwrap_err().to_string();
        for n in needles {
            assert!(err.contains(n), "{what}: {err:?} lacks {n:?}");
        }
    }
}

#[test]
fn roots_load_into_memory_as_the_full_tensors() {
    use reshard_core::{load_rank, LoadOptions, TensorMeta};
    for c in CASES {
        let want = tensors(&[case(c).join("expected.safetensors")]);
        let plan = Plan::build(&case(c).join("root"), None, None, &PlanOptions::default()).unwrap();
        let rp = plan.rank_plan(0).unwrap();
        let mut storage: Vec<Vec<u8>> = rp.tensors.iter().map(|t| vec![0xA5; t.nbytes as usize]).collect();
        let mut lend = storage.iter_mut();
        let mut names = Vec::new();
        load_rank(&plan, 0, &LoadOptions::default(), &mut |m: &TensorMeta<'_>| {
            names.push((m.name.to_string(), m.shape.to_vec()));
            Ok(lend.next().map(|b| b.as_mut_slice()))
        })
        .unwrap();
        assert_eq!(names.len(), want.len(), "{c}");
        for ((name, shape), bytes) in names.into_iter().zip(storage) {
            let (_, s, b) = &want[&name];
            assert_eq!((&shape, &bytes), (s, b), "{c}: {name}");
        }
    }
}

/// Writes a Checkpoint 2.0 root with `dst` (a legacy strategy, or another root's layouts).
fn write_root(src: &Path, src_strategy: Option<&Path>, dst: Dst<'_>, out: &Path, mfo: &MindFormersOptions) {
    let dst = match dst {
        Dst::Complete => None,
        Dst::Strategy(p) => Some(reshard_core::Strategy::load(p).unwrap()),
        Dst::Layout(p) => Some(reshard_core::mindformers::strategy_from_metadata(p).unwrap()),
    };
    let plan = Plan::build_to(src, src_strategy, dst, &PlanOptions::default()).unwrap();
    execute_mindformers(&plan, out, &ExecuteOptions::default(), mfo).unwrap();
}

enum Dst<'a> {
    Complete,
    Strategy(&'a Path),
    Layout(&'a Path),
}

use reshard_core::execute::mindformers::{execute_mindformers, MindFormersOptions};

/// The cases of `tests/gen/check_mindformers_written.sh`, whose roots MindFormers 2.1 loaded
/// (load_checkpoint and ReshardLoader) with the expected values: reshard still writes the same
/// metadata.json, and the roots read back as the tensors they were made from.
#[test]
fn written_roots_match_those_mindformers_loaded() {
    let tmp = Scratch::new("mf-written");
    let f = fixtures().join("mindformers");
    let conf = fixtures().join("conformance/complete_to_dp2mp2_opt");
    let legacy = f.join("written/legacy_dp2mp2_opt.json");
    let dp2mp2 = case("dp2mp2").join("root");
    let pp2 = case("pp2_balanced").join("root");
    let conf_strategy = conf.join("dst_strategy.ckpt");
    let dedup = |iteration: u64| MindFormersOptions { iteration, dedup: true, ..MindFormersOptions::default() };
    let plain = |iteration: u64| MindFormersOptions { iteration, ..MindFormersOptions::default() };
    #[allow(clippy::type_complexity)]
    let cases: Vec<(&str, PathBuf, Option<&Path>, Dst<'_>, MindFormersOptions, PathBuf)> = vec![
        ("dp2mp2_legacy_opt", dp2mp2.clone(), None, Dst::Strategy(&legacy), plain(20), case("dp2mp2")),
        ("dp2mp2_dedup", dp2mp2.clone(), None, Dst::Layout(&dp2mp2), dedup(20), case("dp2mp2")),
        ("pp2_dedup", pp2.clone(), None, Dst::Layout(&pp2), dedup(7), case("pp2_balanced")),
        ("single_complete", case("single").join("root"), None, Dst::Complete, plain(3), case("single")),
        (
            "legacy_dp2mp2_opt",
            conf.join("expected"),
            Some(&conf_strategy),
            Dst::Strategy(&conf_strategy),
            plain(5),
            conf.join("src/rank_0/llama_tiny.ckpt"),
        ),
    ];
    for (name, src, src_strategy, dst, mfo, expected) in cases {
        let out = tmp.join(name);
        write_root(&src, src_strategy, dst, &out, &mfo);
        let it = out.join(format!("iteration_{:08}", mfo.iteration));
        let got = std::fs::read_to_string(it.join("metadata.json")).unwrap();
        let want = std::fs::read_to_string(f.join(format!("written/{name}.metadata.json"))).unwrap();
        assert_eq!(got, want, "{name}: metadata.json differs from the one MindFormers loaded");
        assert_eq!(
            std::fs::read_to_string(out.join("latest_checkpointed_iteration.txt")).unwrap(),
            mfo.iteration.to_string()
        );
        assert!(it.join("common.json").is_file(), "{name}");
        let expected = if expected.is_dir() { expected.join("expected.safetensors") } else { expected };
        let back = complete(&out, &tmp.join(format!("{name}-back")));
        assert_eq!(tensors(&back), tensors(&[expected]), "{name}");
    }
}

/// De-duplicated saving picks the writer of each chunk as MindFormers' `distribute_shards` does:
/// rewriting the two-stage root MindFormers saved with balanced de-duplication, in its own
/// layout, gives the same storage_data (files, storage ranks, rank groups).
#[test]
fn dedup_assigns_chunks_as_mindformers_does() {
    let tmp = Scratch::new("mf-dedup");
    let root = case("pp2_balanced").join("root");
    let mfo = MindFormersOptions { iteration: 7, dedup: true, ..MindFormersOptions::default() };
    write_root(&root, None, Dst::Layout(&root), &tmp.join("out"), &mfo);
    let read = |p: &Path| -> serde_json::Value { serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap() };
    let got = read(&tmp.join("out/iteration_00000007/metadata.json"));
    let want = read(&root.join("iteration_00000007/metadata.json"));
    assert_eq!(got["storage_data"], want["storage_data"]);
    // Fewer files than ranks, as MindFormers wrote.
    let files = |d: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str().filter(|n| n.ends_with(".safetensors")).map(String::from))
            .collect();
        v.sort();
        v
    };
    assert_eq!(files(&tmp.join("out/iteration_00000007")), files(&root.join("iteration_00000007")));
}

/// A new iteration may go into the source's own root, but not over the source's iteration; and
/// a run over an earlier root at the same iteration that stops half-way leaves no tracker or
/// metadata.json describing files it was replacing.
#[test]
fn writing_over_roots_never_leaves_a_root_that_loads_wrongly() {
    let tmp = Scratch::new("mf-over");
    let root = tmp.join("root");
    let src = case("dp2mp2").join("root");
    std::fs::create_dir_all(root.join("iteration_00000020")).unwrap();
    std::fs::copy(src.join("latest_checkpointed_iteration.txt"), root.join("latest_checkpointed_iteration.txt"))
        .unwrap();
    for e in std::fs::read_dir(src.join("iteration_00000020")).unwrap().flatten() {
        std::fs::copy(e.path(), root.join("iteration_00000020").join(e.file_name())).unwrap();
    }
    let plan = Plan::build(&root, None, None, &PlanOptions::default()).unwrap();
    let same = MindFormersOptions { iteration: 20, ..MindFormersOptions::default() };
    let err = execute_mindformers(&plan, &root, &ExecuteOptions::default(), &same).unwrap_err().to_string();
    assert!(err.contains("source's own iteration"), "{err}");
    let next = MindFormersOptions { iteration: 21, ..MindFormersOptions::default() };
    execute_mindformers(&plan, &root, &ExecuteOptions::default(), &next).unwrap();
    assert_eq!(std::fs::read_to_string(root.join("latest_checkpointed_iteration.txt")).unwrap(), "21");
    let want = tensors(&[case("dp2mp2").join("expected.safetensors")]);
    assert_eq!(tensors(&complete(&root, &tmp.join("back21"))), want);
    assert_eq!(tensors(&complete(&root.join("iteration_00000020"), &tmp.join("back20"))), want);
    // Stopped before its first file: the earlier root at iteration 21 is no longer loadable.
    let stop = ExecuteOptions {
        cancel: Some(std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true))),
        // (Resumed, the files the run before wrote would all be kept.)
        resume: false,
        ..ExecuteOptions::default()
    };
    let plan = Plan::build(&root.join("iteration_00000020"), None, None, &PlanOptions::default()).unwrap();
    assert!(execute_mindformers(&plan, &root, &stop, &next).is_err());
    assert!(!root.join("latest_checkpointed_iteration.txt").exists());
    assert!(!root.join("iteration_00000021/metadata.json").exists());
}

/// A root whose tracker is missing names its iteration folders rather than guessing one (it
/// used to be read as a folder without rank_N folders).
#[test]
fn a_root_without_its_tracker_names_its_iterations() {
    let tmp = Scratch::new("mf-no-tracker");
    let root = edited_root(&tmp.join("root"), |_| {});
    std::fs::remove_file(root.join("latest_checkpointed_iteration.txt")).unwrap();
    let err = Plan::build(&root, None, None, &PlanOptions::default()).unwrap_err().to_string();
    assert!(err.contains("latest_checkpointed_iteration.txt") && err.contains("iteration_00000020"), "{err}");
}
