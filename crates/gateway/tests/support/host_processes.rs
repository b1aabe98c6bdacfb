//! A test double of the compute driver, never shipped: each "container" is a plain host process
//! (its command, or `sleep` when it has none) and exec runs the command on the host. It has no
//! images, no isolation and no limits; it exists so the gateway's sandbox API can be driven end
//! to end by the real SDK on a host without containerd.

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::sync::Mutex;

use openshell_gateway::sandboxes::{
    ContainerSpec, ContainerState, Driver, DriverError, DriverInfo, ExecEvent, ExecSpec, ExecStream,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

#[derive(Default)]
pub struct HostProcesses {
    containers: Mutex<HashMap<String, Container>>,
}

struct Container {
    spec: ContainerSpec,
    main: Option<Child>,
    exited: Option<i32>,
}

fn code(status: ExitStatus) -> i32 {
    status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

fn missing(id: &str) -> DriverError {
    DriverError::Missing(id.to_owned())
}

#[tonic::async_trait]
impl Driver for HostProcesses {
    async fn create(&self, id: &str, spec: &ContainerSpec) -> Result<(), DriverError> {
        let c = Container { spec: spec.clone(), main: None, exited: None };
        self.containers.lock().unwrap().insert(id.to_owned(), c);
        Ok(())
    }

    async fn start(&self, id: &str) -> Result<(), DriverError> {
        let mut containers = self.containers.lock().unwrap();
        let c = containers.get_mut(id).ok_or_else(|| missing(id))?;
        let argv = if c.spec.command.is_empty() { vec!["sleep".into(), "600".into()] } else { c.spec.command.clone() };
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .envs(&c.spec.env)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| DriverError::Failed(format!("spawning {argv:?}: {e}")))?;
        c.main = Some(child);
        c.exited = None;
        Ok(())
    }

    async fn state(&self, id: &str) -> Result<ContainerState, DriverError> {
        let mut containers = self.containers.lock().unwrap();
        let Some(c) = containers.get_mut(id) else { return Ok(ContainerState::Missing) };
        if let Some(child) = c.main.as_mut() {
            if let Some(status) = child.try_wait().map_err(|e| DriverError::Failed(e.to_string()))? {
                c.exited = Some(code(status));
                c.main = None;
            }
        }
        Ok(match (&c.main, c.exited) {
            (Some(_), _) => ContainerState::Running,
            (None, Some(code)) => ContainerState::Exited { code },
            (None, None) => ContainerState::Created,
        })
    }

    async fn stop(&self, id: &str) -> Result<(), DriverError> {
        let child = self.containers.lock().unwrap().get_mut(id).ok_or_else(|| missing(id))?.main.take();
        if let Some(mut child) = child {
            let _ = child.kill().await;
        }
        Ok(())
    }

    async fn delete(&self, id: &str) -> Result<(), DriverError> {
        let c = self.containers.lock().unwrap().remove(id);
        if let Some(mut child) = c.and_then(|c| c.main) {
            let _ = child.kill().await;
        }
        Ok(())
    }

    async fn exec(&self, id: &str, spec: ExecSpec) -> Result<ExecStream, DriverError> {
        if !self.containers.lock().unwrap().contains_key(id) {
            return Err(missing(id));
        }
        let mut cmd = Command::new(&spec.command[0]);
        cmd.args(&spec.command[1..])
            .envs(&spec.env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(dir) = &spec.workdir {
            cmd.current_dir(dir);
        }
        let mut child = cmd.spawn().map_err(|e| DriverError::Failed(format!("spawning {:?}: {e}", spec.command)))?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let mut stdin = child.stdin.take().expect("piped");
        let mut out = child.stdout.take().expect("piped");
        let mut err = child.stderr.take().expect("piped");
        tokio::spawn(async move {
            // Written apart from the reads, so a command that fills its stdout before reading all
            // of stdin does not deadlock; dropping the pipe is its end of input.
            let data = spec.stdin;
            tokio::spawn(async move {
                let _ = stdin.write_all(&data).await;
            });
            let (mut ob, mut eb) = (vec![0u8; 8192], vec![0u8; 8192]);
            let (mut out_open, mut err_open) = (true, true);
            while out_open || err_open {
                // A closed receiver (the service gave up: timeout, client gone) drops the child,
                // which kill_on_drop kills.
                let event = tokio::select! {
                    _ = tx.closed() => return,
                    n = out.read(&mut ob), if out_open => match n {
                        Ok(0) | Err(_) => { out_open = false; continue }
                        Ok(n) => ExecEvent::Stdout(ob[..n].to_vec()),
                    },
                    n = err.read(&mut eb), if err_open => match n {
                        Ok(0) | Err(_) => { err_open = false; continue }
                        Ok(n) => ExecEvent::Stderr(eb[..n].to_vec()),
                    },
                };
                if tx.send(Ok(event)).await.is_err() {
                    return;
                }
            }
            let status = tokio::select! {
                _ = tx.closed() => return,
                status = child.wait() => status,
            };
            let event = status.map(|s| ExecEvent::Exit(code(s))).map_err(|e| DriverError::Failed(e.to_string()));
            let _ = tx.send(event).await;
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn images(&self) -> Result<Vec<String>, DriverError> {
        Ok(Vec::new())
    }

    fn info(&self) -> DriverInfo {
        DriverInfo { name: "host-processes".into(), version: "test".into(), ..Default::default() }
    }
}
