//! Named gateway instances on top of the VM runtime (`openshell-vm`): an instance's directory,
//! metadata, lock and PKI ([`state`]), what a gateway VM is ([`preset`]), when a VM's workload is ready ([`ready`]), the built-in profiles a VM is
//! booted from ([`profile`]), the supervisor that boots it and watches its
//! children ([`supervise`]), stale-state recovery, readiness and status, the verification matrix
//! of a running instance ([`verify`]), and the host check with the preflight every boot passes
//! ([`check`]; here rather than in the runtime because its rows name the instance that holds a
//! port and it reports through `openshell-matrix`), plus the guest checker's host side
//! ([`guest_check`]).
//!
//! A plain library: no printing, no `process::exit`. Progress goes to `tracing`.

pub mod check;
pub mod guest_check;
pub mod preset;
pub mod profile;
pub mod ready;
pub mod state;
pub mod status;
pub mod supervise;
pub mod verify;
