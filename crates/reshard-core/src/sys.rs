//! The only module of the core with `unsafe` code: read-only memory maps of source files (and
//! the SIGBUS handler that keeps a source truncated during a run from killing the process), and
//! `sync_file_range(2)` to start write-back early.
#![allow(unsafe_code)]

use std::os::fd::AsRawFd;

use std::fs::File;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::error::{Error, Result};

/// A read-only view of a whole file, registered with the SIGBUS handler while it lives.
pub struct MappedFile {
    map: Option<memmap2::Mmap>,
    /// The most one `MADV_WILLNEED` reads (the kernel caps each call at the device's read-ahead).
    readahead: u64,
    path: PathBuf,
    /// The open file, to compare its size and times now with those at mapping time.
    file: File,
    opened: Stamp,
    /// This map's entry in the fault registry (None for an empty file).
    slot: Option<&'static Slot>,
}

/// What says a file's content is still the one that was mapped: size, modification and change
/// times (nanoseconds; the change time also moves when a rewrite restores the mtime, as
/// `rsync --inplace -t` or `touch -r` do), and the inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Size in bytes.
    pub len: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i128,
    /// Status change time, nanoseconds since the epoch.
    pub ctime_ns: i128,
    /// Device and inode.
    pub dev_ino: (u64, u64),
}

impl Stamp {
    /// The stamp of an open file or of a path's metadata.
    pub fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Stamp {
            len: meta.len(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
            dev_ino: (meta.dev(), meta.ino()),
        }
    }

    /// How `now` differs from `self`, in words, or None when it does not.
    pub fn change(&self, now: &Stamp) -> Option<String> {
        let mut what = Vec::new();
        if now.len != self.len {
            what.push(format!("its size went from {} to {} bytes", self.len, now.len));
        }
        if now.mtime_ns != self.mtime_ns {
            what.push(format!("its modification time went from {} to {}", fmt_ns(self.mtime_ns), fmt_ns(now.mtime_ns)));
        } else if now.ctime_ns != self.ctime_ns {
            what.push(format!("its change time went from {} to {}", fmt_ns(self.ctime_ns), fmt_ns(now.ctime_ns)));
        }
        if now.dev_ino != self.dev_ino {
            what.push("it is another file (device, inode)".into());
        }
        (!what.is_empty()).then(|| what.join(", "))
    }
}

/// Seconds.nanoseconds since the epoch.
fn fmt_ns(ns: i128) -> String {
    format!("{}.{:09}", ns.div_euclid(1_000_000_000), ns.rem_euclid(1_000_000_000))
}

/// The system's page size.
pub fn page_size() -> u64 {
    static PAGE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf only reads a system constant.
        let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        u64::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
    })
}

/// The read-ahead of the device holding a file (`/sys/class/bdi/MAJ:MIN/read_ahead_kb`): the
/// kernel reads at most that much (or the device's optimal I/O size, if larger) for one
/// `MADV_WILLNEED`. 128 KiB, Linux's default, when it cannot be found or is 0.
fn device_readahead(meta: &std::fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let dev = meta.dev();
    let path = format!("/sys/class/bdi/{}:{}/read_ahead_kb", libc::major(dev), libc::minor(dev));
    let kb = std::fs::read_to_string(path).ok().and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(0);
    if kb == 0 {
        128 << 10
    } else {
        kb << 10
    }
}

impl MappedFile {
    /// Maps `path` read-only. An empty file gives an empty slice (mmap of 0 bytes is an error on Linux).
    pub fn open(path: &Path) -> Result<Self> {
        let (file, meta) = crate::input::open_regular(path)?;
        Self::from_file(path, file, &meta)
    }

