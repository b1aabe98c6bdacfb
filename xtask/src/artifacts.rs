//! Building what a VM needs, shared by the subcommands: the kernel, the guest programs, the rootfs.

use std::path::PathBuf;

use anyhow::Context;
use openshell_artifacts::debian::{self, DebianRecipe};
use openshell_artifacts::kernel::{self, GuestKernel, KernelRole, KernelSpec};
use openshell_artifacts::nested_root;
use openshell_artifacts::rootfs::{self, GuestFile, RootfsBundle, RootfsInputs};
use openshell_artifacts::{Arch, Store};
use openshell_instance::profile::{Profile, ProfileRoot};
use xshell::{cmd, Shell};

use crate::{builds, deps, progress};

/// Guest programs: (cargo package, binary name, path inside the guest).
const GUEST_PROGRAMS: &[(&str, &str, &str)] = &[
    ("openshell-guest", "openshell-init", openshell_guest::INIT_BIN),
    ("openshell-gateway", "openshell-gateway", openshell_guest::GATEWAY_BIN),
    ("openshell-guest-check", "openshell-guest-check", openshell_guest::GUEST_CHECK_BIN),
];

/// The guest programs a root of `arch` carries. A foreign arch's root serves `--exec` only: its
/// init, cross-built; the gateway and the capability checker come for the host's arch (a cross
/// build of the gateway's TLS stack would add minutes to every CI run for no trial that needs it).
fn guest_programs(arch: Arch) -> impl Iterator<Item = &'static (&'static str, &'static str, &'static str)> {
    GUEST_PROGRAMS.iter().filter(move |(_, bin, _)| arch == Arch::host() || *bin == "openshell-init")
}

/// The Rust std for `arch`'s target, added through rustup when missing (the cross linker is a host
/// package: `deps::cross`).
fn ensure_rust_target(sh: &Shell, arch: Arch) -> anyhow::Result<()> {
    let target = arch.rust_target();
    let installed = cmd!(sh, "rustup target list --installed").quiet().read().unwrap_or_default();
    if installed.lines().any(|l| l.trim() == target) {
        return Ok(());
    }
    eprintln!("adding the Rust target {target} (rustup)");
    cmd!(sh, "rustup target add {target}")
        .run()
        .with_context(|| format!("the Rust std for {target} is missing; install it with: rustup target add {target}"))
}

/// Removes from this process's environment what Cargo sets for the crate it runs or tests:
/// `cargo xtask` runs xtask with xtask's `CARGO_MANIFEST_DIR` and `CARGO_PKG_*`, nextest runs a VM
/// suite (which runs xtask) with openshell-instance's, and a shell has none. They describe that crate,
/// not what xtask builds, yet a build script that reads one is rerun, and everything above it
/// rebuilt, whenever its value differs from the last build's: ring's reads `CARGO_MANIFEST_DIR`
/// and `CARGO_PKG_*`, so each change of caller rebuilt the guest programs (and the host's ring)
/// from scratch. Called once, first thing in `main`, before any thread or child exists.
pub fn scrub_crate_env() {
    const SET_FOR_CRATES: &[&str] = &[
        "CARGO_CRATE_NAME",
        "CARGO_BIN_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "CARGO_RUSTC_CURRENT_DIR",
        "OUT_DIR",
    ];
    let prefixes = ["CARGO_MANIFEST_", "CARGO_PKG_", "CARGO_BIN_EXE_"];
    for (key, _) in std::env::vars_os() {
        let Some(k) = key.to_str() else { continue };
        if SET_FOR_CRATES.contains(&k) || prefixes.iter().any(|p| k.starts_with(p)) {
            std::env::remove_var(k);
        }
    }
}

pub fn kernel_spec(role: KernelRole, arch: Arch) -> anyhow::Result<KernelSpec> {
    Ok(KernelSpec::from_project(&crate::project_root().join("kernel"), role, arch)?)
}

