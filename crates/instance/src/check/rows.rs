//! One function per capability: facts in, one PASS / WARN / FAIL [`Row`] out, with a one-line
//! reason and, when it is not PASS, the fix. Pure, so each decision is unit-tested with fake facts.
//!
//! WARN means "boots, but worse than it could" (no hardware virtualization, an artifact `vm run`
//! will build first); FAIL means "this does not work here". Only what a boot cannot do without is
//! required: one usable VMM (not every backend), passt for the default network, the gateway's port,
//! artifacts that match their records, room to build them.

use openshell_matrix::Row;

use super::facts::{Artifact, Facts, Os, PortFacts, Tool};
use openshell_vm::plan::{KrunPlace, Plan, CODESIGN};
use openshell_vm::VmmChoice;

/// Whether artifacts that do not match their records may boot anyway (`--allow-unverified`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum Verification {
    #[default]
    Required,
    AllowUnverified,
}

pub use openshell_vm::plan::{PASST_INSTALL, QEMU_INSTALL};
/// A kernel build unpacks and compiles the source beside the store: ~1.5 GiB, plus headroom.
pub const KERNEL_BUILD_BYTES: u64 = 2 << 30;
/// Baking a rootfs and the VMs' logs need little.
pub const ROOTFS_BAKE_BYTES: u64 = 256 << 20;
pub const RUN_BYTES: u64 = 64 << 20;
const FASTER_HOST: &str =
    "for libkrun at native speed use a host with hardware KVM (bare metal, or a cloud VM with nested VMX/SVM)";

/// Hardware virtualization: VMX/SVM on Linux. Optional: QEMU's TCG boots without it.
pub fn hardware_virt(f: &Facts) -> Row {
    match &f.host.cpu_virt_flag {
        Some(flag) => Row::pass("hardware-virt", format!("the CPU advertises {}", flag.to_uppercase())),
        None => Row::warn(
            "hardware-virt",
            "no VMX/SVM in /proc/cpuinfo: guests run under QEMU's software emulation (TCG), ~2.5 s to guest userspace",
            "enable VT-x/AMD-V in the firmware, or pick an instance type with nested virtualization",
        )
        .optional(),
    }
}

/// HVF on macOS: what libkrun runs on there.
pub fn hvf(f: &Facts) -> Row {
    match &f.host.macos {
        Some(m) if m.hvf => Row::pass("hvf", "Hypervisor.framework is available (kern.hv_support=1)"),
        _ => Row::fail(
            "hvf",
            "Hypervisor.framework is not available (kern.hv_support is not 1)",
            "run on a Mac with Apple silicon or VT-x, not inside a VM without nested HVF",
        )
        .optional(),
    }
}

/// `/dev/kvm` present and openable read-write by this user. Optional: TCG needs neither.
pub fn kvm_device(f: &Facts) -> Row {
    if !f.host.kvm.exists {
        return Row::warn(
            "kvm-device",
            "/dev/kvm does not exist (no KVM module loaded): only QEMU's software emulation can run",
            "load KVM: modprobe kvm_intel (or kvm_amd), where the CPU has VMX/SVM",
        )
        .optional();
    }
    match &f.host.kvm.open_error {
        Some(e) => Row::warn(
            "kvm-device",
            format!("/dev/kvm exists but this user cannot open it read-write ({e})"),
            "sudo usermod -aG kvm $USER, then log in again",
        )
        .optional(),
        None => Row::pass("kvm-device", "/dev/kvm opens read-write"),
    }
}

