//! The two VMMs behind one contract: boot the kernel with the rootfs directory shared read-only,
//! share the instance directory, record the console to a file, and exit when the guest powers off.

pub mod krun;
pub mod qemu;

use std::fmt;
use std::path::{Path, PathBuf};

use crate::{HostFacts, VmError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// libkrun: hardware KVM (Linux) or HVF (macOS), root over virtio-fs.
    Krun,
    /// QEMU microvm: KVM where hardware KVM exists, TCG otherwise; root over virtio-9p.
    Qemu { kvm: bool },
}

/// What the user asked for with `--vmm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VmmChoice {
    #[default]
    Auto,
    Krun,
    Qemu,
}

impl std::str::FromStr for VmmChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(VmmChoice::Auto),
            "krun" => Ok(VmmChoice::Krun),
            "qemu" => Ok(VmmChoice::Qemu),
            _ => Err(format!("unknown VMM {s:?}: expected auto, krun or qemu")),
        }
    }
}

impl Backend {
    /// The backend's name without its accelerator: `krun` or `qemu`, as `--vmm` spells it.
    pub fn kind(self) -> &'static str {
        match self {
            Backend::Krun => "krun",
            Backend::Qemu { .. } => "qemu",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Backend::Krun => f.write_str("krun"),
            Backend::Qemu { kvm: true } => f.write_str("qemu (kvm)"),
            Backend::Qemu { kvm: false } => f.write_str("qemu (tcg)"),
        }
    }
}

/// Parameters for our init, common to both backends: the host's wall clock (microvm has no RTC and
/// libkrun none the guest reads, and TLS certificate checks need a real date) and the network.
pub fn init_params(cfg: &crate::VmConfig) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut p = format!("openshell.time={now}");
    if let Some(guest) = cfg.net.guest() {
        p.push(' ');
        p.push_str(&guest.cmdline_param(cfg.dhcp));
    }
    let mounts: Vec<openshell_guest::GuestMount> = cfg.shares.iter().map(|s| s.mount.clone()).collect();
    if !mounts.is_empty() {
        p.push(' ');
        p.push_str(&openshell_guest::GuestMount::param(&mounts));
    }
    p
}

/// The tag of the device that serves the guest's root directory (`root=` on its command line):
/// a 9p `mount_tag` under QEMU, a virtio-fs share under libkrun.
pub const ROOT_TAG: &str = "rootfs";

/// The kernel file and root directory a VMM process was started with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootedArtifacts {
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
}

/// What a running VMM of ours was started with, read back from its argv (`/proc/<pid>/cmdline`):
/// QEMU names both on its command line, `openshell-vmm` names the spec file that does. Relative
/// paths resolve against the VMM's working directory `cwd`. This is the VMM's word, not the
/// instance's records: what `verify` re-hashes.
pub fn booted_artifacts(argv: &[String], cwd: &Path) -> Result<BootedArtifacts, String> {
    let program = argv.first().map(|a| a.rsplit('/').next().unwrap_or(a)).unwrap_or_default();
    let found = if program.starts_with("qemu-system") {
        qemu::booted_artifacts(argv)?
    } else if program == "openshell-vmm" {
        krun::booted_artifacts(argv, cwd)?
    } else {
        return Err(format!("{program:?} is not a VMM this project starts ({})", VMM_PROGRAMS.join(", ")));
    };
    Ok(BootedArtifacts { kernel: cwd.join(found.kernel), rootfs: cwd.join(found.rootfs) })
}

/// What a VMM process of ours runs: a recorded VMM pid that runs neither is not ours any more.
pub const VMM_PROGRAMS: &[&str] = &["qemu-system", "openshell-vmm"];

const QEMU_HINT: &str = "install QEMU with: apt-get install -y qemu-system-x86";

