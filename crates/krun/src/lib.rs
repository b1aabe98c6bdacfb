//! Safe wrapper over libkrun's C API and the only crate in the workspace that
//! contains `unsafe` FFI to it. [`Context`] owns one libkrun configuration
//! context and turns every negative `krun_*` return into a [`KrunError`];
//! [`KrunSpec`] plus [`run`] describe and boot a whole VM from serialisable
//! data, which is what the `openshell-vmm` binary does. libkrun takes over the
//! calling process in [`Context::start_enter`], so a VM normally gets its own
//! process.

pub mod child;
#[cfg(target_os = "linux")]
pub mod confine;
#[macro_use]
mod ffi;
mod spec;

pub mod codesign;

use std::convert::Infallible;
use std::ffi::{CString, NulError};
use std::io;
use std::os::fd::RawFd;
use std::os::raw::c_char;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::ptr;

pub use spec::{run, KrunDisk, KrunSpec, UnixgramNet, SPEC_FLAG};

/// How libkrun is linked into this build, which the target decides (`Cargo.toml`): `bundled` on
/// Linux (the registry crate compiled in), `system` on macOS (Homebrew's libkrun found by
/// pkg-config). `cargo xtask check` reports it.
pub const LINK_MODE: &str = if cfg!(target_os = "linux") { "bundled" } else { "system" };

/// The libkrun version the `bundled` link mode compiles in: the workspace pins `libkrun = "=…"`,
/// and a unit test keeps this in step with that pin. With `system` the version is whatever
/// pkg-config found, known only at run time.
pub const BUNDLED_LIBKRUN_VERSION: &str = "1.19.7";

/// Kernel image format for `krun_set_kernel` (libkrun's `KRUN_KERNEL_FORMAT_*`): an ELF `vmlinux`
/// on x86_64, the raw arm64 `Image` on aarch64 (arm64 has no bootable ELF; libkrun loads `Image`).
const KERNEL_FORMAT: u32 = if cfg!(target_arch = "aarch64") { 0 } else { 1 };

/// `krun_add_net_unixgram` flag: send the 4-byte `VFKT` magic after connecting, which gvproxy in
/// vfkit mode waits for (libkrun 1.19.7 `src/lib.rs` `NET_FLAG_VFKIT`; the bundled crate keeps its
/// constants private, so they are restated here).
pub const NET_FLAG_VFKIT: u32 = 1 << 0;
/// The virtio-net features libkrun's legacy network calls (`krun_set_passt_fd`,
/// `krun_set_gvproxy_path`) enable: CSUM, GUEST_CSUM, GUEST_TSO4, GUEST_UFO, HOST_TSO4, HOST_UFO
/// (bits 0, 1, 7, 10, 11, 14 of `uapi/linux/virtio_net.h`; libkrun 1.19.7 `NET_COMPAT_FEATURES`).
pub const NET_COMPAT_FEATURES: u32 = (1 << 0) | (1 << 1) | (1 << 7) | (1 << 10) | (1 << 11) | (1 << 14);

#[derive(Debug, thiserror::Error)]
pub enum KrunError {
    #[error("{call} failed: {source}")]
    Call {
        call: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{what} contains an interior NUL byte")]
    Nul {
        what: &'static str,
        #[source]
        source: NulError,
    },
}

impl KrunError {
    /// libkrun reports failure as `-errno`; non-negative values are results.
    fn check(call: &'static str, ret: i32) -> Result<i32, Self> {
        if ret < 0 {
            Err(Self::Call { call, source: io::Error::from_raw_os_error(-ret) })
        } else {
            Ok(ret)
        }
    }

    /// The `krun_*` function that failed, if this is a call error.
    pub fn call(&self) -> Option<&'static str> {
        match self {
            Self::Call { call, .. } => Some(call),
            Self::Nul { .. } => None,
        }
    }
}

fn cstr(what: &'static str, s: impl Into<Vec<u8>>) -> Result<CString, KrunError> {
    CString::new(s).map_err(|source| KrunError::Nul { what, source })
}

fn cpath(what: &'static str, p: &Path) -> Result<CString, KrunError> {
    cstr(what, p.as_os_str().as_bytes())
}

/// NULL-terminated `char *[]` borrowing from `strings`, which must outlive it.
fn ptr_array(strings: &[CString]) -> Vec<*const c_char> {
    strings.iter().map(|s| s.as_ptr()).chain(std::iter::once(ptr::null())).collect()
}

/// Sets libkrun's global log level (0 = off … 5 = trace).
pub fn set_log_level(level: u32) -> Result<(), KrunError> {
    call!(krun_set_log_level(level)).map(drop)
}

/// One libkrun configuration context; freed on drop unless the VM started.
#[derive(Debug)]
pub struct Context {
    id: u32,
}