/// Every host package group booting a guest of `arch` with `choice` and `net` needs: the kernel's
/// and the rootfs' build tools (cross tools for a foreign arch), passt when it networks through
/// passt, QEMU unless libkrun runs on hardware KVM. `vm run` installs them all in one round before
/// it builds anything.
fn boot_packages(plan: &openshell_vm::Plan, arch: Arch) -> Vec<&'static [(&'static str, &'static str)]> {
    use openshell_vm::plan::Need;
    let mut groups = vec![deps::KERNEL, deps::ROOTFS, deps::cross(arch)];
    for &need in &plan.needs {
        match need {
            Need::Qemu => groups.push(deps::qemu(arch)),
            Need::Passt => groups.push(deps::PASST),
            // Fetched from Debian's archive when missing, not installed; the VMM is built.
            Need::Gvproxy | Need::VmmBinary => {}
        }
    }
    groups
}

/// The `role` kernel of `arch` for the current fragments, built (minutes, with progress) if the
/// store lacks it.
pub fn ensure_kernel(sh: &Shell, store: &Store, role: KernelRole, arch: Arch) -> anyhow::Result<GuestKernel> {
    if builds::never() {
        return pinned_kernel(store, role, arch);
    }
    deps::ensure(sh, &[deps::KERNEL, deps::cross(arch)])?;
    let spec = kernel_spec(role, arch)?;
    if let Ok(k) = kernel::locate(store, &spec) {
        return Ok(k);
    }
    let mut progress = progress::BuildLines::new(
        format!("building the {role} kernel for {arch} (about 5-10 min on 2 cores)"),
        format!("{role} {arch} kernel build"),
        200,
    );
    let built = kernel::build(store, &spec, &mut |line| progress.line(line));
    progress.finish();
    built.context("kernel build failed")
}

/// The kernel `OPENSHELL_KERNEL_KEY` pins (see [`builds`]): the host arch's guest kernel only.
fn pinned_kernel(store: &Store, role: KernelRole, arch: Arch) -> anyhow::Result<GuestKernel> {
    anyhow::ensure!(
        role == KernelRole::Guest && arch == Arch::host(),
        "{}=never pins the {} guest kernel only; the {role} kernel for {arch} would be built",
        builds::ENV,
        Arch::host()
    );
    let k = GuestKernel::open(&builds::pinned(store, kernel::STORE_KIND)?)?;
    anyhow::ensure!(
        k.provenance.arch == arch,
        "the pinned kernel {} is built for {}, not {arch}",
        k.dir.display(),
        k.provenance.arch
    );
    Ok(k)
}

/// The rootfs `OPENSHELL_ROOTFS_KEY` pins (see [`builds`]): the host arch's only.
fn pinned_rootfs(store: &Store, arch: Arch) -> anyhow::Result<RootfsBundle> {
    anyhow::ensure!(
        arch == Arch::host(),
        "{}=never pins the {} rootfs only; the rootfs for {arch} would be baked",
        builds::ENV,
        Arch::host()
    );
    Ok(RootfsBundle::open(&builds::pinned(store, rootfs::STORE_KIND)?)?)
}

/// Builds the guest programs statically for a guest of `arch`, in their own target dir so the host
/// build's flags and artifacts are left alone.
pub fn build_guest_programs(sh: &Shell, arch: Arch) -> anyhow::Result<Vec<GuestFile>> {
    let target_dir = crate::project_root().join("target/guest");
    let target = arch.rust_target();
    let mut sel: Vec<String> = Vec::new();
    for (pkg, bin, _) in guest_programs(arch) {
        sel.extend(["-p".to_owned(), pkg.to_string(), "--bin".to_owned(), bin.to_string()]);
    }
    let mut env = vec![("RUSTFLAGS".to_owned(), "-C target-feature=+crt-static".to_owned())];
    if let Some(prefix) = arch.cross_compile() {
        // Per target and only for this build, never a global cargo config: the host build and the
        // host-arch guest build keep their own linker (and with it their cache).
        env.push((format!("CARGO_TARGET_{}_LINKER", target.to_uppercase().replace('-', "_")), format!("{prefix}gcc")));
    }
    let files = guest_program_files(arch);
    let outputs: Vec<PathBuf> = files.iter().map(|f| f.source.clone()).collect();
    let stamp = target_dir.join(target).join("inputs.sha256");
    let inputs = |outputs: &[PathBuf]| {
        build_inputs(&[&env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(), &sel], outputs)
    };
    if inputs(&outputs).ok().is_some_and(|key| std::fs::read_to_string(&stamp).is_ok_and(|s| s == key)) {
        return Ok(files);
    }
    if arch.cross_compile().is_some() {
        // Only when cargo has work to do: rustup's listing costs more than the stamp saves.
        ensure_rust_target(sh, arch)?;
    }
    let args = &sel;
    let mut build =
        cmd!(sh, "cargo build --quiet --release --target {target} --target-dir {target_dir} {args...}").quiet();
    for (k, v) in &env {
        build = build.env(k, v);
    }
    build.run().with_context(|| format!("building the guest programs for {target} failed"))?;
    if let Ok(key) = inputs(&outputs) {
        // Best effort: without the stamp the next run asks cargo again, which is only slower.
        let _ = std::fs::write(&stamp, key);
    }
    Ok(files)
}

