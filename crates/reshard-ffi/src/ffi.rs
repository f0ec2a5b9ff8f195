//! Every conversion between raw C pointers and Rust values happens in this module.
//!
//! The exported functions never dereference a pointer themselves: they call these helpers, which
//! check for NULL (and for empty paths, UTF-8 and sizes) and turn a bad argument into an
//! [`FfiError`] with a message naming the argument. What cannot be checked (that a non-NULL
//! pointer really points to what the header says) is the caller's side of the contract, stated
//! in each helper's `# Safety` section and in the header.

use std::ffi::{c_char, CStr, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::ptr::NonNull;

use crate::error::{c_string_lossy, FfiError, ReshardError, ReshardStatus};

fn null(name: &str) -> FfiError {
    FfiError::new(ReshardStatus::NullArgument, format!("argument '{name}' is NULL"))
}

/// Where a failing call puts its error object: a caller-supplied `ReshardError **`, possibly
/// NULL (then the error is dropped and only the status code is returned).
pub(crate) struct ErrorOut(*mut *mut ReshardError);

impl ErrorOut {
    /// # Safety
    ///
    /// `ptr` must be NULL or valid for writing one `ReshardError *` until the call returns.
    pub(crate) unsafe fn new(ptr: *mut *mut ReshardError) -> Self {
        ErrorOut(ptr)
    }

    /// Hands `e` to the caller (who then owns it) and returns its status code.
    pub(crate) fn set(&self, e: FfiError) -> ReshardStatus {
        let status = e.status;
        if !self.0.is_null() {
            let boxed = Box::into_raw(Box::new(ReshardError::from_ffi(e)));
            // SAFETY: `ErrorOut::new`'s contract: non-NULL means valid for one write.
            unsafe { self.0.write(boxed) };
        }
        status
    }
}

/// A required out-parameter (`T *`), written at most once, on success.
pub(crate) struct Out<T>(NonNull<T>);

impl<T> Out<T> {
    /// Checks `ptr` for NULL.
    ///
    /// # Safety
    ///
    /// `ptr` must be NULL or valid and aligned for writing one `T` until the call returns.
    pub(crate) unsafe fn new(ptr: *mut T, name: &str) -> Result<Self, FfiError> {
        NonNull::new(ptr).map(Out).ok_or_else(|| null(name))
    }

    /// Stores the output. `T` is a plain C value (pointer or integer): nothing is dropped.
    pub(crate) fn write(self, v: T) {
        // SAFETY: `Out::new`'s contract: valid and aligned for one write.
        unsafe { self.0.as_ptr().write(v) }
    }
}

/// Borrows the object behind a handle.
///
/// # Safety
///
/// `ptr` must be NULL or a live handle of type `T` returned by this library and not yet freed,
/// and must stay live until the returned reference is dropped (the call returns).
pub(crate) unsafe fn try_ref<'a, T>(ptr: *const T, name: &str) -> Result<&'a T, FfiError> {
    // SAFETY: the caller guarantees a non-NULL `ptr` is a live handle.
    unsafe { ptr.as_ref() }.ok_or_else(|| null(name))
}

/// A NUL-terminated string argument, NULL allowed.
///
/// # Safety
///
/// `ptr` must be NULL or point to a NUL-terminated string that stays unchanged until the call
/// returns.
unsafe fn c_str<'a>(ptr: *const c_char) -> Option<&'a CStr> {
    if ptr.is_null() {
        None
    } else {
        // SAFETY: non-NULL and NUL-terminated per the caller's contract.
        Some(unsafe { CStr::from_ptr(ptr) })
    }
}

/// A required path argument. Paths are bytes on Unix, so any non-empty string is accepted.
///
/// # Safety
///
/// As [`c_str`].
pub(crate) unsafe fn path_arg(ptr: *const c_char, name: &str) -> Result<PathBuf, FfiError> {
    // SAFETY: forwarded contract.
    unsafe { opt_path_arg(ptr, name) }?.ok_or_else(|| null(name))
}

/// An optional path argument: NULL gives `None`; an empty string is refused.
///
/// # Safety
///
/// As [`c_str`].
pub(crate) unsafe fn opt_path_arg(ptr: *const c_char, name: &str) -> Result<Option<PathBuf>, FfiError> {
    // SAFETY: forwarded contract.
    let Some(s) = (unsafe { c_str(ptr) }) else {
        return Ok(None);
    };
    if s.is_empty() {
        return Err(FfiError::new(ReshardStatus::InvalidArgument, format!("argument '{name}' is an empty path")));
    }
    Ok(Some(PathBuf::from(OsStr::from_bytes(s.to_bytes()))))
}

/// Several required path arguments, checked in order: the first NULL or empty one is the error.
///
/// # Safety
///
/// As [`c_str`], for each pointer.
pub(crate) unsafe fn path_args<const N: usize>(args: [(*const c_char, &str); N]) -> Result<[PathBuf; N], FfiError> {
    let mut paths: [PathBuf; N] = std::array::from_fn(|_| PathBuf::new());
    for (path, (ptr, name)) in paths.iter_mut().zip(args) {
        // SAFETY: forwarded contract.
        *path = unsafe { path_arg(ptr, name) }?;
    }
    Ok(paths)
}

/// The `options_json` argument of an export, given to its parser: `None` for NULL, the text
/// when it is UTF-8.
///
/// # Safety
///
/// As [`c_str`].
pub(crate) unsafe fn options_arg<T>(
    ptr: *const c_char,
    parse: impl FnOnce(Option<&str>) -> Result<T, FfiError>,
) -> Result<T, FfiError> {
    // SAFETY: forwarded contract.
    parse(unsafe { opt_utf8_arg(ptr, "options_json") }?)
}

/// An optional UTF-8 string argument: NULL gives `None`.
///
/// # Safety
///
/// As [`c_str`].
pub(crate) unsafe fn opt_utf8_arg<'a>(ptr: *const c_char, name: &str) -> Result<Option<&'a str>, FfiError> {
    // SAFETY: forwarded contract.
    let Some(s) = (unsafe { c_str(ptr) }) else {
        return Ok(None);
    };
    s.to_str()
        .map(Some)
        .map_err(|e| FfiError::new(ReshardStatus::InvalidUtf8, format!("argument '{name}' is not valid UTF-8: {e}")))
}

fn check_len<T>(len: usize, name: &str) -> Result<(), FfiError> {
    if len.saturating_mul(std::mem::size_of::<T>().max(1)) > isize::MAX as usize {
        return Err(FfiError::new(
            ReshardStatus::InvalidArgument,
            format!("argument '{name}': length {len} is impossibly large"),
        ));
    }
    Ok(())
}

/// An input array `(ptr, len)`. NULL is allowed only with `len == 0`.
///
/// # Safety
///
/// A non-NULL `ptr` must point to `len` initialised, aligned values that stay unchanged until the
/// call returns.
pub(crate) unsafe fn slice_arg<'a, T>(ptr: *const T, len: usize, name: &str) -> Result<&'a [T], FfiError> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(FfiError::new(
            ReshardStatus::NullArgument,
            format!("argument '{name}' is NULL but its length is {len}"),
        ));
    }
    check_len::<T>(len, name)?;
    // SAFETY: non-NULL, and the caller guarantees `len` valid aligned elements.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// An output array `(ptr, cap)`. NULL is allowed only with `cap == 0`. The memory may be
