//! Serialisable description of one VM, so a supervisor can hand the whole
//! configuration to a separate `openshell-vmm` process (libkrun takes over the
//! process that boots the guest) as a single JSON file.

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