/// A digest of what a cargo build of the guest programs reads: the flags, the workspace's
/// manifests, lock file, toolchain pin and cargo config, every file under `crates/` (path, size, mtime) and the
/// binaries it produced. Equal to the one stamped after the last build, cargo has nothing to do,
/// and asking it anyway costs 0.2-0.4 s of every `vm run` (its fingerprint walk over ~300 crates).
/// Errs when a file cannot be read (a binary not built yet), which means: build.
fn build_inputs(args: &[&[String]], outputs: &[PathBuf]) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::MetadataExt;
    fn walk(dir: &std::path::Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                if entry.file_name() != "target" {
                    walk(&path, out)?;
                }
            } else {
                out.push(path);
            }
        }
        Ok(())
    }
    let root = crate::project_root();
    let mut files: Vec<PathBuf> = ["Cargo.lock", "Cargo.toml", "rust-toolchain.toml", ".cargo/config.toml"]
        .iter()
        .map(|f| root.join(f))
        .collect();
    walk(&root.join("crates"), &mut files)?;
    files.sort();
    files.extend(outputs.iter().cloned());
    let mut h = Sha256::new();
    for arg in args.iter().flat_map(|a| a.iter()) {
        h.update(arg.as_bytes());
        h.update([0]);
    }
    for f in &files {
        let m = std::fs::metadata(f)?;
        h.update(f.as_os_str().as_encoded_bytes());
        h.update(m.len().to_le_bytes());
        h.update(m.mtime().to_le_bytes());
        h.update(m.mtime_nsec().to_le_bytes());
    }
    Ok(hex::encode(h.finalize()))
}

/// Where the guest programs of `arch` are once built (whether or not they are yet).
fn guest_program_files(arch: Arch) -> Vec<GuestFile> {
    let release = crate::project_root().join("target/guest").join(arch.rust_target()).join("release");
    guest_programs(arch)
        .map(|(_, bin, dest)| GuestFile { source: release.join(bin), dest: dest.to_string(), mode: 0o755 })
        .collect()
}