/// What kind of KVM `/dev/kvm` is: hardware, nested hardware, or nested PVM (and what that costs).
/// `None` when there is no `/dev/kvm` (the `kvm-device` row says so).
pub fn kvm_kind(f: &Facts) -> Option<Row> {
    if !f.host.kvm.exists {
        return None;
    }
    let module = f.host.kvm.modules.join(", ");
    Some(if f.host.kvm.pvm() {
        Row::warn(
            "kvm-kind",
            "nested PVM KVM (kvm_pvm, no VMX/SVM): guest-kernel code is emulated (~70x slower) and libkrun guests never reach userspace, so QEMU with TCG runs them (~2.5 s to guest userspace)",
            FASTER_HOST,
        )
        .optional()
    } else if f.host.cpu_virt_flag.is_some() && f.host.cpu_hypervisor {
        Row::pass(
            "kvm-kind",
            format!(
                "nested hardware KVM ({module}) inside a VM: near-native guests; VM exits cost more than on bare metal"
            ),
        )
    } else if f.host.cpu_virt_flag.is_some() {
        Row::pass("kvm-kind", format!("hardware KVM ({module})"))
    } else {
        Row::warn(
            "kvm-kind",
            format!(
                "/dev/kvm exists ({}) but the CPU shows no VMX/SVM: treated as unaccelerated, QEMU with TCG",
                if module.is_empty() { "unknown module" } else { &module }
            ),
            FASTER_HOST,
        )
        .optional()
    })
}

/// libkrun: its link mode and version, and where the plan says it can run here. Optional: QEMU
/// may be the backend that runs.
pub fn backend_krun(f: &Facts, plan: &Plan) -> Row {
    let k = &f.host.krun;
    let what = format!("libkrun {} ({})", k.version.as_deref().unwrap_or("of unknown version"), k.link_mode);
    let vmm = if k.vmm_built {
        String::new()
    } else {
        format!("; {} not built yet (`vm run` builds it)", k.vmm_binary.display())
    };
    let host = &f.host;
    match &plan.krun {
        KrunPlace::Direct if f.host.os == Os::MacOs => Row::pass("backend-krun", format!("{what} on HVF{vmm}")),
        KrunPlace::Direct => Row::pass("backend-krun", format!("{what} on hardware KVM{vmm}")),
        KrunPlace::Nowhere(why) if f.host.os == Os::MacOs => {
            Row::fail("backend-krun", format!("{what}: {why}"), "see the hvf and entitlement rows").optional()
        }
        place => {
            let (why, fix) = if host.kvm.usable() && host.kvm.pvm() {
                (
                    "under nested PVM the guest kernel starts but never reaches userspace",
                    format!("use QEMU (what --vmm auto does here); {FASTER_HOST}"),
                )
            } else if host.kvm.usable() {
                ("/dev/kvm works but the CPU shows no VMX/SVM", FASTER_HOST.to_owned())
            } else {
                ("needs a usable /dev/kvm", "see the kvm-device row; --vmm auto uses QEMU meanwhile".to_owned())
            };
            let nested = match place {
                KrunPlace::NestedL1 => {
                    "; it runs only nested here, as L2 inside a QEMU TCG VM with emulated SVM (the nested host), which \
                     is where the krun trials run (`cargo xtask e2e --vm`), not `vm run`"
                }
                _ => "",
            };
            Row::fail("backend-krun", format!("{what}: {why}{nested}"), fix).optional()
        }
    }
}

/// `major.minor` of a `QEMU emulator version X.Y.Z …` line.
fn qemu_version(v: &str) -> Option<(u32, u32)> {
    let num = v.split_whitespace().find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()))?;
    let mut parts = num.split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??))
}

/// QEMU: present, its version, and the accelerator it would use. Optional on its own; the `vmm`
/// row requires that some backend works.
pub fn backend_qemu(f: &Facts) -> Row {
    let Some(Tool { path, version }) = &f.host.qemu else {
        return Row::fail("backend-qemu", "qemu-system-x86_64 is not on PATH", QEMU_INSTALL).optional();
    };
    let accel = if f.host.hardware_kvm() { "kvm" } else { "tcg (software emulation: no hardware KVM)" };
    let shown = version.as_deref().unwrap_or("of unknown version");
    match version.as_deref().and_then(qemu_version) {
        Some(v) if v < (7, 2) => Row::warn(
            "backend-qemu",
            format!(
                "QEMU {shown} at {} predates 7.2: no `-netdev stream`, so passt networking (the gateway) cannot work",
                path.display()
            ),
            format!("install QEMU 7.2 or newer (Debian bookworm: {QEMU_INSTALL})"),
        ),
        _ => Row::pass("backend-qemu", format!("QEMU {shown} at {}; accelerator {accel}", path.display())),
    }
}

