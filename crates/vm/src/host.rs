//! Facts about the host that decide how a VM can run here, probed once by [`HostFacts::probe`]
//! and passed around as data: virtualization (Linux `/dev/kvm` and its kind, macOS HVF), the VMM
//! binaries and helper programs with their paths and versions. Nothing here decides; the plan
//! ([`crate::plan`]) does, from these facts alone, so every decision is testable with fake facts.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use openshell_artifacts::Arch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Os {
    Linux,
    MacOs,
}

impl Os {
    /// The OS this program was built for, which is the one it runs on.
    pub const fn host() -> Os {
        if cfg!(target_os = "macos") {
            Os::MacOs
        } else {
            Os::Linux
        }
    }
}

#[derive(Debug, Clone)]
pub struct HostFacts {
    pub os: Os,
    /// `vmx` or `svm` when `/proc/cpuinfo` shows it.
    pub cpu_virt_flag: Option<String>,
    /// The CPU flag `hypervisor`: this host is itself a VM, so any KVM here is nested.
    pub cpu_hypervisor: bool,
    pub kvm: KvmDevice,
    /// Only on macOS.
    pub macos: Option<MacFacts>,
    pub krun: KrunFacts,
    pub qemu: Option<Tool>,
    /// QEMU for guests of the other arch (`qemu-system-aarch64` on an x86_64 host and back): what
    /// boots an arm64 kernel here, under emulation.
    pub qemu_foreign: Option<Tool>,
    pub passt: Option<Tool>,
    /// Found on PATH, where podman's packages put it, or (Linux) fetched from Debian into the
    /// artifact store ([`crate::net::gvproxy::find`]).
    pub gvproxy: Option<Tool>,
}

#[derive(Debug, Clone, Default)]
pub struct KvmDevice {
    pub exists: bool,
    /// Why opening `/dev/kvm` read-write failed, if it did.
    pub open_error: Option<String>,
    /// Loaded KVM modules among `kvm_intel`, `kvm_amd`, `kvm_pvm`.
    pub modules: Vec<String>,
}

impl KvmDevice {
    pub fn usable(&self) -> bool {
        self.exists && self.open_error.is_none()
    }

    /// The KVM module is `kvm_pvm`: nested KVM without VMX, where every guest kernel instruction
    /// is emulated (see docs/nested-hosts.md).
    pub fn pvm(&self) -> bool {
        self.modules.iter().any(|m| m == "kvm_pvm")
    }
}

#[derive(Debug, Clone, Default)]
pub struct MacFacts {
    /// `sysctl kern.hv_support` is 1.
    pub hvf: bool,
    /// Whether `openshell-vmm` carries `com.apple.security.hypervisor`; `None` when not built.
    pub vmm_entitled: Option<bool>,
}

#[derive(Debug, Clone)]
pub struct KrunFacts {
    /// `bundled` or `system` (the `openshell-krun` feature this build links).
    pub link_mode: String,
    pub version: Option<String>,
    /// The `openshell-vmm` binary that hosts a libkrun VM ([`vmm_binary`]).
    pub vmm_binary: PathBuf,
    pub vmm_built: bool,
}

/// A helper program found on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tool {
    pub path: PathBuf,
    pub version: Option<String>,
}

/// Where `openshell-vmm` is, or will be once built: `$OPENSHELL_VMM` (the VM suites, and a nested
/// host's share), else beside the running program (`target/debug/`, where `cargo xtask` builds it).
/// The one place that locates it.
pub fn vmm_binary() -> PathBuf {
    std::env::var_os("OPENSHELL_VMM")
        .map(PathBuf::from)
        .or_else(|| std::env::current_exe().ok().and_then(|e| Some(e.parent()?.join("openshell-vmm"))))
        .unwrap_or_else(|| PathBuf::from("openshell-vmm"))
}

