//! libkrun: the backend for hardware KVM (and HVF on macOS).
//!
//! The supervisor writes a [`KrunSpec`] and starts `openshell-vmm` with it, because
//! `krun_start_enter` takes over the process that calls it. The root directory is shared as an
//! extra virtio-fs device tagged `rootfs` and mounted with `root=rootfs rootfstype=virtiofs`, the
//! same shape as the QEMU backend: libkrun's own `/dev/root` tag needs libkrunfw's kernel patches,
//! which our kernel (built from Debian's source) does not carry.

use std::path::PathBuf;
use std::process::Command;

use openshell_guest::{SHARE_TAG, SHARE_TRANSPORT_PARAM};
use openshell_krun::{KrunSpec, UnixgramNet};

use crate::child::CHILD_FD;
use crate::net::Link;
use crate::{VmConfig, VmError};

/// libkrun's default prolog (which a cmdline passed to `krun_set_kernel` replaces) with our init
/// and root; `earlyprintk` puts the first kernel lines on the serial console.
pub fn kernel_cmdline(cfg: &VmConfig) -> String {
    let line = format!(
        "reboot=k panic=-1 panic_print=0 nomodule console=hvc0 earlyprintk=serial,ttyS0,115200 \
         root={} rootfstype=virtiofs ro quiet no-kvmapf init=/sbin/openshell-init {SHARE_TRANSPORT_PARAM}=virtiofs",
        super::ROOT_TAG
    );
    format!("{line} {}", super::init_params(cfg))
}

/// What libkrun is told to execute: our init itself, without arguments or environment. The
/// command reaches the guest once, in `exec.json` in the share; `krun_set_exec` would also put its
/// argv and env on the guest kernel command line, where every guest process can read them and a
/// newline in a script aborts the VMM (libkrun's cmdline builder: `InvalidAscii`).
const KRUN_EXEC: &str = "/sbin/openshell-init";

pub fn spec(cfg: &VmConfig, link: &Link) -> KrunSpec {
    KrunSpec {
        vcpus: cfg.vcpus,
        mem_mib: cfg.mem_mib,
        root: cfg.rootfs.clone(),
        kernel: cfg.kernel.clone(),
        cmdline: kernel_cmdline(cfg),
        exec_path: KRUN_EXEC.into(),
        args: Vec::new(),
        env: Vec::new(),
        workdir: None,
        console_output: Some(cfg.console_path()),
        serial_console: true,
        shares: [(super::ROOT_TAG.into(), cfg.rootfs.clone()), (SHARE_TAG.into(), cfg.share_dir())]
            .into_iter()
            .chain(cfg.shares.iter().map(|s| (s.mount.tag.clone(), s.host.clone())))
            .collect(),
        log_level: cfg.log_level,
        // passt's socketpair, or gvproxy's stream link (Linux). libkrun's legacy call takes no
        // MAC and gives the guest 5a:94:ef:e4:0c:ee (libkrun 1.19.7 `krun_start_enter`), which
        // is gvproxy's static lease (`net::gvproxy::GUEST_MAC`) and which passt ignores.
        passt_fd: matches!(link, Link::Stream { .. }).then_some(CHILD_FD),
        net_unixgram: match link {
            Link::Unixgram { path, mac } => Some(UnixgramNet { path: path.clone(), mac: *mac, vfkit_magic: true }),
            _ => None,
        },
    }
}

/// `openshell-vmm` (`vmm`, located by [`crate::host::vmm_binary`]) with the spec it boots.
pub fn command(vmm: &std::path::Path, cfg: &VmConfig, link: &Link) -> Result<Command, VmError> {
    let path = cfg.state_dir.join("krun-spec.json");
    let json = serde_json::to_vec_pretty(&spec(cfg, link)).expect("spec serializes");
    std::fs::write(&path, json).map_err(|source| VmError::Io { path: path.clone(), source })?;
    let mut c = Command::new(vmm);
    c.arg(path);
    // macOS: openshell-vmm links Homebrew's libkrun, which Apple silicon's Homebrew keeps off the
    // loader's default search path. The VMM is signed without the hardened runtime, so DYLD_*
    // reaches its loader and `vm run` works without the user exporting anything.
    #[cfg(target_os = "macos")]
    c.env("DYLD_FALLBACK_LIBRARY_PATH", dyld_fallback_path(std::env::var_os("DYLD_FALLBACK_LIBRARY_PATH")));
    Ok(c)
}

/// Where Homebrew installs libkrun: Apple silicon, then Intel. What the VMM's loader searches on
/// macOS (and what `cargo xtask check` can name as where it looked).
pub const LIBKRUN_DIRS: &[&str] = &["/opt/homebrew/lib", "/usr/local/lib"];

/// `DYLD_FALLBACK_LIBRARY_PATH` for the VMM: the caller's own entries first, then
/// [`LIBKRUN_DIRS`], then the rest of dyld's default fallback (`~/lib`, `/usr/lib`), which setting
/// the variable would otherwise replace.
pub fn dyld_fallback_path(existing: Option<std::ffi::OsString>) -> std::ffi::OsString {
    let mut dirs: Vec<PathBuf> = existing.map(|v| std::env::split_paths(&v).collect()).unwrap_or_default();
    let home_lib = std::env::var_os("HOME").map(|h| PathBuf::from(h).join("lib"));
    for d in LIBKRUN_DIRS.iter().map(PathBuf::from).chain(home_lib).chain([PathBuf::from("/usr/lib")]) {
        if !dirs.contains(&d) {
            dirs.push(d);
        }
    }
    std::env::join_paths(dirs).expect("no ':' in these directories")
}

