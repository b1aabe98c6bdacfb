//! The guest kernel: built from Debian's `linux-source-6.1` with the fragments in `kernel/`.
//!
//! The config is `allnoconfig` plus the fragments (`KCONFIG_ALLCONFIG`), so the guest gets only what
//! a fragment names. After Kconfig resolves dependencies, every `=y` a fragment asks for must still
//! be `=y` and every `is not set` must still be off; otherwise the build fails naming the options
//! Kconfig dropped. The artifact (`vmlinux`, `config`, `provenance.json`) is keyed by the sha256 of
//! the source package version and the fragments.
//!
//! Two kernels come from the same machinery, one per [`KernelRole`]: the guest's, and the nested
//! host's (an L1 VM that runs libkrun's guest as L2 where libkrun cannot run directly), which is the
//! guest's fragments plus its own.
//!
//! Each is built for one [`Arch`]: the common fragments hold nothing arch-specific, and
//! `arch-<arch>.config` adds what that architecture's machine needs (PVH entry on x86_64; PL011
//! console and the `virt` machine's devices on aarch64). A foreign arch is cross-compiled with
//! Debian's `gcc-<arch>-linux-gnu`. Which source package to build from is `kernel/source.json`'s
//! word, read here and nowhere else.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::command::{capture, run, CommandFailed};
use crate::store::StoreError;
use crate::{sha256_file, Arch, Digest, DigestBuilder, Store};

pub const STORE_KIND: &str = "kernel";
/// The file in `kernel/` that names the source package.
pub const SOURCE_FILE: &str = "source.json";

/// `kernel/source.json`: the Debian package the kernel is built from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelSource {
    /// The package (`linux-source-6.1`); its tarball unpacks into a directory of the same name.
    pub package: String,
    /// Where the package puts the source tarball.
    pub tarball: PathBuf,
    /// The one command that installs the source and everything a native `make` needs.
    pub install: String,
}

impl KernelSource {
    pub fn read(kernel_dir: &Path) -> Result<KernelSource, KernelError> {
        let path = kernel_dir.join(SOURCE_FILE);
        let text = fs::read_to_string(&path).map_err(|source| KernelError::Io { path: path.clone(), source })?;
        serde_json::from_str(&text).map_err(|e| KernelError::SourceFile { path, detail: e.to_string() })
    }

    /// The install command for a build of `arch` here: the cross compiler joins the list when
    /// `arch` is not the host's.
    pub fn install_for(&self, arch: Arch) -> String {
        match arch.cross_compile() {
            Some(prefix) => format!("{} gcc-{}", self.install, prefix.trim_end_matches('-')),
            None => self.install.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{package} is not installed ({tarball} missing); install it with: {install}")]
    SourceMissing { package: String, tarball: PathBuf, install: String },
    #[error(
        "{path} is not a valid kernel source record ({detail}); it needs \"package\", \"tarball\" and \"install\""
    )]
    SourceFile { path: PathBuf, detail: String },
    #[error("the {role} kernel exists only for x86_64 (asked for {arch})")]
    RoleArch { role: KernelRole, arch: Arch },
    #[error("cannot read the kernel fragments in {dir}: {source}")]
    Fragments { dir: PathBuf, source: std::io::Error },
    #[error("no kernel has been built for the current fragments (expected {expected}); run `cargo xtask kernel`")]
    NotBuilt { expected: PathBuf },
    #[error("`{command}` failed: {detail}; the last build output is above. Missing tools? {install}")]
    Command { command: String, detail: String, install: String },
    #[error("Kconfig dropped options the fragments require (a missing dependency?): {}", .0.join(", "))]
    Dropped(Vec<String>),
    #[error("kernel {path} does not match its provenance.json: recorded sha256 {recorded}, found {found}; rebuild it (remove {path} and run `cargo xtask kernel`)")]
    Tampered { path: PathBuf, recorded: Digest, found: Digest },
    #[error("kernel artifact I/O at {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One config fragment from `kernel/`.
#[derive(Debug, Clone)]
pub struct Fragment {
    pub name: String,
    pub text: String,
}

/// What a fragment requires of the final `.config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    Enabled(String),
    Disabled(String),
}

