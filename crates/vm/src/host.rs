//! Facts about the host that decide which VMM can run here. Read once, passed around as data, so
//! the decisions that use them are testable with fake facts.

use std::fs;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    /// `/dev/kvm` exists and this user can open it read-write.
    pub kvm_usable: bool,
    /// The CPU advertises VMX or SVM (hardware virtualization visible to this kernel).
    pub cpu_virt: bool,
    /// The KVM module is `kvm_pvm`: nested KVM without VMX, where every guest kernel instruction
    /// is emulated (see the README's PVM note).
    pub kvm_pvm: bool,
    /// `qemu-system-x86_64` on PATH.
    pub qemu: Option<PathBuf>,
}

impl HostFacts {
    pub fn probe() -> HostFacts {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let flags = cpuinfo.lines().find(|l| l.starts_with("flags")).unwrap_or("");
        HostFacts {
            kvm_usable: fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok(),
            cpu_virt: flags.split_whitespace().any(|f| f == "vmx" || f == "svm"),
            kvm_pvm: Path::new("/sys/module/kvm_pvm").exists(),
            qemu: which::which("qemu-system-x86_64").ok(),
        }
    }

    /// Hardware-accelerated KVM that runs an unmodified guest at native speed.
    pub fn hardware_kvm(&self) -> bool {
        self.kvm_usable && self.cpu_virt && !self.kvm_pvm
    }
}

/// The host's TSC rate in kHz, or `None` when the TSC is not invariant (no `constant_tsc`) or this
/// is not x86_64. Measured against `CLOCK_MONOTONIC_RAW` over 50 ms, which needs no privilege (the
/// kernel's own figure is only in its log) and is right whatever the CPU's frequency scaling does
/// (`/proc/cpuinfo`'s "cpu MHz" is the current core clock where the CPU reports one). When the
/// kernel's clocksource is the TSC, the result is the kernel's calibration, give or take a few kHz.
/// A separate probe from [`HostFacts::probe`]: it takes 50 ms and only a nested host's boot uses it.
pub fn tsc_khz() -> Option<u32> {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = cpuinfo.lines().find(|l| l.starts_with("flags")).unwrap_or("");
    if !flags.split_whitespace().any(|f| f == "constant_tsc") {
        return None;
    }
    measure_tsc_khz(std::time::Duration::from_millis(50))
}

#[cfg(target_arch = "x86_64")]
fn measure_tsc_khz(window: std::time::Duration) -> Option<u32> {
    // One reading: the clock between two TSC reads; the tightest of a few pairs is the one least
    // disturbed by preemption.
    fn reading() -> (u128, u128) {
        let sample = || {
            // SAFETY: rdtsc has no preconditions; clock_gettime writes into the timespec we own.
            unsafe {
                let before = core::arch::x86_64::_rdtsc();
                let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
                libc::clock_gettime(libc::CLOCK_MONOTONIC_RAW, &mut ts);
                let after = core::arch::x86_64::_rdtsc();
                (before, ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128, after)
            }
        };
        let (before, ns, after) =
            (0..32).map(|_| sample()).min_by_key(|(b, _, a)| a.wrapping_sub(*b)).expect("32 samples");
        (u128::from(before) + u128::from(after.wrapping_sub(before)) / 2, ns)
    }
    let (tsc0, ns0) = reading();
    std::thread::sleep(window);
    let (tsc1, ns1) = reading();
    let khz = tsc1.checked_sub(tsc0)? * 1_000_000 / ns1.checked_sub(ns0).filter(|d| *d > 0)?;
    u32::try_from(khz).ok().filter(|k| *k > 0)
}

#[cfg(not(target_arch = "x86_64"))]
fn measure_tsc_khz(_: std::time::Duration) -> Option<u32> {
    None
}
