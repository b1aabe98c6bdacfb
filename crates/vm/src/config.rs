//! What a VM is: kernel, rootfs, size, the command to run, where its state and console go.

use std::path::PathBuf;

use openshell_artifacts::Arch;
use openshell_guest::{ExecRequest, GuestMount};

use crate::{Net, PortMap};

pub use crate::error::VmError;

/// [`VmConfig::console_cap`] unless set: a boot's console is some KiB, and a gateway's log of
/// refused connections is summarised; this is far above both, and far below a disk.
pub const DEFAULT_CONSOLE_CAP: u64 = 16 * 1024 * 1024;

/// vCPUs of every preset unless a caller says otherwise: the guests here serve one client or run
/// one command, and a second vCPU under TCG costs the host a core.
pub const DEFAULT_VCPUS: u8 = 1;

/// Memory of an `--exec` VM unless a caller says otherwise.
pub const EXEC_MEM_MIB: u32 = 512;

/// One VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// The guest's architecture: the kernel and rootfs must be built for it. The QEMU backend
    /// derives its binary, machine and console from it; a foreign arch runs only under TCG.
    pub arch: Arch,
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
    pub vcpus: u8,
    pub mem_mib: u32,
    pub exec: ExecRequest,
    /// Per-instance directory: the guest share, the console log, VMM logs. Created 0700.
    pub state_dir: PathBuf,
    /// Where the guest console is recorded (default: `<state_dir>/console.log`).
    pub console_log: Option<PathBuf>,
    /// The console log's bound in bytes, per boot (QEMU; see [`crate::console`]).
    pub console_cap: u64,
    pub vmm: VmmChoice,
    /// libkrun log level (0 off … 5 trace).
    pub log_level: u32,
    pub net: Net,
    /// `--gvproxy PATH`: the gvproxy a `--net gvproxy` boot starts instead of the host's.
    pub gvproxy: Option<PathBuf>,
    /// TCP forwards from 127.0.0.1 on the host into the guest (needs a network backend).
    pub ports: Vec<PortMap>,
    /// Let the guest ask the network backend by DHCP (the host's static address is the
    /// fallback) instead of taking the static address directly, which skips a round trip.
    pub dhcp: bool,
    /// Host directories shared into the guest besides the rootfs and the instance share; the
    /// guest's init mounts them before it runs the command.
    pub shares: Vec<DirShare>,
    /// Where the guest's root comes from: the rootfs directory shared read-only (the default), or
    /// its ext4 image with the instance's data disk stacked on it ([`Root`]).
    pub root: Root,
    /// The TSC rate the guest kernel is told (`tsc_early_khz`, QEMU only) instead of calibrating it
    /// against the PIT, which under TCG fails in about one boot of four and leaves the TSC marked
    /// unstable. TCG hands the guest the host's TSC, so this is the host's rate
    /// ([`crate::host::tsc_khz`]). The nested host needs it: its KVM cannot run L2 without a TSC rate.
    pub guest_tsc_khz: Option<u32>,
}

/// What a caller (`vm run`'s flags, a trial, a benchmark) says about a VM on top of a preset
/// ([`VmConfig::exec`], the gateway's): each field left `None` or empty keeps the preset's value.
/// [`VmConfig::update`] applies it. Serialized in a detached gateway's request.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Overrides {
    pub arch: Option<Arch>,
    pub vcpus: Option<u8>,
    pub mem_mib: Option<u32>,
    pub vmm: Option<VmmChoice>,
    pub net: Option<Net>,
    /// `--gvproxy PATH`.
    pub gvproxy: Option<PathBuf>,
    /// Replaces the preset's forwards when not empty.
    pub ports: Vec<PortMap>,
    /// `--dhcp`: only ever turns DHCP on.
    pub dhcp: bool,
    /// Set in the command's environment, replacing a preset variable of the same name.
    pub env: Vec<(String, String)>,
    pub workdir: Option<String>,
    pub console_log: Option<PathBuf>,
    /// `--root disk|share` (with `--disk-size`), as the caller decided it.
    pub root: Option<Root>,
}