impl Fragment {
    pub fn requirements(&self) -> Vec<Requirement> {
        self.text
            .lines()
            .map(str::trim)
            .filter_map(|l| {
                if let Some(opt) = l.strip_suffix("=y") {
                    opt.starts_with("CONFIG_").then(|| Requirement::Enabled(opt.to_owned()))
                } else {
                    let opt = l.strip_prefix("# ")?.strip_suffix(" is not set")?;
                    opt.starts_with("CONFIG_").then(|| Requirement::Disabled(opt.to_owned()))
                }
            })
            .collect()
    }
}

/// What a kernel is for. Each role but the guest owns one fragment in `kernel/`; the guest's
/// fragments are all the others, and every other role builds on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelRole {
    /// The kernel every VM boots.
    Guest,
    /// L1 of a nested boot: KVM built in (for TCG's emulated AMD SVM) and what a glibc userspace
    /// running `openshell-vmm` and passt needs.
    NestedHost,
}

impl KernelRole {
    pub const ALL: [KernelRole; 2] = [KernelRole::Guest, KernelRole::NestedHost];

    /// The fragment only this role adds.
    pub fn own_fragment(self) -> Option<&'static str> {
        match self {
            KernelRole::Guest => None,
            KernelRole::NestedHost => Some("nested-host.config"),
        }
    }

    /// Whether the fragment file `name` goes into this role's kernel.
    fn takes(self, name: &str) -> bool {
        let owner = KernelRole::ALL.into_iter().find(|r| r.own_fragment() == Some(name));
        owner.is_none_or(|r| r == self)
    }
}

impl std::fmt::Display for KernelRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KernelRole::Guest => "guest",
            KernelRole::NestedHost => "nested-host",
        })
    }
}

/// Whether the fragment file `name` goes into a kernel for `arch`: `arch-<a>.config` only into
/// `a`'s, every other fragment into all.
fn arch_takes(arch: Arch, name: &str) -> bool {
    match name.strip_prefix("arch-").and_then(|n| n.strip_suffix(".config")) {
        Some(a) => a == arch.name(),
        None => true,
    }
}

/// The inputs of a kernel build.
#[derive(Debug, Clone)]
pub struct KernelSpec {
    pub source: KernelSource,
    pub source_version: String,
    pub arch: Arch,
    pub fragments: Vec<Fragment>,
}

impl KernelSpec {
    /// Reads the source record (`kernel/source.json`), the fragments of `role` and `arch` from
    /// `kernel/*.config` (sorted by name) and the installed source package's version.
    pub fn from_project(kernel_dir: &Path, role: KernelRole, arch: Arch) -> Result<KernelSpec, KernelError> {
        if role == KernelRole::NestedHost && arch != Arch::X86_64 {
            return Err(KernelError::RoleArch { role, arch });
        }
        let source = KernelSource::read(kernel_dir)?;
        if !source.tarball.is_file() {
            return Err(source.missing(arch));
        }
        let io = |source| KernelError::Fragments { dir: kernel_dir.to_owned(), source };
        let mut names: Vec<PathBuf> = fs::read_dir(kernel_dir)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "config"))
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| role.takes(&n.to_string_lossy()) && arch_takes(arch, &n.to_string_lossy()))
            })
            .collect();
        names.sort();
        let fragments = names
            .iter()
            .map(|p| {
                Ok(Fragment {
                    name: p.file_name().unwrap().to_string_lossy().into_owned(),
                    text: fs::read_to_string(p).map_err(io)?,
                })
            })
            .collect::<Result<Vec<_>, KernelError>>()?;
        let source_version = package_version(&source.package).map_err(|_| source.missing(arch))?;
        Ok(KernelSpec { source, source_version, arch, fragments })
    }

    /// The content address of the build: source version, arch and every fragment, nothing else.
    pub fn key(&self) -> Digest {
        let mut b = DigestBuilder::new("openshell-kernel/v1");
        b.str("source", &format!("{}={}", self.source.package, self.source_version));
        b.str("arch", self.arch.name());
        for f in &self.fragments {
            b.str("fragment-name", &f.name).str("fragment", &f.text);
        }
        b.finish()
    }

    pub fn requirements(&self) -> Vec<Requirement> {
        self.fragments.iter().flat_map(Fragment::requirements).collect()
    }

    fn command_failed(&self) -> impl Fn(CommandFailed) -> KernelError + '_ {
        |CommandFailed { command, detail }| KernelError::Command {
            command,
            detail,
            install: self.source.install_for(self.arch),
        }
    }

    /// `make -C <src> ARCH=… [CROSS_COMPILE=…]`, the start of every make call of the build.
    fn make(&self, src: &Path) -> Command {
        let mut c = Command::new("make");
        c.arg("-C").arg(src).arg(format!("ARCH={}", self.arch.kernel_arch()));
        if let Some(prefix) = self.arch.cross_compile() {
            c.arg(format!("CROSS_COMPILE={prefix}"));
        }
        c
    }
}

