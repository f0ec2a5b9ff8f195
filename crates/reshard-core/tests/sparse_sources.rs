//! Sources saved with redundancy removed (MindSpore's `remove_redundancy=True`): each replicated
//! slice is in one rank of its replica group only. Made here from a MindSpore-made dp2mp2
//! safetensors source by dropping replicas, alternately keeping the lower and the higher rank's
//! copy, and marking the files as MindSpore does (`"remove_redundancy": "True"`).
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod util;

use std::collections::BTreeMap;
use std::path::Path;

use reshard_core::checkpoint::{CheckpointFile, ReadOptions, TensorHeader};
use reshard_core::execute::{execute, ExecuteOptions};
use reshard_core::plan::{Plan, PlanOptions};
use util::checkpoint::tensors;
use util::{fixtures, Scratch};

/// Writes `src` (4 ranks) to `dst` with each replicated tensor kept in one rank only; `drop`
/// removes the slice of that tensor that rank 0 holds, from every rank of its replica group.
fn dedup(src: &Path, dst: &Path, drop: Option<&str>) {
    let files: Vec<CheckpointFile> = (0..4)
        .map(|r| {
            CheckpointFile::open(&src.join(format!("rank_{r}/checkpoint_{r}.safetensors")), ReadOptions::default())
                .unwrap()
        })
        .collect();
    // (name, bytes) -> ranks holding that replica.
    let mut groups: BTreeMap<(String, Vec<u8>), Vec<usize>> = BTreeMap::new();
    for (r, f) in files.iter().enumerate() {
        for t in &f.index().tensors {
            groups.entry((t.name().to_string(), f.content(t).into_owned())).or_default().push(r);
        }
    }
    let mut keep: Vec<Vec<(TensorHeader, Vec<u8>)>> = vec![Vec::new(); 4];
    for (i, ((name, bytes), ranks)) in groups.into_iter().enumerate() {
        if drop == Some(name.as_str()) && ranks.contains(&0) {
            continue;
        }
        // Alternate between the first and the last holder, so both kinds of choice are read.
        let r = if i % 2 == 0 { ranks[0] } else { ranks[ranks.len() - 1] };
        let t = files[r].index().get(&name).unwrap();
        let h = TensorHeader { name, dtype: t.dtype, dims: t.shape().to_vec(), nbytes: t.nbytes() };
        keep[r].push((h, bytes));
    }
    for (r, tensors) in keep.into_iter().enumerate() {
        let meta = BTreeMap::from([
            ("format".to_string(), "ms".to_string()),
            ("remove_redundancy".to_string(), "True".to_string()),
        ]);
        let headers: Vec<TensorHeader> = tensors.iter().map(|(h, _)| h.clone()).collect();
        let layout = reshard_core::safetensors::layout(&headers, &meta).unwrap();
        let contents: Vec<&[u8]> = tensors.iter().map(|(_, b)| b.as_slice()).collect();
        let d = dst.join(format!("rank_{r}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(format!("checkpoint_{r}.safetensors")), layout.render(&contents)).unwrap();
    }
}

#[test]
fn slices_are_read_from_whichever_replica_holds_them() {
    let case = fixtures().join("conformance/safetensors_dp2mp2_to_dp1mp4");
    let tmp = Scratch::new("sparse");
    let sparse = tmp.join("sparse");
    dedup(&case.join("src"), &sparse, None);
    // Some rank really lacks something its replica holds.
    let held: Vec<usize> = (0..4)
        .map(|r| {
            let f = sparse.join(format!("rank_{r}/checkpoint_{r}.safetensors"));
            CheckpointFile::open(&f, ReadOptions::default()).unwrap().index().tensors.len()
        })
        .collect();
    assert!(held.iter().any(|&n| n < held.iter().copied().max().unwrap()), "{held:?}");
    for dst in [Some(case.join("dst_strategy.ckpt")), None] {
        let src_s = case.join("src_strategy.ckpt");
        let full = Plan::build(&case.join("src"), Some(&src_s), dst.as_deref(), &PlanOptions::default()).unwrap();
        let plan = Plan::build(&sparse, Some(&src_s), dst.as_deref(), &PlanOptions::default()).unwrap();
        let (a, b) = (tmp.join("a"), tmp.join("b"));
        let _ = (std::fs::remove_dir_all(&a), std::fs::remove_dir_all(&b));
        let wa = execute(&full, &a, &[], &ExecuteOptions::default()).unwrap();
        let wb = execute(&plan, &b, &[], &ExecuteOptions::default()).unwrap();
        assert_eq!(wa.len(), wb.len());
        // The same tensors, byte for byte (the order follows the files read, which differ).
        for (x, y) in wa.iter().zip(&wb) {
            assert_eq!(tensors(&x.path), tensors(&y.path), "{}", y.path.display());
        }
    }
}

#[test]
fn a_slice_no_rank_holds_is_refused_naming_the_parameter_and_ranks() {
    let case = fixtures().join("conformance/safetensors_dp2mp2_to_dp1mp4");
    let tmp = Scratch::new("sparse-missing");
    let name = "model.layers.0.attention.wq.weight";
    let sparse = tmp.join("sparse");
    dedup(&case.join("src"), &sparse, Some(name));
    let src_s = case.join("src_strategy.ckpt");
    let err = Plan::build(&sparse, Some(&src_s), None, &PlanOptions::default()).unwrap_err().to_string();
    assert!(err.contains(name), "{err}");
    assert!(err.contains("rank_0") && err.contains("offset [0, 0]"), "{err}");
}