/// Picks the backend and says why, in one line.
pub fn choose(choice: VmmChoice, host: &HostFacts) -> Result<(Backend, String), VmError> {
    let qemu = |why: String| -> Result<(Backend, String), VmError> {
        if host.qemu.is_none() {
            return Err(VmError::NoBackend(format!("{why}, and qemu-system-x86_64 is not installed; {QEMU_HINT}")));
        }
        let kvm = host.hardware_kvm();
        Ok((Backend::Qemu { kvm }, why))
    };
    match choice {
        VmmChoice::Krun if !host.kvm_usable => Err(VmError::NoBackend(
            "krun needs /dev/kvm, which is missing or not openable by this user; use --vmm qemu".into(),
        )),
        VmmChoice::Krun => Ok((Backend::Krun, "krun requested with --vmm".into())),
        VmmChoice::Qemu => qemu("qemu requested with --vmm".into()),
        VmmChoice::Auto if host.hardware_kvm() => {
            Ok((Backend::Krun, "hardware KVM is available, so libkrun runs the guest".into()))
        }
        VmmChoice::Auto if host.kvm_pvm => qemu(
            "/dev/kvm is nested PVM KVM (no VMX/SVM), where libkrun's guest cannot reach userspace; using QEMU with TCG".into(),
        ),
        VmmChoice::Auto if host.kvm_usable => qemu("/dev/kvm exists but the CPU shows no VMX/SVM; using QEMU with TCG".into()),
        VmmChoice::Auto => qemu("no usable /dev/kvm; using QEMU with TCG".into()),
    }
}

/// [`choose`] for a guest of `arch`: a guest of the host's arch gets what `choose` says; a foreign
/// one (an arm64 kernel on x86_64) can only be emulated, so QEMU with TCG, and `--vmm krun` is
/// refused (libkrun runs guests of the host's arch only).
pub fn choose_for(
    choice: VmmChoice,
    arch: openshell_artifacts::Arch,
    host: &HostFacts,
) -> Result<(Backend, String), VmError> {
    let host_arch = openshell_artifacts::Arch::host();
    if arch == host_arch {
        return choose(choice, host);
    }
    match choice {
        VmmChoice::Krun => Err(VmError::NoBackend(format!(
            "libkrun runs only {host_arch} guests on this {host_arch} host, not {arch}; use --vmm qemu"
        ))),
        VmmChoice::Auto | VmmChoice::Qemu => Ok((
            Backend::Qemu { kvm: false },
            format!("an {arch} guest on an {host_arch} host runs under QEMU's emulation (TCG)"),
        )),
    }
}

/// Where libkrun's guest can run on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KrunPlace {
    /// Here: hardware KVM (or HVF on macOS).
    Direct,
    /// Only inside a nested host: an L1 QEMU TCG VM whose emulated AMD CPU (`-cpu max`) offers SVM
    /// with nested paging, so L1's own KVM runs libkrun's guest as L2. Slow (everything below L1
    /// is emulated), so it serves the krun trials, not `vm run`.
    NestedL1,
    /// Nowhere on this host, and why.
    Nowhere(String),
}

