//! MindSpore's safetensors era (issue 15), against files MindSpore 2.10 made
//! (`tests/gen/make_st_era.py`, `tests/fixtures/st_era`): unified folders and Hugging Face index
//! folders as complete sources, rank folders of several files, sources saved with
//! `remove_redundancy`.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod util;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use reshard_core::checkpoint::{CheckpointFile, ReadOptions, TensorHeader};
use reshard_core::execute::{execute, ExecuteOptions};
use reshard_core::plan::{Plan, PlanOptions};
use reshard_core::Format;
use util::checkpoint::tensors;
use util::{fixtures, Scratch};

fn st_era() -> PathBuf {
    fixtures().join("st_era")
}

fn st_opts() -> ExecuteOptions {
    ExecuteOptions { format: Format::Safetensors, sync: false, ..ExecuteOptions::default() }
}

fn transform(src: &Path, src_strategy: Option<&Path>, dst_strategy: Option<&Path>, out: &Path) -> Plan {
    let plan = Plan::build(src, src_strategy, dst_strategy, &PlanOptions::default()).unwrap();
    execute(&plan, out, &[], &st_opts()).unwrap();
    plan
}

/// Writes a safetensors file of `tensors` (name, header source file) with `meta`.
fn write_st(path: &Path, items: &[(TensorHeader, Vec<u8>)], meta: &[(&str, &str)]) {
    let meta: BTreeMap<String, String> = meta.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let headers: Vec<TensorHeader> = items.iter().map(|(h, _)| h.clone()).collect();
    let layout = reshard_core::safetensors::layout(&headers, &meta).unwrap();
    let contents: Vec<&[u8]> = items.iter().map(|(_, b)| b.as_slice()).collect();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, layout.render(&contents)).unwrap();
}

