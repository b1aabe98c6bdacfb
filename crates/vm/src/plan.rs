//! The one decision about how a VM runs on this host: from [`HostFacts`] and what the user asked
//! for (`--vmm`, the network), [`plan`] says which backend boots and why, where libkrun can run at
//! all, whether `openshell-vmm` must exist (and be built), and which helper programs the boot
//! needs. Pure, so each host shape is a unit test with fake facts. The check's rows, the
//! preflight, `launch`, xtask's build step and the bench all read this plan; none decides again.

use std::path::PathBuf;

use openshell_artifacts::Arch;

use crate::backend::Backend;
use crate::host::{HostFacts, Os};
pub use crate::net::Net;
use crate::{VmConfig, VmmChoice};

pub const QEMU_INSTALL: &str = "apt-get install -y qemu-system-x86";
/// Defined beside the code that starts passt (which names it when passt is missing).
pub use crate::net::INSTALL_HINT as PASST_INSTALL;
/// How an unsigned `openshell-vmm` gets the hypervisor entitlement on macOS.
pub const CODESIGN: &str = "run `cargo xtask codesign`";

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

/// Something the boot needs on the host besides the kernel and rootfs: each is a required row of
/// the preflight and something xtask's build step installs or builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// `qemu-system-x86_64` (the QEMU backend, or the nested host that runs libkrun's guest).
    Qemu,
    Passt,
    Gvproxy,
    /// `openshell-vmm` (the krun backend); on macOS signed with the hypervisor entitlement.
    VmmBinary,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub choice: VmmChoice,
    /// The guest's arch: the host's, or another one that only QEMU's emulation boots.
    pub arch: Arch,
    /// The backend `choice` boots with and why (one line), or why nothing boots and what to do.
    pub backend: Result<(Backend, String), String>,
    /// Set when the backend starts but its guest will not get far here (krun asked for on a Linux
    /// host without hardware KVM): the check shows it as a WARN.
    pub caveat: Option<String>,
    pub krun: KrunPlace,
    /// `openshell-vmm` when the backend is krun: where it is, and whether it is built yet.
    pub vmm_binary: Option<(PathBuf, bool)>,
    /// `qemu-system-x86_64` when the backend is QEMU.
    pub qemu: Option<PathBuf>,
    /// The gvproxy a `--net gvproxy` boot starts: `--gvproxy PATH` ([`Plan::of`]), else the
    /// host's (PATH, podman's directories, the artifact store); `None` when none was found.
    pub gvproxy: Option<PathBuf>,
    /// What the boot needs on the host, in the order the preflight shows it.
    pub needs: Vec<Need>,
}

impl Plan {
    pub fn needs(&self, n: Need) -> bool {
        self.needs.contains(&n)
    }

    /// The chosen backend, or the plan's reason as an error.
    pub fn backend(&self) -> Result<(Backend, &str), crate::VmError> {
        match &self.backend {
            Ok((b, why)) => Ok((*b, why.as_str())),
            Err(why) => Err(crate::VmError::NoBackend(why.clone())),
        }
    }
}

/// The plan for booting a guest of the host's arch with `choice` and network `net` on a host
/// with these facts.
pub fn plan(host: &HostFacts, choice: VmmChoice, net: Net) -> Plan {
    plan_for(host, choice, net, Arch::host())
}

/// [`plan`] for a guest of `arch`: a foreign arch (an arm64 kernel on an x86_64 host) boots only
/// under QEMU's emulation.
pub fn plan_for(host: &HostFacts, choice: VmmChoice, net: Net, arch: Arch) -> Plan {
    let krun = krun_place(host);
    let backend = if arch == Arch::host() { choose(host, choice) } else { choose_foreign(host, choice, arch) };
    let caveat = match &backend {
        Ok((Backend::Krun, _)) if host.os == Os::Linux && !host.hardware_kvm() => {
            Some("without hardware KVM its guest does not reach userspace here".to_owned())
        }
        _ => None,
    };
    let mut needs = Vec::new();
    match &backend {
        Ok((Backend::Krun, _)) => needs.push(Need::VmmBinary),
        Ok((Backend::Qemu { .. }, _)) => needs.push(Need::Qemu),
        // Nothing boots: name what would let the QEMU route boot, so the build step installs it.
        Err(_) if host.os == Os::Linux && choice != VmmChoice::Krun && host.qemu.is_none() => needs.push(Need::Qemu),
        Err(_) => {}
    }
    match net {
        Net::None => {}
        Net::Passt => needs.push(Need::Passt),
        Net::Gvproxy => needs.push(Need::Gvproxy),
    }
    let vmm_binary = needs.contains(&Need::VmmBinary).then(|| (host.krun.vmm_binary.clone(), host.krun.vmm_built));
    let qemu = match &backend {
        Ok((Backend::Qemu { .. }, _)) if arch == Arch::host() => host.qemu.as_ref().map(|t| t.path.clone()),
        Ok((Backend::Qemu { .. }, _)) => host.qemu_foreign.as_ref().map(|t| t.path.clone()),
        _ => None,
    };
    let gvproxy = (net == Net::Gvproxy).then(|| host.gvproxy.as_ref().map(|t| t.path.clone())).flatten();
    Plan { choice, arch, backend, caveat, krun, vmm_binary, qemu, gvproxy, needs }
}

