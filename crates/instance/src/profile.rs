//! Profiles: what a gateway VM is, by name, decided in one place. A profile says where the guest's
//! root comes from (the busybox base or a Debian suite plus packages), how the guest gets it by
//! default (a share or a root disk) and how much memory it has; the workload (the gateway), its
//! forwards and its readiness check (mTLS gRPC health) are the gateway preset's, for every
//! profile built in today. Flags of `vm run` override what a profile says.

use std::fmt;

use openshell_artifacts::debian::{self, DebianRecipe};
use openshell_artifacts::rootfs::GuestFile;

/// Where a profile's root tree comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProfileRoot {
    /// busybox-static, the project's `rootfs/` overlay and the guest programs
    /// (`openshell_artifacts::rootfs`).
    Busybox,
    /// Debian's `suite` (minbase) with `packages`, baked by `mmdebstrap`, and the guest programs.
    Debian { suite: &'static str, packages: &'static [&'static str] },
}

/// A built-in profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Profile {
    pub name: &'static str,
    /// One line for `--help` and `rootfs --profile`'s report.
    pub about: &'static str,
    pub root: ProfileRoot,
    /// The guest gets its root as a read-only ext4 disk with a data disk stacked on it, unless
    /// `--root share` says otherwise; else as a share unless `--root disk`.
    pub disk_root: bool,
    /// Guest memory in MiB unless `--mem` says otherwise.
    pub mem_mib: u32,
}

/// The default: the gateway on busybox, shared into the guest. Measured as today's boot.
pub const GATEWAY: Profile = Profile {
    name: "gateway",
    about: "the gateway on a busybox root, shared read-only into the guest (the default)",
    root: ProfileRoot::Busybox,
    disk_root: false,
    mem_mib: crate::preset::GATEWAY_MEM_MIB,
};

/// The gateway on Debian with python3: a real distribution root on an ext4 disk, where what the
/// guest installs or writes is kept on the data disk. The next step's sandboxes run here.
pub const DEBIAN: Profile = Profile {
    name: "debian",
    about: "the gateway on Debian bookworm (minbase + python3) as a root disk with a data disk",
    root: ProfileRoot::Debian { suite: "bookworm", packages: &["python3"] },
    disk_root: true,
    // Debian's userland (python3 among it) touches more than busybox's; still a small guest.
    mem_mib: 512,
};

pub const PROFILES: &[Profile] = &[GATEWAY, DEBIAN];

/// The store kind of a profile's Debian root.
const DEBIAN_STORE_KIND: &str = "debian-root";
/// A minbase tree with python3 is ~250 MiB here; room for more.
const DEBIAN_BAKE_BYTES: u64 = 768 << 20;

impl Profile {
    /// The built-in profile called `name`, or an error that lists them.
    pub fn named(name: &str) -> Result<Profile, String> {
        PROFILES.iter().find(|p| p.name == name).copied().ok_or_else(|| {
            let names: Vec<&str> = PROFILES.iter().map(|p| p.name).collect();
            format!("no profile {name:?}; the profiles are: {}", names.join(", "))
        })
    }

    /// The Debian recipe of this profile's root with `programs` (the guest programs on their
    /// paths), or `None` for the busybox root.
    pub fn debian_recipe(&self, programs: Vec<GuestFile>) -> Option<DebianRecipe> {
        let ProfileRoot::Debian { suite, packages } = self.root else { return None };
        Some(DebianRecipe {
            kind: DEBIAN_STORE_KIND,
            bake_hint: "run `cargo xtask rootfs --profile debian`",
            suite: suite.into(),
            sources: debian::sources(suite),
            packages: packages.iter().map(|s| s.to_string()).collect(),
            options: vec![],
            links: vec![],
            files: vec![],
            programs,
            bytes: DEBIAN_BAKE_BYTES,
        })
    }
}

impl std::str::FromStr for Profile {
    type Err = String;
    fn from_str(s: &str) -> Result<Profile, String> {
        Profile::named(s)
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_found() {
        for p in PROFILES {
            assert_eq!(PROFILES.iter().filter(|q| q.name == p.name).count(), 1, "{}", p.name);
            assert_eq!(Profile::named(p.name).unwrap(), *p);
        }
        let err = Profile::named("ubuntu").unwrap_err();
        assert!(err.contains("\"ubuntu\"") && err.contains("gateway, debian"), "{err}");
    }

    #[test]
    fn only_a_debian_root_has_a_recipe() {
        assert!(GATEWAY.debian_recipe(vec![]).is_none());
        let r = DEBIAN.debian_recipe(vec![]).unwrap();
        assert_eq!((r.suite.as_str(), r.packages.as_slice()), ("bookworm", ["python3".to_owned()].as_slice()));
        assert!(r.sources.iter().all(|s| s.contains("bookworm")));
    }
}
