//! OpenShell's sandboxes as this gateway keeps them: one record per sandbox (id, name, labels,
//! spec, phase, conditions, times) in memory, the lifecycle that moves a record between phases
//! as its compute [`Driver`] reports, and the API's errors. It does not run containers (the
//! driver does) and does not speak gRPC transport (`crate::openshell` routes the calls here).
//!
//! Phases are only ever what is true: PROVISIONING while the driver makes and starts the
//! container, READY once the driver says the main process runs, COMPLETED or ERROR once it has
//! exited (0 or not, the code in `exit_code`), STOPPED after StopSandbox, ERROR with the reason in
//! the `Ready` condition when the driver fails, DELETING until the driver has removed it (then the
//! record is gone: NOT_FOUND). The gateway has one workspace, [`DEFAULT_WORKSPACE`].

// Every function here answers a gRPC call, whose error is a `tonic::Status` (176 bytes); boxing
// it would only be undone at the method boundary, so clippy's size lint does not fit this module.
#![allow(clippy::result_large_err)]

mod driver;
mod listing;

use std::collections::hash_map::RandomState;
use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio_stream::StreamExt;
use tonic::Status;

pub use driver::{ContainerSpec, ContainerState, Driver, DriverError, DriverInfo, ExecEvent, ExecSpec, ExecStream};
pub use listing::{Selector, MAX_NAME};

use crate::proto::datamodel::v1::{
    workspace_selector::Selection, ObjectMeta, Workspace, WorkspacePhase, WorkspaceSelector, WorkspaceStatus,
};
use crate::proto::openshell::{
    exec_sandbox_event::Payload, CreateSandboxRequest, DeleteSandboxRequest, DeleteSandboxResponse, DeletionOutcome,
    ExecSandboxEvent, ExecSandboxExit, ExecSandboxRequest, ExecSandboxStderr, ExecSandboxStdout, GetSandboxRequest,
    ListSandboxesRequest, ListSandboxesResponse, Sandbox, SandboxCondition, SandboxPhase, SandboxSpec, SandboxStatus,
    StartSandboxRequest, StopSandboxRequest,
};

/// The one workspace this gateway has; OpenShell's SDK names a workspace in every sandbox call.
pub const DEFAULT_WORKSPACE: &str = "default";

/// What every sandbox call answers on a gateway started without a compute driver.
pub const NO_DRIVER: &str = "this gateway runs no compute driver: boot the sandbox profile";

/// A stream of ExecSandbox events as the API sends them.
pub type ExecEvents = tokio_stream::wrappers::ReceiverStream<Result<ExecSandboxEvent, Status>>;

#[derive(Clone, Debug)]
struct Record {
    id: String,
    name: String,
    labels: BTreeMap<String, String>,
    spec: SandboxSpec,
    phase: SandboxPhase,
    /// The `Ready` condition: why the sandbox is (not) ready.
    ready: SandboxCondition,
    created: SystemTime,
    started: Option<SystemTime>,
    exit_code: Option<i32>,
    /// Held across each driver call that changes this sandbox, so the driver never sees two at
    /// once for one id (a delete waits for the provisioning it interrupts).
    ops: Arc<tokio::sync::Mutex<()>>,
}

impl Record {
    fn transition(&mut self, phase: SandboxPhase, reason: &str, message: String) {
        self.phase = phase;
        self.ready = SandboxCondition {
            r#type: "Ready".into(),
            status: if phase == SandboxPhase::Ready { "True" } else { "False" }.into(),
            reason: reason.into(),
            message,
            transition_time: Some(SystemTime::now().into()),
        };
    }

    fn to_proto(&self) -> Sandbox {
        Sandbox {
            metadata: Some(ObjectMeta {
                id: self.id.clone(),
                name: self.name.clone(),
                created_time: Some(self.created.into()),
                labels: self.labels.clone().into_iter().collect(),
                workspace: DEFAULT_WORKSPACE.into(),
            }),
            spec: Some(self.spec.clone()),
            status: Some(SandboxStatus {
                conditions: vec![self.ready.clone()],
                phase: self.phase.into(),
                exit_code: self.exit_code,
                main_process_started_time: self.started.map(Into::into),
            }),
        }
    }
}

/// The sandboxes of one gateway, over its driver (or none).
#[derive(Clone)]
pub struct Sandboxes {
    driver: Option<Arc<dyn Driver>>,
    /// By name, so listing is in name order and names are unique.
    records: Arc<Mutex<BTreeMap<String, Record>>>,
}