/// The data disk's file name in a VM's state directory ([`VmConfig::data_disk_path`]).
pub const DATA_DISK_FILE: &str = "data.ext4";

/// Where a guest's root comes from, decided once by the caller and read by both backends (what
/// they attach and the `root=` they boot with) and by the guest's init ([`openshell_guest::ROOT_PARAM`]).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Root {
    /// The rootfs directory ([`VmConfig::rootfs`]) shared read-only (virtio-9p under QEMU,
    /// virtio-fs under libkrun): the guest writes only to tmpfs and its share, and nothing it
    /// writes elsewhere outlives it.
    #[default]
    Share,
    /// The rootfs baked into an ext4 image (`openshell_artifacts::disk`), attached read-only as
    /// the first virtio-blk disk and mounted by the kernel as `/`, and the VM's data disk
    /// ([`VmConfig::data_disk_path`], ext4, read-write) as overlayfs' upper layer, made on first
    /// boot with `data_mib` MiB (sparse) and kept across boots: what the guest writes outlives it.
    ///
    /// `init` is where the image carries our init (the kernel's `init=`, libkrun's exec path):
    /// [`openshell_guest::INIT_BIN`] in our own rootfs, [`openshell_guest::IMAGE_INIT_BIN`] in an
    /// OCI image's root, whose own files keep their paths.
    Disk {
        image: PathBuf,
        data_mib: u64,
        #[serde(default = "default_init")]
        init: String,
    },
}

fn default_init() -> String {
    openshell_guest::INIT_BIN.to_owned()
}

impl Root {
    /// A disk root of our own rootfs' image (init at [`openshell_guest::INIT_BIN`]).
    pub fn disk(image: PathBuf, data_mib: u64) -> Root {
        Root::Disk { image, data_mib, init: default_init() }
    }

    /// The guest path of our init in this root.
    pub fn init(&self) -> &str {
        match self {
            Root::Share => openshell_guest::INIT_BIN,
            Root::Disk { init, .. } => init,
        }
    }

    /// `share` or `disk`, as `--root` spells it.
    pub fn kind(&self) -> &'static str {
        match self {
            Root::Share => "share",
            Root::Disk { .. } => "disk",
        }
    }
}

/// A host directory shared into the guest (virtio-9p under QEMU, virtio-fs under libkrun).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirShare {
    pub host: PathBuf,
    pub mount: GuestMount,
}

impl VmConfig {
    /// Preset: run one command in a small VM ([`DEFAULT_VCPUS`], [`EXEC_MEM_MIB`]), no network.
    pub fn exec(kernel: PathBuf, rootfs: PathBuf, state_dir: PathBuf, argv: Vec<String>) -> VmConfig {
        VmConfig {
            arch: Arch::host(),
            kernel,
            rootfs,
            vcpus: DEFAULT_VCPUS,
            mem_mib: EXEC_MEM_MIB,
            exec: ExecRequest { argv, env: Vec::new(), workdir: None, user: None },
            state_dir,
            console_log: None,
            console_cap: DEFAULT_CONSOLE_CAP,
            vmm: VmmChoice::Auto,
            log_level: 0,
            net: Net::None,
            gvproxy: None,
            ports: Vec::new(),
            dhcp: false,
            shares: Vec::new(),
            root: Root::Share,
            guest_tsc_khz: None,
        }
    }

    /// Applies what a caller said on top of this preset: the one place a flag meets a default
    /// (firecracker's `MachineConfigUpdate` model). Every field `o` leaves unset keeps the preset's.
    pub fn update(&mut self, o: &Overrides) {
        let Overrides { arch, vcpus, mem_mib, vmm, net, gvproxy, ports, dhcp, env, workdir, console_log, root } = o;
        if let Some(r) = root {
            self.root = r.clone();
        }
        if let Some(a) = arch {
            self.arch = *a;
        }
        if let Some(v) = vcpus {
            self.vcpus = *v;
        }
        if let Some(m) = mem_mib {
            self.mem_mib = *m;
        }
        if let Some(v) = vmm {
            self.vmm = *v;
        }
        if let Some(n) = net {
            self.net = *n;
        }
        if gvproxy.is_some() {
            self.gvproxy.clone_from(gvproxy);
        }
        if !ports.is_empty() {
            self.ports.clone_from(ports);
        }
        self.dhcp |= *dhcp;
        for (k, v) in env {
            self.exec.env.retain(|(have, _)| have != k);
            self.exec.env.push((k.clone(), v.clone()));
        }
        if workdir.is_some() {
            self.exec.workdir.clone_from(workdir);
        }
        if console_log.is_some() {
            self.console_log.clone_from(console_log);
        }
    }