impl KernelSource {
    fn missing(&self, arch: Arch) -> KernelError {
        KernelError::SourceMissing {
            package: self.package.clone(),
            tarball: self.tarball.clone(),
            install: self.install_for(arch),
        }
    }
}

/// Options whose requirement the resolved `.config` text does not meet.
pub fn unmet(requirements: &[Requirement], dot_config: &str) -> Vec<String> {
    let enabled = |opt: &str| dot_config.lines().any(|l| l.strip_prefix(opt) == Some("=y"));
    requirements
        .iter()
        .filter_map(|r| match r {
            Requirement::Enabled(o) if !enabled(o) => Some(format!("{o}=y")),
            Requirement::Disabled(o) if enabled(o) => Some(format!("{o} (must be off)")),
            _ => None,
        })
        .collect()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FragmentDigest {
    pub name: String,
    pub sha256: Digest,
}

/// `provenance.json`: what was built, from what, where and when.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KernelProvenance {
    pub kernel_release: String,
    pub source_package: String,
    pub source_version: String,
    /// Kernels built before the arch was recorded are all x86_64.
    #[serde(default)]
    pub arch: Arch,
    /// The cross compiler's prefix, when the kernel was cross-built.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cross_compile: Option<String>,
    pub fragments: Vec<FragmentDigest>,
    pub key: Digest,
    /// The boot image's sha256 (`vmlinux` or `Image`, see [`Arch::kernel_image`]); the field keeps
    /// its x86-era name so every stored provenance.json still reads.
    pub vmlinux_sha256: Digest,
    pub built_at_unix: u64,
    pub build_seconds: f64,
    pub host: String,
}

/// A built kernel in the store.
#[derive(Debug, Clone)]
pub struct GuestKernel {
    pub dir: PathBuf,
    /// The boot image the VMM loads: `vmlinux` on x86_64, `Image` on aarch64.
    pub vmlinux: PathBuf,
    pub provenance: KernelProvenance,
}

impl GuestKernel {
    pub fn open(dir: &Path) -> Result<GuestKernel, KernelError> {
        let p = dir.join("provenance.json");
        let text = fs::read_to_string(&p).map_err(|source| KernelError::Io { path: p.clone(), source })?;
        let provenance: KernelProvenance = serde_json::from_str(&text).map_err(|e| KernelError::Io {
            path: p,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })?;
        let vmlinux = dir.join(provenance.arch.kernel_image().file_name);
        Ok(GuestKernel { dir: dir.to_owned(), vmlinux, provenance })
    }
}

/// Re-hashes `vmlinux` and compares it with the digest `provenance.json` recorded at build time.
/// Returns the digest on a match; a mismatch names the file and both digests.
pub fn verify(kernel: &GuestKernel) -> Result<Digest, KernelError> {
    let found =
        sha256_file(&kernel.vmlinux).map_err(|source| KernelError::Io { path: kernel.vmlinux.clone(), source })?;
    if found != kernel.provenance.vmlinux_sha256 {
        return Err(KernelError::Tampered {
            path: kernel.vmlinux.clone(),
            recorded: kernel.provenance.vmlinux_sha256.clone(),
            found,
        });
    }
    Ok(found)
}

/// The kernel already built for `spec`, without building.
pub fn locate(store: &Store, spec: &KernelSpec) -> Result<GuestKernel, KernelError> {
    let key = spec.key();
    match store.get(STORE_KIND, &key) {
        Some(dir) => GuestKernel::open(&dir),
        None => Err(KernelError::NotBuilt { expected: store.path(STORE_KIND, &key) }),
    }
}

/// Disk a build needs beside the store: the work tree is ~1.5 GiB once built.
const BUILD_BYTES: u64 = 2 << 30;

