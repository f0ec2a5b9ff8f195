//! reshard's SIGBUS handler (installed when the first source is mapped) keeps the action that
//! was installed before it for every SIGBUS that is not a fault in one of reshard's maps: an
//! ignored SIGBUS sent with kill stays ignored, a fault still kills when SIGBUS was ignored (as
//! the kernel does), the default action still kills, and an earlier handler is still called.
//!
//! The handler is installed once per process and keeps the action of that moment, so each case
//! runs in a forked child that sets the action, maps a source and then gets the signal. The
//! child is single-threaded, so a `kill` of its own pid is delivered before `kill` returns. No
//! other test of this binary maps anything in the parent.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
#![allow(unsafe_code)] // fork, sigaction, kill, mmap and waitpid

mod util;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};

use reshard_core::checkpoint::{CheckpointFile, ReadOptions, TensorHeader};
use reshard_core::{ckpt, DType};
use util::Scratch;

/// The action the child sets before reshard's handler is installed.
#[derive(Clone, Copy, Debug)]
enum Before {
    Ignore,
    Default,
    /// A handler with `SA_SIGINFO`.
    InfoHandler,
    /// A handler without it.
    PlainHandler,
}

/// What the child does once reshard's handler is installed.
#[derive(Clone, Copy, Debug)]
enum Then {
    /// `kill(getpid(), SIGBUS)`.
    Kill,
    /// `raise(SIGBUS)` (tgkill).
    Raise,
    /// Reads a page beyond the end of a truncated file it mapped itself (not one of reshard's).
    ForeignFault,
}

static CALLS: AtomicUsize = AtomicUsize::new(0);
static CODE: AtomicI32 = AtomicI32::new(i32::MIN);

extern "C" fn info_handler(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    CALLS.fetch_add(1, Ordering::SeqCst);
    // SAFETY: the kernel (through reshard's handler) passes a valid siginfo_t.
    CODE.store(unsafe { (*info).si_code }, Ordering::SeqCst);
}

extern "C" fn plain_handler(_: libc::c_int) {
    CALLS.fetch_add(1, Ordering::SeqCst);
}

fn source(dir: &Path) -> PathBuf {
    let headers = vec![TensorHeader { name: "w".into(), dtype: DType::Float32, dims: vec![1024], nbytes: 4096 }];
    let p = dir.join("model.ckpt");
    std::fs::write(&p, ckpt::layout(&headers, ckpt::CHUNK_BYTES).render(&[&[7u8; 4096]])).unwrap();
    p
}

/// The child's exit codes besides 0 (all went as expected) and death by a signal.
const NOT_INSTALLED: i32 = 3;
const HANDLER_NOT_CALLED: i32 = 4;
const FAULT_SURVIVED: i32 = 5;

/// Runs one case in a child and returns its wait status.
fn run(dir: &Path, before: Before, then: Then) -> libc::c_int {
    let src = source(dir);
    let other = dir.join("other.bin");
    std::fs::write(&other, vec![1u8; 1 << 16]).unwrap();
    let f = std::fs::File::options().read(true).write(true).open(&other).unwrap();
    // SAFETY: the child is single-threaded (fork copies only this thread); it sets its own
    // signal action, maps files it owns, signals itself and leaves with _exit. glibc makes
    // malloc usable in the child of a fork. The parent only waits for it.
    unsafe {
        let pid = libc::fork();
        assert!(pid >= 0);
        if pid == 0 {
            let mut act: libc::sigaction = std::mem::zeroed();
            libc::sigemptyset(&mut act.sa_mask);
            match before {
                Before::Ignore => act.sa_sigaction = libc::SIG_IGN,
                Before::Default => act.sa_sigaction = libc::SIG_DFL,
                Before::InfoHandler => {
                    act.sa_sigaction = info_handler as *const () as libc::sighandler_t;
                    act.sa_flags = libc::SA_SIGINFO;
                }
                Before::PlainHandler => act.sa_sigaction = plain_handler as *const () as libc::sighandler_t,
            }
            libc::sigaction(libc::SIGBUS, &act, std::ptr::null_mut());
            // Installs reshard's handler (the source is mapped to be read).
            let ckpt = CheckpointFile::open(&src, ReadOptions::default());
            let mut now: libc::sigaction = std::mem::zeroed();
            libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut now);
            if ckpt.is_err() || now.sa_sigaction == act.sa_sigaction {
                libc::_exit(NOT_INSTALLED);
            }
            match then {
                Then::Kill => {
                    libc::kill(libc::getpid(), libc::SIGBUS);
                }
                Then::Raise => {
                    libc::raise(libc::SIGBUS);
                }
                Then::ForeignFault => {
                    let p =
                        libc::mmap(std::ptr::null_mut(), 1 << 16, libc::PROT_READ, libc::MAP_SHARED, f.as_raw_fd(), 0);
                    libc::ftruncate(f.as_raw_fd(), 0);
                    let _ = std::ptr::read_volatile((p as *const u8).add(8192));
                    libc::_exit(FAULT_SURVIVED);
                }
            }
            let called = CALLS.load(Ordering::SeqCst);
            let expect_call = matches!(before, Before::InfoHandler | Before::PlainHandler);
            let code_ok = !matches!(before, Before::InfoHandler)
                || CODE.load(Ordering::SeqCst)
                    == if matches!(then, Then::Kill) { libc::SI_USER } else { libc::SI_TKILL };
            if (called == 1) != expect_call || !code_ok {
                libc::_exit(HANDLER_NOT_CALLED);
            }
            drop(ckpt);
            libc::_exit(0);
        }
        let mut status = 0;
        assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
        status
    }
}

fn describe(status: libc::c_int) -> String {
    if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("exit status {}", libc::WEXITSTATUS(status))
    }
}

#[test]
fn a_sigbus_that_is_not_a_fault_in_reshards_maps_gets_the_earlier_action() {
    let dir = Scratch::new("sigbus-actions");
    let survives = [
        // Was: SIG_DFL restored and the signal raised again, so an ignored SIGBUS killed.
        (Before::Ignore, Then::Kill),
        (Before::Ignore, Then::Raise),
        (Before::InfoHandler, Then::Kill),
        (Before::InfoHandler, Then::Raise),
        (Before::PlainHandler, Then::Kill),
    ];
    for (before, then) in survives {
        let status = run(&dir.0, before, then);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "SIGBUS with {before:?} before reshard's handler, then {then:?}: {} (3: handler not installed, \
             4: the earlier handler was not called as expected)",
            describe(status)
        );
    }
    let dies = [(Before::Default, Then::Kill), (Before::Default, Then::Raise), (Before::Ignore, Then::ForeignFault)];
    for (before, then) in dies {
        let status = run(&dir.0, before, then);
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGBUS,
            "SIGBUS with {before:?} before reshard's handler, then {then:?}: {} instead of death by SIGBUS",
            describe(status)
        );
    }
}