impl Plan {
    /// The plan for booting `cfg` on this host: [`plan_for`] its `--vmm`, network and arch, with
    /// its `--gvproxy PATH` taking the place of the host's gvproxy.
    pub fn of(host: &HostFacts, cfg: &VmConfig) -> Plan {
        let mut plan = plan_for(host, cfg.vmm, cfg.net, cfg.arch);
        if let (Net::Gvproxy, Some(flag)) = (cfg.net, &cfg.gvproxy) {
            plan.gvproxy = Some(flag.clone());
        }
        plan
    }
}

/// A VM config with the plan made for it, the one thing [`crate::launch`] boots: built only by
/// [`Planned::new`], so a boot never runs a plan made for another config.
#[derive(Debug, Clone)]
pub struct Planned {
    cfg: VmConfig,
    plan: Plan,
}

impl Planned {
    pub fn new(host: &HostFacts, cfg: VmConfig) -> Planned {
        Planned { plan: Plan::of(host, &cfg), cfg }
    }

    pub fn cfg(&self) -> &VmConfig {
        &self.cfg
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }
}

/// A guest of another arch than the host's: QEMU emulates it (TCG), on Linux; libkrun runs only
/// guests of the host's arch.
fn choose_foreign(host: &HostFacts, choice: VmmChoice, arch: Arch) -> Result<(Backend, String), String> {
    let host_arch = Arch::host();
    let m = crate::backend::qemu::Machine::of(arch);
    if host.os == Os::MacOs || choice == VmmChoice::Krun {
        return Err(format!(
            "libkrun runs only {host_arch} guests on this {host_arch} host, not {arch}; {}",
            if host.os == Os::MacOs { "boot an arm64 kernel on a Mac" } else { "use --vmm qemu (emulated)" }
        ));
    }
    match &host.qemu_foreign {
        Some(_) => Ok((Backend::Qemu { kvm: false }, format!("an {arch} guest on an {host_arch} host runs under QEMU's emulation (TCG)"))),
        None => Err(format!(
            "an {arch} guest runs under QEMU's emulation, and {} is not installed; install it with: apt-get install -y {}",
            m.binary, m.package
        )),
    }
}

/// The backend and why, in one line, or why none and what to do.
fn choose(host: &HostFacts, choice: VmmChoice) -> Result<(Backend, String), String> {
    if host.os == Os::MacOs {
        return choose_macos(host, choice);
    }
    let qemu = |why: &str| -> Result<(Backend, String), String> {
        if host.qemu.is_none() {
            return Err(format!("{why}, and qemu-system-x86_64 is not installed; install QEMU with: {QEMU_INSTALL}"));
        }
        Ok((Backend::Qemu { kvm: host.hardware_kvm() }, why.to_owned()))
    };
    let kvm = &host.kvm;
    match choice {
        VmmChoice::Krun if !kvm.usable() => {
            Err("krun needs /dev/kvm, which is missing or not openable by this user; use --vmm qemu".into())
        }
        VmmChoice::Krun => Ok((Backend::Krun, "krun requested with --vmm".into())),
        VmmChoice::Qemu => qemu("qemu requested with --vmm"),
        VmmChoice::Auto if host.hardware_kvm() => {
            Ok((Backend::Krun, "hardware KVM is available, so libkrun runs the guest".into()))
        }
        VmmChoice::Auto if kvm.usable() && kvm.pvm() => qemu(
            "/dev/kvm is nested PVM KVM (no VMX/SVM), where libkrun's guest cannot reach userspace; using QEMU with TCG",
        ),
        VmmChoice::Auto if kvm.usable() => qemu("/dev/kvm exists but the CPU shows no VMX/SVM; using QEMU with TCG"),
        VmmChoice::Auto => qemu("no usable /dev/kvm; using QEMU with TCG"),
    }
}

