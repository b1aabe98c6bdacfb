//! The guest's CPU architecture: the one value that decides how its kernel is built (`make ARCH=`,
//! cross compiler, boot image), which busybox and Rust target its root holds, and (in
//! `openshell-vm`) which QEMU machine boots it. Every arch-dependent name is a method here, so a
//! new architecture is one match arm per fact, not a search through the builders.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    #[default]
    X86_64,
    Aarch64,
}

impl Arch {
    pub const ALL: [Arch; 2] = [Arch::X86_64, Arch::Aarch64];

    /// The architecture this program runs on (what a guest is unless asked otherwise).
    pub fn host() -> Arch {
        if cfg!(target_arch = "aarch64") {
            Arch::Aarch64
        } else {
            Arch::X86_64
        }
    }

    /// The name Rust and GNU triples use: `x86_64`, `aarch64`.
    pub fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }

    /// The kernel's `ARCH=`.
    pub fn kernel_arch(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86",
            Arch::Aarch64 => "arm64",
        }
    }

    /// Debian's architecture name (multiarch packages, `dpkg --add-architecture`).
    pub fn debian(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Aarch64 => "arm64",
        }
    }

    /// The GNU toolchain prefix Debian's cross compilers use (`gcc-aarch64-linux-gnu`).
    pub fn gnu_prefix(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64-linux-gnu-",
            Arch::Aarch64 => "aarch64-linux-gnu-",
        }
    }

    /// `CROSS_COMPILE=` for the kernel build: none when building for the host.
    pub fn cross_compile(self) -> Option<&'static str> {
        (self != Arch::host()).then(|| self.gnu_prefix())
    }

    /// The Rust target the guest programs are built for (static, glibc's crt-static).
    pub fn rust_target(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64-unknown-linux-gnu",
            Arch::Aarch64 => "aarch64-unknown-linux-gnu",
        }
    }

    /// The kernel's boot image: the make target and where the build leaves it. x86_64 boots the ELF
    /// `vmlinux` (PVH entry, what QEMU microvm and libkrun load); arm64 the flat `Image` (what
    /// `qemu-system-aarch64 -M virt -kernel` and libkrun on aarch64 load).
    pub fn kernel_image(self) -> KernelImage {
        match self {
            Arch::X86_64 => KernelImage { make_target: "vmlinux", built_at: "vmlinux", file_name: "vmlinux" },
            Arch::Aarch64 => {
                KernelImage { make_target: "Image", built_at: "arch/arm64/boot/Image", file_name: "Image" }
            }
        }
    }
}

/// See [`Arch::kernel_image`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelImage {
    pub make_target: &'static str,
    /// Relative to the kernel source tree.
    pub built_at: &'static str,
    /// Its name in the kernel's store directory.
    pub file_name: &'static str,
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Arch {
    type Err = String;
    fn from_str(s: &str) -> Result<Arch, String> {
        match s {
            "x86_64" | "amd64" => Ok(Arch::X86_64),
            "aarch64" | "arm64" => Ok(Arch::Aarch64),
            _ => Err(format!("unknown architecture {s:?}: expected x86_64 or aarch64")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_debian_aliases_parse() {
        for a in Arch::ALL {
            assert_eq!(a.name().parse::<Arch>().unwrap(), a);
            assert_eq!(a.debian().parse::<Arch>().unwrap(), a);
        }
        assert!("riscv64".parse::<Arch>().unwrap_err().contains("x86_64 or aarch64"));
    }

    #[test]
    fn only_a_foreign_arch_is_cross_compiled() {
        assert_eq!(Arch::host().cross_compile(), None);
        let foreign = Arch::ALL.into_iter().find(|a| *a != Arch::host()).unwrap();
        assert_eq!(foreign.cross_compile(), Some(foreign.gnu_prefix()));
    }
}
