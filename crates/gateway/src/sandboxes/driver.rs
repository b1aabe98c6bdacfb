//! The compute driver: what the sandbox service asks of whatever runs a sandbox's container.
//! The types are plain Rust, not the OpenShell proto, so a driver in another crate (containerd +
//! runc + CNI inside the VM) implements it without knowing the wire. The service owns the records,
//! phases and errors the API shows; a driver owns containers, keyed by the sandbox id, and nothing
//! else.

use std::collections::BTreeMap;
use std::pin::Pin;

use tokio_stream::Stream;

/// Everything a driver needs to make one sandbox's container.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerSpec {
    /// The image reference; "" is the driver's default sandbox image.
    pub image: String,
    /// The main process's argv; empty is the image's own command.
    pub command: Vec<String>,
    /// The main process's environment, on top of the image's.
    pub env: BTreeMap<String, String>,
}

/// What a driver knows of a container's main process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContainerState {
    /// Created, its main process not started (or stopped).
    Created,
    Running,
    Exited {
        code: i32,
    },
    /// The driver has no such container (never made, or removed behind the gateway's back).
    Missing,
}

/// One command to run in a running container.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecSpec {
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// `None`: the container's working directory.
    pub workdir: Option<String>,
    /// Fed to the command's stdin, which is then closed.
    pub stdin: Vec<u8>,
}

/// One event of a running command. A stream ends with exactly one `Exit`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExecEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(i32),
}

/// A command's output as it comes. Dropping it must end the command (the service drops it when
/// the client goes away or `execution_timeout` passes), so a driver kills what it started then.
pub type ExecStream = Pin<Box<dyn Stream<Item = Result<ExecEvent, DriverError>> + Send>>;

/// What GetGatewayInfo lists as the gateway's compute driver.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DriverInfo {
    pub name: String,
    pub version: String,
    pub cpu_limit_supported: bool,
    pub memory_limit_supported: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DriverError {
    /// The driver has no container with this id.
    #[error("the compute driver has no container {0}")]
    Missing(String),
    /// Anything else, in words the user can act on (the driver's own message).
    #[error("{0}")]
    Failed(String),
}

/// Runs sandbox containers. Every method takes the sandbox id the service chose. The service
/// never runs two changes (create, start, stop, delete) for one id at once; `state` and `exec`
/// may come alongside them, so a driver answers them from whatever state it is in.
#[tonic::async_trait]
pub trait Driver: Send + Sync + 'static {
    /// Makes the container, without starting its main process.
    async fn create(&self, id: &str, spec: &ContainerSpec) -> Result<(), DriverError>;
    /// Starts the main process; returns once it runs.
    async fn start(&self, id: &str) -> Result<(), DriverError>;
    async fn state(&self, id: &str) -> Result<ContainerState, DriverError>;
    /// Stops the main process (SIGTERM, then SIGKILL after the driver's grace); the container stays.
    async fn stop(&self, id: &str) -> Result<(), DriverError>;
    /// Stops what runs and removes the container; a missing one is not an error.
    async fn delete(&self, id: &str) -> Result<(), DriverError>;
    /// Runs a command in the running container.
    async fn exec(&self, id: &str, spec: ExecSpec) -> Result<ExecStream, DriverError>;
    /// The image references the driver can create from without fetching anything.
    async fn images(&self) -> Result<Vec<String>, DriverError>;
    fn info(&self) -> DriverInfo;
}
