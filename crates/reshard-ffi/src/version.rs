//! Library and ABI versions.

use std::ffi::c_char;

use crate::RESHARD_ABI_VERSION;

/// The library version, e.g. "0.1.0": a static string, never NULL, not to be freed.
#[no_mangle]
pub extern "C" fn reshard_version() -> *const c_char {
    const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");
    VERSION.as_ptr().cast()
}

/// The ABI version of the loaded library; compare with `RESHARD_ABI_VERSION`.
#[no_mangle]
pub extern "C" fn reshard_abi_version() -> u32 {
    RESHARD_ABI_VERSION
}