/// Decides [`KrunPlace`] from the host's facts: the one answer the check, the test suites and the
/// e2e build step read. The nested host needs QEMU for x86_64 on an x86_64 Linux host (it runs
/// `openshell-vmm` built here inside L1); TCG needs no `/dev/kvm`, so PVM or none both qualify.
pub fn krun_place(host: &HostFacts) -> KrunPlace {
    if host.hardware_kvm() {
        return KrunPlace::Direct;
    }
    let why = if host.kvm_pvm {
        "/dev/kvm is nested PVM KVM, where libkrun's guest never reaches userspace"
    } else if host.kvm_usable {
        "/dev/kvm works but the CPU shows no VMX/SVM"
    } else {
        "there is no usable /dev/kvm"
    };
    if !cfg!(all(target_os = "linux", target_arch = "x86_64")) {
        return KrunPlace::Nowhere(format!("{why}, and a nested host needs an x86_64 Linux host"));
    }
    match host.qemu {
        Some(_) => KrunPlace::NestedL1,
        None => KrunPlace::Nowhere(format!("{why}, and a nested host needs qemu-system-x86_64; {QEMU_HINT}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(kvm_usable: bool, cpu_virt: bool, kvm_pvm: bool, qemu: bool) -> HostFacts {
        HostFacts { kvm_usable, cpu_virt, kvm_pvm, qemu: qemu.then(|| "/usr/bin/qemu-system-x86_64".into()) }
    }

    #[test]
    fn auto_prefers_krun_on_hardware_kvm() {
        assert_eq!(choose(VmmChoice::Auto, &facts(true, true, false, true)).unwrap().0, Backend::Krun);
    }

    #[test]
    fn auto_uses_qemu_tcg_on_pvm_and_says_why() {
        let (b, why) = choose(VmmChoice::Auto, &facts(true, false, true, true)).unwrap();
        assert_eq!(b, Backend::Qemu { kvm: false });
        assert!(why.contains("PVM"), "{why}");
    }

    #[test]
    fn no_backend_is_a_clear_error() {
        let err = choose(VmmChoice::Auto, &facts(false, false, false, false)).unwrap_err().to_string();
        assert!(err.contains("apt-get install -y qemu-system-x86"), "{err}");
        let err = choose(VmmChoice::Krun, &facts(false, false, false, true)).unwrap_err().to_string();
        assert!(err.contains("/dev/kvm"), "{err}");
    }

    #[test]
    fn krun_runs_directly_on_hardware_kvm_nested_under_pvm_with_qemu_and_nowhere_without_it() {
        assert_eq!(krun_place(&facts(true, true, false, true)), KrunPlace::Direct);
        assert_eq!(krun_place(&facts(true, false, true, true)), KrunPlace::NestedL1);
        assert_eq!(krun_place(&facts(false, false, false, true)), KrunPlace::NestedL1);
        match krun_place(&facts(true, false, true, false)) {
            KrunPlace::Nowhere(why) => {
                assert!(why.contains("PVM") && why.contains("apt-get install -y qemu-system-x86"), "{why}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_foreign_arch_guest_is_emulated_by_qemu_and_krun_refused() {
        use openshell_artifacts::Arch;
        let foreign = Arch::ALL.into_iter().find(|a| *a != Arch::host()).unwrap();
        let hw = facts(true, true, false, true);
        assert_eq!(choose_for(VmmChoice::Auto, Arch::host(), &hw).unwrap().0, Backend::Krun);
        let (b, why) = choose_for(VmmChoice::Auto, foreign, &hw).unwrap();
        assert_eq!(b, Backend::Qemu { kvm: false });
        assert!(why.contains("TCG"), "{why}");
        let err = choose_for(VmmChoice::Krun, foreign, &hw).unwrap_err().to_string();
        assert!(err.contains("--vmm qemu"), "{err}");
    }

    #[test]
    fn parses_choices() {
        assert_eq!("qemu".parse::<VmmChoice>().unwrap(), VmmChoice::Qemu);
        assert!("xen".parse::<VmmChoice>().is_err());
    }

    #[test]
    fn booted_artifacts_by_program_with_relative_paths_from_the_cwd() {
        let argv: Vec<String> = [
            "/usr/bin/qemu-system-x86_64",
            "-kernel",
            "k/vmlinux",
            "-fsdev",
            "local,id=root,path=rootfs",
            "-device",
            "virtio-9p-device,fsdev=root,mount_tag=rootfs",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        let b = booted_artifacts(&argv, Path::new("/cwd")).unwrap();
        assert_eq!((b.kernel.as_path(), b.rootfs.as_path()), (Path::new("/cwd/k/vmlinux"), Path::new("/cwd/rootfs")));
        let e = booted_artifacts(&["/usr/bin/sleep".to_owned(), "9".to_owned()], Path::new("/")).unwrap_err();
        assert!(e.contains("\"sleep\" is not a VMM"), "{e}");
    }
}
