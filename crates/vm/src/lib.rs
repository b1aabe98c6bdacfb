//! The VM runtime: what a VM is ([`VmConfig`] and its presets), which VMM runs it ([`Backend`],
//! chosen from the host's capabilities), and a running VM as a value ([`RunningVm`]) that streams
//! its console, forwards signals, returns the guest command's exit code and, when dropped, stops
//! the VMM so that nothing outlives it.
//!
//! A plain library: no printing, no `process::exit`. Progress goes to `tracing`.

pub mod backend;
pub mod child;
pub mod config;
pub mod console;
pub mod error;
pub mod host;
pub mod kernel_image;
pub mod launch;
pub mod nested;
pub mod net;
pub mod plan;
pub mod procfs;
pub mod sandbox;
pub mod timeline;

pub use backend::Backend;
pub use config::{DirShare, Overrides, Root, VmConfig, VmmChoice, DATA_DISK_FILE};
pub use error::VmError;
pub use host::HostFacts;
pub use launch::{launch, Child, Ended, HostStop, RunningVm, Stopped, VmExit, LEDGER_ENV};
pub use net::{Net, PortMap};
pub use plan::{plan, plan_for, KrunPlace, Need, Plan, Planned};
