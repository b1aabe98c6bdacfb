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