fn items_of(path: &Path) -> Vec<(TensorHeader, Vec<u8>)> {
    let f = CheckpointFile::open(path, ReadOptions::default()).unwrap();
    f.index()
        .tensors
        .iter()
        .map(|t| {
            (
                TensorHeader {
                    name: t.name().to_string(),
                    dtype: t.dtype,
                    dims: t.shape().to_vec(),
                    nbytes: t.nbytes(),
                },
                f.content(t).into_owned(),
            )
        })
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.path().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn unified_folders_load_as_mindspore_loads_them() {
    // What load_distributed_checkpoint(unified_safetensors_dir=...) gives each destination rank,
    // hyper-parameters included, byte for byte.
    for case in ["dp2mp2", "dp4mp2pp2_opt2"] {
        let dir = st_era().join(case);
        let tmp = Scratch::new("unified-src");
        let plan = transform(&dir.join("unified_full"), None, Some(&dir.join("dst_strategy.ckpt")), tmp.path());
        assert_eq!(plan.sources[&0].files.len(), 2, "{case}: part0 and hyper_param");
        for r in 0..plan.dst_rank_count() {
            let ours = tmp.join(format!("rank_{r}/checkpoint_{r}.safetensors"));
            let theirs = dir.join(format!("load_dst/rank_{r}/net.safetensors"));
            assert_eq!(tensors(&ours), tensors(&theirs), "{case} rank {r}");
            assert_eq!(std::fs::read(&ours).unwrap(), std::fs::read(&theirs).unwrap(), "{case} rank {r}");
        }
    }
}

#[test]
fn hugging_face_index_folders_are_complete_sources() {
    let dir = st_era().join("hf");
    let tmp = Scratch::new("hf-src");
    let plan = transform(&dir, None, Some(&dir.join("dst_strategy.ckpt")), tmp.path());
    assert_eq!(plan.sources[&0].files.len(), 2);
    for r in 0..4 {
        let name = format!("rank_{r}/checkpoint_{r}.safetensors");
        assert_eq!(
            std::fs::read(tmp.join(&name)).unwrap(),
            std::fs::read(dir.join("expected_dp2mp2").join(&name)).unwrap(),
            "rank {r}"
        );
    }
}

#[test]
fn remove_redundancy_sources_made_by_mindspore_convert_like_their_full_copies() {
    for case in ["dp2mp2", "dp4mp2pp2_opt2"] {
        let dir = st_era().join(case);
        let src = dir.join("src_strategy.ckpt");
        let dst = dir.join("dst_strategy.ckpt");
        let (a, b) = (Scratch::new("rr"), Scratch::new("rr-full"));
        let plan = transform(&dir.join("rr"), Some(&src), Some(&dst), a.path());
        transform(&dir.join("full"), Some(&src), Some(&dst), b.path());
        for r in 0..plan.dst_rank_count() {
            let name = format!("rank_{r}/checkpoint_{r}.safetensors");
            assert_eq!(tensors(&a.join(&name)), tensors(&b.join(&name)), "{case} rank {r}");
        }
        // And to a complete checkpoint: what the unified part holds.
        let c = Scratch::new("rr-complete");
        transform(&dir.join("rr"), Some(&src), None, c.path());
        let ours = tensors(&c.join("rank_0/checkpoint_0.safetensors"));
        let mut theirs = tensors(&dir.join("unified_rr/part0.safetensors"));
        theirs.extend(tensors(&dir.join("unified_rr/hyper_param.safetensors")));
        assert_eq!(ours, theirs, "{case}");
    }
}

/// A unified folder copied into `tmp` with `part0.safetensors` split in two files and the map
/// rewritten to match; returns the folder.
fn two_part_folder(tmp: &Scratch) -> PathBuf {
    let from = st_era().join("dp2mp2/unified_full");
    let dir = tmp.join("unified");
    copy_dir(&from, &dir);
    let items = items_of(&dir.join("part0.safetensors"));
    let (a, b) = items.split_at(items.len() / 2);
    std::fs::remove_file(dir.join("part0.safetensors")).unwrap();
    write_st(&dir.join("part0.safetensors"), a, &[("format", "ms")]);
    write_st(&dir.join("part1.safetensors"), b, &[("format", "ms")]);
    let mut map = serde_json::Map::new();
    for (h, _) in a {
        map.insert(h.name.clone(), "part0.safetensors".into());
    }
    for (h, _) in b {
        map.insert(h.name.clone(), "part1.safetensors".into());
    }
    let json = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(dir.join("param_name_map.json"), serde_json::to_string_pretty(&json).unwrap()).unwrap();
    dir
}

#[test]
fn a_map_that_disagrees_with_its_files_is_refused_naming_both() {
    let tmp = Scratch::new("bad-map");
    let dir = two_part_folder(&tmp);
    let dst = st_era().join("dp2mp2/dst_strategy.ckpt");
    // The split folder itself is fine and gives what the single part gave.
    let out = Scratch::new("bad-map-out");
    transform(&dir, None, Some(&dst), out.path());
    let want = st_era().join("dp2mp2/load_dst/rank_1/net.safetensors");
    assert_eq!(tensors(&out.join("rank_1/checkpoint_1.safetensors")), tensors(&want));

    let map_path = dir.join("param_name_map.json");
    let original = std::fs::read_to_string(&map_path).unwrap();
    let refused = |what: &str, needles: &[&str]| {
        let e = Plan::build(&dir, None, Some(&dst), &PlanOptions::default()).unwrap_err().to_string();
        for n in needles {
            assert!(e.contains(n), "{what}: {e}");
        }
    };
    // Listed in the wrong file.
    let v: serde_json::Value = serde_json::from_str(&original).unwrap();
    let (name, file) = {
        let m = v["weight_map"].as_object().unwrap();
        let (n, f) = m.iter().next().unwrap();
        (n.clone(), f.as_str().unwrap().to_string())
    };
    let other = if file == "part0.safetensors" { "part1.safetensors" } else { "part0.safetensors" };
    let mut w = v.clone();
    w["weight_map"][&name] = other.into();
    std::fs::write(&map_path, w.to_string()).unwrap();
    refused("wrong file", &[&name, other, &file, "param_name_map.json"]);
    // Listed but absent.
    let mut w = v.clone();
    w["weight_map"]["no.such.tensor"] = "part1.safetensors".into();
    std::fs::write(&map_path, w.to_string()).unwrap();
    refused("absent", &["no.such.tensor", "part1.safetensors", "does not contain"]);
    // In two files.
    std::fs::write(&map_path, &original).unwrap();
    let mut both = items_of(&dir.join("part1.safetensors"));
    let first = items_of(&dir.join("part0.safetensors")).remove(0);
    let dup = first.0.name.clone();
    both.push(first);
    write_st(&dir.join("part1.safetensors"), &both, &[("format", "ms")]);
    refused("two files", &[&dup, "part0.safetensors", "part1.safetensors", "both"]);
    // In a file but not in the map.
    let mut w = v.clone();
    w["weight_map"].as_object_mut().unwrap().remove(&name);
    write_st(&dir.join("part1.safetensors"), &items_of(&dir.join("part1.safetensors"))[..both.len() - 1], &[]);
    std::fs::write(&map_path, w.to_string()).unwrap();
    refused("unlisted", &[&name, "does not list it"]);
}

#[test]
fn rank_folders_of_several_files_join_into_one_checkpoint() {
    // Each rank of the dp2mp2 source split into two files with a map, and its hyper-parameters
    // moved to hyper_param.safetensors; it converts like the original.
    let dir = st_era().join("dp2mp2");
    let tmp = Scratch::new("multi");
    let src = tmp.join("src");
    for r in 0..4 {
        let items = items_of(&dir.join(format!("full/rank_{r}/checkpoint_{r}.safetensors")));
        let (hyper, weights): (Vec<_>, Vec<_>) =
            items.into_iter().partition(|(h, _)| h.name == "global_step" || h.name == "learning_rate");
        let (a, b) = weights.split_at(weights.len() / 2);
        let d = src.join(format!("rank_{r}"));
        write_st(&d.join("model-00001-of-00002.safetensors"), a, &[("format", "ms")]);
        write_st(&d.join("model-00002-of-00002.safetensors"), b, &[("format", "ms")]);
        write_st(&d.join("hyper_param.safetensors"), &hyper, &[("format", "ms")]);
        let mut map = serde_json::Map::new();
        for (h, _) in a {
            map.insert(h.name.clone(), "model-00001-of-00002.safetensors".into());
        }
        for (h, _) in b {
            map.insert(h.name.clone(), "model-00002-of-00002.safetensors".into());
        }
        let json = serde_json::json!({"weight_map": map});
        std::fs::write(d.join("model.safetensors.index.json"), json.to_string()).unwrap();
    }
    let s = dir.join("src_strategy.ckpt");
    let d = dir.join("dst_strategy.ckpt");
    let (a, b) = (Scratch::new("multi-out"), Scratch::new("multi-ref"));
    let plan = transform(&src, Some(&s), Some(&d), a.path());
    assert_eq!(plan.sources[&1].files.len(), 3);
    transform(&dir.join("full"), Some(&s), Some(&d), b.path());
    for r in 0..4 {
        let name = format!("rank_{r}/checkpoint_{r}.safetensors");
        assert_eq!(std::fs::read(a.join(&name)).unwrap(), std::fs::read(b.join(&name)).unwrap(), "rank {r}");
    }
    // A stray checkpoint beside a map is refused by name.
    std::fs::copy(dir.join("full/rank_2/checkpoint_2.safetensors"), src.join("rank_2/checkpoint_2.safetensors"))
        .unwrap();
    let e = Plan::build(&src, Some(&s), Some(&d), &PlanOptions::default()).unwrap_err().to_string();
    assert!(e.contains("checkpoint_2.safetensors") && e.contains("not named by"), "{e}");
}

#[test]
fn a_ckpt_with_a_hyper_param_file_is_one_checkpoint_and_steps_stay_unmixed() {
    let case = fixtures().join("conformance/dp2mp2_to_dp1mp4");
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(case.join("case.json")).unwrap()).unwrap();
    let s = case.join(info["src_strategy"].as_str().unwrap());
    let d = case.join(info["dst_strategy"].as_str().unwrap());
    let tmp = Scratch::new("ckpt-hyper");
    let src = tmp.join("src");
    copy_dir(&case.join("src"), &src);
    // Move rank 1's scalars to a hyper_param.safetensors beside its .ckpt.
    let ckpt = src.join("rank_1/checkpoint_1.ckpt");
    let items = items_of(&ckpt);
    let (hyper, rest): (Vec<_>, Vec<_>) =
        items.into_iter().partition(|(h, _)| h.name == "global_step" || h.name == "learning_rate");
    assert!(!hyper.is_empty());
    let headers: Vec<TensorHeader> = rest.iter().map(|(h, _)| h.clone()).collect();
    let layout = reshard_core::execute::file_layout(&headers, Format::Ckpt).unwrap();
    let contents: Vec<&[u8]> = rest.iter().map(|(_, b)| b.as_slice()).collect();
    std::fs::write(&ckpt, layout.render(&contents)).unwrap();
    write_st(&src.join("rank_1/hyper_param.safetensors"), &hyper, &[("format", "ms")]);
    let out = Scratch::new("ckpt-hyper-out");
    let opts = ExecuteOptions { sync: false, ..ExecuteOptions::default() };
    let plan = Plan::build(&src, Some(&s), Some(&d), &PlanOptions::default()).unwrap();
    assert_eq!(plan.sources[&1].files.len(), 2);
    execute(&plan, out.path(), &[], &opts).unwrap();
    for r in 0..plan.dst_rank_count() {
        let name = format!("rank_{r}/checkpoint_{r}.ckpt");
        assert_eq!(tensors(&out.join(&name)), tensors(&case.join("expected").join(&name)), "rank {r}");
    }
    // Two checkpoints of different steps beside it are still refused.
    std::fs::copy(&ckpt, src.join("rank_1/m-1_2.ckpt")).unwrap();
    std::fs::rename(&ckpt, src.join("rank_1/m-1_4.ckpt")).unwrap();
    let e = Plan::build(&src, Some(&s), Some(&d), &PlanOptions::default()).unwrap_err().to_string();
    assert!(e.contains("rank_") && e.contains("--src_ckpt_name"), "{e}");
}