/// The kernel and root directory a running `openshell-vmm` was started with: its argv names
/// the spec file ([`command`]), and the spec names the kernel and the virtio-fs share tagged
/// [`super::ROOT_TAG`] that the guest mounts as its root. Relative paths resolve against `cwd`.
pub fn booted_artifacts(argv: &[String], cwd: &std::path::Path) -> Result<super::BootedArtifacts, String> {
    let [_, spec_path] = argv else {
        return Err(format!("expected `openshell-vmm SPEC.json`, found {} arguments", argv.len()));
    };
    let spec_path = cwd.join(spec_path);
    let bytes = std::fs::read(&spec_path).map_err(|e| format!("{}: {e}", spec_path.display()))?;
    let spec: KrunSpec = serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", spec_path.display()))?;
    let rootfs = spec
        .shares
        .iter()
        .find(|(tag, _)| tag == super::ROOT_TAG)
        .map(|(_, dir)| dir.clone())
        .ok_or_else(|| format!("{}: no virtio-fs share tagged {}", spec_path.display(), super::ROOT_TAG))?;
    Ok(super::BootedArtifacts { kernel: spec.kernel, rootfs })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(net: crate::NetMode) -> VmConfig {
        let mut c = VmConfig::exec("/k".into(), "/r".into(), "/st".into(), vec!["/bin/true".into()]);
        c.net = net;
        c
    }

    fn spec_of(c: &VmConfig) -> KrunSpec {
        spec(c, &Link::of(&c.net, crate::net::Attach::Krun, &c.state_dir))
    }

    #[test]
    fn the_command_travels_only_in_the_share() {
        let mut c = cfg(crate::NetMode::None);
        c.exec.argv = vec!["/bin/sh".into(), "-c".into(), "echo one\necho two".into()];
        c.exec.env = vec![("SECRET".into(), "value".into())];
        let s = spec_of(&c);
        assert_eq!((s.exec_path.as_str(), s.args.len(), s.env.len(), s.workdir), (KRUN_EXEC, 0, 0, None));
        assert!(!s.cmdline.contains("SECRET") && !s.cmdline.contains("echo"), "{}", s.cmdline);
    }

    #[test]
    fn passt_is_an_inherited_fd_and_gvproxy_its_stream_on_linux_and_a_vfkit_socket_on_macos() {
        let s = spec_of(&cfg(crate::NetMode::Passt));
        assert_eq!((s.passt_fd, s.net_unixgram), (Some(3), None));
        assert!(s.cmdline.contains("openshell.net=192.0.2.2/24,192.0.2.1"), "{}", s.cmdline);

        let s = spec_of(&cfg(crate::NetMode::Gvproxy { binary: "/gv".into() }));
        if cfg!(target_os = "macos") {
            assert_eq!(s.passt_fd, None);
            let net = s.net_unixgram.expect("gvproxy link");
            assert_eq!(net.path, std::path::Path::new("/st/gvproxy/link.sock"));
            assert_eq!(net.mac, [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee]);
            assert!(net.vfkit_magic, "gvproxy's vfkit mode learns libkrun's address from the VFKT magic");
        } else {
            // gvproxy's released Linux builds have no vfkit link: its stream, at the inherited fd.
            assert_eq!((s.passt_fd, s.net_unixgram), (Some(3), None));
        }
        assert!(s.cmdline.contains("openshell.net=192.168.127.2/24,192.168.127.1"), "{}", s.cmdline);

        let s = spec_of(&cfg(crate::NetMode::None));
        assert_eq!((s.passt_fd, s.net_unixgram), (None, None));
        assert!(!s.cmdline.contains("openshell.net"));
    }

    #[test]
    fn booted_artifacts_come_from_the_spec_the_vmm_names() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(crate::NetMode::Passt);
        c.kernel = "/store/kernel/vmlinux".into();
        c.rootfs = "/store/rootfs/abc".into();
        // The spec file `command` writes, named relative to the VMM's working directory.
        std::fs::write(dir.path().join("krun-spec.json"), serde_json::to_vec(&spec_of(&c)).unwrap()).unwrap();
        let argv = ["/x/openshell-vmm".to_owned(), "krun-spec.json".to_owned()];
        let b = booted_artifacts(&argv, dir.path()).unwrap();
        assert_eq!(b.kernel, std::path::Path::new("/store/kernel/vmlinux"));
        assert_eq!(b.rootfs, std::path::Path::new("/store/rootfs/abc"));

        let e = booted_artifacts(&argv[..1], dir.path()).unwrap_err();
        assert!(e.contains("expected `openshell-vmm SPEC.json`"), "{e}");
        let e = booted_artifacts(&["openshell-vmm".into(), "gone.json".into()], dir.path()).unwrap_err();
        assert!(e.contains("gone.json"), "{e}");
    }

    #[test]
    fn dyld_fallback_keeps_the_callers_entries_and_adds_homebrew() {
        let got = super::dyld_fallback_path(None).into_string().unwrap();
        assert!(got.starts_with("/opt/homebrew/lib:/usr/local/lib:"), "{got}");
        assert!(got.ends_with(":/usr/lib"), "{got}");
        let got = super::dyld_fallback_path(Some("/my/lib:/usr/local/lib".into())).into_string().unwrap();
        assert!(got.starts_with("/my/lib:/usr/local/lib:/opt/homebrew/lib:"), "{got}");
        assert_eq!(got.matches("/usr/local/lib").count(), 1, "{got}");
    }
}
