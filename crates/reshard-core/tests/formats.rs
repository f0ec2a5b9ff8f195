//! Readers and the strategy merge checked against files and results made by MindSpore 2.10.
#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

mod util;

use std::path::{Path, PathBuf};

use reshard_core::checkpoint::{CheckpointFile, ReadOptions};
use reshard_core::strategy::{merge_dir, Strategy};
use reshard_core::Error;
use serde_json::Value;
use util::fixtures;

fn json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn expected_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".expected.json"))
        .collect();
    v.sort();
    v
}

#[test]
fn checkpoints_read_as_mindspore_loads_them() {
    let dir = fixtures().join("formats");
    let files = expected_files(&dir);
    assert!(files.len() >= 6, "formats fixtures missing");
    let mut checked = 0;
    for exp in files {
        let e = json(&exp);
        let ckpt = PathBuf::from(exp.to_string_lossy().trim_end_matches(".expected.json"));
        if e.get("crc_check_error").is_some() {
            // MindSpore refuses it with crc_check=True; so do we, naming the file and crc.
            let err = CheckpointFile::open(&ckpt, ReadOptions::default()).err().expect("damaged file accepted");
            assert!(matches!(err, Error::CrcMismatch { .. }), "{err}");
            let msg = err.to_string();
            assert!(msg.contains("crc") && msg.contains(ckpt.file_name().unwrap().to_str().unwrap()), "{msg}");
            // Without verification, the (damaged) content reads like MindSpore's crc_check=False.
            let f = CheckpointFile::open(&ckpt, ReadOptions { verify_crc: false }).unwrap();
            compare(&f, &e, &ckpt);
            continue;
        }
        let f = CheckpointFile::open(&ckpt, ReadOptions::default()).unwrap_or_else(|e| panic!("{e}"));
        compare(&f, &e, &ckpt);
        if let Some(c) = e.get("crc").and_then(|c| c.get("stored")).and_then(Value::as_u64) {
            assert_eq!(f.index().crc, Some(c as u32), "{}", ckpt.display());
        }
        checked += 1;
    }
    assert!(checked >= 5);
}