fn unify_opts(merge: Option<bool>, part_bytes: u64) -> reshard_core::unify::UnifyOptions {
    reshard_core::unify::UnifyOptions {
        merge_with_redundancy: merge,
        part_bytes,
        exec: ExecuteOptions { sync: false, ..ExecuteOptions::default() },
        ..Default::default()
    }
}

/// Compares a unified folder with MindSpore's: the same files, the map byte for byte, each
/// file tensor for tensor with the same metadata, and byte for byte where the metadata has one
/// key (the safetensors library orders several keys as its hash map does).
fn assert_same_unified(ours: &Path, theirs: &Path) {
    let names = |d: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| !n.starts_with("reshard_manifest") && !n.starts_with('.'))
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(ours), names(theirs), "{}", theirs.display());
    for n in names(theirs) {
        let (a, b) = (ours.join(&n), theirs.join(&n));
        if n.ends_with(".json") {
            assert_eq!(std::fs::read_to_string(&a).unwrap(), std::fs::read_to_string(&b).unwrap(), "{n}");
            continue;
        }
        assert_eq!(tensors(&a), tensors(&b), "{}", b.display());
        let meta = |p: &Path| CheckpointFile::open(p, ReadOptions::default()).unwrap().index().metadata.clone();
        assert_eq!(meta(&a), meta(&b), "{}", b.display());
        if meta(&b).len() == 1 {
            assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap(), "{}", b.display());
        }
    }
}

