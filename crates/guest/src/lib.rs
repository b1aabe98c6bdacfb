//! What the host and the guest agree on: the exec request the host places in the instance share,
//! and where the guest reports the command's exit status. Shared so neither side guesses.

use serde::{Deserialize, Serialize};

#[cfg(target_os = "linux")]
pub mod ifconfig;
pub mod netconf;

/// Mount point of the per-instance share inside the guest (tag [`SHARE_TAG`]).
pub const SHARE_MOUNT: &str = "/run/openshell";
/// The virtio-9p / virtio-fs tag of the per-instance share.
pub const SHARE_TAG: &str = "openshell";
/// The exec request, relative to the share.
pub const EXEC_FILE: &str = "exec.json";
/// The exit status the guest writes back, relative to the share.
pub const EXIT_CODE_FILE: &str = "exit-code";
/// The host asks the guest to stop by creating this file in the share: init then stops the
/// workload (SIGTERM, SIGKILL after its grace) and reports its real exit status. A signal to the
/// VMM would end the guest without letting it say how its workload ended.
pub const STOP_REQUEST_FILE: &str = "stop-request";
/// The guest capability checker inside the rootfs (`openshell-guest-check`).
pub const GUEST_CHECK_BIN: &str = "/usr/bin/openshell-guest-check";
/// Where the guest checker writes its matrix as JSON, relative to the share.
pub const GUEST_CHECK_FILE: &str = "guest-check.json";
/// Kernel command-line key telling init how the share is transported (`9p` or `virtiofs`).
pub const SHARE_TRANSPORT_PARAM: &str = "openshell.share";

/// The command the guest's init runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub workdir: Option<String>,
}
