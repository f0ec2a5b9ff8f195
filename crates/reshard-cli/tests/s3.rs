//! Object storage against a real S3 server on loopback (SeaweedFS), started by `tests/s3/run.sh`,
//! which runs these tests with `--ignored` and passes the server in `RESHARD_S3_TEST_ENDPOINT`
//! (and its folder, for the kill-and-restart test, in `RESHARD_S3_TEST_DIR`).
//!
//! The tests check the store with `curl --aws-sigv4`, never with reshard's own client, and count
//! the bytes the server sends through a small TCP proxy of their own.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod util;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reshard_core::checkpoint::TensorHeader;
use reshard_core::{ckpt, DType};
use util::{assert_refused, files_under, fixture, text, Scratch, BIN};

const KEY: &str = "reshardtestkey";
const SECRET: &str = "reshardtestsecret";

fn endpoint() -> String {
    std::env::var("RESHARD_S3_TEST_ENDPOINT")
        .unwrap_or_else(|_| panic!("RESHARD_S3_TEST_ENDPOINT is not set: run these tests with bash tests/s3/run.sh"))
}

/// `curl` signed with the test keys against `endpoint`; returns (HTTP status, body).
fn curl(endpoint: &str, args: &[&str], path: &str) -> (u32, Vec<u8>) {
    let out = Command::new("curl")
        .args([
            "-s",
            "-w",
            "\n%{http_code}",
            "--aws-sigv4",
            "aws:amz:us-east-1:s3",
            "--user",
            &format!("{KEY}:{SECRET}"),
        ])
        .args(args)
        .arg(format!("{endpoint}/{path}"))
        .output()
        .unwrap();
    let mut body = out.stdout;
    let nl = body.iter().rposition(|&b| b == b'\n').unwrap();
    let code = text(&body[nl + 1..]).trim().parse().unwrap_or(0);
    body.truncate(nl);
    (code, body)
}