fn compare(f: &CheckpointFile, e: &Value, path: &Path) {
    let want = e["tensors"].as_array().unwrap();
    let mut got: Vec<_> = f.index().tensors.iter().collect();
    if f.index().format == reshard_core::Format::Safetensors {
        // MindSpore lists safetensors tensors by name.
        got.sort_by(|a, b| a.name().cmp(b.name()));
    }
    assert_eq!(got.len(), want.len(), "{}: tensor count", path.display());
    for (t, w) in got.iter().zip(want) {
        let ctx = format!("{}: {}", path.display(), t.name());
        assert_eq!(t.name(), w["name"].as_str().unwrap(), "{ctx}");
        assert_eq!(t.dtype.ckpt_name(), w["dtype"].as_str().unwrap(), "{ctx}");
        if t.dtype != reshard_core::DType::Str {
            let shape: Vec<u64> = w["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
            assert_eq!(t.shape(), shape.as_slice(), "{ctx}");
        }
        assert_eq!(hex(&f.content(t)), w["hex"].as_str().unwrap(), "{ctx}");
        if let Some(chunks) = w.get("chunks").and_then(Value::as_u64) {
            assert_eq!(t.segments().len() as u64, chunks, "{ctx}: consecutive values");
        }
    }
}

fn layouts_match(s: &Strategy, e: &Value, path: &Path) {
    let params = e["params"].as_object().unwrap();
    assert_eq!(s.param_count(), params.len(), "{}: parameter count", path.display());
    for (name, w) in params {
        let ctx = format!("{}: {name}", path.display());
        let l = s.layout(name).unwrap_or_else(|| panic!("{ctx}: missing"));
        let dev: Vec<u64> = w["dev_matrix"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
        assert_eq!(l.dev_matrix, dev, "{ctx}");
        let tm: Vec<Vec<i64>> = w["tensor_map"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| match x {
                Value::Array(a) => a.iter().map(|v| v.as_i64().unwrap()).collect(),
                v => vec![v.as_i64().unwrap()],
            })
            .collect();
        assert_eq!(l.tensor_map, tm, "{ctx}");
        assert_eq!(l.opt_shard_step, w["opt_weight_shard_step"].as_i64().unwrap(), "{ctx}");
        assert_eq!(l.opt_shard_size, w["opt_weight_shard_size"].as_i64().unwrap(), "{ctx}");
        let mut stages = s.stages_of(name);
        stages.sort_unstable();
        let mut want: Vec<u32> = w["stages"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        want.sort_unstable();
        assert_eq!(stages, want, "{ctx}");
    }
    if let Some(n) = e.get("stage_num").and_then(Value::as_u64) {
        assert_eq!(u64::from(s.stage_num().unwrap()), n, "{}", path.display());
    }
}

#[test]
fn strategies_parse_as_mindspore_parses_them() {
    let root = fixtures().join("strategies");
    let mut n = 0;
    for dir in [root.clone(), root.join("pp2_proto"), root.join("pp2_json")] {
        for exp in expected_files(&dir) {
            let file = PathBuf::from(exp.to_string_lossy().trim_end_matches(".expected.json"));
            let s = Strategy::load(&file).unwrap_or_else(|e| panic!("{e}"));
            layouts_match(&s, &json(&exp), &file);
            n += 1;
        }
    }
    assert!(n >= 4, "strategy fixtures missing");
}

#[test]
fn merge_equals_mindspore_merge() {
    let root = fixtures().join("strategies");
    for (dir, merged) in [("pp2_proto", "pp2_proto.merged.ckpt"), ("pp2_json", "pp2_json.merged.json")] {
        // The fixture folder also holds expected.json files; merge a copy of the stage files.
        let stages = std::env::temp_dir().join(format!("reshard-stages-{}-{dir}", std::process::id()));
        std::fs::create_dir_all(&stages).unwrap();
        for e in std::fs::read_dir(root.join(dir)).unwrap() {
            let p = e.unwrap().path();
            if !p.to_string_lossy().ends_with(".expected.json") {
                std::fs::copy(&p, stages.join(p.file_name().unwrap())).unwrap();
            }
        }
        let ours = merge_dir(&stages).unwrap();
        std::fs::remove_dir_all(&stages).ok();
        // Byte for byte what MindSpore wrote (files taken in name order, as the fixture did).
        assert_eq!(ours.to_bytes(), std::fs::read(root.join(merged)).unwrap(), "{dir}: merged bytes differ");
        let out = std::env::temp_dir().join(format!("reshard-merge-{}-{merged}", std::process::id()));
        std::fs::write(&out, ours.to_bytes()).unwrap();
        let a = Strategy::load(&out).unwrap();
        let b = Strategy::load(&root.join(merged)).unwrap();
        std::fs::remove_file(&out).ok();
        assert_eq!(a.to_params(), b.to_params(), "{dir}: merged layouts differ from MindSpore's");
        assert_eq!(a.stage_num().unwrap(), b.stage_num().unwrap());
        // Names with '-' survive the stage prefix.
        assert!(a.params().any(|(n, _)| n.contains('-')), "{dir}: fixture lost its '-' name");
    }
}

#[test]
fn garbage_and_truncated_files_are_refused_with_the_file_name() {
    let dir = std::env::temp_dir().join(format!("reshard-garbage-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = std::fs::read(fixtures().join("formats/basic.ckpt")).unwrap();
    for (i, cut) in [3usize, good.len() / 3, good.len() - 2].into_iter().enumerate() {
        let p = dir.join(format!("trunc{i}.ckpt"));
        std::fs::write(&p, &good[..cut]).unwrap();
        let err = CheckpointFile::open(&p, ReadOptions::default()).err().expect("truncated file accepted");
        assert!(err.to_string().contains(&format!("trunc{i}.ckpt")), "{err}");
    }
    let st = std::fs::read(fixtures().join("formats/basic.safetensors")).unwrap();
    let p = dir.join("trunc.safetensors");
    std::fs::write(&p, &st[..st.len() - 3]).unwrap();
    assert!(CheckpointFile::open(&p, ReadOptions::default()).is_err());
    let p = dir.join("garbage.ckpt");
    std::fs::write(&p, (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect::<Vec<_>>()).unwrap();
    assert!(CheckpointFile::open(&p, ReadOptions::default()).is_err());
    let p = dir.join("empty.json");
    std::fs::write(&p, b"").unwrap();
    assert!(Strategy::load(&p).unwrap_err().to_string().contains("empty.json"));
    std::fs::remove_dir_all(&dir).ok();
}