/// Builds the kernel for `spec` unless the store has it. `on_line` sees every line of build output.
pub fn build(store: &Store, spec: &KernelSpec, on_line: &mut dyn FnMut(&str)) -> Result<GuestKernel, KernelError> {
    let key = spec.key();
    let dir = store.get_or_build(STORE_KIND, &key, BUILD_BYTES, |out| build_into(store, spec, &key, out, on_line))?;
    GuestKernel::open(&dir)
}

fn build_into(
    store: &Store,
    spec: &KernelSpec,
    key: &Digest,
    out: &Path,
    on_line: &mut dyn FnMut(&str),
) -> Result<(), KernelError> {
    let started = Instant::now();
    let failed = spec.command_failed();
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| KernelError::Io { path, source }
    };
    // The work tree lives beside the store, not in /tmp: it is ~1.5 GiB once built.
    let work = store.scratch_dir("kernelwork").map_err(io(store.root()))?;
    on_line(&format!("extracting {}", spec.source.tarball.display()));
    run(Command::new("tar").arg("xf").arg(&spec.source.tarball).arg("-C").arg(work.path()), on_line)
        .map_err(&failed)?;
    let src = work.path().join(&spec.source.package);
    let allconfig = work.path().join("fragments.config");
    let merged: String = spec.fragments.iter().map(|f| format!("{}\n", f.text)).collect();
    fs::write(&allconfig, merged).map_err(io(&allconfig))?;
    run(spec.make(&src).arg("allnoconfig").env("KCONFIG_ALLCONFIG", &allconfig), on_line).map_err(&failed)?;
    let dot_config = src.join(".config");
    let resolved = fs::read_to_string(&dot_config).map_err(io(&dot_config))?;
    let dropped = unmet(&spec.requirements(), &resolved);
    if !dropped.is_empty() {
        return Err(KernelError::Dropped(dropped));
    }
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    let image = spec.arch.kernel_image();
    run(spec.make(&src).arg(format!("-j{jobs}")).arg(image.make_target), on_line).map_err(&failed)?;
    let release = capture(spec.make(&src).arg("-s").arg("kernelrelease")).map_err(&failed)?;

    let vmlinux = out.join(image.file_name);
    fs::copy(src.join(image.built_at), &vmlinux).map_err(io(&vmlinux))?;
    fs::write(out.join("config"), &resolved).map_err(io(out))?;
    let provenance = KernelProvenance {
        kernel_release: release.trim().to_owned(),
        source_package: spec.source.package.clone(),
        source_version: spec.source_version.clone(),
        arch: spec.arch,
        cross_compile: spec.arch.cross_compile().map(str::to_owned),
        fragments: spec
            .fragments
            .iter()
            .map(|f| FragmentDigest { name: f.name.clone(), sha256: Digest::of_bytes(f.text.as_bytes()) })
            .collect(),
        key: key.clone(),
        vmlinux_sha256: sha256_file(&vmlinux).map_err(io(&vmlinux))?,
        built_at_unix: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        build_seconds: started.elapsed().as_secs_f64(),
        host: capture(Command::new("uname").arg("-srm")).unwrap_or_default().trim().to_owned(),
    };
    let json = serde_json::to_string_pretty(&provenance).expect("provenance serializes");
    fs::write(out.join("provenance.json"), json).map_err(io(out))?;
    Ok(())
}