    pub fn console_path(&self) -> PathBuf {
        self.console_log.clone().unwrap_or_else(|| self.state_dir.join("console.log"))
    }

    pub fn share_dir(&self) -> PathBuf {
        self.state_dir.join("share")
    }

    /// The data disk of a [`Root::Disk`] VM: in its state directory, so it lives and dies with
    /// the instance (kept across `vm stop`/`vm run`, removed by `--reset`).
    pub fn data_disk_path(&self) -> PathBuf {
        self.state_dir.join(DATA_DISK_FILE)
    }

    /// Checks everything that can be checked before a VMM is started.
    pub fn validate(&self) -> Result<(), VmError> {
        if !self.kernel.is_file() {
            return Err(VmError::KernelMissing(self.kernel.clone()));
        }
        crate::kernel_image::check(&self.kernel, self.arch)?;
        if !self.rootfs.join("sbin/openshell-init").is_file() {
            return Err(VmError::RootfsMissing(self.rootfs.clone()));
        }
        if let Root::Disk { image, .. } = &self.root {
            if !image.is_file() {
                return Err(VmError::Invalid(format!(
                    "the root disk image {} does not exist; `vm run --root disk` bakes it",
                    image.display()
                )));
            }
        }
        if self.vcpus == 0 || self.vcpus > 16 {
            return Err(VmError::Invalid(format!("--vcpus {} is out of range 1..=16", self.vcpus)));
        }
        if !(64..=65536).contains(&self.mem_mib) {
            return Err(VmError::Invalid(format!("--mem {} MiB is out of range 64..=65536", self.mem_mib)));
        }
        if self.exec.argv.first().is_none_or(|p| !p.starts_with('/')) {
            return Err(VmError::Invalid(
                "the command must be an absolute path inside the guest, e.g. /bin/true".into(),
            ));
        }
        if let Some((k, _)) = self.exec.env.iter().find(|(k, _)| k.is_empty() || k.contains('=')) {
            return Err(VmError::Invalid(format!("bad environment variable name {k:?}")));
        }
        for (i, share) in self.shares.iter().enumerate() {
            share.mount.validate().map_err(VmError::Invalid)?;
            if !share.host.is_dir() {
                return Err(VmError::Invalid(format!("shared directory {} does not exist", share.host.display())));
            }
            if self.shares[..i].iter().any(|s| s.mount.tag == share.mount.tag) {
                return Err(VmError::Invalid(format!("share tag {:?} is used twice", share.mount.tag)));
            }
        }
        if let (Some(path), net @ (Net::None | Net::Passt)) = (&self.gvproxy, self.net) {
            return Err(VmError::Invalid(format!(
                "--gvproxy {} only applies to --net gvproxy, not --net {net}",
                path.display()
            )));
        }
        if !self.ports.is_empty() && self.net == Net::None {
            return Err(VmError::Invalid(
                "port forwards (-p) need a network backend: use --net passt or --net gvproxy".into(),
            ));
        }
        Ok(())
    }
}

