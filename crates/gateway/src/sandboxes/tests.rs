//! The lifecycle and the API's errors over a driver whose containers are entries in a map.

use std::collections::HashMap;

use tonic::Code;

use super::*;
use crate::proto::openshell::SandboxTemplate;

/// A driver whose containers are states in a map; `hold_start` keeps `start` from returning
/// until released, so a test can look at a sandbox mid-provisioning.
struct MapDriver {
    states: Mutex<HashMap<String, ContainerState>>,
    fail_start: Mutex<Option<String>>,
    hold_start: tokio::sync::Semaphore,
    held: std::sync::atomic::AtomicBool,
}

impl Default for MapDriver {
    fn default() -> Self {
        MapDriver {
            states: Mutex::default(),
            fail_start: Mutex::default(),
            hold_start: tokio::sync::Semaphore::new(0),
            held: Default::default(),
        }
    }
}

#[tonic::async_trait]
impl Driver for MapDriver {
    async fn create(&self, id: &str, _: &ContainerSpec) -> Result<(), DriverError> {
        self.states.lock().unwrap().insert(id.into(), ContainerState::Created);
        Ok(())
    }
    async fn start(&self, id: &str) -> Result<(), DriverError> {
        if self.held.load(std::sync::atomic::Ordering::SeqCst) {
            self.hold_start.acquire().await.unwrap().forget();
        }
        if let Some(why) = self.fail_start.lock().unwrap().clone() {
            return Err(DriverError::Failed(why));
        }
        self.states.lock().unwrap().insert(id.into(), ContainerState::Running);
        Ok(())
    }
    async fn state(&self, id: &str) -> Result<ContainerState, DriverError> {
        Ok(self.states.lock().unwrap().get(id).copied().unwrap_or(ContainerState::Missing))
    }
    async fn stop(&self, id: &str) -> Result<(), DriverError> {
        self.states.lock().unwrap().insert(id.into(), ContainerState::Exited { code: 143 });
        Ok(())
    }
    async fn delete(&self, id: &str) -> Result<(), DriverError> {
        self.states.lock().unwrap().remove(id);
        Ok(())
    }
    async fn exec(&self, _: &str, spec: ExecSpec) -> Result<ExecStream, DriverError> {
        if spec.command[0] == "hang" {
            return Ok(Box::pin(tokio_stream::pending()));
        }
        if spec.command[0] == "no-exit" {
            return Ok(Box::pin(tokio_stream::iter(vec![Ok(ExecEvent::Stdout(b"x".to_vec()))])));
        }
        Ok(Box::pin(tokio_stream::iter(vec![
            Ok(ExecEvent::Stdout(spec.stdin)),
            Ok(ExecEvent::Stderr(spec.command.join(" ").into_bytes())),
            Ok(ExecEvent::Exit(7)),
        ])))
    }
    async fn images(&self) -> Result<Vec<String>, DriverError> {
        Ok(vec!["localhost/have:1".into()])
    }
    fn info(&self) -> DriverInfo {
        DriverInfo { name: "map".into(), ..Default::default() }
    }
}

fn service() -> (Sandboxes, Arc<MapDriver>) {
    let driver = Arc::new(MapDriver::default());
    (Sandboxes::new(Some(driver.clone())), driver)
}

fn scope() -> Option<WorkspaceSelector> {
    Some(WorkspaceSelector { selection: Some(Selection::Workspace(DEFAULT_WORKSPACE.into())) })
}

fn create_req(name: &str, labels: &[(&str, &str)]) -> CreateSandboxRequest {
    CreateSandboxRequest {
        workspace_scope: scope(),
        spec: None,
        name: name.into(),
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
    }
}

fn phase(s: &Sandbox) -> SandboxPhase {
    s.status.as_ref().unwrap().phase()
}

async fn get(s: &Sandboxes, name: &str) -> Result<Sandbox, Status> {
    s.get(GetSandboxRequest { workspace_scope: scope(), name: name.into() }).await
}