impl Context {
    pub fn new() -> Result<Self, KrunError> {
        let id = call!(krun_create_ctx())?;
        Ok(Self { id: id as u32 })
    }

    /// Same as the free function [`set_log_level`]; libkrun's level is global.
    pub fn set_log_level(&mut self, level: u32) -> Result<&mut Self, KrunError> {
        set_log_level(level)?;
        Ok(self)
    }

    pub fn vm_config(&mut self, vcpus: u8, mem_mib: u32) -> Result<&mut Self, KrunError> {
        call!(krun_set_vm_config(self.id, vcpus, mem_mib))?;
        Ok(self)
    }

    /// Host directory exported over virtio-fs as the guest's root filesystem.
    pub fn root(&mut self, dir: &Path) -> Result<&mut Self, KrunError> {
        let dir = cpath("root path", dir)?;
        call!(krun_set_root(self.id, dir.as_ptr()))?;
        Ok(self)
    }

    pub fn add_virtiofs(&mut self, tag: &str, dir: &Path) -> Result<&mut Self, KrunError> {
        let tag = cstr("virtiofs tag", tag)?;
        let dir = cpath("virtiofs path", dir)?;
        call!(krun_add_virtiofs(self.id, tag.as_ptr(), dir.as_ptr()))?;
        Ok(self)
    }

    /// A raw disk image as a virtio-blk device whose serial (`VIRTIO_BLK_T_GET_ID`) is
    /// `block_id`; devices are `/dev/vda`, `/dev/vdb`, … in the order they are added.
    pub fn add_disk(&mut self, block_id: &str, image: &Path, read_only: bool) -> Result<&mut Self, KrunError> {
        let id = cstr("disk block id", block_id)?;
        let image = cpath("disk image path", image)?;
        call!(krun_add_disk(self.id, id.as_ptr(), image.as_ptr(), read_only))?;
        Ok(self)
    }

    /// ELF `vmlinux` without initramfs. `cmdline` replaces libkrun's whole
    /// default prolog (`console=hvc0 rootfstype=virtiofs init=/init.krun …`),
    /// so it must carry everything the guest needs.
    pub fn kernel(&mut self, vmlinux: &Path, cmdline: &str) -> Result<&mut Self, KrunError> {
        let vmlinux = cpath("kernel path", vmlinux)?;
        let cmdline = cstr("kernel cmdline", cmdline)?;
        call!(krun_set_kernel(self.id, vmlinux.as_ptr(), KERNEL_FORMAT, ptr::null(), cmdline.as_ptr(),))?;
        Ok(self)
    }

    /// `env` is always passed explicitly: a NULL envp makes libkrun copy the
    /// whole host environment onto the kernel command line.
    pub fn exec(&mut self, path: &str, args: &[String], env: &[(String, String)]) -> Result<&mut Self, KrunError> {
        let path = cstr("exec path", path)?;
        let args = args.iter().map(|a| cstr("exec argument", a.as_str())).collect::<Result<Vec<_>, _>>()?;
        let env =
            env.iter().map(|(k, v)| cstr("exec environment", format!("{k}={v}"))).collect::<Result<Vec<_>, _>>()?;
        let (argv, envp) = (ptr_array(&args), ptr_array(&env));
        call!(krun_set_exec(self.id, path.as_ptr(), argv.as_ptr(), envp.as_ptr()))?;
        Ok(self)
    }

    /// Working directory of the exec'd process, as a guest path.
    pub fn workdir(&mut self, dir: &Path) -> Result<&mut Self, KrunError> {
        let dir = cpath("workdir", dir)?;
        call!(krun_set_workdir(self.id, dir.as_ptr()))?;
        Ok(self)
    }

    /// Host file receiving the guest's virtio console output.
    pub fn console_output(&mut self, file: &Path) -> Result<&mut Self, KrunError> {
        let file = cpath("console output path", file)?;
        call!(krun_set_console_output(self.id, file.as_ptr()))?;
        Ok(self)
    }

    /// Legacy 8250 serial port (ttyS0); it is up early enough for
    /// `earlyprintk=serial`, unlike virtio hvc0. `-1` disables a direction.
    pub fn serial_console_default(&mut self, in_fd: RawFd, out_fd: RawFd) -> Result<&mut Self, KrunError> {
        call!(krun_add_serial_console_default(self.id, in_fd, out_fd))?;
        Ok(self)
    }

    /// Connected passt socket used as the guest's virtio-net backend.
    pub fn passt_fd(&mut self, fd: RawFd) -> Result<&mut Self, KrunError> {
        call!(krun_set_passt_fd(self.id, fd))?;
        Ok(self)
    }

