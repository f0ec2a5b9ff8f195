//! Properties that need no MindSpore: plans tile every destination tensor exactly once, and
//! round trips through other layouts (including device counts MindSpore refuses) are lossless.
#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use reshard_core::checkpoint::{CheckpointFile, ReadOptions, TensorHeader};
use reshard_core::execute::{execute, ExecuteOptions};
use reshard_core::plan::{Plan, PlanOptions, TensorSource};
use reshard_core::{ckpt, DType};
use serde_json::json;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("reshard-rt-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Writes a .ckpt with the given tensors (name, dtype, shape, bytes).
fn write_ckpt(path: &Path, tensors: &[(String, DType, Vec<u64>, Vec<u8>)]) {
    let headers: Vec<TensorHeader> = tensors
        .iter()
        .map(|(n, d, s, b)| TensorHeader { name: n.clone(), dtype: *d, dims: s.clone(), nbytes: b.len() as u64 })
        .collect();
    let contents: Vec<&[u8]> = tensors.iter().map(|t| t.3.as_slice()).collect();
    let out = ckpt::layout(&headers, 64).render(&contents);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, out).unwrap();
}

fn read_all(path: &Path) -> Vec<(String, DType, Vec<u64>, Vec<u8>)> {
    let f = CheckpointFile::open(path, ReadOptions::default()).unwrap();
    f.index()
        .tensors
        .iter()
        .map(|t| (t.name().to_string(), t.dtype, t.shape().to_vec(), f.content(t).into_owned()))
        .collect()
}

/// A small model: (name, dtype, shape, tensor_map for a 2-axis dev matrix [a, b]).
fn model() -> Vec<(String, DType, Vec<u64>, Vec<i64>)> {
    vec![
        ("embedding".into(), DType::Float32, vec![48, 8], vec![0, -1]),
        ("wq".into(), DType::BFloat16, vec![48, 12], vec![0, -1]),
        ("wo".into(), DType::Float16, vec![12, 48], vec![-1, 0]),
        ("w_both".into(), DType::Float32, vec![24, 24], vec![1, 0]),
        ("norm".into(), DType::Float32, vec![48], vec![-1]),
        ("counts".into(), DType::Int64, vec![24, 4], vec![1, -1]),
        ("global_step".into(), DType::Int32, vec![], vec![]),
    ]
}

fn complete_tensors() -> Vec<(String, DType, Vec<u64>, Vec<u8>)> {
    model()
        .into_iter()
        .enumerate()
        .map(|(i, (n, d, s, _))| {
            let bytes = s.iter().product::<u64>() * d.size();
            let data = (0..bytes).map(|k| (k as u8).wrapping_mul(31).wrapping_add(i as u8 * 17)).collect();
            (n, d, s, data)
        })
        .collect()
}

/// A JSON strategy for dev matrix `dev` (2 axes), optimizer shard over axis 1 when `opt`.
fn strategy(path: &Path, dev: [u64; 2], opt: bool) {
    let mut items = serde_json::Map::new();
    for (n, _, _, map) in model() {
        if map.is_empty() {
            continue;
        }
        // Optimizer shard needs the left axis replicated (maps that do not use axis 1).
        let use_opt = opt && !map.contains(&1) && dev[0] > 1;
        items.insert(
            n,
            json!({"dev_matrix": dev, "tensor_map": map, "field": 0,
                   "opt_weight_shard_step": if use_opt { dev[1] as i64 } else { 0 },
                   "opt_weight_shard_size": if use_opt { -1 } else { 0 }}),
        );
    }
    let v = json!({"current_stage": 0, "parallel_strategy_item": {"op": {"stage": 0, "parallel_strategy": [[1]]}},
                   "parallel_layout_item": items});
    std::fs::write(path, serde_json::to_vec(&v).unwrap()).unwrap();
}

