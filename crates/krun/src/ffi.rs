//! The single switch between libkrun sources, chosen by the target (see `Cargo.toml`): on Linux the
//! libkrun crate compiled in from the registry, on macOS Homebrew's libkrun through krun-sys'
//! bindgen output (pkg-config finds it). krun-sys is only built where libkrun is installed, so the
//! macOS path is compiled by the macOS CI job. Its bindgen signatures are all `unsafe extern "C"`
//! with the same C types, which is why callers go through the `call!` macro.

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
compile_error!("libkrun runs on Linux (KVM) and macOS (Hypervisor.framework) only");

#[cfg(target_os = "linux")]
pub(crate) use krun::*;
#[cfg(target_os = "macos")]
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