fn choice_name(c: VmmChoice) -> &'static str {
    match c {
        VmmChoice::Auto => "auto",
        VmmChoice::Krun => "krun",
        VmmChoice::Qemu => "qemu",
    }
}

/// The backend the plan boots with for `--vmm <choice>`, and why. Required: without it nothing
/// boots.
pub fn vmm(plan: &Plan) -> Row {
    let name = choice_name(plan.choice);
    match (&plan.backend, &plan.caveat) {
        (Ok((b, why)), Some(caveat)) => {
            Row::warn("vmm", format!("--vmm {name} boots with {b} ({why}), but {caveat}"), "use --vmm auto (QEMU here)")
        }
        (Ok((b, why)), None) => Row::pass("vmm", format!("--vmm {name} boots with {b}: {why}")),
        (Err(why), _) => Row::fail(
            "vmm",
            why.clone(),
            match plan.choice {
                VmmChoice::Krun => "use --vmm auto or --vmm qemu".to_owned(),
                _ if why.contains(CODESIGN) => CODESIGN.to_owned(),
                _ => format!("install QEMU ({QEMU_INSTALL}) or make hardware KVM available"),
            },
        ),
    }
}

/// passt, the user-mode network of the gateway (and `--net passt`). Required on Linux.
pub fn passt(f: &Facts) -> Row {
    match &f.host.passt {
        Some(t) => Row::pass(
            "passt",
            format!("passt {} at {}", t.version.as_deref().unwrap_or("of unknown version"), t.path.display()),
        ),
        None => {
            Row::fail("passt", "passt is not on PATH: the gateway's network (and --net passt) needs it", PASST_INSTALL)
        }
    }
}

/// gvproxy, the network helper on macOS and of `--net gvproxy` on Linux. Required where it is used.
pub fn gvproxy(f: &Facts) -> Row {
    match (&f.host.gvproxy, f.host.os) {
        (Some(t), _) => Row::pass(
            "gvproxy",
            format!("gvproxy {} at {}", t.version.as_deref().unwrap_or("of unknown version"), t.path.display()),
        ),
        (None, Os::MacOs) => Row::fail(
            "gvproxy",
            "gvproxy is not on PATH: the guest network on macOS needs it",
            "brew install podman (it ships gvproxy), or put gvproxy on PATH",
        ),
        (None, Os::Linux) => Row::fail(
            "gvproxy",
            "gvproxy is not on PATH nor in the artifact store: --net gvproxy needs it",
            "`cargo xtask vm run --net gvproxy` fetches Debian's gvproxy into the artifact store; or put gvproxy on PATH",
        ),
    }
}

/// The gvproxy a boot runs (the plan's: `--gvproxy PATH` or what the search found), which need not be the one this host's search finds (inside a nested host, the one
/// shared in): `exists` is whether that path is a file.
pub fn gvproxy_for_boot(f: &Facts, binary: &std::path::Path, exists: bool) -> Row {
    if !exists {
        return Row::fail(
            "gvproxy",
            format!("gvproxy {} does not exist", binary.display()),
            openshell_vm::net::gvproxy::install_hint(f.host.os == Os::MacOs),
        );
    }
    let version = f.host.gvproxy.as_ref().filter(|t| t.path == binary).and_then(|t| t.version.clone());
    Row::pass(
        "gvproxy",
        format!("gvproxy {} at {}", version.as_deref().unwrap_or("of unknown version"), binary.display()),
    )
}

/// The hypervisor entitlement of `openshell-vmm` on macOS. Required there once the binary exists.
pub fn entitlement(f: &Facts) -> Row {
    let path = f.host.krun.vmm_binary.display();
    let sign = CODESIGN.to_owned();
    match f.host.macos.as_ref().and_then(|m| m.vmm_entitled) {
        Some(true) => Row::pass("entitlement", format!("{path} carries com.apple.security.hypervisor")),
        Some(false) => {
            Row::fail("entitlement", format!("{path} lacks com.apple.security.hypervisor, so HVF refuses it"), sign)
        }
        None => Row::warn(
            "entitlement",
            format!("{path} is not built yet, so its entitlement cannot be checked"),
            format!("build it (`vm run` does), then {sign}"),
        ),
    }
}