/// busybox-static for a guest of `arch`: the host's `/bin/busybox` for the host's arch; for a
/// foreign arch, Debian's `busybox-static:<arch>` unpacked under `target/guest/` (installing it
/// would replace the host's own busybox: the package is not co-installable). Returns (the binary
/// for the guest, a busybox of the same version that runs here to list the applets).
fn busybox_for(sh: &Shell, arch: Arch) -> anyhow::Result<(PathBuf, PathBuf)> {
    let host = PathBuf::from(rootfs::BUSYBOX);
    if arch == Arch::host() {
        return Ok((host.clone(), host));
    }
    let deb_arch = arch.debian();
    let dir = crate::project_root().join("target/guest").join(format!("busybox-{deb_arch}"));
    let binary = dir.join("bin/busybox");
    let format = "-f=${Version}";
    let host_version = cmd!(sh, "dpkg-query -W {format} busybox-static").quiet().read().unwrap_or_default();
    let unpacked_version = std::fs::read_to_string(dir.join("version")).unwrap_or_default();
    if binary.is_file() && unpacked_version == host_version {
        return Ok((binary, host));
    }
    let foreign = cmd!(sh, "dpkg --print-foreign-architectures").quiet().read().unwrap_or_default();
    if !foreign.lines().any(|a| a.trim() == deb_arch) {
        if !nix::unistd::geteuid().is_root() {
            anyhow::bail!(
                "Debian's {deb_arch} packages are not enabled; enable them with: sudo dpkg --add-architecture {deb_arch} && sudo apt-get update"
            );
        }
        eprintln!("enabling Debian's {deb_arch} packages (dpkg --add-architecture {deb_arch})");
        cmd!(sh, "dpkg --add-architecture {deb_arch}").run()?;
        cmd!(sh, "apt-get update -qq").run().context("apt-get update failed")?;
    }
    // The same version as the host's busybox, so the host's applet list is this one's.
    let pkg = format!("busybox-static:{deb_arch}={host_version}");
    let download = tempfile::tempdir()?;
    {
        let _in_download = sh.push_dir(download.path());
        cmd!(sh, "apt-get download -qq {pkg}").run().with_context(|| {
            format!(
                "`apt-get download {pkg}` failed: the {deb_arch} busybox must be the host's version ({host_version})"
            )
        })?;
    }
    let deb = std::fs::read_dir(download.path())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download left no .deb")?;
    let _ = std::fs::remove_dir_all(&dir);
    cmd!(sh, "dpkg-deb -x {deb} {dir}").run()?;
    std::fs::write(dir.join("version"), &host_version)?;
    Ok((binary, host))
}

/// gvproxy from Debian's archive in the store (`openshell_artifacts::gvproxy`), fetched (a few
/// seconds, about 4 MB) if the store has none for this host's arch; returns the binary.
pub fn ensure_gvproxy(store: &Store) -> anyhow::Result<PathBuf> {
    use openshell_artifacts::gvproxy;
    if let Some(g) = gvproxy::locate(store, Arch::host()) {
        return Ok(g.binary);
    }
    if builds::never() {
        return Err(builds::refused("gvproxy"));
    }
    let mut progress = progress::BuildLines::new(
        format!("fetching gvproxy from Debian {} (apt-get download, about 4 MB)", gvproxy::SUITE),
        "gvproxy fetch",
        10,
    );
    let fetched = gvproxy::fetch(store, Arch::host(), &mut |line| progress.line(line));
    progress.finish();
    let g = fetched.context("fetching gvproxy failed")?;
    eprintln!(
        "gvproxy {} ({} {}, .deb sha256 {}) at {}",
        g.provenance.version,
        g.provenance.package,
        g.provenance.arch,
        g.provenance.deb_sha256,
        g.binary.display()
    );
    Ok(g.binary)
}

/// The kernel `vm run` would boot, without building or installing anything: its `vmlinux`, or
/// what was looked for.
pub fn locate_kernel(store: &Store) -> Result<PathBuf, String> {
    if builds::never() {
        return pinned_kernel(store, KernelRole::Guest, Arch::host()).map(|k| k.vmlinux).map_err(|e| format!("{e:#}"));
    }
    let spec = kernel_spec(KernelRole::Guest, Arch::host())
        .map_err(|e| format!("cannot tell which kernel the current fragments need: {e:#}"))?;
    match kernel::locate(store, &spec) {
        Ok(k) => Ok(k.vmlinux),
        Err(_) => Err(format!(
            "no kernel built for the current fragments and {} (would be {})",
            spec.source_version,
            store.path(kernel::STORE_KIND, &spec.key()).display()
        )),
    }
}