fn transform(src: &Path, src_s: Option<&Path>, dst_s: Option<&Path>, out: &Path) {
    let plan = Plan::build(src, src_s, dst_s, &PlanOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    execute(&plan, out, &[], &ExecuteOptions::default()).unwrap_or_else(|e| panic!("{e}"));
}

fn round_trip(a: [u64; 2], a_opt: bool, b: [u64; 2], b_opt: bool) {
    let dir = scratch(&format!("{}x{}{}-{}x{}{}", a[0], a[1], a_opt, b[0], b[1], b_opt));
    let original = complete_tensors();
    write_ckpt(&dir.join("complete/rank_0/model.ckpt"), &original);
    let (sa, sb) = (dir.join("a.json"), dir.join("b.json"));
    strategy(&sa, a, a_opt);
    strategy(&sb, b, b_opt);
    transform(&dir.join("complete"), None, Some(&sa), &dir.join("A"));
    transform(&dir.join("A"), Some(&sa), Some(&sb), &dir.join("B"));
    transform(&dir.join("B"), Some(&sb), None, &dir.join("B_complete"));
    transform(&dir.join("A"), Some(&sa), None, &dir.join("A_complete"));
    let back = read_all(&dir.join("B_complete/rank_0/checkpoint_0.ckpt"));
    let direct = read_all(&dir.join("A_complete/rank_0/checkpoint_0.ckpt"));
    let sort = |mut v: Vec<(String, DType, Vec<u64>, Vec<u8>)>| {
        v.sort_by(|x, y| x.0.cmp(&y.0));
        v
    };
    assert_eq!(sort(back), sort(original.clone()), "A -> B -> complete lost data");
    assert_eq!(sort(direct), sort(original), "A -> complete lost data");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn six_cards_to_four_and_back_is_lossless() {
    // 6 -> 4 devices: MindSpore refuses (the counts do not divide); boxes do not care.
    round_trip([3, 2], false, [2, 2], false);
    round_trip([2, 3], true, [4, 1], false);
    round_trip([2, 2], true, [3, 1], true);
}

#[test]
fn sharded_to_sharded_round_trips() {
    round_trip([2, 2], true, [1, 4], false);
    round_trip([4, 2], true, [2, 4], true);
    round_trip([1, 1], false, [2, 6], true);
}

fn tile_check(a: [u64; 2], a_opt: bool, b: [u64; 2], b_opt: bool) -> Result<(), TestCaseError> {
    let dir = scratch(&format!("tile-{}x{}{}-{}x{}{}", a[0], a[1], a_opt, b[0], b[1], b_opt));
    let (sa, sb) = (dir.join("a.json"), dir.join("b.json"));
    strategy(&sa, a, a_opt);
    strategy(&sb, b, b_opt);
    write_ckpt(&dir.join("complete/rank_0/model.ckpt"), &complete_tensors());
    transform(&dir.join("complete"), None, Some(&sa), &dir.join("A"));
    let plan = Plan::build(&dir.join("A"), Some(&sa), Some(&sb), &PlanOptions::default()).unwrap();
    for r in 0..plan.dst_rank_count() {
        for t in plan.rank_plan(r).unwrap().tensors {
            if let TensorSource::Pieces { dst_box, pieces } = &t.source {
                // Pieces lie in the destination box, are pairwise disjoint, and add up to it.
                let total: u64 = pieces.iter().map(|p| p.region.numel()).sum();
                prop_assert_eq!(total, dst_box.numel(), "rank {} {}", r, t.name);
                for (i, p) in pieces.iter().enumerate() {
                    prop_assert!(dst_box.contains(&p.region));
                    prop_assert!(p.src_box.contains(&p.region));
                    for q in &pieces[i + 1..] {
                        prop_assert!(p.region.intersect(&q.region).is_none(), "overlap in {}", t.name);
                    }
                }
            }
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}

fn dev() -> impl Strategy<Value = [u64; 2]> {
    // Axis sizes whose splits (and optimizer splits) divide the model's dims.
    (prop::sample::select(vec![1u64, 2, 3, 6]), prop::sample::select(vec![1u64, 2, 4])).prop_map(|(a, b)| [a, b])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]
    #[test]
    fn plans_tile_every_destination_tensor_exactly_once(a in dev(), a_opt: bool, b in dev(), b_opt: bool) {
        tile_check(a, a_opt, b, b_opt)?;
    }
}

/// Ranks with more than 20,000 tensors are written one at a time (to bound the memory their
/// plans and layouts take); that path is as lossless as the other.
#[test]
fn many_small_tensors_round_trip() {
    let dir = scratch("many-small");
    let n = 25_000u32;
    let original: Vec<(String, DType, Vec<u64>, Vec<u8>)> = (0..n)
        .map(|i| {
            let data = (0..32u32).map(|k| (i.wrapping_mul(7).wrapping_add(k * 13)) as u8).collect();
            (format!("layer.{i}.w"), DType::Float32, vec![8], data)
        })
        .collect();
    write_ckpt(&dir.join("complete/rank_0/model.ckpt"), &original);
    let items: serde_json::Map<String, serde_json::Value> = (0..n)
        .map(|i| {
            let map = if i % 2 == 0 { json!([0]) } else { json!([-1]) };
            (format!("layer.{i}.w"), json!({"dev_matrix": [2, 2], "tensor_map": map}))
        })
        .collect();
    let s = dir.join("dp2mp2.json");
    let v = json!({"parallel_strategy_item": {"op": {"stage": 0}}, "parallel_layout_item": items});
    std::fs::write(&s, serde_json::to_vec(&v).unwrap()).unwrap();
    transform(&dir.join("complete"), None, Some(&s), &dir.join("A"));
    let rank1 = read_all(&dir.join("A/rank_1/checkpoint_1.ckpt"));
    assert_eq!(rank1.len(), n as usize);
    assert_eq!(rank1[0].2, vec![4], "split tensors hold half");
    assert_eq!(rank1[0].3, original[0].3[16..], "mp rank 1 holds the second half");
    transform(&dir.join("A"), Some(&s), None, &dir.join("back"));
    assert_eq!(read_all(&dir.join("back/rank_0/checkpoint_0.ckpt")), original);
    std::fs::remove_dir_all(&dir).ok();
}

/// A `.ckpt` rank of many tensors is laid out and written a window of tensors at a time; the
/// file and its crc trailer are byte for byte those of the whole file laid out at once
/// (windows of several sizes of values, 0-d tensors, long names, a window boundary inside).
#[test]
fn windowed_ckpt_output_is_the_whole_layout_byte_for_byte() {
    let dir = scratch("windows");
    let tensors: Vec<(String, DType, Vec<u64>, Vec<u8>)> = (0..20_000u32)
        .map(|i| {
            let (dtype, shape) = match i % 4 {
                0 => (DType::Float32, vec![2, 3]),
                1 => (DType::Int32, vec![]),
                2 => (DType::Float16, vec![u64::from(i % 300)]),
                _ => (DType::UInt8, vec![0, 5]),
            };
            let n = shape.iter().product::<u64>() * dtype.size();
            let name = if i % 1000 == 7 { format!("{}.{i}", "long".repeat(50)) } else { format!("p.{i}") };
            (name, dtype, shape, (0..n).map(|k| (k as u32 ^ i) as u8).collect())
        })
        .collect();
    let headers: Vec<TensorHeader> = tensors
        .iter()
        .map(|(n, d, s, b)| TensorHeader { name: n.clone(), dtype: *d, dims: s.clone(), nbytes: b.len() as u64 })
        .collect();
    let contents: Vec<&[u8]> = tensors.iter().map(|t| t.3.as_slice()).collect();
    let mut expected = ckpt::layout(&headers, ckpt::CHUNK_BYTES).render(&contents);
    std::fs::create_dir_all(dir.join("src/rank_0")).unwrap();
    std::fs::write(dir.join("src/rank_0/model.ckpt"), &expected).unwrap();
    let plan = Plan::build(&dir.join("src"), None, None, &PlanOptions::default()).unwrap();
    let opts = ExecuteOptions { sync: false, crc: true, ..Default::default() };
    execute(&plan, &dir.join("out"), &[], &opts).unwrap();
    expected.extend_from_slice(&ckpt::crc_trailer(crc32fast::hash(&expected)));
    assert!(std::fs::read(dir.join("out/rank_0/checkpoint_0.ckpt")).unwrap() == expected);
    std::fs::remove_dir_all(&dir).ok();
}
