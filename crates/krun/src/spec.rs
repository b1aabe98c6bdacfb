//! Serialisable description of one VM, so a supervisor can hand the whole
//! configuration to a separate `openshell-vmm` process (libkrun takes over the
//! process that boots the guest) as one JSON argument: `openshell-vmm --spec JSON`.
//!
//! On the command line, not in a file, for the reason QEMU's configuration is there: the VMM's
//! argv (`/proc/<pid>/cmdline`) is then its own word on what it runs, which `verify` reads back,
//! and a VMM started unprivileged needs no path to a file of ours. The spec holds no secret (the
//! guest's command travels in the share).

use std::convert::Infallible;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Context, KrunError};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KrunSpec {
    pub vcpus: u8,
    pub mem_mib: u32,
    /// Host directory that becomes the guest's virtio-fs root.
    pub root: PathBuf,
    /// ELF `vmlinux`.
    pub kernel: PathBuf,
    /// Full kernel command line; replaces libkrun's default prolog.
    pub cmdline: String,
    pub exec_path: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub workdir: Option<String>,
    #[serde(default)]
    pub console_output: Option<PathBuf>,
    /// Attach ttyS0 to this process' stdout (input disabled).
    #[serde(default)]
    pub serial_console: bool,
    /// Extra virtio-fs shares as `(tag, host dir)`.
    #[serde(default)]
    pub shares: Vec<(String, PathBuf)>,
    /// Raw disk images as virtio-blk devices, in order (`/dev/vda` first).
    #[serde(default)]
    pub disks: Vec<KrunDisk>,
    #[serde(default)]
    pub log_level: u32,
    /// An inherited fd connected to passt; becomes the guest's virtio-net.
    #[serde(default)]
    pub passt_fd: Option<i32>,
    /// A unix datagram network proxy (gvproxy in vfkit mode) libkrun connects to by path; the
    /// guest's virtio-net. A VM uses this or `passt_fd`, not both.
    #[serde(default)]
    pub net_unixgram: Option<UnixgramNet>,
}

/// A virtio-blk disk (`krun_add_disk`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KrunDisk {
    /// Its serial in the guest (`/sys/block/vdX/serial`).
    pub block_id: String,
    pub image: PathBuf,
    pub read_only: bool,
}

/// The flag before the spec's JSON on `openshell-vmm`'s command line.
pub const SPEC_FLAG: &str = "--spec";

impl KrunSpec {
    /// `openshell-vmm`'s arguments for this spec.
    pub fn to_args(&self) -> [String; 2] {
        [SPEC_FLAG.to_owned(), serde_json::to_string(self).expect("a spec serializes")]
    }

    /// The spec a VMM's command line carries (its whole argv, program first, as
    /// `/proc/<pid>/cmdline` gives it).
    pub fn from_argv(argv: &[String]) -> Result<KrunSpec, String> {
        match argv {
            [_, flag, json] if flag == SPEC_FLAG => {
                serde_json::from_str(json).map_err(|e| format!("the spec on its command line: {e}"))
            }
            _ => Err(format!("expected `openshell-vmm {SPEC_FLAG} JSON`, found {} arguments", argv.len())),
        }
    }

    /// The fds of its own this spec names files by ([`crate::child::fd_path`]).
    pub fn fds(&self) -> Vec<std::os::fd::RawFd> {
        let dirs = self.shares.iter().map(|(_, d)| d.as_path());
        let disks = self.disks.iter().map(|d| d.image.as_path());
        let all = [self.kernel.as_path(), self.root.as_path()].into_iter().chain(self.console_output.as_deref());
        let mut fds: Vec<_> = all.chain(dirs).chain(disks).filter_map(crate::child::fd_of).collect();
        fds.sort_unstable();
        fds.dedup();
        fds
    }

    /// This spec with each fd it names replaced by `map(fd)` ([`crate::child::refd`]).
    pub fn refd(&self, map: &dyn Fn(std::os::fd::RawFd) -> std::os::fd::RawFd) -> KrunSpec {
        let re = |p: &Path| crate::child::refd(p, map);
        KrunSpec {
            root: re(&self.root),
            kernel: re(&self.kernel),
            console_output: self.console_output.as_deref().map(re),
            shares: self.shares.iter().map(|(tag, dir)| (tag.clone(), re(dir))).collect(),
            disks: self.disks.iter().map(|d| KrunDisk { image: re(&d.image), ..d.clone() }).collect(),
            ..self.clone()
        }
    }
}

/// A virtio-net device backed by a unix datagram socket (`krun_add_net_unixgram`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnixgramNet {
    /// The proxy's socket, e.g. gvproxy's `-listen-vfkit unixgram://PATH`.
    pub path: PathBuf,
    pub mac: [u8; 6],
    /// Send the `VFKT` magic after connecting ([`crate::NET_FLAG_VFKIT`]), as gvproxy expects.
    pub vfkit_magic: bool,
}