impl std::fmt::Debug for Sandboxes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandboxes").field("driver", &self.driver.as_ref().map(|d| d.info().name)).finish()
    }
}

impl Default for Sandboxes {
    fn default() -> Self {
        Sandboxes::new(None)
    }
}

fn driver_failed(what: &str, name: &str, e: &DriverError) -> Status {
    Status::internal(format!("the compute driver failed to {what} sandbox {name}: {e}"))
}

fn not_found(name: &str) -> Status {
    Status::not_found(format!(
        "sandbox {name:?} does not exist in workspace {DEFAULT_WORKSPACE}; ListSandboxes shows those that do"
    ))
}

/// The workspace a call names, which must be this gateway's one (or, when `all` is allowed,
/// every workspace). No selector, or an empty name, is the default workspace.
fn check_workspace(scope: Option<&WorkspaceSelector>, all_allowed: bool) -> Result<(), Status> {
    match scope.and_then(|s| s.selection.as_ref()) {
        None => Ok(()),
        Some(Selection::Workspace(w)) if w.is_empty() || w == DEFAULT_WORKSPACE => Ok(()),
        Some(Selection::Workspace(w)) => Err(Status::not_found(format!(
            "workspace {w:?} does not exist: this gateway has one workspace, {DEFAULT_WORKSPACE:?}"
        ))),
        Some(Selection::AllWorkspaces(_)) if all_allowed => Ok(()),
        Some(Selection::AllWorkspaces(_)) => {
            Err(Status::invalid_argument(format!("this call acts in one workspace: name it ({DEFAULT_WORKSPACE:?})")))
        }
    }
}

/// 64 random bits: std's hasher keys are seeded from the OS once per thread and stepped per
/// `RandomState`, which is enough to tell sandboxes apart without another dependency.
fn random_u64() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish()
}

