//! The single switch between libkrun sources, chosen by the target (see `Cargo.toml`): on Linux the
//! libkrun crate compiled in from the registry, on macOS Homebrew's libkrun through krun-sys'
//! bindgen output (pkg-config finds it). krun-sys is built against Homebrew's libkrun by the macOS
//! CI job; on Linux, `cargo xtask check-macos` type-checks the macOS path against the check-only
//! header `check-macos/libkrun.h` (tested below to declare exactly the calls made). Its bindgen
//! signatures are all `unsafe extern "C"` with the same C types, which is why callers go through
//! the `call!` macro.

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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    /// `cargo xtask check-macos` type-checks the macOS path against the check-only header
    /// `check-macos/libkrun.h`, so it must declare the calls this crate makes, and only those: a
    /// call missing there fails the check as a false alarm, one declared but no longer made is a
    /// signature nobody checks.
    #[test]
    fn check_only_header_declares_exactly_the_calls_made() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src");
        let mut called = BTreeSet::new();
        for entry in std::fs::read_dir(dir).unwrap().flatten().filter(|e| e.path().extension() == Some("rs".as_ref())) {
            let text = std::fs::read_to_string(entry.path()).unwrap();
            for rest in text.split("call!(krun_").skip(1) {
                let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                if !name.is_empty() {
                    called.insert(format!("krun_{name}"));
                }
            }
        }
        let header = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/check-macos/libkrun.h")).unwrap();
        let declared: BTreeSet<String> = header
            .lines()
            .filter_map(|l| l.strip_prefix("int32_t "))
            .filter_map(|l| l.split_once('(').map(|(name, _)| name.to_owned()))
            .collect();
        assert!(called.len() >= 10, "found only {called:?} in {dir}: has the call! pattern changed?");
        assert_eq!(declared, called, "check-macos/libkrun.h against the krun_* calls in {dir}");
    }
}