#[test]
fn unify_writes_what_unified_safetensors_writes() {
    for case in ["dp2mp2", "dp4mp2pp2_opt2"] {
        let dir = st_era().join(case);
        let s = dir.join("src_strategy.ckpt");
        for (src, merge, want) in
            [("full", Some(true), "unified_full"), ("rr", Some(false), "unified_rr"), ("rr", None, "unified_rr")]
        {
            let tmp = Scratch::new("unify");
            let out = tmp.join("out");
            let r = reshard_core::unify::unify(&dir.join(src), &s, &out, &unify_opts(merge, 3 << 30)).unwrap();
            assert_eq!(r.deduplicated, src == "rr", "{case} {src}");
            assert_same_unified(&out, &dir.join(want));
        }
        // Several parts: MindSpore was asked for 3 (see make_st_era.py).
        let tmp = Scratch::new("unify3");
        let probe =
            reshard_core::unify::unify(&dir.join("full"), &s, &tmp.join("one"), &unify_opts(None, 3 << 30)).unwrap();
        let out = tmp.join("three");
        let r =
            reshard_core::unify::unify(&dir.join("full"), &s, &out, &unify_opts(None, probe.total_size.div_ceil(3)))
                .unwrap();
        assert_eq!(r.files.len(), 4, "{case}: 3 parts and hyper_param");
        assert_same_unified(&out, &dir.join("unified_3parts"));
    }
}

