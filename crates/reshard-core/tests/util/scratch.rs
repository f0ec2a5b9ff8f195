//! `Scratch`, the scratch folder of the Rust integration tests: the core's (`util/mod.rs` next to
//! this file) and the CLI's (`crates/reshard-cli/tests/util/mod.rs`, through `#[path]`). Each
//! includes it and adds `Scratch::new` with the folder it wants the scratch folders in.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// A scratch folder. Removed (permissions restored first) when dropped after a passing test;
/// kept after a failing one, with its path printed, so that what the failed run left can be
/// looked at.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// A new, empty folder `BASE/reshard-test-PID-N-TAG` (TAG with anything but ASCII letters,
    /// digits and `-` replaced by `_`).
    pub fn in_folder(base: &Path, tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let tag: String = tag.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
        let d = base.join(format!("reshard-test-{}-{n}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.0.join(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept the scratch folder of the failed test: {}", self.0.display());
            return;
        }
        make_writable(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Gives every folder under `p` back its write permission (tests make some read-only).
fn make_writable(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::symlink_metadata(p) {
        if m.is_dir() {
            let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755));
            if let Ok(rd) = std::fs::read_dir(p) {
                for e in rd.flatten() {
                    make_writable(&e.path());
                }
            }
        }
    }
}
