//! Status codes through the exported functions: a core error reaches the caller with its own
//! kind (an I/O error on a source is `RESHARD_STATUS_IO`, not `RESHARD_STATUS_SOURCE`).
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::ptr::{null, null_mut};

use reshard::{
    reshard_error_code, reshard_error_free, reshard_error_message, reshard_execute, reshard_plan, reshard_plan_free,
    ReshardError, ReshardPlan, ReshardStatus,
};
use reshard_core::checkpoint::TensorHeader;
use reshard_core::{ckpt, DType};

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_encoded_bytes()).unwrap()
}

/// A complete 64 x 16 fp32 tensor "w" in `dir/complete/rank_0/model.ckpt` and a strategy
/// splitting it in 2 by rows. Returns (source folder, source file, destination strategy).
fn make_source(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let headers = vec![TensorHeader { name: "w".into(), dtype: DType::Float32, dims: vec![64, 16], nbytes: 4096 }];
    let content: Vec<u8> = (0..4096u32).map(|k| k as u8).collect();
    let src = dir.join("complete/rank_0/model.ckpt");
    std::fs::create_dir_all(src.parent().unwrap()).unwrap();
    std::fs::write(&src, ckpt::layout(&headers, ckpt::CHUNK_BYTES).render(&[&content])).unwrap();
    let strategy = dir.join("mp2.json");
    let v = serde_json::json!({"current_stage": 0,
        "parallel_strategy_item": {"op": {"stage": 0, "parallel_strategy": [[1]]}},
        "parallel_layout_item": {"w": {"dev_matrix": [1, 2], "tensor_map": [0, -1], "field": 0,
            "opt_weight_shard_step": 0, "opt_weight_shard_size": 0}}});
    std::fs::write(&strategy, serde_json::to_vec(&v).unwrap()).unwrap();
    (dir.join("complete"), src, strategy)
}

#[test]
fn a_source_removed_after_the_plan_is_an_io_error() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("reshard-ffi-status-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (src_dir, src, strategy) = make_source(&dir);
    let (src_dir, strategy, out) = (c(&src_dir), c(&strategy), c(&dir.join("out")));
    let mut plan: *mut ReshardPlan = null_mut();
    let mut err: *mut ReshardError = null_mut();
    // SAFETY: NUL-terminated strings, writable out-pointers; the plan and error are freed below.
    unsafe {
        let status = reshard_plan(src_dir.as_ptr(), null(), strategy.as_ptr(), null(), &mut plan, &mut err);
        assert_eq!(status, ReshardStatus::Ok);
        std::fs::remove_file(&src).unwrap();
        let status = reshard_execute(plan, out.as_ptr(), null(), 0, c"{\"sync\": false}".as_ptr(), &mut err);
        let message = CStr::from_ptr(reshard_error_message(err)).to_string_lossy().into_owned();
        assert_eq!(status, ReshardStatus::Io, "{message}");
        assert_eq!(status.code(), 2);
        assert_eq!(reshard_error_code(err), ReshardStatus::Io);
        assert!(message.contains(&src.display().to_string()) && message.contains("open"), "{message}");
        reshard_error_free(err);
        reshard_plan_free(plan);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
