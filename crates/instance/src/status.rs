//! What `vm status` and `vm stop` do with an instance. Status only reads: the lock, the metadata
//! and a live mTLS health check; it never signals a process. What a dead supervisor left behind is
//! reported as stale, and `vm stop` (or the next `vm run`) recovers it ([`crate::supervise::recover`]).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use openshell_vm::VmError;

use crate::state::{now_unix, Failure, GatewayInstance, Restarting};

/// What `vm status` reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub name: String,
    pub endpoint: Option<String>,
    pub running: bool,
    pub supervisor_pid: Option<u32>,
    pub vm_pid: Option<u32>,
    /// `SERVING`, or why not.
    pub health: String,
    pub mtls_dir: PathBuf,
    /// Why the instance is not running, when a child's death ended it (see [`Failure`]), or, while
    /// it is [`Self::restarting`], why it is restarting.
    pub failure: Option<Failure>,
    /// The restart the supervisor is waiting to boot (`--restart on-failure`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarting: Option<Restarting>,
    /// With [`Self::failure`]: the supervisor had restarted the instance this many times, its
    /// limit, and gave up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gave_up_after_restarts: Option<u32>,
    /// Records a dead supervisor left (pids of processes it no longer owns); `vm stop` clears them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stale: Vec<String>,
    /// What is wrong with the instance's files (see [`GatewayInstance::problems`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

impl Status {
    /// Seconds until the scheduled restart boots (0 once it is booting).
    pub fn restart_in(&self) -> Option<u64> {
        self.restarting.map(|r| r.boot_at_unix.saturating_sub(now_unix()))
    }
}

impl GatewayInstance {
    /// Reports the instance, checking health over mTLS when it runs. Reads only: state a dead
    /// supervisor left behind is listed in [`Status::stale`], not cleaned up.
    pub fn status(&self) -> Status {
        let meta = self.read_metadata();
        let running = self.locked();
        let endpoint = meta.as_ref().map(|m| m.endpoint.clone());
        let restarting = meta.as_ref().and_then(|m| m.restarting).filter(|_| running);
        let stale = match (&meta, running) {
            (Some(m), false) => {
                [("supervisor", m.supervisor_pid), ("vm", m.vm_pid), ("passt", m.passt_pid), ("gvproxy", m.gvproxy_pid)]
                    .into_iter()
                    .filter_map(|(role, pid)| {
                        Some(format!("{role} pid {} recorded, but no supervisor holds the instance", pid?))
                    })
                    .collect()
            }
            _ => Vec::new(),
        };
        let problems = self.problems();
        let unreadable = self.load_metadata().is_err();
        let health = match (&endpoint, running, restarting) {
            (Some(_), true, Some(_)) => "restarting".into(),
            (Some(ep), true, None) => match self.client_bundle() {
                Ok(bundle) => health(ep, &bundle),
                Err(e) => e.to_string(),
            },
            // Running, but the endpoint was in the metadata: say so rather than guess a port.
            (None, true, _) if unreadable => {
                "unknown: metadata.json is unreadable, so the endpoint is not known".into()
            }
            (None, false, _) if unreadable => "not running".into(),
            (None, _, _) => "never started".into(),
            (_, false, _) => "not running".into(),
        };
        // The lock's holder wrote its pid into the lock file: the supervisor, metadata or not.
        let supervisor_pid = meta.as_ref().and_then(|m| m.supervisor_pid).or_else(|| self.lock_holder());
        Status {
            name: self.name.clone(),
            endpoint,
            running,
            supervisor_pid: supervisor_pid.filter(|_| running),
            vm_pid: meta.as_ref().and_then(|m| m.vm_pid).filter(|_| running),
            failure: meta.as_ref().and_then(|m| m.failure).filter(|_| !running || restarting.is_some()),
            restarting,
            gave_up_after_restarts: meta.as_ref().and_then(|m| m.gave_up_after_restarts).filter(|_| !running),
            health,
            mtls_dir: self.mtls_dir(),
            stale,
            problems,
        }
    }

    /// Stops a running instance through its supervisor (SIGTERM; it stops the VM and its network
    /// process). After a supervisor was SIGKILLed, its VMM and passt/gvproxy died with it (`PR_SET_PDEATHSIG`);
    /// the recorded pids are only signalled while they still run the program we started.
    /// Works without readable metadata: the lock's holder is the supervisor.
    pub fn stop(&self, grace: Duration) -> Result<bool, VmError> {
        if !self.locked() {
            crate::supervise::recover(self)?;
            return Ok(false);
        }
        let sup = self.read_metadata().and_then(|m| m.supervisor_pid).or_else(|| self.lock_holder());
        let Some(sup) = sup else {
            return Err(VmError::Instance(format!(
                "gateway {:?} is locked, but neither metadata.json nor {} names its supervisor",
                self.name,
                self.lock_path().display()
            )));
        };
        // What the supervisor runs, verified ours now: it reaps them, but a child it killed can
        // still be exiting (a VMM unmapping its guest's memory) once the supervisor is gone.
        let children: Vec<(u32, &[&str])> = self
            .read_metadata()
            .map(|m| crate::supervise::recorded_children(&m).to_vec())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(_, pid, progs)| {
                pid.filter(|&p| openshell_vm::procfs::process(p).program_is_any(progs)).map(|p| (p, progs))
            })
            .collect();
        // The pid of the process holding our instance lock.
        let _ = openshell_vm::child::signal(sup, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        // The lock goes when the supervisor closes it, which is before its process has finished
        // exiting: wait for the process too, so nothing of the instance runs once `stop` returns.
        // Only while it still runs the supervisor program, so a recycled pid is never waited on.
        let supervisor_runs = || openshell_vm::procfs::process(sup).program_is_any(&["openshell-supervisor"]);
        while self.locked() || supervisor_runs() {
            if Instant::now() > deadline {
                return Err(VmError::Instance(format!(
                    "gateway {:?} (supervisor {sup}) did not stop within {}s",
                    self.name,
                    grace.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Alive and either still our program or exiting (its command line already empty): a pid
        // taken since by another program is not waited on.
        let exiting_or_ours = |(pid, progs): &(u32, &[&str])| {
            let p = openshell_vm::procfs::process(*pid);
            p.alive && (p.cmdline.is_empty() || p.program_is_any(progs))
        };
        while let Some((pid, _)) = children.iter().find(|c| exiting_or_ours(c)) {
            if Instant::now() > deadline {
                return Err(VmError::Instance(format!(
                    "gateway {:?}: its supervisor stopped, but pid {pid} it ran did not exit within {}s",
                    self.name,
                    grace.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(true)
    }
}

/// The gateway's mTLS health check: `SERVING`, or what it said or why it could not be asked.
fn health(endpoint: &str, bundle: &openshell_gateway::ClientBundle) -> String {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|rt| {
            rt.block_on(async {
                let ch = openshell_gateway::connect(endpoint, bundle, "localhost").await.map_err(|e| e.to_string())?;
                openshell_gateway::health(&ch).await.map_err(|e| e.to_string())
            })
        })
        .map_or_else(
            |e| e,
            |s| if s == openshell_gateway::ServingStatus::Serving { "SERVING".into() } else { format!("{s:?}") },
        )
}