/// Polls until `name` leaves PROVISIONING (or DELETING), with a hang guard.
async fn settled(s: &Sandboxes, name: &str) -> Result<Sandbox, Status> {
    for _ in 0..500 {
        match get(s, name).await {
            Ok(sb) if matches!(phase(&sb), SandboxPhase::Provisioning | SandboxPhase::Deleting) => {}
            other => return other,
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("{name} never settled");
}

#[tokio::test]
async fn ready_only_once_the_driver_runs_the_main_process() {
    let (s, d) = service();
    d.held.store(true, std::sync::atomic::Ordering::SeqCst);
    let made = s.create(create_req("a", &[])).await.unwrap();
    assert_eq!(phase(&made), SandboxPhase::Provisioning);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(phase(&get(&s, "a").await.unwrap()), SandboxPhase::Provisioning, "READY before start returned");
    d.hold_start.add_permits(1);
    let ready = settled(&s, "a").await.unwrap();
    assert_eq!(phase(&ready), SandboxPhase::Ready);
    let status = ready.status.unwrap();
    assert!(status.main_process_started_time.is_some());
    assert_eq!(status.conditions[0].status, "True");
    assert_eq!(ready.metadata.unwrap().id, made.metadata.unwrap().id);
}

#[tokio::test]
async fn a_failed_start_is_error_with_the_reason() {
    let (s, d) = service();
    *d.fail_start.lock().unwrap() = Some("runc: no such binary".into());
    s.create(create_req("a", &[])).await.unwrap();
    let sb = settled(&s, "a").await.unwrap();
    assert_eq!(phase(&sb), SandboxPhase::Error);
    let c = &sb.status.unwrap().conditions[0];
    assert_eq!((c.r#type.as_str(), c.status.as_str(), c.reason.as_str()), ("Ready", "False", "StartFailed"));
    assert!(c.message.contains("runc: no such binary"), "{c:?}");
}

#[tokio::test]
async fn an_exited_main_process_is_never_shown_ready() {
    let (s, d) = service();
    let id = s.create(create_req("a", &[])).await.unwrap().metadata.unwrap().id;
    settled(&s, "a").await.unwrap();
    d.states.lock().unwrap().insert(id.clone(), ContainerState::Exited { code: 3 });
    let sb = get(&s, "a").await.unwrap();
    assert_eq!(phase(&sb), SandboxPhase::Error);
    assert_eq!(sb.status.unwrap().exit_code, Some(3));
    d.states.lock().unwrap().remove(&id);
    s.start(StartSandboxRequest { workspace_scope: scope(), name: "a".into() }).await.unwrap();
    assert_eq!(phase(&get(&s, "a").await.unwrap()), SandboxPhase::Ready);
}

#[tokio::test]
async fn stop_then_start_and_the_wrong_phase_is_refused() {
    let (s, _) = service();
    s.create(create_req("a", &[])).await.unwrap();
    settled(&s, "a").await.unwrap();
    let start = || s.start(StartSandboxRequest { workspace_scope: scope(), name: "a".into() });
    assert_eq!(start().await.unwrap_err().code(), Code::FailedPrecondition, "start of a READY one");
    let stopped = s.stop(StopSandboxRequest { workspace_scope: scope(), name: "a".into() }).await.unwrap();
    assert_eq!(phase(&stopped), SandboxPhase::Stopped);
    // Still STOPPED when read again: the driver's exited container does not turn it into ERROR.
    assert_eq!(phase(&get(&s, "a").await.unwrap()), SandboxPhase::Stopped);
    let exec = ExecSandboxRequest {
        workspace_scope: scope(),
        sandbox: "a".into(),
        command: vec!["x".into()],
        ..Default::default()
    };
    let e = s.exec(exec).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("SANDBOX_PHASE_STOPPED"), "{}", e.message());
    assert_eq!(phase(&start().await.unwrap()), SandboxPhase::Ready);
}

#[tokio::test]
async fn names_are_unique_checked_and_generated() {
    let (s, _) = service();
    s.create(create_req("a", &[])).await.unwrap();
    let e = s.create(create_req("a", &[])).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    assert_eq!(s.create(create_req("Bad_Name", &[])).await.unwrap_err().code(), Code::InvalidArgument);
    assert_eq!(s.create(create_req("b", &[("k", "a,b")])).await.unwrap_err().code(), Code::InvalidArgument);
    let one = s.create(create_req("", &[])).await.unwrap().metadata.unwrap();
    let two = s.create(create_req("", &[])).await.unwrap().metadata.unwrap();
    assert_ne!(one.name, two.name);
    assert_ne!(one.id, two.id);
    listing::check_name(&one.name).unwrap();
    assert_eq!(one.id.len(), 36);
}

#[tokio::test]
async fn missing_sandboxes_workspaces_and_images() {
    let (s, _) = service();
    assert_eq!(get(&s, "nope").await.unwrap_err().code(), Code::NotFound);
    let del =
        |allow_missing| s.delete(DeleteSandboxRequest { workspace_scope: scope(), name: "nope".into(), allow_missing });
    assert_eq!(del(false).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(del(true).await.unwrap().outcome(), DeletionOutcome::AlreadyAbsent);
    let mut other = create_req("a", &[]);
    other.workspace_scope = Some(WorkspaceSelector { selection: Some(Selection::Workspace("team".into())) });
    assert_eq!(s.create(other).await.unwrap_err().code(), Code::NotFound);
    let mut all = create_req("a", &[]);
    all.workspace_scope = Some(WorkspaceSelector { selection: Some(Selection::AllWorkspaces(Default::default())) });
    assert_eq!(s.create(all).await.unwrap_err().code(), Code::InvalidArgument);

    let with_image = |image: &str| {
        let mut r = create_req("img", &[]);
        r.spec = Some(SandboxSpec {
            template: Some(SandboxTemplate { image: image.into(), ..Default::default() }),
            ..Default::default()
        });
        r
    };
    let e = s.create(with_image("docker.io/library/absent:1")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("cargo xtask image import docker.io/library/absent:1"), "{}", e.message());
    s.create(with_image("localhost/have:1")).await.unwrap();
}

#[tokio::test]
async fn delete_goes_through_deleting_to_not_found() {
    let (s, d) = service();
    let id = s.create(create_req("a", &[])).await.unwrap().metadata.unwrap().id;
    settled(&s, "a").await.unwrap();
    let r = s.delete(DeleteSandboxRequest { workspace_scope: scope(), name: "a".into(), allow_missing: false });
    let r = r.await.unwrap();
    assert_eq!((r.outcome(), r.sandbox_id.as_str()), (DeletionOutcome::Accepted, id.as_str()));
    assert_eq!(settled(&s, "a").await.unwrap_err().code(), Code::NotFound);
    assert!(!d.states.lock().unwrap().contains_key(&id), "the driver still has the container");
}

#[tokio::test]
async fn a_delete_during_provisioning_waits_for_it_and_wins() {
    let (s, d) = service();
    d.held.store(true, std::sync::atomic::Ordering::SeqCst);
    let id = s.create(create_req("a", &[])).await.unwrap().metadata.unwrap().id;
    tokio::time::sleep(Duration::from_millis(10)).await;
    s.delete(DeleteSandboxRequest { workspace_scope: scope(), name: "a".into(), allow_missing: false }).await.unwrap();
    assert_eq!(phase(&get(&s, "a").await.unwrap()), SandboxPhase::Deleting);
    d.hold_start.add_permits(1);
    assert_eq!(settled(&s, "a").await.unwrap_err().code(), Code::NotFound);
    assert!(!d.states.lock().unwrap().contains_key(&id), "provisioning outlived the delete");
}

#[tokio::test]
async fn list_pages_and_selects_by_label() {
    let (s, _) = service();
    for (name, team) in [("c", "x"), ("a", "x"), ("b", "y")] {
        s.create(create_req(name, &[("team", team)])).await.unwrap();
    }
    let list = |token: String, selector: &str| {
        s.list(ListSandboxesRequest {
            workspace_scope: scope(),
            page_size: 1,
            page_token: token,
            label_selector: selector.into(),
        })
    };
    let mut names = Vec::new();
    let mut token = String::new();
    loop {
        let page = list(token, "").await.unwrap();
        assert_eq!(page.sandboxes.len(), 1);
        names.push(page.sandboxes[0].metadata.clone().unwrap().name);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(names, ["a", "b", "c"]);
    let x = s
        .list(ListSandboxesRequest { workspace_scope: scope(), label_selector: "team=x".into(), ..Default::default() })
        .await
        .unwrap();
    let names: Vec<_> = x.sandboxes.iter().map(|s| s.metadata.clone().unwrap().name).collect();
    assert_eq!(names, ["a", "c"]);
    assert_eq!(list("bogus".into(), "").await.unwrap_err().code(), Code::InvalidArgument);
    assert_eq!(list(String::new(), "team in (x)").await.unwrap_err().code(), Code::InvalidArgument);
}

async fn run(
    s: &Sandboxes,
    command: &str,
    timeout: Option<prost_types::Duration>,
) -> Vec<Result<ExecSandboxEvent, Status>> {
    let req = ExecSandboxRequest {
        workspace_scope: scope(),
        sandbox: "a".into(),
        command: vec![command.into(), "arg".into()],
        stdin: b"in".to_vec(),
        execution_timeout: timeout,
        ..Default::default()
    };
    s.exec(req).await.unwrap().collect().await
}

#[tokio::test]
async fn exec_streams_output_then_exit_and_bounds_the_command() {
    let (s, _) = service();
    s.create(create_req("a", &[])).await.unwrap();
    settled(&s, "a").await.unwrap();
    let events: Vec<_> = run(&s, "echo", None).await.into_iter().map(|e| e.unwrap().payload.unwrap()).collect();
    assert_eq!(
        events,
        [
            Payload::Stdout(ExecSandboxStdout { data: b"in".to_vec() }),
            Payload::Stderr(ExecSandboxStderr { data: b"echo arg".to_vec() }),
            Payload::Exit(ExecSandboxExit { exit_code: 7 }),
        ]
    );
    let no_exit = run(&s, "no-exit", None).await;
    assert_eq!(no_exit.last().unwrap().as_ref().unwrap_err().code(), Code::Internal);
    let t0 = std::time::Instant::now();
    let hung = run(&s, "hang", Some(prost_types::Duration { seconds: 0, nanos: 50_000_000 })).await;
    assert_eq!(hung.len(), 1);
    assert_eq!(hung[0].as_ref().unwrap_err().code(), Code::DeadlineExceeded);
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn without_a_driver_every_sandbox_call_says_so() {
    let s = Sandboxes::new(None);
    let e = s.create(create_req("a", &[])).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(e.message(), NO_DRIVER);
    assert_eq!(get(&s, "a").await.unwrap_err().message(), NO_DRIVER);
    assert_eq!(s.list(ListSandboxesRequest::default()).await.unwrap_err().message(), NO_DRIVER);
    assert!(s.driver_info().is_none());
}

#[test]
fn the_default_workspace_is_the_only_one() {
    assert_eq!(list_workspaces(0, "", "").unwrap(), vec![default_workspace()]);
    assert!(list_workspaces(0, "", "team=x").unwrap().is_empty());
    assert_eq!(list_workspaces(0, "junk", "").unwrap_err().code(), Code::InvalidArgument);
}
