//! Small files and objects written and read whole (maps, job records): a local file is written
//! with [`crate::atomic::write_atomic`]; an `s3://`/`obs://` object with one PUT, which the store
//! makes visible only complete. Either way nothing half-written appears under the final name.

use std::path::Path;

use crate::error::Result;

/// Writes `bytes` to `path` (a file or an object URL) whole; `sync` is for files (an object is
/// durable once its PUT returns).
pub fn write(path: &Path, bytes: &[u8], sync: bool) -> Result<()> {
    if super::is_url(path) {
        #[cfg(feature = "s3")]
        return super::object::put(path, bytes.to_vec()).map(|_| ());
        #[cfg(not(feature = "s3"))]
        return Err(super::no_object_storage(path));
    }
    crate::atomic::write_atomic(path, bytes, sync)
}

/// The bytes of `path` (a file or an object URL, at most `cap` bytes), or `None` when there is
/// no such file or object. A local file that cannot be read is taken as absent too (a record
/// being replaced by a rename is read on the next poll).
pub fn read(path: &Path, cap: u64, what: &str) -> Result<Option<Vec<u8>>> {
    if super::is_url(path) {
        #[cfg(feature = "s3")]
        {
            // A GET is pinned to the ETag its HEAD saw: an object replaced in between (a record
            // rewritten by its process) fails it, and is read again.
            let mut tries = 0;
            loop {
                if super::object::head(path)?.is_none() {
                    return Ok(None);
                }
                match super::object::read_all(path, cap, what) {
                    Err(crate::error::Error::Source { .. }) if tries < 4 => tries += 1,
                    r => return r.map(Some),
                }
            }
        }
        #[cfg(not(feature = "s3"))]
        return Err(super::no_object_storage(path));
    }
    let _ = (cap, what);
    Ok(std::fs::read(path).ok())
}
