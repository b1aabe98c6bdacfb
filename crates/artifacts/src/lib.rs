//! Guest artifacts the VM boots: the kernel (`kernel`) and the root directory (`rootfs`), the
//! network helper gvproxy fetched from Debian (`gvproxy`, for Linux hosts without one), Debian roots
//! baked from the archive (`debian`), among them the nested host's (`nested_root`, L1 of a nested
//! boot; its kernel is a [`kernel::KernelRole`]), and root disks (`disk`).
//!
//! Both are content-addressed: a build is keyed by the sha256 of its inputs, lives in its own
//! directory under the [`Store`], and is published by an atomic rename, so a directory that exists
//! is complete and a re-run with unchanged inputs returns at once. This crate builds and verifies
//! artifacts; it does not boot them (that is `openshell-vm`) and prints nothing (callers get
//! progress through callbacks and `tracing`).

pub mod arch;
mod command;
pub mod debian;
pub mod digest;
pub mod disk;
pub mod gvproxy;
pub mod kernel;
pub mod nested_root;
pub mod rootfs;
pub mod store;

pub use arch::Arch;
pub use digest::{sha256_file, Digest, DigestBuilder};
pub use store::Store;