    /// Maps an already opened regular file (`meta` is its `fstat`).
    pub fn from_file(path: &Path, file: File, meta: &std::fs::Metadata) -> Result<Self> {
        let readahead = device_readahead(meta);
        let opened = Stamp::of(meta);
        if meta.len() == 0 {
            return Ok(MappedFile { map: None, readahead, path: path.to_path_buf(), file, opened, slot: None });
        }
        install_sigbus_handler();
        // SAFETY: the map is read-only and lives as long as `self`. If another process rewrites
        // the file while it is mapped, reads see changed bytes: `check` compares the file's size
        // and times with those at mapping time, and the executor calls it before an output is
        // renamed into place. If the file is truncated, a read of a page beyond the new end
        // raises SIGBUS: the map is registered below, and the handler maps zeros over the rest
        // of it and marks it, which `check` then reports, instead of the process being killed.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, "mmap", e))?;
        // No read-around on faults: with the device read-ahead of this project's machine (8 MiB)
        // indexing a cold 578 MB checkpoint read 439 MB of it, and converting one rank of
        // complete -> 8 read 470 MB. What the executor needs it announces with `will_need`.
        let _ = map.advise(memmap2::Advice::Random);
        let slot = register(map.as_ptr() as usize, map.len());
        Ok(MappedFile { map: Some(map), readahead, path: path.to_path_buf(), file, opened, slot: Some(slot) })
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's size and times when it was mapped.
    pub fn opened(&self) -> &Stamp {
        &self.opened
    }

    /// Whether a read of the map faulted (the file was truncated under it, or a read of it
    /// failed): the bytes read since then are zeros, not the file's.
    pub fn faulted(&self) -> bool {
        self.slot.is_some_and(|s| s.faulted.load(Ordering::Acquire))
    }

    /// Fails, naming the file and what changed, when a read of the map faulted or the file's
    /// size or times are no longer those it had when it was mapped: what was read from it may
    /// then be a mix of two versions.
    pub fn check(&self) -> Result<()> {
        let now = self.file.metadata().map(|m| Stamp::of(&m));
        let detail = match (&now, self.faulted()) {
            (Ok(now), _) if now.len < self.opened.len => format!(
                "the file was truncated from {} to {} bytes while reshard was reading it; nothing read \
                 from it was kept",
                self.opened.len, now.len
            ),
            (_, true) => "a read of the file failed (an I/O error, or the file was truncated and \
                          extended again) while reshard was reading it; nothing read from it was kept"
                .to_string(),
            (Ok(now), false) => match self.opened.change(now) {
                Some(what) => format!(
                    "the file changed while reshard was reading it ({what}); what was read may mix two \
                     versions, nothing read from it was kept"
                ),
                None => return Ok(()),
            },
            (Err(_), false) => return Ok(()),
        };
        Err(Error::Source { path: self.path.clone(), detail })
    }

    /// Asks the kernel to start reading `len` bytes at `offset` (`MADV_WILLNEED`) without
    /// waiting for them, in calls no larger than the kernel reads for one (larger requests are
    /// cut short, and the rest would then be read a page per fault). Out-of-range requests and
    /// errors are ignored: it is a hint.
    pub fn will_need(&self, offset: u64, len: u64) {
        let Some(map) = &self.map else {
            return;
        };
        let Some(end) = offset.checked_add(len).filter(|&e| e <= map.len() as u64) else {
            return;
        };
        let mut at = offset;
        while at < end {
            let n = (end - at).min(self.readahead);
            let _ = map.advise_range(memmap2::Advice::WillNeed, at as usize, n as usize);
            at += n;
        }
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        // Before the map (a field) is unmapped: a fault at that address is then no longer ours.
        if let Some(slot) = self.slot.take() {
            unregister(slot);
        }
    }
}

impl Deref for MappedFile {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }
}

/// Starts write-back of `len` bytes of `file` at `off` without waiting for it
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), so that the final fsync finds less to do.
pub fn start_writeback(file: &File, off: u64, len: u64) {
    // SAFETY: a plain system call on a descriptor borrowed for its duration; no memory is passed.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            off as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// Asks the kernel to start reading `len` bytes of `file` at `offset` into the page cache
/// (`POSIX_FADV_WILLNEED`, the `pread` path's read-ahead). A hint: errors are ignored.
pub fn fadvise_willneed(file: &File, offset: u64, len: u64) {
    let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return;
    };
    // SAFETY: a plain system call on a descriptor borrowed for its duration; no memory is passed.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), off, n, libc::POSIX_FADV_WILLNEED);
    }
}

/// Tells the kernel that `file` will be read front to back once (`POSIX_FADV_SEQUENTIAL`:
/// larger read-ahead). A hint: errors are ignored.
pub fn fadvise_sequential(file: &File) {
    // SAFETY: a plain system call on a descriptor borrowed for its duration; no memory is passed.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL);
    }
}

/// Whether `file` is on a network or FUSE filesystem (NFS, SMB/CIFS, Lustre, GPFS, CephFS, 9p,
/// AFS, FUSE), where page faults on a map are slow and `pread` is the better way to read.
pub fn is_network_fs(file: &File) -> bool {
    // f_type magic numbers from statfs(2) and the kernel's magic.h.
    const NETWORK: [u64; 10] = [
        0x6969,      // NFS
        0x517b,      // SMB
        0xff53_4d42, // CIFS
        0xfe53_4d42, // SMB2
        0x0bd0_0bd0, // Lustre
        0x4750_4653, // GPFS
        0x00c3_6400, // CephFS
        0x0102_1997, // 9p (v9fs)
        0x5346_414f, // AFS
        0x6573_5546, // FUSE
    ];
    // SAFETY: statfs is a plain C struct of integers; all zeros is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes into the struct we pass, which lives for the call.
    let r = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) };
    r == 0 && NETWORK.contains(&(st.f_type as u64))
}

