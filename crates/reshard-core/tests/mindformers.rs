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
            out.insert(t.name.clone(), (t.dtype.to_string(), t.shape.clone(), f.content(t).into_owned()));
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
    let cases: [(&str, Edit, &[&str]); 5] = [
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
