//! `map_large_allocations` (what the `reshard` process sets at start): a large block freed is
//! given back to the system even after glibc would have raised its threshold for maps. One
//! test in its own binary, so that nothing else allocates meanwhile.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

fn anon_kb() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("RssAnon:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A block of `n` bytes, every page touched.
fn touched(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    for i in (0..n).step_by(4096) {
        v[i] = 1;
    }
    std::hint::black_box(v)
}

#[test]
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn a_large_block_freed_leaves_nothing_resident() {
    reshard_core::map_large_allocations();
    // glibc, left to itself, raises its threshold for maps to a large block's size when that
    // block is freed (here to 16 MiB): blocks below it then come from the heap and stay
    // resident after they are freed (a parser's growing vectors: 81 MiB at the peak for
    // 300,000 small tensors, where 52 MiB were live).
    drop(touched(16 << 20));
    let before = anon_kb();
    drop(touched(8 << 20));
    let grew = anon_kb().saturating_sub(before);
    assert!(grew < 2048, "8 MiB freed left {grew} KiB resident");
}