impl HostFacts {
    /// The one probe of the host. Records what it cannot find out as a fact rather than failing.
    pub fn probe() -> HostFacts {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let flags: Vec<&str> = cpuinfo
            .lines()
            .find(|l| l.starts_with("flags"))
            .map(|l| l.split_whitespace().collect())
            .unwrap_or_default();
        let macos = cfg!(target_os = "macos");
        let vmm = vmm_binary();
        HostFacts {
            os: Os::host(),
            cpu_virt_flag: flags.iter().find(|f| **f == "vmx" || **f == "svm").map(|f| f.to_string()),
            cpu_hypervisor: flags.contains(&"hypervisor"),
            kvm: probe_kvm(),
            macos: macos.then(|| probe_macos(&vmm)),
            krun: KrunFacts {
                link_mode: openshell_krun::LINK_MODE.to_owned(),
                version: if openshell_krun::LINK_MODE == "bundled" {
                    Some(openshell_krun::BUNDLED_LIBKRUN_VERSION.to_owned())
                } else {
                    first_line("pkg-config", &["--modversion", "libkrun"])
                },
                vmm_built: vmm.is_file(),
                vmm_binary: vmm,
            },
            qemu: qemu_for(Arch::host()),
            qemu_foreign: Arch::ALL.into_iter().find(|a| *a != Arch::host()).and_then(qemu_for),
            passt: tool("passt", |out| {
                // Debian's passt says "passt unknown version"; its package version is the useful one.
                let own = out.strip_prefix("passt ").filter(|v| !v.contains("unknown")).map(str::to_owned);
                own.or_else(|| {
                    first_line("dpkg-query", &["-W", "-f=${Version}", "passt"]).map(|v| format!("{v} (Debian package)"))
                })
            }),
            gvproxy: crate::net::gvproxy::find().map(|path| {
                // "gvproxy version v0.8.1"
                let version = first_line(&path.to_string_lossy(), &["-version"])
                    .map(|l| l.strip_prefix("gvproxy version ").map(str::to_owned).unwrap_or(l));
                Tool { path, version }
            }),
        }
    }

    /// Hardware-accelerated KVM that runs an unmodified guest at native speed.
    pub fn hardware_kvm(&self) -> bool {
        self.kvm.usable() && self.cpu_virt_flag.is_some() && !self.kvm.pvm()
    }
}

/// QEMU's system emulator for guests of `arch` (QEMU names it `qemu-system-<arch>`).
fn qemu_for(arch: Arch) -> Option<Tool> {
    tool(&format!("qemu-system-{}", arch.name()), |out| out.strip_prefix("QEMU emulator version ").map(str::to_owned))
}

fn probe_kvm() -> KvmDevice {
    let dev = Path::new("/dev/kvm");
    KvmDevice {
        exists: dev.exists(),
        open_error: fs::OpenOptions::new().read(true).write(true).open(dev).err().map(|e| e.to_string()),
        modules: ["kvm_intel", "kvm_amd", "kvm_pvm"]
            .into_iter()
            .filter(|m| Path::new("/sys/module").join(m).exists())
            .map(str::to_owned)
            .collect(),
    }
}

/// Compiled everywhere so Linux builds type-check it; only called on macOS.
fn probe_macos(vmm_binary: &Path) -> MacFacts {
    use openshell_krun::codesign;
    MacFacts {
        hvf: first_line("sysctl", &["-n", "kern.hv_support"]).as_deref() == Some("1"),
        vmm_entitled: vmm_binary.is_file().then(|| {
            codesign::display_command(vmm_binary)
                .output()
                .is_ok_and(|o| signature_entitled(o.status.success(), &o.stdout, &String::from_utf8_lossy(&o.stderr)))
        }),
    }
}

/// Whether what `codesign -d --entitlements - --xml` printed entitles a VMM, read by the parser
/// `cargo xtask codesign` verifies its signature with: every key set to `true`. A key set to
/// `false`, another key only, no signature, or output codesign could not make count as not.
fn signature_entitled(success: bool, stdout: &[u8], stderr: &str) -> bool {
    openshell_krun::codesign::parse_display(success, stdout, stderr) == Ok(openshell_krun::codesign::Entitled::Yes)
}