#[test]
fn unified_folders_written_by_reshard_are_sources_again() {
    let dir = st_era().join("dp4mp2pp2_opt2");
    let tmp = Scratch::new("unify-again");
    let out = tmp.join("unified");
    reshard_core::unify::unify(&dir.join("rr"), &dir.join("src_strategy.ckpt"), &out, &unify_opts(None, 1 << 12))
        .unwrap();
    let o = Scratch::new("unify-again-out");
    transform(&out, None, Some(&dir.join("dst_strategy.ckpt")), o.path());
    for r in 0..4 {
        let name = format!("rank_{r}/checkpoint_{r}.safetensors");
        assert_eq!(
            tensors(&o.join(&name)),
            tensors(&dir.join(format!("load_dst/rank_{r}/net.safetensors"))),
            "rank {r}"
        );
    }
}

#[test]
fn the_plan_names_the_file_each_slice_comes_from() {
    // A remove_redundancy source (slices from whichever rank holds them) and a unified folder
    // of three parts: every piece names a file that holds its tensor, with that box.
    let dir = st_era().join("dp4mp2pp2_opt2");
    for (src, strategy) in [("rr", Some(dir.join("src_strategy.ckpt"))), ("unified_3parts", None)] {
        let plan = Plan::build(
            &dir.join(src),
            strategy.as_deref(),
            Some(&dir.join("dst_strategy.ckpt")),
            &PlanOptions::default(),
        )
        .unwrap();
        let v = reshard_core::report::plan_json(&plan, Path::new("out"), &ExecuteOptions::default(), true).unwrap();
        let mut files_seen = std::collections::BTreeSet::new();
        for r in v["ranks"].as_array().unwrap() {
            for t in r["plan"].as_array().unwrap() {
                let name = t["name"].as_str().unwrap();
                let pieces: Vec<&serde_json::Value> = match t["source"]["pieces"].as_array() {
                    Some(p) => p.iter().collect(),
                    None => vec![&t["source"]],
                };
                for p in pieces {
                    let file = PathBuf::from(p["src_file"].as_str().unwrap());
                    let f = CheckpointFile::open(&file, ReadOptions::default()).unwrap();
                    let held = f.index().get(name).unwrap_or_else(|| panic!("{} lacks {name}", file.display()));
                    if let Some(shape) = p["src_box"]["shape"].as_array() {
                        let shape: Vec<u64> = shape.iter().map(|x| x.as_u64().unwrap()).collect();
                        assert_eq!(held.shape(), shape.as_slice(), "{src}: {name} in {}", file.display());
                    }
                    files_seen.insert(file);
                }
            }
            let by_file: u64 = r["sources"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|s| s["files"].as_array().unwrap())
                .map(|f| f["bytes"].as_u64().unwrap())
                .sum();
            assert_eq!(by_file, r["bytes_written"].as_u64().unwrap(), "{src}");
        }
        // The table says the same: each file of a source of several files, by name, with its bytes.
        let text = reshard_core::report::plan_text(&plan, Path::new("out"), &ExecuteOptions::default()).unwrap();
        let mut listed = 0;
        for s in v["ranks"].as_array().unwrap().iter().flat_map(|r| r["sources"].as_array().unwrap()) {
            let files = s["files"].as_array().unwrap();
            for f in files.iter().filter(|_| files.len() > 1) {
                let name = Path::new(f["path"].as_str().unwrap()).file_name().unwrap().to_string_lossy();
                assert!(text.contains(&format!("{name} {}", f["bytes"])), "{src}: {name} not in\n{text}");
                listed += 1;
            }
        }
        assert_eq!(listed > 0, src == "unified_3parts", "{src}: {listed} files listed");
        assert!(files_seen.len() >= 4, "{src}: {files_seen:?}");
    }
}