/// The rootfs `vm run` would boot, without building: keyed by the guest programs as they are
/// now in `target/guest` (a `vm run` after a source change rebuilds them and bakes anew).
pub fn locate_rootfs(store: &Store) -> Result<PathBuf, String> {
    if builds::never() {
        return pinned_rootfs(store, Arch::host()).map(|r| r.dir).map_err(|e| format!("{e:#}"));
    }
    let inputs = RootfsInputs {
        busybox: PathBuf::from(rootfs::BUSYBOX),
        applet_lister: PathBuf::from(rootfs::BUSYBOX),
        overlay: crate::project_root().join("rootfs"),
        programs: guest_program_files(Arch::host()),
    };
    if !inputs.busybox.is_file() {
        return Err(format!("{} is missing ({})", rootfs::BUSYBOX, rootfs::INSTALL_HINT));
    }
    if let Some(p) = inputs.programs.iter().find(|p| !p.source.is_file()) {
        return Err(format!("the guest programs are not built yet ({} missing)", p.source.display()));
    }
    let key = inputs.key().map_err(|e| e.to_string())?;
    store.get(rootfs::STORE_KIND, &key).ok_or_else(|| {
        format!(
            "no rootfs baked for the guest programs now in target/guest (would be {})",
            store.path(rootfs::STORE_KIND, &key).display()
        )
    })
}

pub fn rootfs_inputs(sh: &Shell, arch: Arch) -> anyhow::Result<RootfsInputs> {
    deps::ensure(sh, &[deps::ROOTFS, deps::cross(arch)])?;
    let (busybox, applet_lister) = busybox_for(sh, arch)?;
    Ok(RootfsInputs {
        busybox,
        applet_lister,
        overlay: crate::project_root().join("rootfs"),
        programs: build_guest_programs(sh, arch)?,
    })
}

/// The rootfs baked for the current inputs (the guest programs built first), never baking it.
pub fn baked_rootfs(sh: &Shell, store: &Store, arch: Arch) -> anyhow::Result<RootfsBundle> {
    if builds::never() {
        return pinned_rootfs(store, arch);
    }
    Ok(rootfs::locate(store, &rootfs_inputs(sh, arch)?)?)
}

pub fn ensure_rootfs(sh: &Shell, store: &Store, arch: Arch) -> anyhow::Result<RootfsBundle> {
    if builds::never() {
        return pinned_rootfs(store, arch);
    }
    let inputs = rootfs_inputs(sh, arch)?;
    rootfs::bake(store, &inputs).context("rootfs bake failed")
}

/// The root of `profile` for `arch`: the busybox rootfs, or the profile's Debian root (the guest
/// programs on their paths) baked from the archive. With `bake` false nothing is baked, only found.
pub fn profile_root(
    sh: &Shell,
    store: &Store,
    profile: &Profile,
    arch: Arch,
    bake: bool,
) -> anyhow::Result<RootfsBundle> {
    let ProfileRoot::Debian { suite, packages } = profile.root else {
        return if bake { ensure_rootfs(sh, store, arch) } else { baked_rootfs(sh, store, arch) };
    };
    anyhow::ensure!(
        arch == Arch::host(),
        "the {profile} profile's root is made for the host's arch ({}) only; a foreign guest boots the gateway profile",
        Arch::host()
    );
    let what = format!("the {profile} profile's root ({suite} minbase + {})", packages.join(", "));
    if builds::never() {
        return Err(builds::refused(&what));
    }
    deps::ensure(sh, &[deps::MMDEBSTRAP])?;
    let recipe = profile.debian_recipe(build_guest_programs(sh, arch)?).expect("a Debian profile has a recipe");
    if !bake {
        return Ok(debian::locate(store, &recipe)?);
    }
    ensure_debian_root(store, &recipe, &what)
}

/// The root image of `rootfs` (`--root disk`): built into the store unless it is there, and
/// verified against its record either way (a tampered image is refused before any VMM starts).
pub fn ensure_root_disk(sh: &Shell, store: &Store, rootfs: &RootfsBundle) -> anyhow::Result<std::path::PathBuf> {
    use openshell_artifacts::disk;
    deps::ensure(sh, &[deps::E2FSPROGS])?;
    let spec = disk::RootDiskSpec::for_bundle(rootfs).context("sizing the root disk")?;
    let image = match disk::locate(store, &spec) {
        Some(found) => found,
        None if builds::never() => return Err(builds::refused("the root disk image of this rootfs")),
        None => {
            // The image is keyed by the tree's recorded digest: a tree changed since it was baked
            // would be sealed into an image under a digest it no longer has.
            openshell_artifacts::rootfs::verify(rootfs).with_context(|| {
                format!(
                    "refusing to bake a root disk from {}; run `cargo xtask rootfs` to bake the tree again",
                    rootfs.dir.display()
                )
            })?;
            disk::build(store, &spec).context("root disk build failed")?
        }
    };
    Ok(image.image)
}

