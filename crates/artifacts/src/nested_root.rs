//! The nested host's root directory (L1): a [`debian`](crate::debian) root of minbase plus passt
//! and e2fsprogs, with the guest's own init (`openshell-init`) as PID 1, so L1 runs the command in
//! `exec.json` from its share and writes the exit code back exactly as a guest does. It does not
//! hold the guest artifacts, `openshell-vmm` or the test binary: those are shared into L1 when it
//! boots.

use crate::debian::{self, DebianRecipe};
use crate::rootfs::GuestFile;

pub const STORE_KIND: &str = "nested-root";
pub use crate::debian::INSTALL_HINT;

/// Debian's suite: the host's (bookworm), so `openshell-vmm` and the test binary built on the host
/// find the same glibc in L1.
pub const SUITE: &str = "bookworm";
/// On top of minbase (which brings libc6 and libgcc-s1, all `openshell-vmm` links): passt, which
/// carries L2's network inside L1, and e2fsprogs, whose mke2fs makes the data disks (and the disk
/// trials' root images) of `--root disk` boots where the VMM runs. Nothing else: the trials bring
/// their own clients.
pub const PACKAGES: &[&str] = &["passt", "e2fsprogs"];
/// A `kvm` group, as Debian's udev package adds it (minbase has no udev): the VMM inside L1 starts
/// as `nobody` (minbase has it) with `/dev/kvm`'s group, which L1's init gives the device
/// (`openshell_vm::nested`).
const KVM_GROUP_HOOK: &str = "--customize-hook=chroot \"$1\" groupadd --system kvm";
/// A Debian minbase tree with passt is ~530 MiB in the store here.
const BAKE_BYTES: u64 = 640 << 20;

/// The project's nested root with `init` (`openshell-init` built static for the guest, on its
/// guest path) as PID 1.
pub fn recipe(init: GuestFile) -> DebianRecipe {
    DebianRecipe {
        kind: STORE_KIND,
        bake_hint: "run `cargo xtask nested-host`",
        suite: SUITE.into(),
        sources: debian::sources(SUITE),
        packages: PACKAGES.iter().map(|s| s.to_string()).collect(),
        options: vec![KVM_GROUP_HOOK.into()],
        links: vec![],
        files: vec![],
        programs: vec![init],
        bytes: BAKE_BYTES,
    }
}