fn package_version(package: &str) -> Result<String, CommandFailed> {
    Ok(capture(Command::new("dpkg-query").args(["-W", "-f=${Version}", package]))?.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frag(text: &str) -> Fragment {
        Fragment { name: "t.config".into(), text: text.into() }
    }

    #[test]
    fn parses_enabled_and_disabled_lines_and_ignores_comments() {
        let f = frag("# a comment\nCONFIG_A=y\n\n# CONFIG_B is not set\nCONFIG_C=m\nnot config=y\n");
        assert_eq!(
            f.requirements(),
            vec![Requirement::Enabled("CONFIG_A".into()), Requirement::Disabled("CONFIG_B".into())]
        );
    }

    #[test]
    fn unmet_names_dropped_and_forbidden_options() {
        let reqs = frag("CONFIG_A=y\nCONFIG_AB=y\n# CONFIG_B is not set\n# CONFIG_C is not set\n").requirements();
        let resolved = "CONFIG_A=y\nCONFIG_ABC=y\nCONFIG_B=y\n# CONFIG_C is not set\n";
        assert_eq!(unmet(&reqs, resolved), vec!["CONFIG_AB=y", "CONFIG_B (must be off)"]);
    }

    #[test]
    fn the_nested_host_takes_the_guests_fragments_and_its_own_and_the_guest_not_its() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../kernel");
        let names = |role| -> Vec<String> {
            let files = fs::read_dir(&dir)
                .unwrap()
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned());
            let mut v: Vec<String> = files.filter(|n| n.ends_with(".config") && KernelRole::takes(role, n)).collect();
            v.sort();
            v
        };
        let (guest, nested) = (names(KernelRole::Guest), names(KernelRole::NestedHost));
        assert!(!guest.contains(&"nested-host.config".to_owned()), "{guest:?}");
        assert!(guest.contains(&"microvm.config".to_owned()), "{guest:?}");
        let mut expected = guest.clone();
        expected.push("nested-host.config".into());
        expected.sort();
        assert_eq!(nested, expected);
    }

    #[test]
    fn nested_host_fragment_builds_kvm_amd_in_and_keeps_kvm_intel_out() {
        let text =
            fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../kernel/nested-host.config")).unwrap();
        let reqs = frag(&text).requirements();
        for opt in ["CONFIG_KVM", "CONFIG_KVM_AMD", "CONFIG_FHANDLE", "CONFIG_USER_NS"] {
            assert!(reqs.contains(&Requirement::Enabled(opt.into())), "{opt} missing");
        }
        assert!(reqs.contains(&Requirement::Disabled("CONFIG_KVM_INTEL".into())));
    }

    #[test]
    fn key_changes_with_fragments_and_source() {
        let source = KernelSource { package: "linux-source-6.1".into(), tarball: "/x".into(), install: "i".into() };
        let spec = KernelSpec {
            source,
            source_version: "6.1.1".into(),
            arch: Arch::X86_64,
            fragments: vec![frag("CONFIG_A=y\n")],
        };
        let mut other = spec.clone();
        other.fragments[0].text.push_str("CONFIG_B=y\n");
        let mut newer = spec.clone();
        newer.source_version = "6.1.2".into();
        let mut arm = spec.clone();
        arm.arch = Arch::Aarch64;
        assert_ne!(spec.key(), other.key());
        assert_ne!(spec.key(), newer.key());
        assert_ne!(spec.key(), arm.key());
        assert_eq!(spec.key(), spec.clone().key());
    }

    fn built_kernel(dir: &Path, vmlinux: &[u8]) -> GuestKernel {
        fs::write(dir.join("vmlinux"), vmlinux).unwrap();
        let provenance = KernelProvenance {
            kernel_release: "6.1.0".into(),
            source_package: "linux-source-6.1".into(),
            source_version: "6.1.0-1".into(),
            arch: Arch::X86_64,
            cross_compile: None,
            fragments: vec![],
            key: Digest::of_bytes(b"key"),
            vmlinux_sha256: Digest::of_bytes(vmlinux),
            built_at_unix: 0,
            build_seconds: 0.0,
            host: String::new(),
        };
        fs::write(dir.join("provenance.json"), serde_json::to_string(&provenance).unwrap()).unwrap();
        GuestKernel::open(dir).unwrap()
    }

    #[test]
    fn verify_accepts_the_recorded_vmlinux() {
        let t = tempfile::tempdir().unwrap();
        let k = built_kernel(t.path(), b"\x7fELF kernel");
        assert_eq!(verify(&k).unwrap(), Digest::of_bytes(b"\x7fELF kernel"));
    }

    #[test]
    fn verify_names_the_file_and_both_digests_on_a_mismatch() {
        let t = tempfile::tempdir().unwrap();
        let k = built_kernel(t.path(), b"\x7fELF kernel");
        fs::write(&k.vmlinux, b"\x7fELF evil").unwrap();
        let err = verify(&k).unwrap_err().to_string();
        assert!(err.contains(&k.vmlinux.display().to_string()), "{err}");
        assert!(err.contains(&Digest::of_bytes(b"\x7fELF kernel").hex()), "{err}");
        assert!(err.contains(&Digest::of_bytes(b"\x7fELF evil").hex()), "{err}");
    }

    #[test]
    fn project_fragments_require_what_libkrun_and_cni_need() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../kernel");
        let reqs: Vec<Requirement> = fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "config"))
            .flat_map(|e| frag(&fs::read_to_string(e.path()).unwrap()).requirements())
            .collect();
        for opt in [
            "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES",
            "CONFIG_PVH",
            "CONFIG_9P_FS",
            "CONFIG_VIRTIO_FS",
            "CONFIG_BRIDGE_NETFILTER",
            "CONFIG_NFT_MASQ",
            "CONFIG_SECURITY_LANDLOCK",
            "CONFIG_VIRTIO_BLK",
            "CONFIG_EXT4_FS",
            "CONFIG_EXT4_FS_POSIX_ACL",
            "CONFIG_EXT4_FS_SECURITY",
            "CONFIG_OVERLAY_FS",
        ] {
            assert!(reqs.contains(&Requirement::Enabled(opt.into())), "{opt} missing");
        }
        assert!(reqs.contains(&Requirement::Disabled("CONFIG_JUMP_LABEL".into())));
    }

    fn project_kernel_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../kernel")
    }

    /// The fragments a kernel of `arch` takes, by the same rule the build uses.
    fn fragments_for(arch: Arch) -> Vec<(String, Vec<Requirement>)> {
        let mut v: Vec<(String, Vec<Requirement>)> = fs::read_dir(project_kernel_dir())
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".config") && KernelRole::Guest.takes(n) && arch_takes(arch, n))
            .map(|n| {
                let text = fs::read_to_string(project_kernel_dir().join(&n)).unwrap();
                (n, frag(&text).requirements())
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    #[test]
    fn source_json_is_the_one_record_of_the_source_package() {
        let src = KernelSource::read(&project_kernel_dir()).unwrap();
        assert_eq!(src.package, "linux-source-6.1");
        assert!(src.tarball.to_string_lossy().ends_with(".tar.xz"), "{src:?}");
        assert!(src.install.contains(&src.package), "{src:?}");
        assert_eq!(src.install_for(Arch::host()), src.install);
        let foreign = Arch::ALL.into_iter().find(|a| *a != Arch::host()).unwrap();
        assert!(src.install_for(foreign).ends_with(&format!(" gcc-{}-linux-gnu", foreign.name())));
    }

    #[test]
    fn a_malformed_source_json_names_the_file_and_its_fields() {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join(SOURCE_FILE), r#"{"package": "linux-source-6.1"}"#).unwrap();
        let err = KernelSource::read(t.path()).unwrap_err().to_string();
        assert!(err.contains("source.json") && err.contains("tarball"), "{err}");
    }

    #[test]
    fn the_common_fragments_hold_nothing_x86_only_and_each_arch_gets_its_own() {
        const X86_ONLY: &[&str] =
            &["CONFIG_PVH", "CONFIG_KVM_GUEST", "CONFIG_HYPERVISOR_GUEST", "CONFIG_SERIAL_8250", "CONFIG_EARLY_PRINTK"];
        let x86 = fragments_for(Arch::X86_64);
        let arm = fragments_for(Arch::Aarch64);
        let names = |v: &[(String, Vec<Requirement>)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        assert!(
            names(&x86).contains(&"arch-x86_64.config".into()) && !names(&x86).contains(&"arch-aarch64.config".into())
        );
        assert!(
            names(&arm).contains(&"arch-aarch64.config".into()) && !names(&arm).contains(&"arch-x86_64.config".into())
        );
        for (name, reqs) in arm.iter().filter(|(n, _)| !n.starts_with("arch-")) {
            for opt in X86_ONLY {
                assert!(!reqs.contains(&Requirement::Enabled(opt.to_string())), "{name} enables x86-only {opt}");
            }
        }
        let all = |v: &[(String, Vec<Requirement>)]| v.iter().flat_map(|(_, r)| r.clone()).collect::<Vec<_>>();
        assert!(all(&x86).contains(&Requirement::Enabled("CONFIG_PVH".into())));
        for opt in ["CONFIG_SERIAL_AMBA_PL011_CONSOLE", "CONFIG_VIRTIO_MMIO", "CONFIG_9P_FS"] {
            assert!(all(&arm).contains(&Requirement::Enabled(opt.into())), "arm64 kernel lacks {opt}");
        }
    }

    #[test]
    fn the_nested_host_is_x86_64_only() {
        let err = KernelSpec::from_project(&project_kernel_dir(), KernelRole::NestedHost, Arch::Aarch64).unwrap_err();
        assert!(err.to_string().contains("only for x86_64"), "{err}");
    }
}