#[test]
fn memory_loading_reads_these_sources_like_the_files() {
    use reshard_core::{load_rank, LoadOptions};
    let dir = st_era().join("dp4mp2pp2_opt2");
    let dst = dir.join("dst_strategy.ckpt");
    for (src, strategy) in [("unified_3parts", None), ("rr", Some(dir.join("src_strategy.ckpt")))] {
        let plan = Plan::build(&dir.join(src), strategy.as_deref(), Some(&dst), &PlanOptions::default()).unwrap();
        for r in [0, 3] {
            let mut bufs: Vec<(String, Vec<u8>)> = Vec::new();
            let rp = plan.rank_plan(r).unwrap();
            let mut storage: Vec<Vec<u8>> = rp.tensors.iter().map(|t| vec![0u8; t.nbytes as usize]).collect();
            let names: Vec<String> = rp.tensors.iter().map(|t| t.name.clone()).collect();
            {
                let mut it = storage.iter_mut();
                load_rank(&plan, r, &LoadOptions::default(), &mut |_m| Ok(it.next().map(|b| b.as_mut_slice())))
                    .unwrap();
            }
            bufs.extend(names.into_iter().zip(storage));
            let want = tensors(&dir.join(format!("load_dst/rank_{r}/net.safetensors")));
            assert_eq!(bufs.len(), want.len(), "{src} rank {r}");
            for (name, bytes) in bufs {
                assert_eq!(bytes, want[&name].2, "{src} rank {r} {name}");
            }
        }
    }
}

#[test]
fn auto_takes_a_unified_folder_as_load_checkpoint() {
    let dir = st_era().join("dp2mp2");
    let tmp = Scratch::new("auto-unified");
    let strategies = tmp.join("output/strategy");
    std::fs::create_dir_all(&strategies).unwrap();
    for r in 0..4 {
        std::fs::copy(dir.join("dst_strategy.ckpt"), strategies.join(format!("ckpt_strategy_rank_{r}.ckpt"))).unwrap();
    }
    for (load, src_strategy) in [("unified_full", None), ("rr", Some(dir.join("src_strategy.ckpt")))] {
        let o = reshard_core::auto::AutoOptions {
            load_checkpoint: dir.join(load),
            src_strategy_path_or_dir: src_strategy,
            output_dir: tmp.join("output"),
            rank: Some(2),
            world_size: Some(4),
            output_format: "safetensors".into(),
            timeout: 5,
            ..Default::default()
        };
        let r = reshard_core::auto::auto(&o).unwrap();
        assert_eq!(
            tensors(&r.load_path),
            tensors(&dir.join("load_dst/rank_2/net.safetensors")),
            "{load}: {}",
            r.log.join("\n")
        );
    }
}