/// An OCI image made ready to boot: unpacked and verified in the store, and its root disk.
pub struct ImageRoot {
    pub image: openshell_image::UnpackedImage,
    pub disk: openshell_artifacts::disk::RootDisk,
    /// Whether this call unpacked the image / baked the disk (false: found in the store).
    pub fresh_image: bool,
    pub fresh_disk: bool,
}

/// The root disk of the OCI image `image` (`rootfs --image`, `vm run --image`): the image
/// unpacked (every blob checked against its digest, the host's arch only), then its tree baked
/// with our guest programs beside it under [`openshell_guest::IMAGE_GUEST_DIR`] (init at
/// [`openshell_guest::IMAGE_INIT_BIN`]), through the same builder and store as `--root disk`.
/// The programs are `rootfs`'s own copies: the binaries our own root boots, already built (or
/// pinned, under `OPENSHELL_BUILD=never`), so the two roots never carry different inits.
/// No busybox is added: init needs none unless it runs udhcpc, and `vm run --image` refuses
/// `--dhcp`.
pub fn ensure_image_root(
    sh: &Shell,
    store: &Store,
    rootfs: &RootfsBundle,
    image: &openshell_image::ImageRef,
) -> anyhow::Result<ImageRoot> {
    use openshell_artifacts::disk::{self, DiskAddition, RootDiskSpec};
    deps::ensure(sh, &[deps::E2FSPROGS])?;
    let mut progress = progress::BuildLines::new("image", "image", 1);
    let unpacked = openshell_image::unpack(store, image, &mut |line| progress.line(line));
    progress.finish();
    let unpacked = unpacked.with_context(|| format!("unpacking {image:?}"))?;
    let img = unpacked.image;
    anyhow::ensure!(
        !img.config.rootless,
        "{} was unpacked without root: its owners are the unpacker's and its device nodes are missing, so it \
         cannot be booted; remove it and run again as root",
        img.dir.display()
    );
    let mut additions = Vec::new();
    for (_, _, path) in guest_programs(Arch::host()) {
        let dest = format!("{}{path}", openshell_guest::IMAGE_GUEST_DIR);
        additions.push(DiskAddition::new(&rootfs.dir.join(path.trim_start_matches('/')), &dest, 0o755)?);
    }
    debug_assert!(additions.iter().any(|a| a.dest == openshell_guest::IMAGE_INIT_BIN));
    let spec = RootDiskSpec::for_tree(img.config.manifest_digest.clone(), &img.root(), additions)
        .context("sizing the image's root disk")?;
    let (disk, fresh_disk) = match disk::locate(store, &spec) {
        Some(found) => (found, false),
        None if builds::never() => return Err(builds::refused("the root disk of this image")),
        None => (disk::build(store, &spec).context("image root disk build failed")?, true),
    };
    disk::verify(&disk)?;
    Ok(ImageRoot { image: img, disk, fresh_image: unpacked.fresh, fresh_disk })
}

/// The nested host (L1 of a nested boot): its kernel and its root, built if the store lacks them
/// (the kernel takes minutes; the root about a minute, from Debian's archive).
pub fn ensure_nested_host(sh: &Shell, store: &Store) -> anyhow::Result<(GuestKernel, RootfsBundle)> {
    // QEMU runs L1, mmdebstrap bakes its root.
    deps::ensure(sh, &[deps::QEMU, deps::MMDEBSTRAP])?;
    let kernel = ensure_kernel(sh, store, KernelRole::NestedHost, Arch::X86_64)?;
    let init = build_guest_programs(sh, Arch::X86_64)?
        .into_iter()
        .find(|p| p.dest == openshell_guest::INIT_BIN)
        .expect("openshell-init is a guest program");
    let root =
        ensure_debian_root(store, &nested_root::recipe(init), "the nested root (Debian minbase + passt + e2fsprogs)")?;
    Ok((kernel, root))
}