/// uninitialised: it is only ever written, through the raw pointer.
pub(crate) struct OutSlice<T> {
    ptr: *mut T,
    cap: usize,
}

impl<T: Copy> OutSlice<T> {
    /// Checks the pair.
    ///
    /// # Safety
    ///
    /// A non-NULL `ptr` must be valid and aligned for writing `cap` values until the call
    /// returns, and not be read or written by anyone else meanwhile.
    pub(crate) unsafe fn new(ptr: *mut T, cap: usize, name: &str) -> Result<Self, FfiError> {
        if cap > 0 && ptr.is_null() {
            return Err(FfiError::new(
                ReshardStatus::NullArgument,
                format!("argument '{name}' is NULL but its capacity is {cap}"),
            ));
        }
        check_len::<T>(cap, name)?;
        Ok(OutSlice { ptr, cap })
    }

    /// The capacity.
    pub(crate) fn cap(&self) -> usize {
        self.cap
    }

    /// Copies `values` to the start of the array. Panics if they do not fit, which callers
    /// check first with [`OutSlice::cap`].
    pub(crate) fn write(self, values: &[T]) {
        assert!(values.len() <= self.cap, "output array overflow");
        if values.is_empty() {
            return;
        }
        // SAFETY: `values.len() <= cap`, and `new`'s contract makes `cap` elements at the
        // non-NULL `ptr` writable and untouched by anyone else; a Rust slice cannot overlap them.
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), self.ptr, values.len()) }
    }
}

/// Moves a value to the heap and gives C the pointer (the handle).
pub(crate) fn into_handle<T>(v: T) -> *mut T {
    Box::into_raw(Box::new(v))
}

/// Frees a handle made by [`into_handle`]. NULL is a no-op.
///
/// # Safety
///
/// `ptr` must be NULL or a handle of type `T` from [`into_handle`] that was not freed before and
/// that no other thread is using.
pub(crate) unsafe fn free_handle<T>(ptr: *mut T) {
    if !ptr.is_null() {
        // SAFETY: made by `Box::into_raw` in `into_handle`, freed once (caller's contract).
        drop(unsafe { Box::from_raw(ptr) });
    }
}

/// Gives C an owned string, to be freed with [`free_string`].
pub(crate) fn into_c_string(s: String) -> *mut c_char {
    c_string_lossy(s).into_raw()
}

/// Frees a string made by [`into_c_string`]. NULL is a no-op.
///
/// # Safety
///
/// `ptr` must be NULL or a string from [`into_c_string`] that was not freed before.
pub(crate) unsafe fn free_string(ptr: *mut c_char) {
    if !ptr.is_null() {
        // SAFETY: made by `CString::into_raw`, freed once (caller's contract).
        drop(unsafe { std::ffi::CString::from_raw(ptr) });
    }
}