/// The first line a program prints (stdout, else stderr), if it runs and succeeds.
pub(crate) fn first_line(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok().filter(|o| o.status.success())?;
    let text = if out.stdout.is_empty() { out.stderr } else { out.stdout };
    String::from_utf8_lossy(&text).lines().next().map(|l| l.trim().to_owned()).filter(|l| !l.is_empty())
}

/// A program on PATH and its version, read from its `--version` line by `parse`.
fn tool(name: &str, parse: impl Fn(&str) -> Option<String>) -> Option<Tool> {
    let path = which::which(name).ok()?;
    let version = first_line(&path.to_string_lossy(), &["--version"]).and_then(|l| parse(&l));
    Some(Tool { path, version })
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
            #[allow(unsafe_code)]
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

/// Fake facts for the host shapes the plan distinguishes, for unit tests here and in the crates
/// above (the check's rows): facts in, decisions out, no host needed.
#[doc(hidden)]
pub mod fake {
    use super::*;

    /// A bare-metal Linux host with hardware KVM, QEMU and passt.
    pub fn hardware_kvm() -> HostFacts {
        HostFacts {
            os: Os::Linux,
            cpu_virt_flag: Some("vmx".into()),
            cpu_hypervisor: false,
            kvm: KvmDevice { exists: true, open_error: None, modules: vec!["kvm_intel".into()] },
            macos: None,
            krun: KrunFacts {
                link_mode: "bundled".into(),
                version: Some("1.19.7".into()),
                vmm_binary: "/t/openshell-vmm".into(),
                vmm_built: true,
            },
            qemu: Some(Tool { path: "/usr/bin/qemu-system-x86_64".into(), version: Some("7.2.22".into()) }),
            qemu_foreign: Some(Tool { path: "/usr/bin/qemu-system-aarch64".into(), version: Some("7.2.22".into()) }),
            passt: Some(Tool { path: "/usr/bin/passt".into(), version: Some("0.0~git20230309".into()) }),
            gvproxy: None,
        }
    }

    /// This project's CI host: /dev/kvm is nested PVM, no VMX.
    pub fn pvm() -> HostFacts {
        let mut h = hardware_kvm();
        h.cpu_virt_flag = None;
        h.cpu_hypervisor = true;
        h.kvm.modules = vec!["kvm_pvm".into()];
        h
    }

    pub fn no_kvm() -> HostFacts {
        let mut h = hardware_kvm();
        h.cpu_virt_flag = None;
        h.kvm = KvmDevice::default();
        h
    }

    pub fn macos(hvf: bool, vmm_entitled: Option<bool>) -> HostFacts {
        let mut h = hardware_kvm();
        h.os = Os::MacOs;
        h.cpu_virt_flag = None;
        h.kvm = KvmDevice::default();
        h.qemu = None;
        h.passt = None;
        h.gvproxy = Some(Tool { path: "/opt/homebrew/bin/gvproxy".into(), version: None });
        h.macos = Some(MacFacts { hvf, vmm_entitled });
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `codesign -d --entitlements - --xml` output, as `openshell_krun::codesign`'s tests have it.
    fn plist(dict: &str) -> String {
        format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?><plist version=\"1.0\"><dict>{dict}</dict></plist>")
    }

    #[test]
    fn the_vmm_is_entitled_only_with_the_key_set_to_true() {
        let stderr = "Executable=/t/openshell-vmm\n";
        let key = "<key>com.apple.security.hypervisor</key>";
        assert!(signature_entitled(true, plist(&format!("{key}<true/>")).as_bytes(), stderr));
        assert!(!signature_entitled(true, plist(&format!("{key}<false/>")).as_bytes(), stderr), "a key set to false");
        assert!(!signature_entitled(true, plist(&format!("{key}<string>yes</string>")).as_bytes(), stderr));
        // The arm64 linker's own ad hoc signature: no entitlements, empty stdout.
        assert!(!signature_entitled(true, b"", stderr));
        assert!(!signature_entitled(false, b"", "/t/openshell-vmm: code object is not signed at all\n"));
    }
}