/// Configures a context from `spec` and boots it; returns only on failure.
///
/// The order of calls is the one measured to work with an external kernel
/// (`vm_config`, `root`, `kernel`, then `exec`).
pub fn run(spec: &KrunSpec) -> Result<Infallible, KrunError> {
    crate::set_log_level(spec.log_level)?;
    let mut ctx = Context::new()?;
    ctx.vm_config(spec.vcpus, spec.mem_mib)?.root(&spec.root)?.kernel(&spec.kernel, &spec.cmdline)?.exec(
        &spec.exec_path,
        &spec.args,
        &spec.env,
    )?;
    for (tag, dir) in &spec.shares {
        ctx.add_virtiofs(tag, dir)?;
    }
    for d in &spec.disks {
        ctx.add_disk(&d.block_id, &d.image, d.read_only)?;
    }
    if let Some(dir) = &spec.workdir {
        ctx.workdir(Path::new(dir))?;
    }
    if let Some(file) = &spec.console_output {
        ctx.console_output(file)?;
    }
    if let Some(fd) = spec.passt_fd {
        ctx.passt_fd(fd)?;
    }
    if let Some(net) = &spec.net_unixgram {
        let flags = if net.vfkit_magic { crate::NET_FLAG_VFKIT } else { 0 };
        ctx.add_net_unixgram(&net.path, net.mac, crate::NET_COMPAT_FEATURES, flags)?;
    }
    if spec.serial_console {
        ctx.serial_console_default(-1, libc::STDOUT_FILENO)?;
    }
    ctx.start_enter()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> KrunSpec {
        KrunSpec {
            vcpus: 2,
            mem_mib: 512,
            root: "/tmp/root".into(),
            kernel: "/tmp/vmlinux".into(),
            cmdline: "console=ttyS0".into(),
            exec_path: "/bin/true".into(),
            args: vec!["a b".into()],
            env: vec![("HOME".into(), "/root".into())],
            workdir: Some("/".into()),
            console_output: None,
            serial_console: true,
            shares: vec![("work".into(), "/tmp/work".into())],
            disks: vec![KrunDisk { block_id: "root".into(), image: "/tmp/root.ext4".into(), read_only: true }],
            log_level: 2,
            passt_fd: Some(3),
            net_unixgram: None,
        }
    }

    #[test]
    fn json_roundtrip() {
        let spec = sample();
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<KrunSpec>(&json).unwrap(), spec);
    }

    #[test]
    fn gvproxy_link_roundtrips_and_is_optional() {
        let spec = KrunSpec {
            passt_fd: None,
            net_unixgram: Some(UnixgramNet {
                path: "/st/gvproxy-link.sock".into(),
                mac: [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee],
                vfkit_magic: true,
            }),
            ..sample()
        };
        let json = serde_json::to_string(&spec).unwrap();
        assert!(json.contains(r#""path":"/st/gvproxy-link.sock""#), "{json}");
        assert_eq!(serde_json::from_str::<KrunSpec>(&json).unwrap(), spec);
        // a spec written before the field existed still reads, without a unixgram NIC
        let old = serde_json::to_string(&sample()).unwrap().replace(r#","net_unixgram":null"#, "");
        assert!(!old.contains("net_unixgram"));
        assert_eq!(serde_json::from_str::<KrunSpec>(&old).unwrap().net_unixgram, None);
    }

    #[test]
    fn the_spec_travels_as_one_argument_and_reads_back() {
        let spec = sample();
        let argv: Vec<String> = ["/x/openshell-vmm".to_owned()].into_iter().chain(spec.to_args()).collect();
        assert_eq!(KrunSpec::from_argv(&argv).unwrap(), spec);
        let e = KrunSpec::from_argv(&argv[..2]).unwrap_err();
        assert!(e.contains("expected `openshell-vmm --spec JSON`"), "{e}");
        let e = KrunSpec::from_argv(&["vmm".into(), SPEC_FLAG.into(), "{".into()]).unwrap_err();
        assert!(e.contains("the spec on its command line"), "{e}");
    }

    #[test]
    fn fds_are_listed_once_and_replaced_everywhere() {
        use crate::child::{dir_fd_path, fd_path};
        let spec = KrunSpec {
            kernel: fd_path(10).into(),
            root: dir_fd_path(11).into(),
            console_output: Some(fd_path(13).into()),
            shares: vec![("rootfs".into(), dir_fd_path(11).into()), ("work".into(), "/by/path".into())],
            disks: vec![
                KrunDisk { block_id: "r".into(), image: fd_path(14).into(), read_only: true },
                KrunDisk { block_id: "d".into(), image: fd_path(15).into(), read_only: false },
            ],
            ..sample()
        };
        assert_eq!(spec.fds(), [10, 11, 13, 14, 15]);
        let moved = spec.refd(&|fd| fd + 10);
        assert_eq!(moved.kernel, Path::new(&fd_path(20)));
        assert_eq!(moved.root, Path::new(&dir_fd_path(21)));
        assert_eq!(moved.console_output.as_deref(), Some(Path::new(&fd_path(23))));
        assert_eq!(moved.shares[1].1, Path::new("/by/path"), "a path that is no fd stays");
        assert_eq!(moved.disks[1].image, Path::new(&fd_path(25)));
        assert!(moved.disks[0].read_only && !moved.disks[1].read_only);
        assert_eq!((moved.cmdline, moved.vcpus), (spec.cmdline, spec.vcpus));
    }

    #[test]
    fn optional_fields_default() {
        let json = r#"{"vcpus":1,"mem_mib":128,"root":"/r","kernel":"/k",
                       "cmdline":"","exec_path":"/bin/true"}"#;
        let spec: KrunSpec = serde_json::from_str(json).unwrap();
        assert!(spec.args.is_empty() && spec.shares.is_empty() && !spec.serial_console);
    }

    #[test]
    fn run_reports_nul_before_booting() {
        let spec = KrunSpec { cmdline: "a\0b".into(), ..sample() };
        let err = run(&spec).unwrap_err();
        assert!(matches!(err, KrunError::Nul { what: "kernel cmdline", .. }), "{err}");
    }
}