/// Tells the kernel that `data` (usually part of a map) is about to be read front to back once,
/// as a checksum pass over a whole file does (`MADV_SEQUENTIAL`: large read-ahead). Maps are
/// made with no read-around, and a cold 606 MB source with a crc trailer took 3.2 s to check
/// page by page. A hint: errors are ignored.
pub fn will_read_sequentially(data: &[u8]) {
    if data.is_empty() {
        return;
    }
    let page = page_size() as usize;
    let start = data.as_ptr() as usize & !(page - 1);
    let len = data.as_ptr() as usize + data.len() - start;
    // SAFETY: MADV_SEQUENTIAL only changes read-ahead for pages of memory we hold a shared
    // reference to (from the start of its first page); it never changes their contents.
    unsafe {
        libc::madvise(start as *mut libc::c_void, len, libc::MADV_SEQUENTIAL);
    }
}

/// Takes an exclusive `flock(2)` on `file`, waiting for it; released when the file is closed.
/// Locks belong to the open file description, so two opens of one file exclude each other
/// within a process too.
pub fn lock_exclusive(file: &File) -> std::io::Result<()> {
    loop {
        // SAFETY: a plain system call on a descriptor borrowed for its duration.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Tries to take an exclusive `flock(2)` on `file` without waiting: `Ok(false)` when another
/// open file description holds one.
#[cfg(test)]
pub fn try_lock_exclusive(file: &File) -> std::io::Result<bool> {
    // SAFETY: a plain system call on a descriptor borrowed for its duration.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EWOULDBLOCK) => Ok(false),
        _ => Err(e),
    }
}

// ---- SIGBUS: a source truncated while it is mapped ----
//
// Reading a page of a map beyond the end of its file raises SIGBUS, whose default action
// kills the process (leaving temporary files; for a library, killing its host). A read through
// `pwrite` from such a page fails with EFAULT instead, which the executor checks with `check`.
// Reading from the file with `pread` instead of maps would avoid the signal, but costs a copy
// per byte and the page-exact read-ahead the executor does on maps. So: a process-wide handler,
// installed once, that for a fault inside a registered map maps anonymous zero pages over the
// rest of that map (so the copy runs on, reading zeros), marks the map and returns; the reader
// checks the mark after each block and fails naming the file. Any other SIGBUS gets the action
// that was installed before: the handler (a runtime hosting the library keeps its own), the
// default action, or, when SIGBUS was ignored, nothing for a signal sent with kill and the
// default action for a fault (the kernel does not let a fault be ignored).

/// One registered map, readable from the signal handler without locks: a sequence number
/// (odd while a writer changes the entry) guards the range against being read half-written.
struct Slot {
    seq: AtomicUsize,
    start: AtomicUsize,
    /// 0 when the slot is free.
    len: AtomicUsize,
    faulted: AtomicBool,
}

impl Slot {
    const fn new() -> Self {
        Slot {
            seq: AtomicUsize::new(0),
            start: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            faulted: AtomicBool::new(false),
        }
    }

    /// The entry's (start, len), read consistently (None when it is free or being changed).
    fn range(&self) -> Option<(usize, usize)> {
        for _ in 0..64 {
            let s1 = self.seq.load(Ordering::Acquire);
            if s1 % 2 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let (start, len) = (self.start.load(Ordering::Acquire), self.len.load(Ordering::Acquire));
            if self.seq.load(Ordering::Acquire) == s1 {
                return (len > 0).then_some((start, len));
            }
        }
        None
    }

    fn set(&self, start: usize, len: usize) {
        self.seq.fetch_add(1, Ordering::AcqRel);
        self.start.store(start, Ordering::Release);
        self.len.store(len, Ordering::Release);
        self.faulted.store(false, Ordering::Release);
        self.seq.fetch_add(1, Ordering::AcqRel);
    }
}

const SLOTS_PER_CHUNK: usize = 256;

/// Slots in chunks that are allocated when all are taken and never freed, so the handler can
/// walk them at any time. A job maps each source once; thousands of sources take kilobytes.
struct Chunk {
    slots: [Slot; SLOTS_PER_CHUNK],
    next: AtomicPtr<Chunk>,
}

static FIRST_CHUNK: Chunk =
    Chunk { slots: [const { Slot::new() }; SLOTS_PER_CHUNK], next: AtomicPtr::new(std::ptr::null_mut()) };
/// Serialises registrations (never taken by the handler).
static REGISTER: Mutex<()> = Mutex::new(());
/// The page size, for the handler (which must not call into `OnceLock`).
static PAGE_SIZE: AtomicUsize = AtomicUsize::new(0);
/// The SIGBUS action that was installed before reshard's (leaked, never freed).
static PREVIOUS: AtomicPtr<libc::sigaction> = AtomicPtr::new(std::ptr::null_mut());

fn chunks() -> impl Iterator<Item = &'static Chunk> {
    let mut cur: Option<&'static Chunk> = Some(&FIRST_CHUNK);
    std::iter::from_fn(move || {
        let c = cur?;
        // SAFETY: `next` is null or a chunk leaked by `register`, never freed.
        cur = unsafe { c.next.load(Ordering::Acquire).as_ref() };
        Some(c)
    })
}