#[test]
fn ckpt_outputs_from_unified_folders_are_in_the_loaders_order() {
    // .ckpt keeps the order it is written in: MindSpore's loader writes a unified folder's
    // tensors in the destination strategy's order (without one, the map's), then the
    // hyper-parameters. Byte for byte, three parts, 4 and 16 source ranks' models.
    for case in ["dp2mp2", "dp4mp2pp2_opt2"] {
        let dir = st_era().join(case);
        let src = dir.join("unified_3parts");
        let opts = ExecuteOptions { sync: false, ..ExecuteOptions::default() };
        let a = Scratch::new("ckpt-order");
        let plan = Plan::build(&src, None, Some(&dir.join("dst_strategy.ckpt")), &PlanOptions::default()).unwrap();
        execute(&plan, a.path(), &[], &opts).unwrap();
        for r in 0..plan.dst_rank_count() {
            assert_eq!(
                std::fs::read(a.join(format!("rank_{r}/checkpoint_{r}.ckpt"))).unwrap(),
                std::fs::read(dir.join(format!("load_dst_ckpt/rank_{r}/net.ckpt"))).unwrap(),
                "{case} rank {r}"
            );
        }
        let b = Scratch::new("ckpt-order-complete");
        let plan = Plan::build(&src, None, None, &PlanOptions::default()).unwrap();
        execute(&plan, b.path(), &[], &opts).unwrap();
        assert_eq!(
            std::fs::read(b.join("rank_0/checkpoint_0.ckpt")).unwrap(),
            std::fs::read(dir.join("load_complete_ckpt/rank_0/net.ckpt")).unwrap(),
            "{case} complete"
        );
    }
}

#[test]
fn unify_splits_the_parts_between_tasks_as_mindspore() {
    // split_dst_file (1, 2) and (2, 2) of three parts: [0, 1] with hyper_param and the map, and
    // [2]; together MindSpore's three-part folder (its own runs of both tasks gave exactly these
    // files).
    let dir = st_era().join("dp4mp2pp2_opt2");
    let s = dir.join("src_strategy.ckpt");
    let tmp = Scratch::new("unify-split");
    let probe =
        reshard_core::unify::unify(&dir.join("full"), &s, &tmp.join("probe"), &unify_opts(None, 3 << 30)).unwrap();
    let all = tmp.join("all");
    for task in [1, 2] {
        let out = tmp.join(format!("task{task}"));
        let mut o = unify_opts(None, probe.total_size.div_ceil(3));
        o.split = Some((task, 2));
        let r = reshard_core::unify::unify(&dir.join("full"), &s, &out, &o).unwrap();
        let mut names: Vec<String> =
            r.files.iter().map(|f| f.path.file_name().unwrap().to_string_lossy().into_owned()).collect();
        names.sort();
        let want: &[&str] = if task == 1 {
            &["hyper_param.safetensors", "part0.safetensors", "part1.safetensors"]
        } else {
            &["part2.safetensors"]
        };
        assert_eq!(names, want, "task {task}");
        assert_eq!(out.join("param_name_map.json").exists(), task == 1);
        for n in names.iter().chain(std::iter::once(&"param_name_map.json".to_string())) {
            if out.join(n).exists() {
                std::fs::create_dir_all(&all).unwrap();
                std::fs::copy(out.join(n), all.join(n)).unwrap();
            }
        }
    }
    assert_same_unified(&all, &dir.join("unified_3parts"));
    let mut o = unify_opts(None, 3 << 30);
    o.split = Some((3, 2));
    let e = reshard_core::unify::unify(&dir.join("full"), &s, &tmp.join("bad"), &o).unwrap_err().to_string();
    assert!(e.contains("split_dst_file (3, 2)"), "{e}");
}