    /// A virtio-net device whose backend is a unix datagram proxy (gvproxy's `-listen-vfkit`)
    /// that libkrun connects to at `path` when the VM starts, from a socket of its own in the
    /// VMM's temporary directory. Pass [`NET_FLAG_VFKIT`] in `flags` for gvproxy.
    pub fn add_net_unixgram(
        &mut self,
        path: &Path,
        mac: [u8; 6],
        features: u32,
        flags: u32,
    ) -> Result<&mut Self, KrunError> {
        let path = cpath("unixgram network path", path)?;
        let mut mac = mac;
        // The header declares `uint8_t *const c_mac` (bindgen: `*mut u8`) while the bundled
        // crate takes `*const u8`; a `*mut` argument fits both.
        call!(krun_add_net_unixgram(self.id, path.as_ptr(), -1, mac.as_mut_ptr(), features, flags))?;
        Ok(self)
    }

    /// Boots the VM in this process. On success libkrun never returns: the
    /// process exits when the guest powers off.
    pub fn start_enter(self) -> Result<Infallible, KrunError> {
        let err = call!(krun_start_enter(self.id)).err().unwrap_or_else(|| KrunError::Call {
            call: "krun_start_enter",
            source: io::Error::other("returned without error"),
        });
        Err(err)
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // ENOENT is expected if krun_start_enter already consumed the context.
        let _ = call!(krun_free_ctx(self.id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_version_matches_the_workspace_pin() {
        let manifest = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../Cargo.toml")).unwrap();
        let pin = manifest
            .lines()
            .find(|l| l.starts_with("libkrun ="))
            .and_then(|l| l.split("version = \"=").nth(1))
            .and_then(|v| v.split('"').next())
            .expect("workspace Cargo.toml pins libkrun = { version = \"=X.Y.Z\" }");
        assert_eq!(pin, BUNDLED_LIBKRUN_VERSION);
    }

    #[test]
    fn negative_return_names_call_and_errno() {
        let err = KrunError::check("krun_set_root", -libc::ENOENT).unwrap_err();
        assert_eq!(err.call(), Some("krun_set_root"));
        let msg = err.to_string();
        assert!(msg.starts_with("krun_set_root failed: "), "{msg}");
        assert!(msg.contains("No such file or directory"), "{msg}");
        assert_eq!(KrunError::check("krun_create_ctx", 3).unwrap(), 3);
    }

    #[test]
    fn interior_nul_is_rejected_before_ffi() {
        let mut ctx = Context::new().unwrap();
        let err = ctx.kernel(Path::new("/vmlinux"), "console=\0ttyS0").unwrap_err();
        assert!(matches!(err, KrunError::Nul { what: "kernel cmdline", .. }), "{err}");
        let env = [("A\0".to_string(), "b".to_string())];
        let err = ctx.exec("/bin/true", &[], &env).unwrap_err();
        assert_eq!(err.to_string(), "exec environment contains an interior NUL byte");
    }

    #[test]
    fn unknown_context_reports_enoent() {
        let ctx = Context::new().unwrap();
        let id = ctx.id;
        drop(ctx);
        let err = call!(krun_set_vm_config(id, 1, 128)).unwrap_err();
        assert_eq!(err.call(), Some("krun_set_vm_config"));
        assert!(matches!(err, KrunError::Call { ref source, .. } if source.raw_os_error() == Some(libc::ENOENT)));
    }

    #[test]
    fn unixgram_net_is_accepted_with_the_vfkit_flag() {
        let mut ctx = Context::new().unwrap();
        let mac = [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee];
        // libkrun records the device; it connects only when the VM starts.
        ctx.add_net_unixgram(Path::new("/tmp/gvproxy.sock"), mac, NET_COMPAT_FEATURES, NET_FLAG_VFKIT).unwrap();
        // A flag libkrun does not know is refused with EINVAL, named after the call.
        let err = ctx.add_net_unixgram(Path::new("/tmp/gvproxy.sock"), mac, 0, 1 << 7).unwrap_err();
        assert_eq!(err.call(), Some("krun_add_net_unixgram"));
        assert!(matches!(err, KrunError::Call { ref source, .. } if source.raw_os_error() == Some(libc::EINVAL)));
    }

    #[test]
    fn builder_accepts_a_configuration_and_refuses_zero_vcpus() {
        let mut ctx = Context::new().unwrap();
        ctx.vm_config(1, 256)
            .unwrap()
            .root(Path::new("/tmp"))
            .unwrap()
            .exec("/bin/true", &["-x".into()], &[("K".into(), "V".into())])
            .unwrap()
            .workdir(Path::new("/"))
            .unwrap();
        // The same call with a value libkrun must refuse: the builder passes errors on, named.
        let err = Context::new().unwrap().vm_config(0, 256).unwrap_err();
        assert_eq!(err.call(), Some("krun_set_vm_config"), "{err}");
    }
}
