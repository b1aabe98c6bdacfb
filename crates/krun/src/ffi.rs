//! The single switch between libkrun sources. `bundled` links the libkrun crate
//! built from source; `system` links an installed libkrun found via pkg-config
//! (e.g. Homebrew on macOS) through krun-sys' bindgen output. The `system` path
//! cannot be built on hosts without libkrun headers, so it is only checked where
//! libkrun is installed; its bindgen signatures are all `unsafe extern "C"` with
//! the same C types, which is why callers go through the `call!` macro.

#[cfg(all(feature = "bundled", feature = "system"))]
compile_error!("features `bundled` and `system` both provide the krun_* symbols; enable exactly one");
#[cfg(not(any(feature = "bundled", feature = "system")))]
compile_error!("enable one of the features `bundled` or `system`");

#[cfg(feature = "bundled")]
pub(crate) use krun::*;
#[cfg(all(feature = "system", not(feature = "bundled")))]
pub(crate) use krun_sys::*;

// Some bundled functions are safe `extern "C" fn`s while their bindgen
// counterparts are unsafe, so the unsafe block may be redundant on one side.
macro_rules! call {
    ($f:ident($($arg:expr),* $(,)?)) => {{
        #[allow(unused_unsafe)]
        // SAFETY: every pointer argument is derived from a CString or pointer
        // array that the caller keeps alive for the duration of this call.
        let ret: i32 = unsafe { $crate::ffi::$f($($arg),*) };
        $crate::KrunError::check(stringify!($f), ret)
    }};
}