/// A new bucket for one test.
fn bucket(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let name = format!("t{}-{}-{tag}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
    let (code, body) = curl(&endpoint(), &["-X", "PUT"], &name);
    assert_eq!(code, 200, "create bucket {name}: {}", text(&body));
    name
}

/// Uploads every file under `dir` to `bucket/prefix/...`.
fn upload_dir(bucket: &str, prefix: &str, dir: &Path) {
    for f in files_under(dir) {
        let rel = f.strip_prefix(dir).unwrap().to_str().unwrap();
        upload(bucket, &format!("{prefix}/{rel}"), &f);
    }
}

/// A new bucket holding the `src` folder of conformance case `case` under `src/`, and each
/// (key, file or folder of the case) of `more`; returns (the case's folder, the bucket).
fn case_in_bucket(tag: &str, case: &str, more: &[(&str, &str)]) -> (PathBuf, String) {
    let dir = fixture(&format!("conformance/{case}"));
    let b = bucket(tag);
    for (key, rel) in [("src", "src")].iter().chain(more) {
        let from = dir.join(rel);
        if from.is_dir() {
            upload_dir(&b, key, &from);
        } else {
            upload(&b, key, &from);
        }
    }
    (dir, b)
}

fn upload(bucket: &str, key: &str, file: &Path) {
    let (code, body) = curl(&endpoint(), &["-T", file.to_str().unwrap()], &format!("{bucket}/{key}"));
    assert_eq!(code, 200, "upload {key}: {}", text(&body));
}

/// The object's bytes, or None when there is none.
fn download(bucket: &str, key: &str) -> Option<Vec<u8>> {
    let (code, body) = curl(&endpoint(), &[], &format!("{bucket}/{key}"));
    (code == 200).then_some(body)
}

/// Keys under `prefix` (ListObjectsV2, one page: the tests hold few objects).
fn keys(bucket: &str, prefix: &str) -> Vec<String> {
    let (code, body) = curl(&endpoint(), &[], &format!("{bucket}?list-type=2&prefix={}", prefix.replace('/', "%2F")));
    assert_eq!(code, 200, "{}", text(&body));
    let body = text(&body);
    let mut out: Vec<String> =
        body.split("<Key>").skip(1).filter_map(|s| s.split("</Key>").next()).map(str::to_string).collect();
    out.sort();
    out
}

/// Multipart uploads still open in `bucket` (ListMultipartUploads).
fn open_uploads(bucket: &str) -> Vec<String> {
    let (code, body) = curl(&endpoint(), &[], &format!("{bucket}?uploads="));
    assert_eq!(code, 200, "{}", text(&body));
    text(&body).split("<Upload>").skip(1).map(|s| s.split("</Upload>").next().unwrap_or("").to_string()).collect()
}

/// The reshard binary with the test's store configuration (`endpoint` may be a proxy).
fn reshard_at(endpoint: &str, args: &[&std::ffi::OsStr], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(BIN);
    c.args(args)
        .env("RUST_BACKTRACE", "0")
        .env("AWS_ACCESS_KEY_ID", KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .env("AWS_ENDPOINT_URL", endpoint)
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_REGION", "us-east-1")
        .env("RESHARD_S3_RETRIES", "2")
        .env("RESHARD_S3_RETRY_SECONDS", "5")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

/// `reshard_at` with owned arguments.
fn reshard_at_strings(endpoint: &str, args: &[String]) -> Output {
    reshard_at(endpoint, &args.iter().map(std::ffi::OsStr::new).collect::<Vec<_>>(), &[])
}

/// `--src_ckpt_dir s3://BUCKET/src --src_ckpt_strategy s3://BUCKET/SRC_STRATEGY
/// --dst_ckpt_strategy s3://BUCKET/DST_STRATEGY` after `command`.
fn from_bucket(command: &[&str], bucket: &str, src_strategy: &str, dst_strategy: &str) -> Vec<String> {
    let mut a: Vec<String> = command.iter().map(|c| c.to_string()).collect();
    a.extend([
        "--src_ckpt_dir".into(),
        format!("s3://{bucket}/src"),
        "--src_ckpt_strategy".into(),
        format!("s3://{bucket}/{src_strategy}"),
        "--dst_ckpt_strategy".into(),
        format!("s3://{bucket}/{dst_strategy}"),
    ]);
    a
}

/// Asserts that `bucket/out/rank_R/checkpoint_R.ckpt` equals `local/rank_R/checkpoint_R.ckpt` for
/// ranks 0 and 1.
#[track_caller]
fn assert_uploaded_as_local(bucket: &str, local: &Path) {
    for r in 0..2 {
        let rel = format!("rank_{r}/checkpoint_{r}.ckpt");
        assert!(download(bucket, &format!("out/{rel}")).unwrap() == std::fs::read(local.join(&rel)).unwrap());
    }
}

macro_rules! args {
    ($($a:expr),* $(,)?) => {
        &[$(std::ffi::OsStr::new($a)),*]
    };
}

#[track_caller]
fn assert_ok(out: &Output) {
    assert!(out.status.success(), "reshard failed:\n{}\n{}", text(&out.stderr), text(&out.stdout));
}

/// Conformance cases (MindSpore-made fixtures) with the sources on S3, the outputs on S3, and
/// both: every output equals MindSpore's byte for byte; `verify` passes on the S3 folder; a rerun
/// keeps every object.
#[test]
#[ignore = "needs a SeaweedFS server: bash tests/s3/run.sh"]
fn s3_conformance_sources_outputs_and_both() {
    let ep = endpoint();
    for case in ["dp1mp4_to_dp4mp2", "complete_to_dp2mp2", "dev222_opt_to_dp2mp2", "safetensors_dp2mp2_to_dp1mp4"] {
        let dir = fixture(&format!("conformance/{case}"));
        let case_json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("case.json")).unwrap()).unwrap();
        let b = bucket("conf");
        upload_dir(&b, "src", &dir.join("src"));
        let mut strategy_args: Vec<String> = Vec::new();
        for (flag, key) in [("--src_ckpt_strategy", "src_strategy"), ("--dst_ckpt_strategy", "dst_strategy")] {
            if let Some(name) = case_json[key].as_str() {
                upload(&b, name, &dir.join(name));
                strategy_args.extend([flag.to_string(), format!("s3://{b}/{name}")]);
            }
        }
        for (flag, key) in [("--output_format", "output_format"), ("--prefix", "prefix")] {
            if let Some(v) = case_json[key].as_str() {
                strategy_args.extend([flag.to_string(), v.to_string()]);
            }
        }
        let expected = files_under(&dir.join("expected"));
        let scratch = Scratch::new(&format!("s3-conf-{case}"));
        let local_src = dir.join("src");
        let runs: [(String, String); 3] = [
            (format!("s3://{b}/src"), scratch.join("from_s3").to_str().unwrap().to_string()),
            (local_src.to_str().unwrap().to_string(), format!("s3://{b}/to_s3")),
            (format!("s3://{b}/src"), format!("obs://{b}/both")),
        ];
        for (src, dst) in &runs {
            let mut a: Vec<&std::ffi::OsStr> =
                args!["transform", "-q", "--src_ckpt_dir", src, "--dst_ckpt_dir", dst].to_vec();
            a.extend(strategy_args.iter().map(std::ffi::OsStr::new));
            assert_ok(&reshard_at(&ep, &a, &[]));
            for e in &expected {
                let rel = e.strip_prefix(dir.join("expected")).unwrap().to_str().unwrap();
                let want = std::fs::read(e).unwrap();
                let got = match dst.split_once("://") {
                    Some((_, rest)) => {
                        let prefix = rest.split_once('/').unwrap().1;
                        download(&b, &format!("{prefix}/{rel}"))
                            .unwrap_or_else(|| panic!("{case}: no object {dst}/{rel}"))
                    }
                    None => std::fs::read(Path::new(dst).join(rel)).unwrap(),
                };
                assert!(got == want, "{case}: {src} -> {dst}: {rel} differs from MindSpore's");
            }
            if dst.contains("://") {
                let v = reshard_at(&ep, args!["verify", dst], &[]);
                assert_ok(&v);
                assert_eq!(text(&v.stdout).lines().filter(|l| l.starts_with("ok ")).count(), expected.len());
                // A rerun keeps every object (size, ETag and crc in the manifest).
                let mut a: Vec<&std::ffi::OsStr> =
                    args!["transform", "--src_ckpt_dir", src, "--dst_ckpt_dir", dst].to_vec();
                a.extend(strategy_args.iter().map(std::ffi::OsStr::new));
                let again = reshard_at(&ep, &a, &[]);
                assert_ok(&again);
                let err = text(&again.stderr);
                assert!(err.contains(&format!("kept {} file(s)", expected.len())), "{err}");
            }
        }
        // `plan` and `inspect` read from the store too.
        let src_url = format!("s3://{b}/src");
        let mut a: Vec<&std::ffi::OsStr> = args!["plan", "--src_ckpt_dir", &src_url].to_vec();
        a.extend(strategy_args.iter().map(std::ffi::OsStr::new));
        let p = reshard_at(&ep, &a, &[]);
        assert_ok(&p);
        assert!(text(&p.stdout).contains("rank 0: fetches"), "{}", text(&p.stdout));
        let first = case_json["src_files"][0].as_str().unwrap();
        let i = reshard_at(&ep, args!["inspect", &format!("s3://{b}/src/{first}")], &[]);
        assert_ok(&i);
        assert!(text(&i.stdout).contains("tensors,"), "{}", text(&i.stdout));
    }
}

/// Wrong keys, a missing bucket, no server: exit 1, one line naming the URL and the store's
/// error code, nothing written.
#[test]
#[ignore = "needs a SeaweedFS server: bash tests/s3/run.sh"]
fn s3_errors_name_the_url_and_the_code() {
    let ep = endpoint();
    let (_, b) = case_in_bucket("err", "dp1mp4_to_dp4mp2", &[]);
    let scratch = Scratch::new("s3-errors");
    let dst = scratch.join("out");
    let src = format!("s3://{b}/src");
    let dead = {
        // A port nothing listens on.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    // (name, endpoint, environment, source, what the message names)
    type Case<'a> = (&'a str, String, Vec<(&'a str, &'a str)>, String, Vec<&'a str>);
    let cases: Vec<Case> = vec![
        (
            "bad credentials",
            ep.clone(),
            vec![("AWS_SECRET_ACCESS_KEY", "wrong")],
            src.clone(),
            vec!["SignatureDoesNotMatch"],
        ),
        ("unknown key", ep.clone(), vec![("AWS_ACCESS_KEY_ID", "nobody")], src.clone(), vec!["InvalidAccessKeyId"]),
        (
            "missing bucket",
            ep.clone(),
            vec![],
            format!("s3://no-such-bucket-{}/src", std::process::id()),
            vec!["NoSuchBucket"],
        ),
        ("no server", dead, vec![], src.clone(), vec!["connection failed"]),
    ];
    util::check_rows(
        &cases,
        |c| c.0.to_string(),
        |(_, endpoint, env, src, needles)| {
            let out = reshard_at(endpoint, args!["transform", "--src_ckpt_dir", src, "--dst_ckpt_dir", &dst], env);
            let mut n = needles.clone();
            n.push(src.as_str());
            n.push("store error code");
            assert_refused(&out, &n);
            util::assert_nothing_written(&dst);
        },
    );
    // Outputs into a bucket with wrong keys: refused, no object (a HEAD's answer has no body,
    // so the code is the HTTP status's).
    let complete = fixture("conformance/complete_to_dp2mp2/src");
    let out = reshard_at(
        &ep,
        args!["transform", "--src_ckpt_dir", complete.to_str().unwrap(), "--dst_ckpt_dir", &format!("s3://{b}/out")],
        &[("AWS_SECRET_ACCESS_KEY", "wrong")],
    );
    assert_refused(&out, &[&format!("s3://{b}/out"), "store error code AccessDenied"]);
    assert!(keys(&b, "out/").is_empty());
}

/// A TCP proxy in front of the server that counts the bytes each way, and can hold the upload
/// direction once `hold_after_up` bytes went up (to stop a run in the middle of an upload).
struct Proxy {
    port: u16,
    down: Arc<AtomicU64>,
    up: Arc<AtomicU64>,
    hold_after_up: Arc<AtomicU64>,
    held: Arc<AtomicBool>,
    release: Arc<AtomicBool>,
}

impl Proxy {
    fn start(target: &str) -> Proxy {
        let target = target.trim_start_matches("http://").to_string();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let p = Proxy {
            port,
            down: Arc::default(),
            up: Arc::default(),
            hold_after_up: Arc::new(AtomicU64::new(u64::MAX)),
            held: Arc::default(),
            release: Arc::default(),
        };
        let (down, up, hold, held, release) =
            (p.down.clone(), p.up.clone(), p.hold_after_up.clone(), p.held.clone(), p.release.clone());
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(client) = c else { continue };
                let Ok(server) = TcpStream::connect(&target) else { continue };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let d = down.clone();
                std::thread::spawn(move || pump(s2, c2, &d, None));
                let gate = (hold.clone(), held.clone(), release.clone());
                let u = up.clone();
                std::thread::spawn(move || pump(client, server, &u, Some(gate)));
            }
        });
        p
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Waits (30 s at the most) until the upload direction is held; whether it is.
    fn wait_held(&self) -> bool {
        for _ in 0..600 {
            if self.held.load(Ordering::Relaxed) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.held.load(Ordering::Relaxed)
    }
}

type Gate = (Arc<AtomicU64>, Arc<AtomicBool>, Arc<AtomicBool>);

/// Copies `from` to `to`, counting; with a gate, stops forwarding (for at most 60 s) once the
/// count passes the threshold, until released.
fn pump(mut from: TcpStream, mut to: TcpStream, count: &AtomicU64, gate: Option<Gate>) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let total = count.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        if let Some((hold, held, release)) = &gate {
            if total > hold.load(Ordering::Relaxed) {
                held.store(true, Ordering::Relaxed);
                for _ in 0..600 {
                    if release.load(Ordering::Relaxed) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// A synthetic complete model: `layers` x 4 float32 [rows, cols] matrices (row-split in the
/// strategies), pseudo-random content.
fn write_model(path: &Path, layers: usize, rows: u64, cols: u64) -> Vec<String> {
    use std::os::unix::fs::FileExt;
    let names: Vec<String> =
        (0..layers).flat_map(|l| ["wq", "wk", "w1", "w2"].map(|w| format!("layers.{l}.{w}.weight"))).collect();
    let headers: Vec<TensorHeader> = names
        .iter()
        .map(|n| TensorHeader {
            name: n.clone(),
            dtype: DType::Float32,
            dims: vec![rows, cols],
            nbytes: rows * cols * 4,
        })
        .collect();
    let layout = ckpt::layout(&headers, ckpt::CHUNK_BYTES);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let f = std::fs::File::create(path).unwrap();
    for (off, b) in &layout.fixed {
        f.write_all_at(b, *off).unwrap();
    }
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for runs in &layout.content {
        for r in runs {
            let buf: Vec<u8> = (0..r.len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            f.write_all_at(&buf, r.file_offset).unwrap();
        }
    }
    names
}

/// A JSON strategy of `mp` ranks, every matrix split by rows.
fn write_strategy(path: &Path, names: &[String], mp: u64, rows: u64, cols: u64) {
    let items: serde_json::Map<String, serde_json::Value> = names
        .iter()
        .map(|n| {
            (
                n.clone(),
                serde_json::json!({"dev_matrix": [mp], "tensor_map": [0, -1], "tensor_shape": [rows, cols], "field": 0,
                                   "opt_weight_shard_step": 0, "opt_weight_shard_size": 0}),
            )
        })
        .collect();
    let v = serde_json::json!({"current_stage": 0,
        "parallel_strategy_item": {"op": {"stage": 0, "parallel_strategy": [[mp]]}},
        "parallel_layout_item": items});
    std::fs::write(path, serde_json::to_vec(&v).unwrap()).unwrap();
}

/// A local `transform -q` of `src` into `out` (with `src_strategy` when the source is
/// distributed): the bytes the store's conversions are compared with.
fn transform_local(src: &Path, src_strategy: Option<&Path>, dst_strategy: &Path, out: &Path) {
    let mut args = util::argv!["transform", "-q", "--src_ckpt_dir", src];
    if let Some(s) = src_strategy {
        args.extend(util::argv!["--src_ckpt_strategy", s]);
    }
    args.extend(util::argv!["--dst_ckpt_strategy", dst_strategy, "--dst_ckpt_dir", out]);
    assert_ok(&util::reshard(args));
}

/// A new scratch folder (`tag`) with a sharded source (8 ranks, rows split) of about
/// `layers` x 4 x rows x cols x 4 bytes in `src8`, its strategy and a 4-rank destination
/// strategy: (scratch, source, source strategy, destination strategy).
fn sharded_model(tag: &str, layers: usize, rows: u64, cols: u64) -> (Scratch, PathBuf, PathBuf, PathBuf) {
    let scratch = Scratch::new(tag);
    let names = write_model(&scratch.join("complete/rank_0/model.ckpt"), layers, rows, cols);
    let (s8, s4) = (scratch.join("mp8.json"), scratch.join("mp4.json"));
    write_strategy(&s8, &names, 8, rows, cols);
    write_strategy(&s4, &names, 4, rows, cols);
    let src8 = scratch.join("src8");
    transform_local(&scratch.join("complete"), None, &s8, &src8);
    std::fs::remove_dir_all(src8.join("merged_strategy")).ok();
    for f in files_under(&src8) {
        if f.file_name().unwrap() == "reshard_manifest.json" {
            std::fs::remove_file(f).unwrap();
        }
    }
    (scratch, src8, s8, s4)
}

/// [`sharded_model`] of `layers` layers of 1024 x 512 (in scratch folder `scratch_tag`) in a new
/// bucket: its 8-rank sources under `src/`, its strategies as `mp8.json` and `mp4.json`.
/// Returns (scratch, bucket, src8, mp8, mp4).
fn model_in_bucket(scratch_tag: &str, tag: &str, layers: usize) -> (Scratch, String, PathBuf, PathBuf, PathBuf) {
    let (scratch, src8, s8, s4) = sharded_model(scratch_tag, layers, 1024, 512);
    let b = bucket(tag);
    upload_dir(&b, "src", &src8);
    upload(&b, "mp8.json", &s8);
    upload(&b, "mp4.json", &s4);
    (scratch, b, src8, s8, s4)
}

/// `transform --ranks RANK` of 8 -> 4 from `s3://BUCKET/src` (strategies `mp8.json` and
/// `mp4.json` beside it) into the local `dst`, through `endpoint`.
fn transform_rank_8_to_4(endpoint: &str, b: &str, dst: &Path, rank: u64) -> Output {
    reshard_at(
        endpoint,
        args![
            "transform",
            "--src_ckpt_dir",
            &format!("s3://{b}/src"),
            "--src_ckpt_strategy",
            &format!("s3://{b}/mp8.json"),
            "--dst_ckpt_strategy",
            &format!("s3://{b}/mp4.json"),
            "--dst_ckpt_dir",
            dst,
            "--ranks",
            &rank.to_string()
        ],
        &[],
    )
}

/// 8 -> 4 from the store: each destination rank, converted alone through a counting proxy,
/// receives at most 1.05x the bytes its plan reads (tables of contents, HTTP headers and the
/// strategy objects included), and its output equals the local conversion's.
#[test]
#[ignore = "needs a SeaweedFS server: bash tests/s3/run.sh"]
fn s3_bytes_fetched_are_close_to_the_ranks_share() {
    let ep = endpoint();
    let (scratch, b, src8, s8, s4) = model_in_bucket("s3-bytes", "bytes", 4);
    let local = scratch.join("local");
    transform_local(&src8, Some(&s8), &s4, &local);
    let plan = reshard_at_strings(&ep, &from_bucket(&["plan", "--json"], &b, "mp8.json", "mp4.json"));
    assert_ok(&plan);
    let plan: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    for r in 0..4u64 {
        let proxy = Proxy::start(&ep);
        let dst = scratch.join(format!("from_s3_{r}"));
        assert_ok(&transform_rank_8_to_4(&proxy.url(), &b, &dst, r));
        let rel = format!("rank_{r}/checkpoint_{r}.ckpt");
        assert!(std::fs::read(dst.join(&rel)).unwrap() == std::fs::read(local.join(&rel)).unwrap(), "{rel} differs");
        let needs = plan["ranks"][r as usize]["bytes_fetched"].as_u64().unwrap();
        let got = proxy.down.load(Ordering::Relaxed);
        eprintln!("rank {r}: plan reads {needs} bytes, the server sent {got}");
        assert!(needs > 4 << 20, "the model is too small for the check: {needs}");
        assert!((got as f64) <= 1.05 * needs as f64, "rank {r}: the server sent {got} bytes for a share of {needs}");
    }
}

/// The runs a destination rank reads are joined across tensors into large GETs started ahead of
/// the copy: 8 -> 4 of 32 tensors, where each rank reads 256 KiB of every tensor from each of two
/// source objects (8 MiB from each), takes a handful of GETs, not one per tensor and source (64).
#[test]
#[ignore = "needs a SeaweedFS server: bash tests/s3/run.sh"]
fn s3_content_is_fetched_in_few_large_gets() {
    let ep = endpoint();
    let (scratch, b, ..) = model_in_bucket("s3-gets", "gets", 8);
    let out = transform_rank_8_to_4(&ep, &b, &scratch.join("out"), 1);
    assert_ok(&out);
    let err = text(&out.stderr);
    let ahead: u64 = err
        .split(" ranged GETs ahead of the copy")
        .next()
        .and_then(|s| s.rsplit('(').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no GET count in:\n{err}"));
    assert!((1..=6).contains(&ahead), "{ahead} GETs ahead of the copy for 2 x 8 MiB of runs:\n{err}");
}

/// Outputs are streamed to the store part by part from memory, with no local staging file:
/// with the temporary folders under a regular file (nothing can be created there), 8 -> complete
/// (one 32 MiB output: five parts, the first rewritten and the last appended to by the codec) as
/// .ckpt and safetensors, with and without crc, equals the local conversion byte for byte.
#[test]
#[ignore = "needs a SeaweedFS server: bash tests/s3/run.sh"]
fn s3_outputs_are_streamed_without_staging() {
    let ep = endpoint();
    let (scratch, src8, s8, _) = sharded_model("s3-stream", 4, 1024, 512);
    let b = bucket("stream");
    let not_a_dir = scratch.join("plain_file");
    std::fs::write(&not_a_dir, b"x").unwrap();
    let no_tmp = not_a_dir.join("tmp");
    for (format, crc) in [("ckpt", false), ("ckpt", true), ("safetensors", false), ("safetensors", true)] {
        let tag = format!("{format}{}", if crc { "_crc" } else { "" });
        let mut argv: Vec<String> =
            ["transform", "-q", "--no-sync", "--output_format", format, "--src_ckpt_dir"].map(String::from).to_vec();
        argv.push(src8.to_str().unwrap().into());
        argv.extend(["--src_ckpt_strategy".into(), s8.to_str().unwrap().into()]);
        if crc {
            argv.push("--crc".into());
        }
        argv.push("--dst_ckpt_dir".into());
        let local = scratch.join(format!("local_{tag}"));
        let mut l = argv.clone();
        l.push(local.to_str().unwrap().into());
        let l: Vec<&std::ffi::OsStr> = l.iter().map(std::ffi::OsStr::new).collect();
        assert_ok(&reshard_at(&ep, &l, &[]));
        let mut r = argv.clone();
        r.push(format!("s3://{b}/{tag}"));
        let r: Vec<&std::ffi::OsStr> = r.iter().map(std::ffi::OsStr::new).collect();
        let no_tmp = no_tmp.to_str().unwrap();
        assert_ok(&reshard_at(&ep, &r, &[("TMPDIR", no_tmp), ("RESHARD_STAGING_DIR", no_tmp)]));
        let name = format!("rank_0/checkpoint_0.{format}");
        let want = std::fs::read(local.join(&name)).unwrap();
        assert!(want.len() > 4 * (8 << 20), "{tag}: {} bytes is too small for the check", want.len());
        let got = download(&b, &format!("{tag}/{name}")).unwrap_or_else(|| panic!("{tag}: no {name} uploaded"));
        assert!(
            got == want,
            "{tag}: the uploaded {name} differs from the local one ({} vs {} bytes)",
            got.len(),
            want.len()
        );
        assert!(open_uploads(&b).is_empty(), "{tag}: uploads left open: {:?}", open_uploads(&b));
    }
}

/// A safetensors output whose header is longer than a part (150,000 tensors: a header of about
/// 17 MB over three parts), written with `--crc`: the codec rewrites the whole header at the end
/// with the crc, so every part the header spans is kept until then (only the first was, and the
/// rewrite failed "after its part was already sent"). The object equals the local output.
#[test]
#[ignore = "needs a SeaweedFS server: bash tests/s3/run.sh"]
fn s3_a_safetensors_header_longer_than_a_part_is_rewritten_with_its_crc() {
    let ep = endpoint();
    let scratch = Scratch::new("s3-long-header");
    let n = 150_000usize;
    let mut header = String::from("{");
    for i in 0..n {
        let at = i * 64;
        header.push_str(&format!(
            "{}\"t{i:06}\":{{\"dtype\":\"F32\",\"shape\":[16],\"data_offsets\":[{at},{}]}}",
            if i == 0 { "" } else { "," },
            at + 64
        ));
    }
    header.push('}');
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header.as_bytes());
    file.extend((0..n * 64).map(|i| (i % 251) as u8));
    let src = scratch.join("src");
    std::fs::create_dir_all(src.join("rank_0")).unwrap();
    std::fs::write(src.join("rank_0/model.safetensors"), &file).unwrap();
    let b = bucket("longheader");
    let local = scratch.join("local");
    let run = |dst: &std::ffi::OsStr| {
        reshard_at(
            &ep,
            args![
                "transform",
                "-q",
                "--no-sync",
                "--output_format",
                "safetensors",
                "--crc",
                "--src_ckpt_dir",
                &src,
                "--dst_ckpt_dir",
                dst
            ],
            &[],
        )
    };
    assert_ok(&run(local.as_os_str()));
    let url = format!("s3://{b}/out");
    assert_ok(&run(std::ffi::OsStr::new(&url)));
    let name = "rank_0/checkpoint_0.safetensors";
    let want = std::fs::read(local.join(name)).unwrap();
    let head = u64::from_le_bytes(want[..8].try_into().unwrap());
    assert!(head > 8 << 20 && want.len() as u64 > 2 * (8 << 20), "header {head} of {} bytes: too small", want.len());
    let got = download(&b, &format!("out/{name}")).unwrap_or_else(|| panic!("no {name} uploaded"));
    assert!(got == want, "the uploaded {name} differs from the local one ({} vs {} bytes)", got.len(), want.len());
    assert!(open_uploads(&b).is_empty(), "uploads left open: {:?}", open_uploads(&b));
}

/// A run stopped (SIGTERM) in the middle of a multipart upload leaves no object under a final
/// name and no open upload; the server killed in the middle of an upload gives a clean error
/// naming the URL; after a restart a rerun finishes, keeping what was complete.
#[test]
#[ignore = "needs a SeaweedFS server: bash tests/s3/run.sh"]
fn s3_interrupted_uploads_leave_nothing_and_a_rerun_finishes() {
    let ep = endpoint();
    // About 40 MB: two outputs of 20 MB, three parts each.
    let (scratch, src8, s8, s4) = sharded_model("s3-kill", 5, 1024, 512);
    let _ = s8;
    let s2 = scratch.join("mp2.json");
    let names: Vec<String> =
        (0..5).flat_map(|l| ["wq", "wk", "w1", "w2"].map(|w| format!("layers.{l}.{w}.weight"))).collect();
    write_strategy(&s2, &names, 2, 1024, 512);
    let b = bucket("kill");
    let local = scratch.join("local");
    let base = |dst: &str| -> Vec<String> {
        [
            "transform",
            "--src_ckpt_dir",
            src8.to_str().unwrap(),
            "--src_ckpt_strategy",
            s8.to_str().unwrap(),
            "--dst_ckpt_strategy",
            s2.to_str().unwrap(),
            "--dst_ckpt_dir",
            dst,
            "--threads",
            "1",
        ]
        .map(str::to_string)
        .to_vec()
    };
    assert_ok(&reshard_at_strings(&ep, &base(local.to_str().unwrap())));
    let _ = s4;

    // 1. SIGTERM while the upload is held in the middle of its second part.
    let proxy = Proxy::start(&ep);
    proxy.hold_after_up.store(12 << 20, Ordering::Relaxed);
    let dst = format!("s3://{b}/out");
    let mut child = Command::new(BIN)
        .args(base(&dst))
        .arg("-q")
        .env("AWS_ACCESS_KEY_ID", KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .env("AWS_ENDPOINT_URL", proxy.url())
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_REGION", "us-east-1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(proxy.wait_held(), "the upload never reached 12 MiB");
    // kill(1) by process id.
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    proxy.release.store(true, Ordering::Relaxed);
    let status = child.wait().unwrap();
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert_eq!(status.code(), Some(128 + 15), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let left: Vec<String> = keys(&b, "out/").into_iter().filter(|k| k.ends_with(".ckpt")).collect();
    for k in &left {
        // Only complete outputs (the run had one worker: at most the first rank finished).
        let rel = k.strip_prefix("out/").unwrap();
        assert!(download(&b, k).unwrap() == std::fs::read(local.join(rel)).unwrap(), "{k} is not complete");
    }
    assert!(left.len() < 2, "the stopped run uploaded everything: {left:?}");
    assert_eq!(open_uploads(&b), Vec::<String>::new(), "the stopped run left multipart uploads open");

    // 2. The server killed in the middle of an upload: a clean error naming the URL.
    if let (Ok(dir), Ok(pid)) = (std::env::var("RESHARD_S3_TEST_DIR"), std::env::var("RESHARD_S3_TEST_PID")) {
        let b2 = bucket("kill2");
        let dst2 = format!("s3://{b2}/out");
        let proxy = Proxy::start(&ep);
        proxy.hold_after_up.store(12 << 20, Ordering::Relaxed);
        let mut args: Vec<String> = base(&dst2);
        args.push("-q".into());
        let ep2 = proxy.url();
        let run = std::thread::spawn(move || reshard_at_strings(&ep2, &args));
        // Killed once held, or after 30 s without (then the run may have finished already).
        proxy.wait_held();
        Command::new("kill").args(["-KILL", &pid]).status().unwrap();
        std::thread::sleep(Duration::from_millis(500));
        proxy.release.store(true, Ordering::Relaxed);
        let out = run.join().unwrap();
        assert_refused(&out, &[&dst2, "store error code"]);
        // Restart (same folder and ports); run.sh stops the new process by the id in DIR/pid.
        let started = Command::new("bash").arg(util::repo().join("tests/s3/weed.sh")).arg(&dir).output().unwrap();
        assert!(started.status.success(), "restart: {}", text(&started.stderr));
        assert_ok(&reshard_at_strings(&ep, &base(&dst2)));
        assert_uploaded_as_local(&b2, &local);
        assert_ok(&reshard_at(&ep, args!["verify", &dst2], &[]));
    }

    // 3. The rerun after the stop finishes, keeping what was complete.
    let rerun = reshard_at_strings(&ep, &base(&dst));
    assert_ok(&rerun);
    let err = text(&rerun.stderr);
    if !left.is_empty() {
        assert!(err.contains("kept 1 file(s)"), "{err}");
    }
    assert_uploaded_as_local(&b, &local);
    assert_eq!(open_uploads(&b), Vec::<String>::new());
}

/// `auto --load_checkpoint s3://...`: every rank of dp1mp4_to_dp4mp2, one process each (one at a
/// time), converts what it needs from the store into the local output folder, equal to
/// MindSpore's output.
#[test]
#[ignore = "needs a SeaweedFS server: bash tests/s3/run.sh"]
fn s3_auto_load_checkpoint() {
    let ep = endpoint();
    let (case, b) = case_in_bucket("auto", "dp1mp4_to_dp4mp2", &[("src_strategy.ckpt", "src_strategy.ckpt")]);
    let scratch = Scratch::new("s3-auto");
    let out = scratch.join("output");
    let strategy = out.join("strategy");
    std::fs::create_dir_all(&strategy).unwrap();
    for r in 0..8 {
        std::fs::copy(case.join("dst_strategy.ckpt"), strategy.join(format!("ckpt_strategy_rank_{r}.ckpt"))).unwrap();
    }
    for r in 0..8u32 {
        let o = reshard_at(
            &ep,
            args![
                "auto",
                "--timeout",
                "30",
                "--load_checkpoint",
                &format!("s3://{b}/src"),
                "--src_strategy_path_or_dir",
                &format!("s3://{b}/src_strategy.ckpt"),
                "--output_dir",
                &out,
                "--rank",
                &r.to_string(),
                "--world_size",
                "8"
            ],
            &[],
        );
        assert_ok(&o);
        let rel = format!("rank_{r}/checkpoint_{r}.ckpt");
        let got = out.join("transformed_checkpoint").join(&rel);
        assert_eq!(text(&o.stdout).trim(), got.to_str().unwrap());
        assert!(std::fs::read(&got).unwrap() == std::fs::read(case.join("expected").join(&rel)).unwrap(), "{rel}");
    }
}

/// Strategy folders (one file per pipeline stage) in the store: `--src_ckpt_strategy` and
/// `--dst_ckpt_strategy` as prefixes of stage files, merged as local folders are; the outputs
/// equal MindSpore's.
#[test]
#[ignore = "needs a SeaweedFS server: bash tests/s3/run.sh"]
fn s3_strategy_folders() {
    let ep = endpoint();
    let (case, b) = case_in_bucket(
        "stages",
        "dp2mp2pp2_to_dp1mp2pp2",
        &[("src_stages", "src_strategy_stages"), ("dst_stages", "dst_strategy_stages")],
    );
    let scratch = Scratch::new("s3-stages");
    let dst = scratch.join("out");
    let mut a = from_bucket(&["transform", "-q"], &b, "src_stages", "dst_stages/");
    a.extend(["--dst_ckpt_dir".into(), dst.to_str().unwrap().into()]);
    let out = reshard_at_strings(&ep, &a);
    assert_ok(&out);
    let expected = files_under(&case.join("expected"));
    assert!(!expected.is_empty());
    for e in expected {
        let rel = e.strip_prefix(case.join("expected")).unwrap();
        assert!(std::fs::read(dst.join(rel)).unwrap() == std::fs::read(&e).unwrap(), "{}", rel.display());
    }
    // A prefix with nothing under it is refused by name.
    let none = format!("s3://{b}/no_such_strategy");
    let out = reshard_at(
        &ep,
        args![
            "transform",
            "--src_ckpt_dir",
            &format!("s3://{b}/src"),
            "--src_ckpt_strategy",
            &none,
            "--dst_ckpt_dir",
            &dst
        ],
        &[],
    );
    assert_refused(&out, &[&none, "no strategy files under this prefix"]);
}

/// `reshard unify` with URLs: sources (rank folders and strategy) in the store to a local folder,
/// local sources to the store, and store to store, with and without `--file_suffix`: every file
/// equals the local unify's byte for byte; `verify` passes on the store's folder and a rerun keeps
/// every object. A source in a missing bucket is refused naming the URL and `NoSuchBucket`,
/// nothing written.
#[test]
#[ignore = "needs a SeaweedFS server: bash tests/s3/run.sh"]
fn s3_unify_from_to_and_within_the_store() {
    let ep = endpoint();
    let case = fixture("st_era/dp2mp2");
    let b = bucket("unify");
    upload_dir(&b, "full", &case.join("full"));
    upload(&b, "src_strategy.ckpt", &case.join("src_strategy.ckpt"));
    // The same sources under other names, two per rank folder, for --file_suffix.
    for r in 0..4 {
        let f = case.join(format!("full/rank_{r}/checkpoint_{r}.safetensors"));
        for step in ["1_1", "1_2"] {
            upload(&b, &format!("sfx/rank_{r}/net_rank_{r}-{step}.safetensors"), &f);
        }
    }
    let scratch = Scratch::new("s3-unify");
    let unify = |src: &str, strategy: &str, dst: &str, extra: &[&str]| {
        let mut a: Vec<&std::ffi::OsStr> =
            args!["unify", "--src_ckpt_dir", src, "--src_ckpt_strategy", strategy, "--dst_dir", dst].to_vec();
        a.extend(extra.iter().map(std::ffi::OsStr::new));
        reshard_at(&ep, &a, &[])
    };
    let (local_src, local_strategy) = (case.join("full"), case.join("src_strategy.ckpt"));
    let (local_src, local_strategy) = (local_src.to_str().unwrap(), local_strategy.to_str().unwrap());
    let local = scratch.join("local");
    assert_ok(&unify(local_src, local_strategy, local.to_str().unwrap(), &["-q"]));
    let want: Vec<PathBuf> = files_under(&local)
        .into_iter()
        .filter(|f| !f.file_name().unwrap().to_str().unwrap().starts_with(".reshard_manifest.lock"))
        .filter(|f| f.file_name().unwrap() != "reshard_manifest.json")
        .collect();
    let names: Vec<String> = want.iter().map(|f| f.file_name().unwrap().to_str().unwrap().to_string()).collect();
    assert_eq!(names.len(), 3, "{names:?}");
    let (s3_src, s3_strategy) = (format!("s3://{b}/full"), format!("s3://{b}/src_strategy.ckpt"));
    let from_s3 = scratch.join("from_s3");
    let from_sfx = scratch.join("from_sfx");
    let sfx = format!("s3://{b}/sfx");
    let runs: Vec<(&str, &str, String, Vec<&str>)> = vec![
        (&s3_src, &s3_strategy, from_s3.to_str().unwrap().to_string(), vec![]),
        (local_src, local_strategy, format!("s3://{b}/to_s3"), vec![]),
        (&s3_src, &s3_strategy, format!("obs://{b}/both"), vec![]),
        (&sfx, &s3_strategy, from_sfx.to_str().unwrap().to_string(), vec!["--file_suffix=-1_2"]),
    ];
    for (src, strategy, dst, extra) in &runs {
        let mut e = extra.clone();
        e.push("-q");
        assert_ok(&unify(src, strategy, dst, &e));
        let prefix = dst.split_once("://").map(|(_, rest)| rest.split_once('/').unwrap().1.to_string());
        for (f, name) in want.iter().zip(&names) {
            let got = match &prefix {
                Some(p) => download(&b, &format!("{p}/{name}")).unwrap_or_else(|| panic!("no object {dst}/{name}")),
                None => std::fs::read(Path::new(dst).join(name)).unwrap(),
            };
            assert!(got == std::fs::read(f).unwrap(), "{src} -> {dst}: {name} differs from the local unify's");
        }
        if prefix.is_some() {
            let v = reshard_at(&ep, args!["verify", dst], &[]);
            assert_ok(&v);
            // The parts and hyper_param.safetensors (the map is not a checkpoint).
            assert_eq!(text(&v.stdout).lines().filter(|l| l.starts_with("ok ")).count(), 2, "{}", text(&v.stdout));
            let again = unify(src, strategy, dst, extra);
            assert_ok(&again);
            assert!(text(&again.stderr).contains("2 kept from a previous run"), "{}", text(&again.stderr));
        }
    }
    // A missing bucket, as the source or as the destination.
    let gone = format!("no-such-bucket-{}", std::process::id());
    let dst = scratch.join("refused");
    let src_url = format!("s3://{gone}/full");
    assert_refused(&unify(&src_url, local_strategy, dst.to_str().unwrap(), &[]), &[&src_url, "NoSuchBucket"]);
    util::assert_nothing_written(&dst);
    // (A destination in a missing bucket cannot be tried here: SeaweedFS makes the bucket on the
    // first PUT by an admin key.)
}

/// `transform --distributed` into the store: two processes (`--process-index`/`--process-count`,
/// started side by side as a launcher would start them) convert one job from an `s3://` source
/// into an `s3://` folder: the share records are objects there, the outputs equal MindSpore's,
/// `verify` passes on the folder, and a rerun keeps every object. A share whose process never
/// starts makes the other give up after the timeout, naming it.
#[test]
#[ignore = "needs a SeaweedFS server: bash tests/s3/run.sh"]
fn s3_distributed_two_processes() {
    let case = fixture("conformance/dp1mp4_to_dp4mp2");
    let b = bucket("dist");
    upload_dir(&b, "src", &case.join("src"));
    let job = |dst: &str, index: u32, timeout: &str| -> Vec<String> {
        [
            "transform",
            "--distributed",
            "--process-index",
            &index.to_string(),
            "--process-count",
            "2",
            "--timeout",
            timeout,
            "--src_ckpt_dir",
            &format!("s3://{b}/src"),
            "--src_ckpt_strategy",
            case.join("src_strategy.ckpt").to_str().unwrap(),
            "--dst_ckpt_strategy",
            case.join("dst_strategy.ckpt").to_str().unwrap(),
            "--dst_ckpt_dir",
            dst,
        ]
        .map(str::to_string)
        .to_vec()
    };
    let run_both = |dst: &str| -> Vec<Output> {
        let started: Vec<_> = (0..2)
            .map(|i| {
                let (ep, a) = (endpoint(), job(dst, i, "60"));
                std::thread::spawn(move || {
                    reshard_at(&ep, &a.iter().map(std::ffi::OsStr::new).collect::<Vec<_>>(), &[])
                })
            })
            .collect();
        started.into_iter().map(|t| t.join().unwrap()).collect()
    };
    let dst = format!("s3://{b}/out");
    for (i, out) in run_both(&dst).iter().enumerate() {
        assert_ok(out);
        assert!(text(&out.stderr).contains(&format!("process {i} of 2")), "{}", text(&out.stderr));
        assert!(text(&out.stderr).contains("all 2 share(s) done and verified"), "{}", text(&out.stderr));
    }
    let expected = files_under(&case.join("expected"));
    for e in &expected {
        let rel = e.strip_prefix(case.join("expected")).unwrap().to_str().unwrap();
        let got = download(&b, &format!("out/{rel}")).unwrap_or_else(|| panic!("no object {dst}/{rel}"));
        assert!(got == std::fs::read(e).unwrap(), "{rel} differs from MindSpore's");
    }
    let k = keys(&b, "out/");
    for i in 0..2 {
        assert!(k.contains(&format!("out/reshard_share_{i}_of_2.json")), "{k:?}");
    }
    let v = reshard_at(&endpoint(), args!["verify", &dst], &[]);
    assert_ok(&v);
    assert_eq!(text(&v.stdout).lines().filter(|l| l.starts_with("ok ")).count(), expected.len());
    let again = run_both(&dst);
    let kept: usize = again
        .iter()
        .map(|o| {
            assert_ok(o);
            let err = text(&o.stderr);
            err.split("kept ").nth(1).and_then(|r| r.split(' ').next()).and_then(|n| n.parse().ok()).unwrap_or(0)
        })
        .sum();
    assert_eq!(kept, expected.len(), "a rerun keeps every object");
    // Share 1 never starts: share 0 writes its ranks, then gives up on it after the timeout.
    let alone = format!("s3://{b}/alone");
    let mut a = job(&alone, 0, "2");
    a.push("-q".into());
    let out = reshard_at(&endpoint(), &a.iter().map(std::ffi::OsStr::new).collect::<Vec<_>>(), &[]);
    assert_refused(
        &out,
        &["gave up after 2s without news from 1 share(s)", "share 1 of 2 (rank_4..rank_7", "no record yet"],
    );
}

/// Points this process's own object store client (the core called in-process) at `endpoint`.
fn store_env_in_process(endpoint: &str) {
    for (k, v) in [
        ("AWS_ACCESS_KEY_ID", KEY),
        ("AWS_SECRET_ACCESS_KEY", SECRET),
        ("AWS_ENDPOINT_URL", endpoint),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_REGION", "us-east-1"),
    ] {
        std::env::set_var(k, v);
    }
}

/// A progress callback that records the size of the worker pool it is called on (the largest).
fn pool_size_probe() -> (Arc<AtomicU64>, Arc<reshard_core::exec::ProgressFn>) {
    let seen = Arc::new(AtomicU64::new(0));
    let s = seen.clone();
    let probe = move |_: u64, _: u64| {
        s.fetch_max(rayon::current_num_threads() as u64, Ordering::Relaxed);
    };
    (seen, Arc::new(probe))
}

/// The read-ahead of object sources stays within half of `--memory-budget` (in-process: the
/// core's count of prefetched bytes not yet copied), and a small budget gives the same bytes:
/// 8 -> 4 from the store with budgets of 4 and 16 MiB, and the default, equals the local
/// conversion. `load_rank` and `unify` from the store run on the workers a transform of objects
/// gets (8 at least), not one per core.
#[test]
#[ignore = "needs a SeaweedFS server: bash tests/s3/run.sh"]
fn s3_read_ahead_fits_the_memory_budget_and_every_job_gets_the_object_workers() {
    use reshard_core::{execute, load_rank, ExecuteOptions, LoadOptions, Plan, PlanOptions, TensorMeta};
    let ep = endpoint();
    let (scratch, b, src8, s8, s4) = model_in_bucket("s3-budget", "budget", 8);
    let local = scratch.join("local");
    transform_local(&src8, Some(&s8), &s4, &local);
    store_env_in_process(&ep);
    let src = PathBuf::from(format!("s3://{b}/src"));
    let plan = Plan::build(&src, Some(&s8), Some(&s4), &PlanOptions::default()).unwrap();
    for budget in [4u64 << 20, 16 << 20, ExecuteOptions::default().memory_budget] {
        let out = scratch.join(format!("budget_{budget}"));
        reshard_core::storage::object::reset_prefetched_peak();
        let (pool, progress) = pool_size_probe();
        let opts = ExecuteOptions { memory_budget: budget, progress: Some(progress), ..ExecuteOptions::default() };
        let written = execute(&plan, &out, &[], &opts).unwrap();
        let peak = reshard_core::storage::object::prefetched_peak();
        eprintln!("budget {budget}: read-ahead peaked at {peak} bytes");
        assert!(peak > 0, "budget {budget}: nothing was read ahead");
        assert!(peak <= budget / 2, "budget {budget}: the read-ahead held {peak} bytes");
        assert!(pool.load(Ordering::Relaxed) >= 8, "transform ran on {} workers", pool.load(Ordering::Relaxed));
        assert_eq!(written.len(), 4);
        for w in written {
            let rel = w.path.strip_prefix(&out).unwrap();
            assert!(std::fs::read(&w.path).unwrap() == std::fs::read(local.join(rel)).unwrap(), "{budget}: {rel:?}");
        }
    }
    // load_rank: the same bytes as the rank's file, on the object workers.
    let (pool, progress) = pool_size_probe();
    let rp = plan.rank_plan(1).unwrap();
    let mut bufs: Vec<Vec<u8>> = rp.tensors.iter().map(|t| vec![0u8; t.nbytes as usize]).collect();
    let mut lend = bufs.iter_mut();
    let lo = LoadOptions { progress: Some(progress), ..LoadOptions::default() };
    load_rank(&plan, 1, &lo, &mut |_: &TensorMeta<'_>| Ok(lend.next().map(|b| b.as_mut_slice()))).unwrap();
    let file = reshard_core::CheckpointFile::open(&local.join("rank_1/checkpoint_1.ckpt"), Default::default()).unwrap();
    for (t, got) in rp.tensors.iter().zip(&bufs) {
        let info = file.index().get(&t.name).unwrap();
        assert!(file.content(info).as_ref() == got.as_slice(), "load_rank: {} differs", t.name);
    }
    assert!(pool.load(Ordering::Relaxed) >= 8, "load_rank ran on {} workers", pool.load(Ordering::Relaxed));
    // unify: from the store into a local folder, on the object workers.
    let (pool, progress) = pool_size_probe();
    let uo = reshard_core::unify::UnifyOptions {
        exec: ExecuteOptions { progress: Some(progress), ..ExecuteOptions::default() },
        ..Default::default()
    };
    reshard_core::unify::unify(&src, &s8, &scratch.join("unified"), &uo).unwrap();
    assert!(pool.load(Ordering::Relaxed) >= 8, "unify ran on {} workers", pool.load(Ordering::Relaxed));
}

/// Tables of contents of `.ckpt` objects of one size are predicted from the first one walked and
/// checked against the bytes the walk used, fetched from each object: 8 ranks of one layout give
/// 6 predictions (plus the walked first, and a hostile rank), each index equal to the one a
/// local walk of the same file gives; rank 3, uploaded with one tensor's name changed (same
/// length, so the same size and offsets), and rank 5, with a dim changed, are refused as
/// predictions and walked, and their indexes name what they really hold.
#[test]
#[ignore = "needs a SeaweedFS server: bash tests/s3/run.sh"]
fn s3_tables_of_contents_are_predicted_only_when_the_object_has_the_same_bytes() {
    use reshard_core::{storage::IoMode, CheckpointFile, ReadOptions};
    let ep = endpoint();
    let (scratch, src8, ..) = sharded_model("s3-predict", 4, 64, 32);
    let b = bucket("predict");
    let edit = |rank: u32, from: &[u8], to: &[u8]| {
        let f = src8.join(format!("rank_{rank}/checkpoint_{rank}.ckpt"));
        let mut bytes = std::fs::read(&f).unwrap();
        let at = bytes.windows(from.len()).position(|w| w == from).unwrap();
        bytes[at..at + to.len()].copy_from_slice(to);
        std::fs::write(&f, bytes).unwrap();
    };
    edit(3, b"layers.2.wq.weight", b"layers.2.wz.weight");
    // dims [8, 32] (row split of 64 by 8): field 1 varint 8 then field 1 varint 32 -> 9.
    let name = b"layers.1.w1.weight";
    {
        let f = src8.join("rank_5/checkpoint_5.ckpt");
        let mut bytes = std::fs::read(&f).unwrap();
        let at = bytes.windows(name.len()).position(|w| w == name).unwrap();
        let dims = bytes[at..].windows(4).position(|w| w == [0x08, 8, 0x08, 32]).unwrap() + at;
        bytes[dims + 3] = 9;
        std::fs::write(&f, bytes).unwrap();
    }
    upload_dir(&b, "src", &src8);
    store_env_in_process(&ep);
    let cat = reshard_core::source::discover(Path::new(&format!("s3://{b}/src")), None).unwrap();
    let before = reshard_core::toc_predict::predictions();
    let ranks: Vec<u32> = (0..8).collect();
    let sources = cat.open_ranks(&ranks, IoMode::Auto, ReadOptions::default());
    let after = reshard_core::toc_predict::predictions();
    // Rank 5's dims no longer match its content size: its own walk refuses it, naming it.
    let Err(err) = sources else { panic!("rank 5's changed dims must be refused") };
    let err = err.to_string();
    assert!(err.contains("rank_5") && err.contains("layers.1.w1.weight"), "{err}");
    // Rank 5 was refused by its prediction and walked (how many others ran before the error
    // stopped the rest is up to the scheduler).
    assert!(
        after.1 - before.1 >= 1 && after.0 - before.0 <= 5,
        "(predicted, refused and walked): {after:?} - {before:?}"
    );
    // Without rank 5: every index is the local walk's.
    let ranks: Vec<u32> = (0..8).filter(|&r| r != 5).collect();
    let before = reshard_core::toc_predict::predictions();
    let sources = cat.open_ranks(&ranks, IoMode::Auto, ReadOptions::default()).unwrap();
    let after = reshard_core::toc_predict::predictions();
    assert_eq!((after.0 - before.0, after.1 - before.1), (5, 1), "(predicted, refused and walked)");
    for s in &sources {
        let local =
            CheckpointFile::open(&src8.join(format!("rank_{0}/checkpoint_{0}.ckpt", s.rank)), Default::default())
                .unwrap();
        assert_eq!(s.index.tensors, local.index().tensors, "rank {}", s.rank);
    }
    assert!(sources[3].index.get("layers.2.wz.weight").is_some());
    drop(scratch);
}

/// Tables of contents taken from a sibling object with their check deferred to the copy (what
/// `transform` does): 8 ranks of one layout, rank 3 uploaded with the records of two tensors
/// swapped (names and contents: the same size, another table of contents). A deferred plan's
/// execution fails naming rank 3, its leader and the byte, and commits nothing read from rank 3:
/// no rank_1 file locally, no rank_1 object (nor an upload left open) in the store; the other
/// outputs are right. `reshard transform` and `reshard auto` fall back to a plan that walks
/// rank 3, say so, and their outputs equal the local conversion's (taking the sibling's table of
/// contents unchecked would write rank 3's two tensors swapped).
#[test]
#[ignore = "needs a SeaweedFS server: bash tests/s3/run.sh"]
fn s3_a_deferred_table_of_contents_check_falls_back_to_walking_the_object() {
    use reshard_core::{execute, CheckpointFile, Error, ExecuteOptions, Plan, PlanOptions};
    let ep = endpoint();
    let (scratch, src8, s8, s4) = sharded_model("s3-defer", 4, 64, 32);
    let f = src8.join("rank_3/checkpoint_3.ckpt");
    let mut bytes = std::fs::read(&f).unwrap();
    let (a, b) = ("layers.1.wq.weight", "layers.1.wk.weight");
    let index = CheckpointFile::open(&f, Default::default()).unwrap().index().clone();
    let (ca, cb) = (index.get(a).unwrap().segments()[0], index.get(b).unwrap().segments()[0]);
    assert_eq!(ca.len, cb.len);
    let content = |s: reshard_core::checkpoint::Segment| s.offset as usize..(s.offset + s.len) as usize;
    let (old_a, old_b) = (bytes[content(ca)].to_vec(), bytes[content(cb)].to_vec());
    bytes[content(ca)].copy_from_slice(&old_b);
    bytes[content(cb)].copy_from_slice(&old_a);
    let name_at = |bytes: &[u8], n: &str| bytes.windows(n.len()).position(|w| w == n.as_bytes()).unwrap();
    let (na, nb) = (name_at(&bytes, a), name_at(&bytes, b));
    bytes[na..na + a.len()].copy_from_slice(b.as_bytes());
    bytes[nb..nb + b.len()].copy_from_slice(a.as_bytes());
    std::fs::write(&f, &bytes).unwrap();
    let local = scratch.join("local");
    transform_local(&src8, Some(&s8), &s4, &local);
    let bk = bucket("defer");
    upload_dir(&bk, "src", &src8);
    store_env_in_process(&ep);
    let src = PathBuf::from(format!("s3://{bk}/src"));
    let deferred = PlanOptions { defer_toc_checks: true, ..PlanOptions::default() };
    let before = reshard_core::toc_predict::deferred();
    let plan = Plan::build(&src, Some(&s8), Some(&s4), &deferred).unwrap();
    assert_eq!(reshard_core::toc_predict::deferred().0 - before.0, 7, "7 followers of rank 0, none checked yet");
    let refused = |e: Error| match e {
        Error::PredictionMismatch { path, leader, offset } => {
            assert!(path.ends_with("rank_3/checkpoint_3.ckpt") && leader.ends_with("rank_0/checkpoint_0.ckpt"));
            assert!(offset >= nb.min(na) as u64, "byte {offset}");
        }
        other => panic!("{other}"),
    };
    let out = scratch.join("out");
    refused(execute(&plan, &out, &[], &ExecuteOptions::default()).unwrap_err());
    assert!(!out.join("rank_1/checkpoint_1.ckpt").exists(), "an output read from rank 3 was committed");
    refused(execute(&plan, Path::new(&format!("s3://{bk}/out")), &[], &ExecuteOptions::default()).unwrap_err());
    assert!(keys(&bk, "out/rank_1").is_empty(), "{:?}", keys(&bk, "out/rank_1"));
    assert!(open_uploads(&bk).is_empty(), "{:?}", open_uploads(&bk));
    // The CLI falls back, and says so.
    let dst = scratch.join("cli");
    let out = reshard_at(
        &ep,
        args![
            "transform",
            "--src_ckpt_dir",
            &src,
            "--src_ckpt_strategy",
            &s8,
            "--dst_ckpt_strategy",
            &s4,
            "--dst_ckpt_dir",
            &dst
        ],
        &[],
    );
    assert_ok(&out);
    let err = text(&out.stderr);
    assert!(err.contains("rank_3/checkpoint_3.ckpt") && err.contains("planning again"), "{err}");
    // The outputs the deferred plan committed (those not reading rank 3) are written again, not
    // resumed: that plan rested on rank 3's table of contents too.
    assert!(err.contains("wrote 4 file(s)"), "{err}");
    for r in 0..4 {
        let rel = format!("rank_{r}/checkpoint_{r}.ckpt");
        assert!(std::fs::read(dst.join(&rel)).unwrap() == std::fs::read(local.join(&rel)).unwrap(), "{rel}");
    }
    // `auto` (also the C ABI's one-shot) falls back the same way: its rank 1 reads rank 3.
    let run = scratch.join("auto");
    std::fs::create_dir_all(run.join("strategy")).unwrap();
    for r in 0..4 {
        std::fs::copy(&s4, run.join(format!("strategy/ckpt_strategy_rank_{r}.json"))).unwrap();
    }
    let out = reshard_at(
        &ep,
        args![
            "auto",
            "--timeout",
            "30",
            "--load_checkpoint",
            &src,
            "--src_strategy_path_or_dir",
            &s8,
            "--output_dir",
            &run,
            "--rank",
            "1",
            "--world_size",
            "4"
        ],
        &[],
    );
    assert_ok(&out);
    let err = text(&out.stderr);
    assert!(err.contains("rank_3/checkpoint_3.ckpt") && err.contains("planning again"), "{err}");
    let rel = "rank_1/checkpoint_1.ckpt";
    let got = std::fs::read(run.join("transformed_checkpoint").join(rel)).unwrap();
    assert!(got == std::fs::read(local.join(rel)).unwrap(), "auto: {rel}");
}

/// complete -> 8 by columns from the store (issue 16 review): each rank's column slices, 3.5 KiB
/// apart, join into GETs spanning the other ranks' columns. Their reads are served by the GETs
/// made ahead, whichever rank started them (with the slices joined into one run per tensor a
/// rank's run crossed the edge of another rank's range, and its reads, one per row, were made on
/// demand: 57,338 here), nothing stays counted once the job is done, and the output equals the
/// local conversion.
#[test]
#[ignore = "needs a SeaweedFS server: bash tests/s3/run.sh"]
fn s3_a_column_split_reads_from_the_read_ahead() {
    use reshard_core::{execute, ExecuteOptions, Plan, PlanOptions};
    let ep = endpoint();
    let scratch = Scratch::new("s3-columns");
    let (rows, cols) = (2048u64, 1024u64);
    let names = write_model(&scratch.join("complete/rank_0/model.ckpt"), 1, rows, cols);
    let s8 = scratch.join("cols8.json");
    let items: serde_json::Map<String, serde_json::Value> = names
        .iter()
        .map(|n| {
            (
                n.clone(),
                serde_json::json!({"dev_matrix": [8], "tensor_map": [-1, 0], "tensor_shape": [rows, cols], "field": 0,
                                   "opt_weight_shard_step": 0, "opt_weight_shard_size": 0}),
            )
        })
        .collect();
    let v = serde_json::json!({"current_stage": 0,
        "parallel_strategy_item": {"op": {"stage": 0, "parallel_strategy": [[8]]}},
        "parallel_layout_item": items});
    std::fs::write(&s8, serde_json::to_vec(&v).unwrap()).unwrap();
    let local = scratch.join("local");
    transform_local(&scratch.join("complete"), None, &s8, &local);
    let b = bucket("columns");
    upload_dir(&b, "src", &scratch.join("complete"));
    store_env_in_process(&ep);
    let src = PathBuf::from(format!("s3://{b}/src"));
    let plan = Plan::build(&src, None, Some(&s8), &PlanOptions::default()).unwrap();
    let (_, on_demand_before) = reshard_core::storage::gets_made();
    let out = scratch.join("out");
    let written = execute(&plan, &out, &[], &ExecuteOptions::default()).unwrap();
    let on_demand = reshard_core::storage::gets_made().1 - on_demand_before;
    assert!(on_demand < 200, "{on_demand} GETs on demand for 8 x {} row slices", rows * names.len() as u64);
    assert_eq!(reshard_core::storage::prefetched_bytes(), 0, "read-ahead still counted after the job");
    assert_eq!(written.len(), 8);
    for w in written {
        let rel = w.path.strip_prefix(&out).unwrap();
        assert!(std::fs::read(&w.path).unwrap() == std::fs::read(local.join(rel)).unwrap(), "{rel:?}");
    }
}