/// The Debian root of `recipe` (`what` names it in the progress line), baked from the archive
/// unless the store has it: a minute or two. The caller has installed mmdebstrap.
pub fn ensure_debian_root(store: &Store, recipe: &DebianRecipe, what: &str) -> anyhow::Result<RootfsBundle> {
    if let Ok(root) = debian::locate(store, recipe) {
        return Ok(root);
    }
    if builds::never() {
        return Err(builds::refused(what));
    }
    let mut progress =
        progress::BuildLines::new(format!("baking {what} from Debian's archive (a minute or two)"), recipe.kind, 20);
    let baked = debian::bake(store, recipe, &mut |line| progress.line(line));
    progress.finish();
    baked.with_context(|| format!("{} bake failed", recipe.kind))
}

/// The build step of a boot: what the plan for `choice` and `net` says the boot needs, installed
/// (the kernel's and rootfs' tools, QEMU, passt, in the one apt round of [`boot_packages`]),
/// fetched (gvproxy from Debian's archive on Linux, unless `--gvproxy` names one) or built
/// (`openshell-vmm`). Runs before any kernel build, so a missing gvproxy costs no build to find
/// out. Decides nothing itself; the preflight then probes the host as this left it and refuses
/// what is still missing.
pub fn ensure_vmm(
    sh: &Shell,
    choice: openshell_vm::VmmChoice,
    net: openshell_vm::Net,
    gvproxy_flag: Option<&std::path::Path>,
    arch: Arch,
) -> anyhow::Result<()> {
    use openshell_vm::plan::Need;
    let plan = openshell_vm::plan_for(&openshell_vm::HostFacts::probe(), choice, net, arch);
    deps::ensure(sh, &boot_packages(&plan, arch))?;
    if plan.needs(Need::Gvproxy) && gvproxy_flag.is_none() && plan.gvproxy.is_none() {
        if cfg!(target_os = "linux") {
            ensure_gvproxy(&Store::default_location())?;
        } else {
            anyhow::bail!("--net gvproxy: {}", openshell_vm::net::gvproxy_missing(true));
        }
    }
    if plan.needs(Need::VmmBinary) {
        build_vmm(sh)?;
    }
    Ok(())
}

/// Builds `openshell-vmm` where [`openshell_vm::host::vmm_binary`] finds it (beside xtask in
/// `target/debug/`), signed with the hypervisor entitlement on macOS, and returns that path: the
/// one place that builds it.
pub fn build_vmm(sh: &Shell) -> anyhow::Result<PathBuf> {
    if builds::never() {
        return built(openshell_vm::host::vmm_binary(), "openshell-vmm");
    }
    cmd!(sh, "cargo build --quiet -p openshell-krun --bin openshell-vmm")
        .quiet()
        .run()
        .context("building openshell-vmm failed")?;
    let vmm = openshell_vm::host::vmm_binary();
    anyhow::ensure!(vmm.is_file(), "openshell-vmm was built, but {} does not exist", vmm.display());
    // A fresh link carries only the linker's ad hoc signature, without the entitlement.
    #[cfg(target_os = "macos")]
    openshell_krun::codesign::sign(&vmm).map_err(|e| anyhow::anyhow!("{e}; run `cargo xtask codesign`"))?;
    Ok(vmm)
}

/// Builds `openshell-supervisor` (the detached gateway's supervisor) where
/// [`openshell_instance::supervise::supervisor_binary`] finds it, and returns that path.
pub fn build_supervisor(sh: &Shell) -> anyhow::Result<PathBuf> {
    if builds::never() {
        return built(openshell_instance::supervise::supervisor_binary(), "openshell-supervisor");
    }
    cmd!(sh, "cargo build --quiet -p openshell-instance --bin openshell-supervisor")
        .quiet()
        .run()
        .context("building openshell-supervisor failed")?;
    let bin = openshell_instance::supervise::supervisor_binary();
    anyhow::ensure!(bin.is_file(), "openshell-supervisor was built, but {} does not exist", bin.display());
    Ok(bin)
}

/// A program that must already be built, in a run that builds nothing.
fn built(path: PathBuf, what: &str) -> anyhow::Result<PathBuf> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(builds::refused(&format!("{what} ({})", path.display())))
    }
}
