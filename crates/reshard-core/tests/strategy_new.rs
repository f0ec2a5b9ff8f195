//! `strategy_new`: strategies made from rules equal the MindSpore-format fixtures written for the
//! same layouts, transforms through them are lossless, and bad requests get clear errors.
#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

mod util;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use prost::Message;
use reshard_core::checkpoint::{CheckpointFile, Format, ReadOptions};
use reshard_core::execute::{execute, ExecuteOptions};
use reshard_core::layout::ResolvedLayout;
use reshard_core::plan::{Plan, PlanOptions};
use reshard_core::strategy::{proto, ParamLayout, Strategy};
use reshard_core::strategy_new::{self, generate, read_params, show, write, ParamInfo, Rules, StrategySpec, Written};
use util::fixtures;

fn case(name: &str) -> PathBuf {
    fixtures().join("conformance").join(name)
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("reshard-sn-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// dp x mp x pp with the llama rules (plus `extra` rule text before them); optimizer shard with
/// `opt` = Some(size), threshold 0 as the tiny fixtures assume.
fn spec(dp: u32, mp: u32, pp: u32, opt: Option<i32>, extra: &str) -> StrategySpec {
    let mut s = StrategySpec::new(dp, mp, pp);
    let mut rules = Rules::parse(extra, "test.rules", true).unwrap();
    rules.extend(Rules::builtin("llama").unwrap());
    s.rules = rules;
    if let Some(size) = opt {
        s.optimizer_shard = true;
        s.opt_shard_size = size;
        s.opt_shard_threshold_kb = 0;
    }
    s
}

fn gen(name: &str, src: &Path, s: &StrategySpec, json: bool) -> Written {
    let params = read_params(src).unwrap_or_else(|e| panic!("{e}"));
    write(s, &params, &scratch(name), json).unwrap_or_else(|e| panic!("{e}"))
}

fn decode(path: &Path) -> proto::ParallelStrategyMap {
    let mut m = proto::ParallelStrategyMap::decode(std::fs::read(path).unwrap().as_slice())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // MindSpore writes its save counter (1 after one compile); the fixtures wrote the stage.
    m.current_stage = 0;
    m
}

/// The per-stage fixture files of a case: `<role>_strategy_stages/*` or the single file.
fn fixture_stage_files(case_dir: &Path, role: &str) -> Vec<PathBuf> {
    let dir = case_dir.join(format!("{role}_strategy_stages"));
    if dir.is_dir() {
        let (mut files, _) = reshard_core::strategy::stage_files(&dir).unwrap();
        files.sort_by_key(|f| {
            let stem = f.file_stem().unwrap().to_str().unwrap().to_string();
            stem.rsplit('_').next().unwrap().parse::<u64>().unwrap()
        });
        files
    } else {
        let f = ["ckpt", "json"]
            .iter()
            .map(|e| case_dir.join(format!("{role}_strategy.{e}")))
            .find(|p| p.is_file())
            .unwrap();
        vec![f]
    }
}

fn layouts_by_name(s: &Strategy) -> BTreeMap<(String, u32), ParamLayout> {
    s.params().flat_map(|(n, e)| e.map(move |x| ((n.to_string(), x.stage), x.layout.clone()))).collect()
}

/// Every rank's box, so that layouts written differently (opt size -1 vs the same explicit
/// size) can be compared by what they mean.
fn boxes(l: &ParamLayout, shape: &[u64]) -> Vec<reshard_core::Region> {
    let r = ResolvedLayout::new(l, shape, "p", Path::new("t")).unwrap();
    (0..l.device_num()).map(|k| r.rank_box(k)).collect()
}

/// Generated stage files equal the fixture's stage files, protobuf message for message.
fn assert_same_stage_files(ours: &Written, case_dir: &Path, role: &str) {
    let theirs = fixture_stage_files(case_dir, role);
    assert_eq!(ours.stage_files.len(), theirs.len(), "stage count");
    for (o, t) in ours.stage_files.iter().zip(&theirs) {
        let (mo, mt) = (decode(o), decode(t));
        assert_eq!(mo.parallel_layout_item, mt.parallel_layout_item, "layouts of {} vs {}", o.display(), t.display());
        assert_eq!(mo, mt, "{} vs {}", o.display(), t.display());
    }
    // and the merged files parse to the same strategy
    let so = Strategy::load(&ours.merged).unwrap();
    let st = Strategy::load(&case_dir.join(format!("{role}_strategy.ckpt")))
        .or_else(|_| Strategy::load(&case_dir.join(format!("{role}_strategy.json"))))
        .unwrap();
    assert_eq!(so.to_params(), st.to_params());
    assert_eq!(so.rank_num().unwrap(), st.rank_num().unwrap());
}

// ---------------------------------------------------------------------------------------------
// equal to the hand-written MindSpore-format fixtures
// ---------------------------------------------------------------------------------------------

/// A complete llama_tiny (2 layers, no adam).
fn tiny2() -> PathBuf {
    case("complete_to_dp2mp2").join("src")
}

/// A complete llama_tiny with 4 layers, no adam.
fn tiny4() -> PathBuf {
    case("complete_to_dp2mp1pp4_opt").join("src")
}

#[test]
fn dp2mp2_equals_fixture() {
    let w = gen("dp2mp2", &tiny2(), &spec(2, 2, 1, None, ""), false);
    assert_same_stage_files(&w, &case("complete_to_dp2mp2"), "dst");
}

#[test]
fn other_single_stage_layouts_equal_fixtures() {
    for (c, dp, mp) in
        [("complete_to_mp2", 1, 2), ("dp2mp2_to_dp1mp4", 1, 4), ("dp2mp2_to_dp4mp1", 4, 1), ("dp1mp4_to_dp4mp2", 4, 2)]
    {
        let w = gen(c, &tiny2(), &spec(dp, mp, 1, None, ""), false);
        assert_same_stage_files(&w, &case(c), "dst");
    }
    // the source of dp1mp4_to_dp4mp2 has a replicated embedding: a user rule
    let w = gen("dp1mp4_emb", &tiny2(), &spec(1, 4, 1, None, "*tok_embeddings* = replicate\n"), false);
    assert_same_stage_files(&w, &case("dp1mp4_to_dp4mp2"), "src");
}

#[test]
fn optimizer_shard_with_explicit_size_equals_fixture() {
    let w = gen("opt2", &tiny2(), &spec(2, 2, 1, Some(2), ""), false);
    assert_same_stage_files(&w, &case("dp2mp2_to_dp2mp2_opt"), "dst");
    // safetensors source, opt size -1
    let c = case("safetensors_complete_to_dp2mp2_opt");
    let w = gen("opt_st", &c.join("src"), &spec(2, 2, 1, Some(-1), ""), false);
    assert_same_stage_files(&w, &c, "dst");
}

#[test]
fn pipeline_layouts_equal_fixtures() {
    // pp4 x [2,1], 4 layers one per stage, opt -1 (step 1)
    let c = case("complete_to_dp2mp1pp4_opt");
    let w = gen("pp4", &tiny4(), &spec(2, 1, 4, Some(-1), ""), false);
    assert_same_stage_files(&w, &c, "dst");
    let names: Vec<String> =
        w.stage_files.iter().map(|f| f.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(
        names,
        [
            "ckpt_strategy_rank_0.ckpt",
            "ckpt_strategy_rank_2.ckpt",
            "ckpt_strategy_rank_4.ckpt",
            "ckpt_strategy_rank_6.ckpt"
        ]
    );
    // pp2 x [1,2], 4 layers (0-1, 2-3), embedding shared by both stages
    let c = case("dp2mp2pp2_to_dp1mp2pp2");
    let w = gen("pp2_shared", &tiny4(), &spec(1, 2, 2, None, "stage *tok_embeddings* = first, last\n"), false);
    assert_same_stage_files(&w, &c, "dst");
}

#[test]
fn json_stage_files_equal_fixture() {
    // JSON pp2 x [2,2], opt size 2 (the source strategy of json_dp2mp2pp2_opt_to_dp1mp4)
    let c = case("json_dp2mp2pp2_opt_to_dp1mp4");
    let w = gen("json", &tiny2(), &spec(2, 2, 2, Some(2), ""), true);
    let theirs = fixture_stage_files(&c, "src");
    assert_eq!(w.stage_files.len(), theirs.len());
    for (o, t) in w.stage_files.iter().zip(&theirs) {
        let norm = |p: &Path| {
            let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
            v["current_stage"] = 0.into();
            v
        };
        assert_eq!(norm(o), norm(t), "{} vs {}", o.display(), t.display());
        // byte for byte, but for current_stage
        let ob = String::from_utf8(std::fs::read(o).unwrap()).unwrap();
        let tb = String::from_utf8(std::fs::read(t).unwrap()).unwrap();
        let strip = |s: &str| s.lines().filter(|l| !l.contains("\"current_stage\"")).collect::<Vec<_>>().join("\n");
        assert_eq!(strip(&ob), strip(&tb));
    }
    assert_eq!(w.merged.file_name().unwrap(), "merged_ckpt_strategy.json");
    let so = Strategy::load(&w.merged).unwrap();
    let st = Strategy::load(&c.join("src_strategy.json")).unwrap();
    assert_eq!(so.to_params(), st.to_params());
}

#[test]
fn adam_states_take_their_weights_layout() {
    // The fixture gives params size -1 and adam states size 2; on [2,2] both mean the dp
    // replicas, so every rank gets the same box. We write the weight's -1 for the states.
    let c = case("complete_to_dp2mp2_opt");
    let params = read_params(&c.join("src")).unwrap();
    let w = write(&spec(2, 2, 1, Some(-1), ""), &params, &scratch("adam"), false).unwrap();
    let ours = layouts_by_name(&Strategy::load(&w.merged).unwrap());
    let theirs = layouts_by_name(&Strategy::load(&c.join("dst_strategy.ckpt")).unwrap());
    assert_eq!(ours.len(), theirs.len());
    assert_eq!(ours.len(), 21 * 3);
    let shapes = strategy_new::shapes_of(&params);
    for ((name, stage), t) in &theirs {
        let o = &ours[&(name.clone(), *stage)];
        if name.starts_with("adam_") {
            let weight = &ours[&(name[7..].to_string(), *stage)];
            assert_eq!(o, weight, "{name} follows its weight");
            // mp-split: size 2 = the 2 dp replicas = -1. The replicated norms differ: the fixture
            // shards their states 2 ways, the weight (and so we) 4 ways.
            if name.contains("norm") {
                assert_eq!((t.opt_shard_step, t.opt_shard_size), (1, 2), "{name}");
                assert_eq!((o.opt_shard_step, o.opt_shard_size), (1, -1), "{name}");
            } else {
                assert_eq!(boxes(o, &shapes[name]), boxes(t, &shapes[name]), "{name}");
            }
        } else {
            assert_eq!(o, t, "{name}");
        }
    }
}

#[test]
fn shared_embedding_is_not_optimizer_sharded() {
    // MindSpore skips optimizer sharding for parameters shared between pipeline stages
    // (OptParamMgr::SplitParam, StageSharedParam); the hand-made fixture shards the shared
    // embedding anyway. Everything else equals it.
    let c = case("complete_to_dp2mp2pp2_opt");
    let params = read_params(&c.join("src")).unwrap();
    let s = spec(2, 2, 2, Some(-1), "stage *tok_embeddings* = first, last\n");
    let w = write(&s, &params, &scratch("pp2_opt"), false).unwrap();
    let ours = layouts_by_name(&Strategy::load(&w.merged).unwrap());
    let theirs = layouts_by_name(&Strategy::load(&c.join("dst_strategy.ckpt")).unwrap());
    assert_eq!(ours.keys().collect::<Vec<_>>(), theirs.keys().collect::<Vec<_>>());
    let shapes = strategy_new::shapes_of(&params);
    for (k, t) in &theirs {
        let o = &ours[k];
        if k.0.contains("tok_embeddings") {
            assert_eq!((o.opt_shard_step, o.opt_shard_size), (0, 0), "{k:?}");
            assert_eq!((o.dev_matrix.clone(), o.tensor_map.clone()), (t.dev_matrix.clone(), t.tensor_map.clone()));
        } else if k.0.starts_with("adam_") {
            assert_eq!(boxes(o, &shapes[&k.0]), boxes(t, &shapes[&k.0]), "{k:?}");
        } else {
            assert_eq!(o, t, "{k:?}");
        }
    }
}

#[test]
fn generate_returns_one_map_per_stage() {
    let params: Vec<(String, Vec<u64>)> =
        read_params(&tiny4()).unwrap().into_iter().map(|p| (p.name, p.shape)).collect();
    let maps = generate(&spec(2, 2, 2, None, ""), &params).unwrap();
    assert_eq!(maps.len(), 2);
    for (stage, m) in &maps {
        assert_eq!(m.current_stage, 1);
        assert!(!m.parallel_strategy_item.is_empty());
        assert!(m.parallel_strategy_item.iter().all(|i| i.parallel_strategys.stage == *stage));
        for l in &m.parallel_layout_item {
            let pl = &l.parallel_layouts;
            assert_eq!(pl.dev_matrix[0].dim, vec![2, 2]);
            assert_eq!(pl.param_split_shape, vec![proto::ParamSplitShape::default()]);
            assert_eq!(pl.indices_offset, vec![proto::IndicesOffset::default()]);
            assert_eq!(pl.field, 0);
        }
    }
    let names = |s: u32| -> Vec<String> {
        maps[s as usize].1.parallel_layout_item.iter().map(|l| l.param_name.clone()).collect()
    };
    assert!(names(0).contains(&"model.tok_embeddings.embedding_weight".to_string()));
    assert!(names(0).contains(&"model.layers.1.attention.wq.weight".to_string()));
    assert!(names(1).contains(&"model.layers.2.attention.wq.weight".to_string()));
    assert!(names(1).contains(&"lm_head.weight".to_string()));
    assert!(names(1).contains(&"model.norm_out.weight".to_string()));
    assert!(!names(0).iter().chain(&names(1)).any(|n| n == "global_step" || n == "learning_rate"));
}

// ---------------------------------------------------------------------------------------------
// complete -> new strategy -> complete is lossless
// ---------------------------------------------------------------------------------------------

type Tensors = BTreeMap<String, (String, Vec<u64>, Vec<u8>)>;

fn tensors(path: &Path) -> Tensors {
    let f = CheckpointFile::open(path, ReadOptions::default()).unwrap();
    f.index()
        .tensors
        .iter()
        .map(|t| {
            (t.name().to_string(), (t.dtype.ckpt_name().to_string(), t.shape().to_vec(), f.content(t).into_owned()))
        })
        .collect()
}

fn round_trip(name: &str, src: &Path, s: &StrategySpec, json: bool, format: Format) {
    let w = gen(&format!("{name}-strategy"), src, s, json);
    let opts = ExecuteOptions { format, sync: false, ..ExecuteOptions::default() };
    let mid = scratch(&format!("{name}-mid"));
    let plan = Plan::build(src, None, Some(&w.merged), &PlanOptions::default()).unwrap();
    let files = execute(&plan, &mid, &[], &opts).unwrap();
    assert_eq!(files.len() as u64, s.stage_devices() * u64::from(s.pp), "one file per rank");
    // the stage folder works as a strategy too
    let back = scratch(&format!("{name}-back"));
    let dir = w.merged.parent().unwrap();
    let plan = Plan::build(&mid, Some(dir), None, &PlanOptions::default()).unwrap();
    let out = execute(&plan, &back, &[], &opts).unwrap();
    assert_eq!(out.len(), 1);
    let original = read_params(src).unwrap();
    let src_file = strategy_new::complete_checkpoint(src).unwrap();
    let (a, b) = (tensors(&src_file), tensors(&out[0].path));
    assert_eq!(a.len(), original.len());
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, v) in &a {
        let got = &b[k];
        // Shapes too: 0-d tensors stay 0-d through safetensors, as MindSpore writes them.
        assert!(got == v, "{name}: {k} differs after the round trip: {got:?} against {v:?}");
    }
    for d in [w.merged.parent().unwrap(), &mid, &back] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn round_trips_are_lossless() {
    // adam states, pp2, optimizer shard over all replicas
    round_trip(
        "pp2opt",
        &case("complete_to_dp2mp2_opt").join("src"),
        &spec(2, 2, 2, Some(-1), ""),
        false,
        Format::Ckpt,
    );
    // bf16, tied embedding, a nested [1, dp*mp] split, opt size 2, JSON is not possible with
    // nested maps so protobuf
    round_trip(
        "nested",
        &case("complete_to_dp2mp2pp2_opt").join("src"),
        &spec(2, 2, 2, Some(2), "*.feed_forward.w2.weight = [1, dp*mp]\nstage *tok_embeddings* = first, last\n"),
        false,
        Format::Ckpt,
    );
    // JSON strategies, 4 layers over 4 stages, dp 4
    round_trip("json", &tiny4(), &spec(4, 1, 4, Some(-1), ""), true, Format::Ckpt);
    // safetensors in and out, vocab-dp preset
    let mut s = StrategySpec::new(1, 4, 1);
    s.rules = Rules::builtin("llama-vocab-dp").unwrap();
    round_trip("st", &case("safetensors_complete_to_dp2mp2_opt").join("src"), &s, false, Format::Safetensors);
}

// ---------------------------------------------------------------------------------------------
// invalid requests
// ---------------------------------------------------------------------------------------------

fn err_of(s: &StrategySpec, src: &Path, json: bool) -> String {
    let params = read_params(src).unwrap();
    let d = scratch("err");
    match write(s, &params, &d, json) {
        Ok(w) => panic!("expected an error, wrote {:?}", w.stage_files),
        Err(e) => e.to_string(),
    }
}

#[test]
fn mp_not_dividing_names_parameter_dim_and_size() {
    let e = err_of(&spec(1, 3, 1, None, ""), &tiny2(), false);
    assert!(
        e.contains("'model.layers.0.attention.wq.weight'")
            && e.contains("dim 0 of size 16")
            && e.contains("mp=3")
            && e.contains("[mp, 1]"),
        "{e}"
    );
    // (the embedding and head fell back to replicated, as in MindFormers)
    let e = err_of(&spec(3, 1, 1, None, "*.w2.weight = [dp, 1]\n"), &tiny2(), false);
    assert!(
        e.contains("'model.layers.0.feed_forward.w2.weight'") && e.contains("dim 0 of size 16") && e.contains("dp=3"),
        "{e}"
    );
}

#[test]
fn unknown_pattern_is_named() {
    let e = err_of(&spec(2, 2, 1, None, "\n*.attention.wqq.weight = [mp, 1]\n"), &tiny2(), false);
    assert!(
        e.contains("test.rules:2") && e.contains("'*.attention.wqq.weight'") && e.contains("matches no parameter"),
        "{e}"
    );
    let e = err_of(&spec(2, 2, 1, None, "re:^adam_m\\..* = replicate\n"), &tiny2(), false);
    assert!(e.contains("optimizer prefixes"), "{e}");
    let e = err_of(&spec(2, 2, 1, None, "stage nothing.here = 0\n"), &tiny2(), false);
    assert!(e.contains("'nothing.here'"), "{e}");
}

#[test]
fn pp_larger_than_layers_is_refused() {
    let e = err_of(&spec(1, 1, 3, None, ""), &tiny2(), false);
    assert!(e.contains("pp 3") && e.contains("number of layers (2"), "{e}");
    let e = err_of(&spec(1, 1, 2, None, "stage lm_head.weight = 2\n"), &tiny2(), false);
    assert!(e.contains("stage 2") && e.contains("pp 2"), "{e}");
    // every stage must get something
    let e = err_of(&spec(1, 1, 2, None, "stage * = 0\n"), &tiny2(), false);
    assert!(e.contains("stage 1 of 2 gets no parameter"), "{e}");
    let mut s = spec(1, 1, 2, None, "");
    s.layers_per_stage = Some(vec![1, 2]);
    let e = err_of(&s, &tiny2(), false);
    assert!(e.contains("add up to 3") && e.contains("2 layers"), "{e}");
}

#[test]
fn other_bad_requests() {
    for (dp, mp, pp) in [(0, 1, 1), (1, 0, 1), (1, 1, 0)] {
        let e = err_of(&spec(dp, mp, pp, None, ""), &tiny2(), false);
        assert!(e.contains("at least 1"), "{e}");
    }
    let e = err_of(&spec(2, 2, 1, Some(0), ""), &tiny2(), false);
    assert!(e.contains("optimizer shard size 0"), "{e}");
    // a split with the wrong number of dims
    let e = err_of(&spec(2, 2, 1, None, "*.ffn_norm.weight = [mp, 1]\n"), &tiny2(), false);
    assert!(e.contains("'model.layers.0.ffn_norm.weight'") && e.contains("2 entries") && e.contains("1 dims"), "{e}");
    // nested maps cannot be written as JSON
    let e = err_of(&spec(2, 2, 1, None, "*.w2.weight = [1, dp*mp]\n"), &tiny2(), true);
    assert!(e.contains("JSON") && e.contains("w2.weight"), "{e}");
    // a folder with other strategy files
    let d = scratch("stale");
    std::fs::write(d.join("ckpt_strategy_rank_8.ckpt"), b"x").unwrap();
    let params = read_params(&tiny2()).unwrap();
    let e = write(&spec(2, 2, 1, None, ""), &params, &d, false).unwrap_err().to_string();
    assert!(e.contains("ckpt_strategy_rank_8.ckpt") && e.contains("empty folder"), "{e}");
    // rewriting into the same folder is fine
    let d = scratch("again");
    write(&spec(2, 2, 1, None, ""), &params, &d, false).unwrap();
    write(&spec(2, 2, 1, None, ""), &params, &d, false).unwrap();
    // a sharded source has no full shapes
    let e = read_params(&case("dp2mp2_to_complete").join("src")).unwrap_err().to_string();
    assert!(e.contains("4 rank folders") && e.contains("complete"), "{e}");
    // duplicate names
    let dup = vec![ParamInfo::new("a.wq.weight", vec![4, 4]), ParamInfo::new("a.wq.weight", vec![4, 4])];
    let e = strategy_new::assign(&spec(1, 1, 1, None, ""), &dup).unwrap_err().to_string();
    assert!(e.contains("twice"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// show
// ---------------------------------------------------------------------------------------------

#[test]
fn show_gives_slices_and_replicas() {
    let params = read_params(&tiny2()).unwrap();
    let w = write(&spec(2, 2, 2, None, ""), &params, &scratch("show"), false).unwrap();
    let s = Strategy::load(&w.merged).unwrap();
    let shapes = strategy_new::shapes_of(&params);
    let r = show(&s, Some(&shapes)).unwrap();
    assert_eq!((r.stages, r.stage_devices), (2, 4));
    let row = |n: &str| r.rows.iter().find(|x| x.name == n).unwrap();
    let wq = row("model.layers.1.attention.wq.weight");
    assert_eq!(wq.stage, 1);
    assert_eq!(wq.split, "[mp(2), 1]");
    assert_eq!(wq.slice_shape, Some(vec![8, 16]));
    assert_eq!(wq.replicas, Some(2));
    // stage 1 = global ranks 4..8; ranks 4 and 6 (mp index 0) hold rows 0..8
    assert_eq!(wq.boxes[0].ranks, vec![4, 6]);
    assert_eq!(wq.boxes[0].offset, vec![0, 0]);
    assert_eq!(wq.boxes[1].offset, vec![8, 0]);
    let wo = row("model.layers.0.attention.wo.weight");
    assert_eq!((wo.slice_shape.clone(), wo.replicas), (Some(vec![16, 8]), Some(2)));
    let norm = row("model.norm_out.weight");
    assert_eq!((norm.slice_shape.clone(), norm.replicas), (Some(vec![16]), Some(4)));
    let text = r.to_text();
    assert!(text.starts_with("2 stage(s) x 4 devices = 8 ranks\n"), "{text}");
    assert!(text.contains("model.layers.1.attention.wq.weight") && text.contains("[8, 16]"), "{text}");
    let j = r.to_json();
    assert_eq!(j["rows"][0]["boxes"][0]["ranks"].as_array().unwrap().len(), 2);

    // without shapes: split only
    let r = show(&s, None).unwrap();
    assert!(r.rows.iter().all(|x| x.slice_shape.is_none() && x.boxes.is_empty()));
    assert!(r.to_text().contains('?'));

    // JSON strategies carry tensor_shape; optimizer shard shows in the slice
    let w = write(&spec(2, 2, 1, Some(-1), ""), &params, &scratch("show_json"), true).unwrap();
    let s = Strategy::load(&w.stage_files[0]).unwrap();
    let r = show(&s, None).unwrap();
    let wq = r.rows.iter().find(|x| x.name == "model.layers.0.attention.wq.weight").unwrap();
    assert_eq!((wq.slice_shape.clone(), wq.replicas), (Some(vec![4, 16]), Some(1)));
    assert!(r.to_text().contains("2 (size -1, step 2)"), "{}", r.to_text());

    // a shape that does not fit is reported in the row, not fatal
    let mut bad = shapes.clone();
    bad.insert("lm_head.weight".into(), vec![31, 16]);
    let s =
        Strategy::load(&write(&spec(2, 2, 1, None, ""), &params, &scratch("show_bad"), false).unwrap().merged).unwrap();
    let r = show(&s, Some(&bad)).unwrap();
    let head = r.rows.iter().find(|x| x.name == "lm_head.weight").unwrap();
    assert!(head.error.as_deref().unwrap().contains("lm_head.weight"));
    assert!(r.to_text().contains("does not fit"));
}

#[test]
fn json_options_for_the_c_abi() {
    let out = scratch("opts");
    let text = serde_json::json!({
        "from": tiny4(), "dp": 2, "mp": 2, "pp": 2, "optimizer_shard": true,
        "opt_shard_threshold_kb": 0, "rules_text": "stage *tok_embeddings* = first, last\n",
        "out": out, "json": true
    })
    .to_string();
    let o = strategy_new::NewOptions::from_json(&text).unwrap();
    assert_eq!((o.opt_shard_size, o.preset.as_str()), (-1, "llama"));
    let w = o.run().unwrap();
    assert_eq!(w.stage_files.len(), 2);
    assert!(w.merged.ends_with("merged_ckpt_strategy.json"));
    let s = Strategy::load(&out).unwrap();
    assert_eq!(s.stages_of("model.tok_embeddings.embedding_weight"), vec![0, 1]);
    let e = strategy_new::NewOptions::from_json(r#"{"from": "x", "dp": 1, "mp": 1, "out": "y", "mp_size": 2}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("mp_size"), "{e}");
    let e = strategy_new::NewOptions::from_json(r#"{"from": "x", "dp": 1, "mp": 1, "out": "y", "preset": "gpt"}"#)
        .unwrap()
        .run()
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown built-in rule set 'gpt'"), "{e}");
}