/// An artifact against its record. A mismatch (or no record) is required-FAIL unless
/// `--allow-unverified`, which makes it a WARN that says so; a missing artifact is a WARN because
/// `vm run` builds it.
fn artifact_row<P>(
    id: &str,
    a: &Artifact<P>,
    verification: Verification,
    record: &str,
    build: &str,
    pass: impl Fn(&super::facts::Checked<P>) -> String,
) -> Row {
    let unverified = |reason: String, fix: String| match verification {
        Verification::Required => {
            Row::fail(id, reason, format!("{fix}, or boot it anyway with `vm run --allow-unverified`"))
        }
        Verification::AllowUnverified => {
            Row::warn(id, format!("{reason}; booting it anyway (--allow-unverified)"), fix)
        }
    };
    match a {
        Artifact::Missing(what) => Row::warn(id, what.clone(), format!("`{build}` (`vm run` builds it too)")),
        Artifact::Unrecorded { path, why } => {
            unverified(format!("{} cannot be verified: {why}", path.display()), format!("rebuild it with `{build}`"))
        }
        Artifact::Checked(c) => match &c.mismatch {
            Some(m) => unverified(
                format!(
                    "{} does not match its {record}: recorded sha256 {}, found {}",
                    m.file.display(),
                    m.recorded,
                    m.found
                ),
                format!("it changed after it was built: remove {} and run `{build}`", c.path.display()),
            ),
            None => Row::pass(id, pass(c)),
        },
    }
}

pub fn kernel(f: &Facts, verification: Verification) -> Row {
    artifact_row("kernel", &f.kernel, verification, "provenance.json", "cargo xtask kernel", |c| {
        format!(
            "{} ({}) matches provenance.json: sha256 {} (re-hashed in {} ms)",
            c.path.display(),
            c.provenance.kernel_release,
            c.digest.short(),
            c.hashed_in.as_millis()
        )
    })
}

pub fn rootfs(f: &Facts, verification: Verification) -> Row {
    artifact_row("rootfs", &f.rootfs, verification, "manifest.json", "cargo xtask rootfs", |c| {
        if !c.provenance.rehashed {
            return format!(
                "{}: manifest sha256 {}, {} files, not re-hashed: the guest boots its root disk (below)",
                c.path.display(),
                c.digest.short(),
                c.provenance.files
            );
        }
        format!(
            "{} matches manifest.json: {} files (re-hashed in {} ms), manifest sha256 {}",
            c.path.display(),
            c.provenance.files,
            c.hashed_in.as_millis(),
            c.digest.short()
        )
    })
}

/// The root disk image of a `--root disk` boot, re-hashed against `rootdisk.json`.
pub fn root_disk(f: &Facts, verification: Verification) -> Option<Row> {
    let a = f.root_disk.as_ref()?;
    Some(artifact_row("root-disk", a, verification, "rootdisk.json", "vm run --root disk", |c| {
        format!(
            "{} matches rootdisk.json: sha256 {} (re-hashed in {} ms), baked from rootfs {}",
            c.path.display(),
            c.digest.short(),
            c.hashed_in.as_millis(),
            c.provenance.rootfs_digest.short()
        )
    }))
}