fn register(start: usize, len: usize) -> &'static Slot {
    let _held = REGISTER.lock().unwrap_or_else(|p| p.into_inner());
    let mut last = &FIRST_CHUNK;
    for c in chunks() {
        if let Some(s) = c.slots.iter().find(|s| s.len.load(Ordering::Acquire) == 0) {
            s.set(start, len);
            return s;
        }
        last = c;
    }
    let chunk: &'static Chunk = Box::leak(Box::new(Chunk {
        slots: [const { Slot::new() }; SLOTS_PER_CHUNK],
        next: AtomicPtr::new(std::ptr::null_mut()),
    }));
    chunk.slots[0].set(start, len);
    last.next.store(chunk as *const Chunk as *mut Chunk, Ordering::Release);
    &chunk.slots[0]
}

fn unregister(slot: &Slot) {
    let _held = REGISTER.lock().unwrap_or_else(|p| p.into_inner());
    slot.set(0, 0);
}

/// Total SIGBUS faults absorbed in registered maps since the process started: the executor
/// looks at its maps' marks only when this moved.
static FAULTS: AtomicUsize = AtomicUsize::new(0);

/// How many faults in source maps the handler has absorbed so far (see [`MappedFile::faulted`]).
pub fn faults_absorbed() -> usize {
    FAULTS.load(Ordering::Acquire)
}

fn install_sigbus_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        PAGE_SIZE.store(page_size() as usize, Ordering::Release);
        // SAFETY: a zeroed sigaction is a valid value (empty mask, no flags); the handler is an
        // `extern "C"` function of the SA_SIGINFO signature, async-signal-safe (atomics, mmap,
        // sigaction, raise). The previous action is kept for chaining.
        unsafe {
            let mut new: libc::sigaction = std::mem::zeroed();
            new.sa_sigaction = on_sigbus as *const () as libc::sighandler_t;
            new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut new.sa_mask);
            let old: &'static mut libc::sigaction = Box::leak(Box::new(std::mem::zeroed()));
            if libc::sigaction(libc::SIGBUS, &new, old) == 0 {
                PREVIOUS.store(old, Ordering::Release);
            }
        }
    });
}