/// On macOS libkrun on HVF is the only backend (the QEMU backend is x86_64 Linux's), and HVF runs
/// only a binary signed with `com.apple.security.hypervisor`.
fn choose_macos(host: &HostFacts, choice: VmmChoice) -> Result<(Backend, String), String> {
    let mac = host.macos.clone().unwrap_or_default();
    if choice == VmmChoice::Qemu {
        return Err("the QEMU backend runs only on Linux; use --vmm auto (libkrun on HVF)".into());
    }
    if !mac.hvf {
        return Err("libkrun needs Hypervisor.framework, which this Mac does not offer (kern.hv_support is not 1); \
                    run on a Mac with Apple silicon or VT-x, not inside a VM without nested HVF"
            .into());
    }
    if mac.vmm_entitled == Some(false) {
        return Err(format!(
            "{} lacks the com.apple.security.hypervisor entitlement, so HVF refuses it; {CODESIGN}",
            host.krun.vmm_binary.display()
        ));
    }
    let why = if choice == VmmChoice::Krun {
        "krun requested with --vmm"
    } else {
        "HVF is available, so libkrun runs the guest"
    };
    Ok((Backend::Krun, why.into()))
}

/// Where libkrun's guest can run. The nested host needs QEMU for x86_64 on an x86_64 Linux host
/// (it runs `openshell-vmm` built here inside L1); TCG needs no `/dev/kvm`, so PVM or none both
/// qualify.
fn krun_place(host: &HostFacts) -> KrunPlace {
    if host.os == Os::MacOs {
        return match choose_macos(host, VmmChoice::Auto) {
            Ok(_) => KrunPlace::Direct,
            Err(why) => KrunPlace::Nowhere(why),
        };
    }
    if host.hardware_kvm() {
        return KrunPlace::Direct;
    }
    let why = if host.kvm.usable() && host.kvm.pvm() {
        "/dev/kvm is nested PVM KVM, where libkrun's guest never reaches userspace"
    } else if host.kvm.usable() {
        "/dev/kvm works but the CPU shows no VMX/SVM"
    } else {
        "there is no usable /dev/kvm"
    };
    if !cfg!(target_arch = "x86_64") {
        return KrunPlace::Nowhere(format!("{why}, and a nested host needs an x86_64 Linux host"));
    }
    match host.qemu {
        Some(_) => KrunPlace::NestedL1,
        None => KrunPlace::Nowhere(format!(
            "{why}, and a nested host needs qemu-system-x86_64; install QEMU with: {QEMU_INSTALL}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::fake::{hardware_kvm, macos, no_kvm, pvm};
    use crate::host::Tool;

    #[test]
    fn a_foreign_arch_boots_only_under_qemu_emulation() {
        let foreign = Arch::ALL.into_iter().find(|a| *a != Arch::host()).unwrap();
        let p = plan_for(&hardware_kvm(), VmmChoice::Auto, Net::None, foreign);
        assert_eq!(p.backend.as_ref().unwrap().0, Backend::Qemu { kvm: false });
        assert_eq!(
            (p.needs.as_slice(), p.qemu.as_deref()),
            ([Need::Qemu].as_slice(), Some("/usr/bin/qemu-system-aarch64".as_ref()))
        );
        let k = plan_for(&hardware_kvm(), VmmChoice::Krun, Net::None, foreign).backend.unwrap_err();
        assert!(k.contains("--vmm qemu"), "{k}");
        let mut without = pvm();
        without.qemu_foreign = None;
        let e = plan_for(&without, VmmChoice::Auto, Net::None, foreign).backend.unwrap_err();
        assert!(e.contains("apt-get install -y qemu-system-"), "{e}");
    }

    #[test]
    fn hardware_kvm_boots_krun_directly_and_needs_the_vmm_binary_and_passt() {
        let p = plan(&hardware_kvm(), VmmChoice::Auto, Net::Passt);
        assert_eq!(p.backend.as_ref().unwrap().0, Backend::Krun);
        assert_eq!(p.krun, KrunPlace::Direct);
        assert_eq!(p.needs, [Need::VmmBinary, Need::Passt]);
        assert_eq!(p.vmm_binary, Some(("/t/openshell-vmm".into(), true)));
        assert_eq!(p.caveat, None);
        let q = plan(&hardware_kvm(), VmmChoice::Qemu, Net::None);
        assert_eq!(q.backend.unwrap().0, Backend::Qemu { kvm: true });
        assert_eq!((q.needs, q.vmm_binary), (vec![Need::Qemu], None));
    }

    #[test]
    fn pvm_uses_qemu_tcg_says_why_and_runs_krun_only_nested() {
        let p = plan(&pvm(), VmmChoice::Auto, Net::Passt);
        let (b, why) = p.backend.clone().unwrap();
        assert_eq!(b, Backend::Qemu { kvm: false });
        assert!(why.contains("PVM"), "{why}");
        assert_eq!(p.krun, KrunPlace::NestedL1);
        assert_eq!(p.needs, [Need::Qemu, Need::Passt]);
        // Asked for anyway: it starts, with the caveat the check shows as a WARN.
        let k = plan(&pvm(), VmmChoice::Krun, Net::None);
        assert_eq!(k.backend.unwrap().0, Backend::Krun);
        assert!(k.caveat.unwrap().contains("does not reach userspace"));
        let mut without_qemu = pvm();
        without_qemu.qemu = None;
        let p = plan(&without_qemu, VmmChoice::Auto, Net::Passt);
        assert!(p.backend.unwrap_err().contains(QEMU_INSTALL));
        assert_eq!(p.needs, [Need::Qemu, Need::Passt], "the build step installs QEMU");
        match p.krun {
            KrunPlace::Nowhere(why) => assert!(why.contains("PVM") && why.contains(QEMU_INSTALL), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn no_kvm_uses_qemu_tcg_and_refuses_krun() {
        let p = plan(&no_kvm(), VmmChoice::Auto, Net::Passt);
        assert_eq!(
            p.backend.unwrap(),
            (Backend::Qemu { kvm: false }, "no usable /dev/kvm; using QEMU with TCG".into())
        );
        assert_eq!(p.krun, KrunPlace::NestedL1);
        let k = plan(&no_kvm(), VmmChoice::Krun, Net::Passt);
        assert!(k.backend.unwrap_err().contains("/dev/kvm"));
        assert_eq!(k.needs, [Need::Passt], "nothing to build for a refused krun");
    }

    #[test]
    fn macos_with_hvf_boots_krun_with_gvproxy() {
        let p = plan(&macos(true, Some(true)), VmmChoice::Auto, Net::default_for(Os::MacOs));
        assert_eq!(p.backend.unwrap().0, Backend::Krun);
        assert_eq!(p.krun, KrunPlace::Direct);
        assert_eq!(p.needs, [Need::VmmBinary, Need::Gvproxy]);
        // Not built yet: the build step builds it, then the preflight reads its entitlement.
        let p = plan(&macos(true, None), VmmChoice::Auto, Net::Gvproxy);
        assert!(p.backend.is_ok());
        assert!(plan(&macos(true, Some(true)), VmmChoice::Qemu, Net::Gvproxy).backend.unwrap_err().contains("Linux"));
    }

    #[test]
    fn the_gvproxy_flag_wins_over_the_hosts_and_only_a_gvproxy_boot_has_one() {
        let mut host = hardware_kvm();
        host.gvproxy = Some(Tool { path: "/usr/bin/gvproxy".into(), version: None });
        let t = tempfile::tempdir().unwrap();
        let mut cfg =
            VmConfig::exec(t.path().join("k"), t.path().join("r"), t.path().join("s"), vec!["/bin/true".into()]);
        cfg.net = Net::Gvproxy;
        assert_eq!(Plan::of(&host, &cfg).gvproxy.as_deref(), Some("/usr/bin/gvproxy".as_ref()));
        cfg.gvproxy = Some("/mine/gvproxy".into());
        assert_eq!(Plan::of(&host, &cfg).gvproxy.as_deref(), Some("/mine/gvproxy".as_ref()));
        cfg.net = Net::Passt;
        assert_eq!(Plan::of(&host, &cfg).gvproxy, None);
        host.gvproxy = None;
        assert_eq!(plan(&host, VmmChoice::Auto, Net::Gvproxy).gvproxy, None);
    }

    #[test]
    fn macos_without_hvf_boots_nothing_and_says_why() {
        let p = plan(&macos(false, Some(true)), VmmChoice::Auto, Net::Gvproxy);
        assert!(p.backend.unwrap_err().contains("Hypervisor.framework"));
        assert!(matches!(p.krun, KrunPlace::Nowhere(why) if why.contains("kern.hv_support")));
        assert_eq!(p.needs, [Need::Gvproxy]);
    }

    #[test]
    fn macos_with_an_unsigned_vmm_is_refused_naming_codesign() {
        let p = plan(&macos(true, Some(false)), VmmChoice::Auto, Net::Gvproxy);
        let why = p.backend.unwrap_err();
        assert!(why.contains("/t/openshell-vmm") && why.contains("run `cargo xtask codesign`"), "{why}");
        assert!(matches!(p.krun, KrunPlace::Nowhere(_)));
    }
}