/// A host port a VM forwards from 127.0.0.1. Required: passt cannot bind a taken port.
pub fn port(id: &str, p: &PortFacts) -> Row {
    if p.free {
        return Row::pass(id, format!("127.0.0.1:{} is free", p.port));
    }
    match &p.held_by {
        Some(who) => Row::fail(
            id,
            format!("127.0.0.1:{} is in use by {who}", p.port),
            "it is already up (`cargo xtask vm status`); stop it with `cargo xtask vm stop`, or map another port with -p HOST:30051",
        ),
        None => Row::fail(
            id,
            format!("127.0.0.1:{} is in use by another program", p.port),
            format!("find it with `ss -ltnp 'sport = :{}'` and stop it, or map another port with -p HOST:GUEST", p.port),
        ),
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Free disk where the artifacts are stored, against what building the missing ones needs.
pub fn disk(f: &Facts) -> Option<Row> {
    let d = f.disk.as_ref()?;
    let path = d.path.display();
    let free = match &d.free_bytes {
        Ok(b) => *b,
        Err(e) => {
            return Some(Row::warn(
                "disk",
                format!("cannot read the free space at {path}: {e}"),
                "check that the directory is readable; set OPENSHELL_CACHE_DIR to move the store",
            ))
        }
    };
    let (need, what) = match (&f.kernel, &f.rootfs) {
        (Artifact::Missing(_), _) => (KERNEL_BUILD_BYTES, "a kernel build needs"),
        (_, Artifact::Missing(_)) => (ROOTFS_BAKE_BYTES, "baking the rootfs needs"),
        _ => (RUN_BYTES, "VM state and logs need"),
    };
    Some(if free < need {
        Row::fail(
            "disk",
            format!("{} free at {path}; {what} ~{}", gib(free), gib(need)),
            "free space there, or set OPENSHELL_CACHE_DIR to a larger disk",
        )
    } else {
        Row::pass("disk", format!("{} free at {path} ({what} ~{})", gib(free), gib(need)))
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use openshell_artifacts::kernel::KernelProvenance;
    use openshell_artifacts::Digest;
    use openshell_matrix::Status;

    use super::*;
    use crate::check::facts::{Checked, DiskFacts, KvmDevice, Mismatch, RootfsProvenance};

    fn kernel_provenance() -> KernelProvenance {
        KernelProvenance {
            kernel_release: "6.1.192".into(),
            source_package: "linux-source-6.1".into(),
            source_version: "6.1.192-2".into(),
            arch: openshell_artifacts::Arch::X86_64,
            cross_compile: None,
            fragments: vec![],
            key: Digest::of_bytes(b"key"),
            vmlinux_sha256: Digest::of_bytes(b"vmlinux"),
            built_at_unix: 1_795_548_776,
            build_seconds: 295.0,
            host: "Linux".into(),
        }
    }

    /// A hardware-KVM Linux host with everything present and matching.
    pub(crate) fn healthy() -> Facts {
        Facts {
            host: openshell_vm::host::fake::hardware_kvm(),
            kernel: Artifact::Checked(Checked {
                path: "/store/kernel/k/vmlinux".into(),
                digest: Digest::of_bytes(b"vmlinux"),
                provenance: kernel_provenance(),
                mismatch: None,
                hashed_in: Duration::from_millis(80),
            }),
            rootfs: Artifact::Checked(Checked {
                path: "/store/rootfs/r".into(),
                digest: Digest::of_bytes(b"manifest"),
                provenance: RootfsProvenance {
                    manifest_sha256: Digest::of_bytes(b"manifest"),
                    files: 12,
                    symlinks: 300,
                    baked_at_unix: None,
                    rehashed: true,
                },
                mismatch: None,
                hashed_in: Duration::from_millis(40),
            }),
            root_disk: None,
            ports: vec![PortFacts { port: 30051, free: true, held_by: None }],
            disk: Some(DiskFacts { path: "/store".into(), free_bytes: Ok(40 << 30) }),
        }
    }

    /// This project's CI host: /dev/kvm is nested PVM, no VMX.
    pub(crate) fn pvm() -> Facts {
        Facts { host: openshell_vm::host::fake::pvm(), ..healthy() }
    }

    /// The plan the rows of `f` read for `--vmm choice` on the gateway's network.
    fn plan(f: &Facts, choice: VmmChoice) -> Plan {
        openshell_vm::plan(&f.host, choice, openshell_vm::Net::default_for(f.host.os))
    }

    fn vmm_row(f: &Facts, choice: VmmChoice) -> Row {
        vmm(&plan(f, choice))
    }

    fn krun_row(f: &Facts) -> Row {
        backend_krun(f, &plan(f, VmmChoice::Auto))
    }

    fn status(r: &Row) -> (Status, bool) {
        (r.status, r.required)
    }

    #[test]
    fn hardware_kvm_host_passes_everything() {
        let f = healthy();
        for r in [
            hardware_virt(&f),
            kvm_device(&f),
            kvm_kind(&f).unwrap(),
            krun_row(&f),
            backend_qemu(&f),
            vmm_row(&f, VmmChoice::Auto),
            passt(&f),
            kernel(&f, Verification::Required),
            rootfs(&f, Verification::Required),
            port("gateway-port", &f.ports[0]),
            disk(&f).unwrap(),
        ] {
            assert_eq!(r.status, Status::Pass, "{r:?}");
        }
        assert!(vmm_row(&f, VmmChoice::Auto).reason.contains("krun"));
        assert!(backend_qemu(&f).reason.contains("accelerator kvm"));
    }

    #[test]
    fn no_dev_kvm_warns_and_qemu_tcg_still_boots() {
        let mut f = healthy();
        f.host.cpu_virt_flag = None;
        f.host.kvm = KvmDevice::default();
        assert_eq!(status(&kvm_device(&f)), (Status::Warn, false));
        assert!(kvm_device(&f).fix.contains("modprobe"));
        assert!(kvm_kind(&f).is_none());
        assert_eq!(status(&krun_row(&f)), (Status::Fail, false));
        assert!(backend_qemu(&f).reason.contains("tcg"));
        let v = vmm_row(&f, VmmChoice::Auto);
        assert_eq!(v.status, Status::Pass);
        assert!(v.reason.contains("qemu (tcg)"), "{}", v.reason);
        assert_eq!(vmm_row(&f, VmmChoice::Krun).status, Status::Fail);
    }

    #[test]
    fn kvm_not_openable_names_the_group_fix() {
        let mut f = healthy();
        f.host.kvm.open_error = Some("Permission denied (os error 13)".into());
        let r = kvm_device(&f);
        assert_eq!(status(&r), (Status::Warn, false));
        assert!(r.reason.contains("Permission denied") && r.fix.contains("usermod -aG kvm"), "{r:?}");
        assert!(vmm_row(&f, VmmChoice::Auto).reason.contains("qemu"));
    }

    #[test]
    fn pvm_module_is_explained_and_qemu_tcg_is_chosen() {
        let f = pvm();
        let kind = kvm_kind(&f).unwrap();
        assert_eq!(status(&kind), (Status::Warn, false));
        assert!(kind.reason.contains("PVM") && kind.reason.contains("70x"), "{}", kind.reason);
        let krun = krun_row(&f);
        assert_eq!(status(&krun), (Status::Fail, false));
        assert!(
            krun.reason.contains("1.19.7 (bundled)") && krun.reason.contains("never reaches userspace"),
            "{}",
            krun.reason
        );
        let v = vmm_row(&f, VmmChoice::Auto);
        assert_eq!(v.status, Status::Pass);
        assert!(v.reason.contains("qemu (tcg)") && v.reason.contains("PVM"), "{}", v.reason);
        assert_eq!(vmm_row(&f, VmmChoice::Krun).status, Status::Warn);
        assert_eq!(status(&hardware_virt(&f)), (Status::Warn, false));
    }

    #[test]
    fn krun_row_says_it_runs_only_nested_when_qemu_can_host_it() {
        let f = pvm();
        let krun = krun_row(&f);
        assert_eq!(status(&krun), (Status::Fail, false));
        assert!(
            krun.reason.contains("runs only nested here") && krun.reason.contains("cargo xtask e2e --vm"),
            "{}",
            krun.reason
        );
        let mut f = pvm();
        f.host.qemu = None;
        assert!(!krun_row(&f).reason.contains("nested here"), "{}", krun_row(&f).reason);
    }

    #[test]
    fn nested_hardware_kvm_passes_and_says_nested() {
        let mut f = healthy();
        f.host.cpu_hypervisor = true;
        let r = kvm_kind(&f).unwrap();
        assert_eq!(r.status, Status::Pass);
        assert!(r.reason.contains("nested hardware KVM"), "{}", r.reason);
    }

    #[test]
    fn no_backend_at_all_fails_the_required_vmm_row() {
        let mut f = pvm();
        f.host.kvm = KvmDevice::default();
        f.host.qemu = None;
        let r = vmm_row(&f, VmmChoice::Auto);
        assert_eq!(status(&r), (Status::Fail, true));
        assert!(r.fix.contains(QEMU_INSTALL), "{r:?}");
        assert_eq!(status(&backend_qemu(&f)), (Status::Fail, false));
    }

    #[test]
    fn old_qemu_warns_about_netdev_stream() {
        let mut f = pvm();
        f.host.qemu.as_mut().unwrap().version = Some("QEMU emulator version 6.2.0 (Debian 1:6.2)".into());
        let r = backend_qemu(&f);
        assert_eq!(r.status, Status::Warn);
        assert!(r.reason.contains("netdev stream"), "{}", r.reason);
        assert_eq!(qemu_version("7.2.22"), Some((7, 2)));
    }

    #[test]
    fn missing_passt_is_a_required_fail() {
        let mut f = healthy();
        f.host.passt = None;
        let r = passt(&f);
        assert_eq!(status(&r), (Status::Fail, true));
        assert_eq!(r.fix, PASST_INSTALL);
    }

    #[test]
    fn taken_port_fails_and_names_our_gateway_when_it_is_ours() {
        let r = port("gateway-port", &PortFacts { port: 30051, free: false, held_by: None });
        assert_eq!(status(&r), (Status::Fail, true));
        assert!(r.fix.contains("ss -ltnp"), "{r:?}");
        let r = port(
            "gateway-port",
            &PortFacts { port: 30051, free: false, held_by: Some("gateway \"default\" (supervisor pid 7)".into()) },
        );
        assert!(r.reason.contains("gateway \"default\"") && r.fix.contains("vm stop"), "{r:?}");
    }

    #[test]
    fn a_root_disk_row_only_for_a_disk_root_and_a_changed_image_fails_naming_it() {
        let mut f = healthy();
        assert!(root_disk(&f, Verification::Required).is_none(), "a share root has no root-disk row");
        let record = openshell_artifacts::disk::RootDiskRecord {
            rootfs_digest: Digest::of_bytes(b"manifest"),
            mke2fs_version: "mke2fs 1.47.0 (5-Feb-2023)".into(),
            options: vec![],
            size_bytes: 23 << 20,
            sha256: Digest::of_bytes(b"image"),
        };
        let checked = |mismatch| {
            Artifact::Checked(Checked {
                path: "/store/rootdisk/d".into(),
                digest: Digest::of_bytes(b"image"),
                provenance: record.clone(),
                mismatch,
                hashed_in: Duration::from_millis(30),
            })
        };
        f.root_disk = Some(checked(None));
        let r = root_disk(&f, Verification::Required).unwrap();
        assert_eq!(status(&r), (Status::Pass, true));
        assert!(r.reason.contains("matches rootdisk.json"), "{}", r.reason);
        f.root_disk = Some(checked(Some(Mismatch {
            file: "/store/rootdisk/d/root.ext4".into(),
            recorded: "aa".repeat(32),
            found: "bb".repeat(32),
        })));
        let r = root_disk(&f, Verification::Required).unwrap();
        assert_eq!(status(&r), (Status::Fail, true));
        for part in ["/store/rootdisk/d/root.ext4", &"aa".repeat(32), &"bb".repeat(32)] {
            assert!(r.reason.contains(part), "{part} not in {}", r.reason);
        }
        assert!(r.fix.contains("remove /store/rootdisk/d") && r.fix.contains("--root disk"), "{}", r.fix);
    }

    #[test]
    fn a_disk_roots_tree_is_vouched_for_by_its_manifest_alone() {
        let mut f = healthy();
        let Artifact::Checked(c) = &mut f.rootfs else { unreachable!() };
        c.provenance.rehashed = false;
        let r = rootfs(&f, Verification::Required);
        assert_eq!(status(&r), (Status::Pass, true));
        assert!(r.reason.contains("not re-hashed: the guest boots its root disk"), "{}", r.reason);
    }

    fn tamper(f: &mut Facts) {
        let Artifact::Checked(c) = &mut f.rootfs else { unreachable!() };
        c.mismatch = Some(Mismatch {
            file: "/store/rootfs/r/etc/hostname".into(),
            recorded: "aa".repeat(32),
            found: "bb".repeat(32),
        });
    }

    #[test]
    fn digest_mismatch_fails_naming_file_and_both_digests() {
        let mut f = healthy();
        tamper(&mut f);
        let r = rootfs(&f, Verification::Required);
        assert_eq!(status(&r), (Status::Fail, true));
        for part in ["/store/rootfs/r/etc/hostname", &"aa".repeat(32), &"bb".repeat(32)] {
            assert!(r.reason.contains(part), "{part} not in {}", r.reason);
        }
        assert!(r.fix.contains("cargo xtask rootfs") && r.fix.contains("--allow-unverified"), "{}", r.fix);
    }

    #[test]
    fn allow_unverified_turns_a_mismatch_into_a_warning() {
        let mut f = healthy();
        tamper(&mut f);
        let r = rootfs(&f, Verification::AllowUnverified);
        assert_eq!(r.status, Status::Warn);
        assert!(r.reason.contains("--allow-unverified") && r.reason.contains(&"bb".repeat(32)), "{}", r.reason);
    }

    #[test]
    fn kernel_without_provenance_cannot_be_verified() {
        let mut f = healthy();
        f.kernel = Artifact::Unrecorded { path: "/k/vmlinux".into(), why: "no provenance.json beside it".into() };
        let r = kernel(&f, Verification::Required);
        assert_eq!(status(&r), (Status::Fail, true));
        assert!(r.reason.contains("/k/vmlinux") && r.fix.contains("cargo xtask kernel"), "{r:?}");
    }

    #[test]
    fn missing_artifacts_warn_with_the_build_command_and_ask_for_disk() {
        let mut f = healthy();
        f.kernel = Artifact::Missing("not built for the current fragments".into());
        let r = kernel(&f, Verification::Required);
        assert_eq!(r.status, Status::Warn);
        assert!(r.fix.contains("cargo xtask kernel"), "{}", r.fix);
        f.disk.as_mut().unwrap().free_bytes = Ok(1 << 30);
        let d = disk(&f).unwrap();
        assert_eq!(status(&d), (Status::Fail, true));
        assert!(d.reason.contains("kernel build"), "{}", d.reason);
        f.kernel = healthy().kernel;
        assert_eq!(disk(&f).unwrap().status, Status::Pass);
    }

    #[test]
    fn macos_rows_decide_from_hvf_gvproxy_and_the_entitlement() {
        let mut f = healthy();
        f.host = openshell_vm::host::fake::macos(true, Some(true));
        f.host.gvproxy = None;
        assert_eq!(hvf(&f).status, Status::Pass);
        assert_eq!(krun_row(&f).status, Status::Pass);
        assert!(vmm_row(&f, VmmChoice::Auto).reason.contains("krun"));
        assert_eq!(status(&gvproxy(&f)), (Status::Fail, true));
        assert_eq!(entitlement(&f).status, Status::Pass);
        // Unsigned: the entitlement row and the vmm row (the plan refuses it) both name the fix.
        f.host = openshell_vm::host::fake::macos(true, Some(false));
        let e = entitlement(&f);
        assert_eq!(status(&e), (Status::Fail, true));
        assert!(e.fix.contains("cargo xtask codesign"), "{}", e.fix);
        let v = vmm_row(&f, VmmChoice::Auto);
        assert_eq!(status(&v), (Status::Fail, true));
        assert_eq!(v.fix, CODESIGN);
        assert_eq!(krun_row(&f).status, Status::Fail);
        f.host.macos.as_mut().unwrap().vmm_entitled = None;
        assert_eq!(entitlement(&f).status, Status::Warn);
    }
}