/// The registered map holding `addr`, with its range.
fn find_map(addr: usize) -> Option<(&'static Slot, usize, usize)> {
    for c in chunks() {
        for s in &c.slots {
            if let Some((start, len)) = s.range() {
                if addr >= start && addr - start < len {
                    return Some((s, start, len));
                }
            }
        }
    }
    None
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    // Only a fault (not a SIGBUS sent with kill) at an address of one of our maps.
    if code == libc::BUS_ADRERR {
        if let Some((slot, start, len)) = find_map(addr) {
            let page = PAGE_SIZE.load(Ordering::Acquire).max(1);
            let from = addr & !(page - 1);
            let end = (start + len).div_ceil(page) * page;
            // SAFETY: [from, end) lies within a live read-only map of ours (registered until its
            // MappedFile is dropped, and the faulting thread is reading it, so it is alive).
            // Replacing its pages with private zero pages changes what readers see (zeros, which
            // `check` then reports) but keeps the range mapped, so the unmap at drop still works.
            let r = unsafe {
                libc::mmap(
                    from as *mut libc::c_void,
                    end - from,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if r != libc::MAP_FAILED {
                slot.faulted.store(true, Ordering::Release);
                FAULTS.fetch_add(1, Ordering::AcqRel);
                return;
            }
        }
    }
    // Not ours: what would have happened without reshard.
    // SAFETY: PREVIOUS is null or a leaked sigaction filled by the kernel; calling the previous
    // handler with the arguments we got is what chaining means. For SIG_DFL (and SIG_IGN with a
    // fault) the default action is restored and the signal raised again (it is blocked until we
    // return, and a fault would recur anyway), which ends the process as it would have ended.
    unsafe {
        let prev = PREVIOUS.load(Ordering::Acquire);
        let h = prev.as_ref().map_or(libc::SIG_DFL, |p| p.sa_sigaction);
        if h == libc::SIG_IGN && !is_forced_fault(code) {
            // Ignored, as it was: a SIGBUS sent with kill, sigqueue or tgkill (or an
            // action-optional machine-check report) is discarded by the kernel when ignored.
            return;
        }
        if let Some(prev) = prev.as_ref().filter(|_| h != libc::SIG_DFL && h != libc::SIG_IGN) {
            if prev.sa_flags & libc::SA_SIGINFO != 0 {
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) = std::mem::transmute(h);
                f(sig, info, ctx);
            } else {
                let f: extern "C" fn(libc::c_int) = std::mem::transmute(h);
                f(sig);
            }
            return;
        }
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(sig, &dfl, std::ptr::null_mut());
        libc::raise(sig);
    }
}

/// Whether a SIGBUS with this `si_code` is a fault of the thread that gets it, which the
/// kernel delivers even when SIGBUS is ignored (it resets the action to the default, so the
/// process dies): bad alignment, an address beyond a mapped file's end, a hardware error, or a
/// machine check that the process must act on. Codes of 0 and below are signals sent by a
/// process (kill, sigqueue, tgkill), which an ignored SIGBUS discards.
fn is_forced_fault(code: libc::c_int) -> bool {
    matches!(code, libc::BUS_ADRALN | libc::BUS_ADRERR | libc::BUS_OBJERR | libc::BUS_MCEERR_AR)
}

/// Allocations of 1 MiB or more get maps of their own from here on, given back to the system
/// when freed (glibc's `M_MMAP_THRESHOLD`, set once, for the `reshard` process; a library
/// leaves its host's allocator alone). glibc otherwise raises that threshold to the size of
/// each large block freed, up to 32 MiB: after a strategy was read, the vectors of a
/// checkpoint's index grew inside the parsing thread's heap, moved at each growth and left
/// holes there, 81 MiB resident at the peak for 300,000 small tensors where a fixed threshold
/// keeps 52 MiB (the index grows in place, by `mremap`). A job's large blocks from local
/// sources are reused buffers, so the maps cost no measurable time there; object stores' GET
/// responses and upload parts are fresh blocks, each faulted in anew in a map of its own, so the
/// CLI leaves the threshold alone when an `s3://` or `obs://` path is involved.
pub fn map_large_allocations() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes a tuning parameter of the allocator, which takes effect for
    // later allocations; live blocks are untouched.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// Memory freed is kept for reuse (glibc, for the `reshard` process when an object store is
/// involved): blocks below 32 MiB come from the heaps (`M_MMAP_THRESHOLD`), a heap keeps up to
/// 256 MiB free at its top (`M_TRIM_THRESHOLD`), and there are two heaps (`M_ARENA_MAX`), not
/// one per thread of the object-store runtime. GET responses arrive in blocks of up to about
/// 400 KiB that live until the copy has read them: with glibc's defaults each was mapped or
/// trimmed away when freed, and the next one faulted in anew, so every byte fetched went to
/// fresh pages. On the S3 bench's 8 -> 4 (`perf stat -r 5`, `-e task-clock,page-faults`):
/// 85,000-102,000 page faults and 0.92-1.16 s of CPU, against 49,000-57,000 and 0.81-0.82 s,
/// the peak anonymous memory the same (190-220 MB). Best effort: an allocator that refuses a
/// setting keeps its default. The heaps hold what the job's budget let it allocate at its peak.
pub fn reuse_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes tuning parameters of the allocator, which take effect for
    // later allocations; live blocks are untouched.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Gives the memory freed so far back to the system (`malloc_trim`, glibc only). glibc keeps a
/// heap per thread: what the main thread frees after a phase (the strategies once the plan is
/// built, the rank plans counted before executing) is not reused by the worker threads, and
/// would otherwise stay resident for the whole job.
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap memory to the system; it touches no live
    // allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}