/// What the user asked for with `--vmm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &std::path::Path) -> VmConfig {
        std::fs::create_dir_all(dir.join("root/sbin")).unwrap();
        std::fs::write(dir.join("root/sbin/openshell-init"), "").unwrap();
        std::fs::write(dir.join("vmlinux"), crate::kernel_image::minimal_image(Arch::host())).unwrap();
        VmConfig::exec(dir.join("vmlinux"), dir.join("root"), dir.join("state"), vec!["/bin/true".into()])
    }

    #[test]
    fn update_changes_only_what_it_names() {
        let t = tempfile::tempdir().unwrap();
        let mut c = cfg(t.path());
        c.exec.env = vec![("A".into(), "1".into()), ("B".into(), "2".into())];
        c.ports = vec![PortMap { host: 1, guest: 2 }];
        let before = c.clone();
        c.update(&Overrides::default());
        assert_eq!(format!("{c:?}"), format!("{before:?}"), "empty overrides change nothing");
        let ports = vec![PortMap { host: 8080, guest: 80 }, PortMap { host: 40051, guest: 30051 }];
        c.update(&Overrides {
            mem_mib: Some(384),
            ports: ports.clone(),
            env: vec![("B".into(), "3".into())],
            ..Overrides::default()
        });
        assert_eq!((c.mem_mib, c.vcpus, c.net, c.ports.clone()), (384, DEFAULT_VCPUS, Net::None, ports));
        assert_eq!(c.exec.env, [("A".to_owned(), "1".to_owned()), ("B".to_owned(), "3".to_owned())]);
    }

    #[test]
    fn exec_preset_is_valid() {
        let t = tempfile::tempdir().unwrap();
        cfg(t.path()).validate().unwrap();
    }

    #[test]
    fn rejects_bad_values_with_the_flag_named() {
        let t = tempfile::tempdir().unwrap();
        let mut c = cfg(t.path());
        c.vcpus = 0;
        assert!(c.validate().unwrap_err().to_string().contains("--vcpus"));
        let mut c = cfg(t.path());
        c.mem_mib = 1;
        assert!(c.validate().unwrap_err().to_string().contains("--mem"));
        let mut c = cfg(t.path());
        c.exec.argv = vec!["true".into()];
        assert!(c.validate().unwrap_err().to_string().contains("absolute"));
    }

    #[test]
    fn shares_need_an_existing_dir_and_distinct_valid_tags() {
        let t = tempfile::tempdir().unwrap();
        let share = |tag: &str, host: &std::path::Path| DirShare {
            host: host.to_owned(),
            mount: GuestMount { tag: tag.into(), path: format!("/run/{tag}"), read_only: true },
        };
        let mut c = cfg(t.path());
        c.shares = vec![share("a", t.path()), share("b", t.path())];
        c.validate().unwrap();
        c.shares.push(share("a", t.path()));
        assert!(c.validate().unwrap_err().to_string().contains("used twice"));
        c.shares = vec![share("a", &t.path().join("nope"))];
        assert!(c.validate().unwrap_err().to_string().contains("does not exist"));
        c.shares = vec![share("rootfs", t.path())];
        assert!(c.validate().unwrap_err().to_string().contains("rootfs"));
    }

    #[test]
    fn a_disk_root_needs_its_image_and_keeps_its_data_disk_in_the_state_dir() {
        let t = tempfile::tempdir().unwrap();
        let mut c = cfg(t.path());
        c.update(&Overrides { root: Some(Root::disk(t.path().join("root.ext4"), 64)), ..Overrides::default() });
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("root.ext4") && e.contains("--root disk"), "{e}");
        std::fs::write(t.path().join("root.ext4"), b"").unwrap();
        c.validate().unwrap();
        assert_eq!(c.data_disk_path(), t.path().join("state").join(DATA_DISK_FILE));
        assert_eq!((c.root.kind(), Root::default().kind()), ("disk", "share"));
    }

    #[test]
    fn gvproxy_path_only_with_gvproxy() {
        let t = tempfile::tempdir().unwrap();
        let mut c = cfg(t.path());
        c.gvproxy = Some("/x/gvproxy".into());
        c.net = Net::Passt;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("only applies to --net gvproxy, not --net passt"), "{e}");
        c.net = Net::Gvproxy;
        c.validate().unwrap();
    }

    #[test]
    fn missing_kernel_names_the_fix() {
        let t = tempfile::tempdir().unwrap();
        let mut c = cfg(t.path());
        c.kernel = t.path().join("nope");
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("cargo xtask kernel") && e.contains("nope"), "{e}");
    }
}