/// A UUID-shaped (version 4) id.
fn new_id() -> String {
    let (a, b) = (random_u64(), random_u64());
    let b = (b & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
    let a = (a & 0xffff_ffff_ffff_0fff) | 0x4000;
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

/// A generated name: `sandbox-` and eight lowercase hex digits, a valid DNS label.
fn new_name() -> String {
    format!("sandbox-{:08x}", random_u64() as u32)
}

impl Sandboxes {
    pub fn new(driver: Option<Arc<dyn Driver>>) -> Sandboxes {
        Sandboxes { driver, records: Arc::default() }
    }

    /// What GetGatewayInfo lists as the compute driver, if there is one.
    pub fn driver_info(&self) -> Option<DriverInfo> {
        self.driver.as_ref().map(|d| d.info())
    }

    fn driver(&self) -> Result<Arc<dyn Driver>, Status> {
        self.driver.clone().ok_or_else(|| Status::failed_precondition(NO_DRIVER))
    }

    fn record(&self, name: &str) -> Result<Record, Status> {
        self.records.lock().unwrap().get(name).cloned().ok_or_else(|| not_found(name))
    }

    /// Applies `f` to the record `name` if it is still the sandbox `id` (not deleted and made anew).
    fn update(&self, name: &str, id: &str, f: impl FnOnce(&mut Record)) {
        if let Some(r) = self.records.lock().unwrap().get_mut(name).filter(|r| r.id == id) {
            f(r);
        }
    }

    pub async fn create(&self, req: CreateSandboxRequest) -> Result<Sandbox, Status> {
        let driver = self.driver()?;
        check_workspace(req.workspace_scope.as_ref(), false)?;
        let labels: BTreeMap<String, String> = req.labels.into_iter().collect();
        listing::check_labels(&labels)?;
        if !req.name.is_empty() {
            listing::check_name(&req.name)?;
        }
        let spec = req.spec.unwrap_or_default();
        let template = spec.template.clone().unwrap_or_default();
        if !template.image.is_empty() {
            let images = driver
                .images()
                .await
                .map_err(|e| Status::unavailable(format!("the compute driver could not list its images: {e}")))?;
            if !images.contains(&template.image) {
                return Err(Status::failed_precondition(format!(
                    "image {:?} is not in this gateway's image store; import it with `cargo xtask image import {}`",
                    template.image, template.image
                )));
            }
        }
        let mut env: BTreeMap<String, String> = template.environment.into_iter().collect();
        env.extend(spec.environment.clone());
        let container = ContainerSpec { image: template.image, command: spec.command.clone(), env };

        let record = {
            let mut records = self.records.lock().unwrap();
            let name = if req.name.is_empty() {
                std::iter::repeat_with(new_name).find(|n| !records.contains_key(n)).expect("an endless iterator")
            } else if records.contains_key(&req.name) {
                return Err(Status::already_exists(format!(
                    "a sandbox named {:?} already exists; delete it first, or pick another name",
                    req.name
                )));
            } else {
                req.name
            };
            let mut r = Record {
                id: new_id(),
                name: name.clone(),
                labels,
                spec,
                phase: SandboxPhase::Provisioning,
                ready: SandboxCondition::default(),
                created: SystemTime::now(),
                started: None,
                exit_code: None,
                ops: Arc::default(),
            };
            r.transition(
                SandboxPhase::Provisioning,
                "Provisioning",
                "the compute driver is making the container".into(),
            );
            records.insert(name, r.clone());
            r
        };
        let this = self.clone();
        let (id, name, ops) = (record.id.clone(), record.name.clone(), record.ops.clone());
        tokio::spawn(async move {
            let _held = ops.lock().await;
            let still = this.record(&name).is_ok_and(|r| r.id == id && r.phase == SandboxPhase::Provisioning);
            if !still {
                return;
            }
            let outcome = match driver.create(&id, &container).await {
                Err(e) => Err(("CreateFailed", e)),
                Ok(()) => driver.start(&id).await.map_err(|e| ("StartFailed", e)),
            };
            let state = match outcome {
                Ok(()) => driver.state(&id).await.map_err(|e| ("StateFailed", e)),
                Err(e) => Err(e),
            };
            this.update(&name, &id, |r| {
                if r.phase != SandboxPhase::Provisioning {
                    return; // deleted while it was being made: DELETING stands
                }
                match state {
                    Ok(s) => observe(r, s, true),
                    Err((reason, e)) => r.transition(SandboxPhase::Error, reason, e.to_string()),
                }
            });
        });
        Ok(record.to_proto())
    }

    /// Reads the driver's state of a sandbox whose main process should be running, and records
    /// what it says (exited, gone), so Get, List and Exec never show READY for a dead process.
    async fn refresh(&self, name: &str) -> Result<Record, Status> {
        let r = self.record(name)?;
        if r.phase != SandboxPhase::Ready {
            return Ok(r);
        }
        // A change under way (stop, delete) decides the phase itself.
        let Ok(_held) = r.ops.try_lock() else { return Ok(r) };
        let driver = self.driver()?;
        match driver.state(&r.id).await {
            Ok(s) => self.update(name, &r.id, |r| {
                if r.phase == SandboxPhase::Ready {
                    observe(r, s, false)
                }
            }),
            Err(e) => tracing::warn!("reading the state of sandbox {name}: {e}"),
        }
        self.record(name)
    }

    pub async fn get(&self, req: GetSandboxRequest) -> Result<Sandbox, Status> {
        self.driver()?;
        check_workspace(req.workspace_scope.as_ref(), false)?;
        Ok(self.refresh(&req.name).await?.to_proto())
    }

    pub async fn list(&self, req: ListSandboxesRequest) -> Result<ListSandboxesResponse, Status> {
        self.driver()?;
        check_workspace(req.workspace_scope.as_ref(), true)?;
        let selector = Selector::parse(&req.label_selector)?;
        let size = listing::page_size(req.page_size)?;
        let names: Vec<String> = self.records.lock().unwrap().keys().cloned().collect();
        let mut matching = Vec::new();
        for name in names {
            // Gone since the names were read: not listed.
            if let Ok(r) = self.refresh(&name).await {
                if selector.matches(&r.labels) {
                    matching.push((name, r));
                }
            }
        }
        let (page, next_page_token) = listing::page(&matching, &req.page_token, size)?;
        Ok(ListSandboxesResponse { sandboxes: page.into_iter().map(Record::to_proto).collect(), next_page_token })
    }

    pub async fn delete(&self, req: DeleteSandboxRequest) -> Result<DeleteSandboxResponse, Status> {
        let driver = self.driver()?;
        check_workspace(req.workspace_scope.as_ref(), false)?;
        let r = {
            let mut records = self.records.lock().unwrap();
            let Some(r) = records.get_mut(&req.name) else {
                if req.allow_missing {
                    return Ok(DeleteSandboxResponse {
                        outcome: DeletionOutcome::AlreadyAbsent.into(),
                        sandbox_id: String::new(),
                    });
                }
                return Err(not_found(&req.name));
            };
            let accepted =
                DeleteSandboxResponse { outcome: DeletionOutcome::Accepted.into(), sandbox_id: r.id.clone() };
            if r.phase == SandboxPhase::Deleting {
                return Ok(accepted);
            }
            r.transition(SandboxPhase::Deleting, "Deleting", "the compute driver is removing the container".into());
            r.clone()
        };
        let this = self.clone();
        let sandbox_id = r.id.clone();
        tokio::spawn(async move {
            let _held = r.ops.lock().await;
            match driver.delete(&r.id).await {
                Ok(()) => {
                    let mut records = this.records.lock().unwrap();
                    if records.get(&r.name).is_some_and(|x| x.id == r.id) {
                        records.remove(&r.name);
                    }
                }
                Err(e) => this.update(&r.name, &r.id, |r| {
                    r.transition(SandboxPhase::Error, "DeleteFailed", format!("{e}; DeleteSandbox tries again"))
                }),
            }
        });
        Ok(DeleteSandboxResponse { outcome: DeletionOutcome::Accepted.into(), sandbox_id })
    }

    pub async fn stop(&self, req: StopSandboxRequest) -> Result<Sandbox, Status> {
        let driver = self.driver()?;
        check_workspace(req.workspace_scope.as_ref(), false)?;
        let r = self.record(&req.name)?;
        let _held = r.ops.lock().await;
        let r = self.record(&req.name)?;
        match r.phase {
            SandboxPhase::Stopped => return Ok(r.to_proto()),
            SandboxPhase::Ready | SandboxPhase::Completed | SandboxPhase::Error => {}
            other => return Err(wrong_phase(&r.name, other, "stop")),
        }
        driver.stop(&r.id).await.map_err(|e| driver_failed("stop", &r.name, &e))?;
        self.update(&r.name, &r.id, |r| r.transition(SandboxPhase::Stopped, "Stopped", "StopSandbox".into()));
        Ok(self.record(&r.name)?.to_proto())
    }

    pub async fn start(&self, req: StartSandboxRequest) -> Result<Sandbox, Status> {
        let driver = self.driver()?;
        check_workspace(req.workspace_scope.as_ref(), false)?;
        let r = self.refresh(&req.name).await?;
        let _held = r.ops.lock().await;
        let r = self.record(&req.name)?;
        match r.phase {
            SandboxPhase::Stopped | SandboxPhase::Completed | SandboxPhase::Error => {}
            other => return Err(wrong_phase(&r.name, other, "start")),
        }
        let started = match driver.start(&r.id).await {
            Ok(()) => driver.state(&r.id).await,
            Err(e) => Err(e),
        };
        match started {
            Ok(s) => self.update(&r.name, &r.id, |r| observe(r, s, true)),
            Err(e) => {
                self.update(&r.name, &r.id, |r| r.transition(SandboxPhase::Error, "StartFailed", e.to_string()));
                return Err(driver_failed("start", &r.name, &e));
            }
        }
        Ok(self.record(&r.name)?.to_proto())
    }

    pub async fn exec(&self, req: ExecSandboxRequest) -> Result<ExecEvents, Status> {
        let driver = self.driver()?;
        check_workspace(req.workspace_scope.as_ref(), false)?;
        if req.command.is_empty() {
            return Err(Status::invalid_argument("ExecSandbox needs a command (argv), and it is empty"));
        }
        let timeout = match req.execution_timeout {
            Some(d) if d.seconds < 0 || d.nanos < 0 => {
                return Err(Status::invalid_argument("execution_timeout is negative"));
            }
            Some(d) if d.seconds > 0 || d.nanos > 0 => Some(Duration::new(d.seconds as u64, d.nanos as u32)),
            _ => None,
        };
        let r = self.refresh(&req.sandbox).await?;
        if r.phase != SandboxPhase::Ready {
            return Err(wrong_phase(&r.name, r.phase, "exec in"));
        }
        let spec = ExecSpec {
            command: req.command,
            env: req.environment.into_iter().collect(),
            workdir: Some(req.workdir).filter(|w| !w.is_empty()),
            stdin: req.stdin,
        };
        let stream = driver.exec(&r.id, spec).await.map_err(|e| driver_failed("exec in", &r.name, &e))?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(forward_exec(stream, tx, timeout));
        Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
    }
}

/// Records what the driver says of a sandbox's main process. `starting`: the phase follows the
/// state whatever it was (provisioning, start); otherwise only a READY one is moved.
fn observe(r: &mut Record, state: ContainerState, starting: bool) {
    match state {
        ContainerState::Running => {
            if starting {
                r.started = Some(SystemTime::now());
                r.exit_code = None;
                r.transition(SandboxPhase::Ready, "MainProcessRunning", "the main process runs".into());
            }
        }
        ContainerState::Exited { code } => {
            r.exit_code = Some(code);
            if code == 0 {
                r.transition(SandboxPhase::Completed, "MainProcessExited", "the main process exited with 0".into());
            } else {
                r.transition(SandboxPhase::Error, "MainProcessExited", format!("the main process exited with {code}"));
            }
        }
        ContainerState::Created => {
            r.transition(SandboxPhase::Stopped, "NotRunning", "the main process is not running".into())
        }
        ContainerState::Missing => r.transition(
            SandboxPhase::Error,
            "ContainerMissing",
            "the compute driver has no container for this sandbox; delete it and create it again".into(),
        ),
    }
}

fn wrong_phase(name: &str, phase: SandboxPhase, what: &str) -> Status {
    let next = match phase {
        SandboxPhase::Ready => "it already runs",
        SandboxPhase::Provisioning => "wait until GetSandbox shows it READY",
        SandboxPhase::Deleting => "it is being deleted",
        SandboxPhase::Stopped => "StartSandbox starts it",
        _ => "StartSandbox starts it again, or delete it",
    };
    Status::failed_precondition(format!("cannot {what} sandbox {name}: it is {}; {next}", phase.as_str_name()))
}

/// Sends the driver's events to the client, ends the command (by dropping its stream) when
/// `timeout` passes or the client goes away, and turns a stream that ends without an exit code
/// into an error rather than a silent success.
async fn forward_exec(
    mut stream: ExecStream,
    tx: tokio::sync::mpsc::Sender<Result<ExecSandboxEvent, Status>>,
    timeout: Option<Duration>,
) {
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    loop {
        let next = match deadline {
            Some(d) => match tokio::time::timeout_at(d, stream.next()).await {
                Ok(next) => next,
                Err(_) => {
                    let t = timeout.unwrap_or_default();
                    let _ = tx
                        .send(Err(Status::deadline_exceeded(format!(
                            "the command ran longer than its execution_timeout ({} s) and was killed",
                            t.as_secs_f64()
                        ))))
                        .await;
                    return;
                }
            },
            None => stream.next().await,
        };
        let (event, last) = match next {
            Some(Ok(ExecEvent::Stdout(data))) => (Ok(Payload::Stdout(ExecSandboxStdout { data })), false),
            Some(Ok(ExecEvent::Stderr(data))) => (Ok(Payload::Stderr(ExecSandboxStderr { data })), false),
            Some(Ok(ExecEvent::Exit(exit_code))) => (Ok(Payload::Exit(ExecSandboxExit { exit_code })), true),
            Some(Err(e)) => (Err(Status::internal(format!("the compute driver's exec failed: {e}"))), true),
            None => (Err(Status::internal("the compute driver's exec ended without the command's exit code")), true),
        };
        let event = event.map(|p| ExecSandboxEvent { payload: Some(p) });
        if tx.send(event).await.is_err() || last {
            return;
        }
    }
}

/// The default workspace, as GetWorkspace and ListWorkspaces show it.
pub fn default_workspace() -> Workspace {
    Workspace {
        metadata: Some(ObjectMeta {
            id: DEFAULT_WORKSPACE.into(),
            name: DEFAULT_WORKSPACE.into(),
            created_time: None,
            labels: Default::default(),
            workspace: String::new(),
        }),
        status: Some(WorkspaceStatus { phase: WorkspacePhase::Active.into() }),
    }
}

/// The workspaces a ListWorkspaces request selects: this gateway's one, or none.
pub fn list_workspaces(page_size: i32, page_token: &str, label_selector: &str) -> Result<Vec<Workspace>, Status> {
    let selector = Selector::parse(label_selector)?;
    let size = listing::page_size(page_size)?;
    let all = vec![(DEFAULT_WORKSPACE.to_string(), default_workspace())];
    let selected: Vec<_> = all.into_iter().filter(|_| selector.matches(&BTreeMap::new())).collect();
    let (page, _) = listing::page(&selected, page_token, size)?;
    Ok(page.into_iter().cloned().collect())
}

#[cfg(test)]
mod tests;
