//! OpenShell's gateway API (`openshell.v1.OpenShell`) as its CLI and SDK call it: the methods in
//! `proto/openshell.proto` are served (the sandbox calls by [`crate::sandboxes`]); every other
//! method of OpenShell's service answers UNIMPLEMENTED naming itself and what is served, instead
//! of tonic's bare status.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::body::BoxBody;
use tonic::server::NamedService;
use tonic::{Request, Response, Status};

use crate::proto::openshell::open_shell_server::{OpenShell, OpenShellServer};
use crate::proto::openshell::{
    ComputeDriverCapabilities, ComputeDriverInfo, CpuResourceCapabilities, CreateSandboxRequest, DeleteSandboxRequest,
    DeleteSandboxResponse, ExecSandboxRequest, GetGatewayInfoRequest, GetGatewayInfoResponse, GetSandboxRequest,
    GetWorkspaceRequest, GetWorkspaceResponse, HealthRequest, HealthResponse, ListSandboxesRequest,
    ListSandboxesResponse, ListWorkspacesRequest, ListWorkspacesResponse, MemoryResourceCapabilities,
    ResourceCapabilities, SandboxResponse, ServiceStatus, StartSandboxRequest, StopSandboxRequest,
};
use crate::sandboxes::{self, Sandboxes};

/// The methods of `openshell.v1.OpenShell` this gateway serves (those in `proto/openshell.proto`).
pub const SERVED: &[&str] = &[
    "Health",
    "GetGatewayInfo",
    "CreateSandbox",
    "GetSandbox",
    "ListSandboxes",
    "DeleteSandbox",
    "StopSandbox",
    "StartSandbox",
    "ExecSandbox",
    "GetWorkspace",
    "ListWorkspaces",
];

#[derive(Clone, Debug, Default)]
pub struct OpenShellService {
    sandboxes: Sandboxes,
}

impl OpenShellService {
    pub fn new(sandboxes: Sandboxes) -> OpenShellService {
        OpenShellService { sandboxes }
    }
}

fn sandbox(s: crate::proto::openshell::Sandbox) -> Response<SandboxResponse> {
    Response::new(SandboxResponse { sandbox: Some(s) })
}

#[tonic::async_trait]
impl OpenShell for OpenShellService {
    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        Ok(Response::new(HealthResponse {
            status: ServiceStatus::Healthy.into(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }))
    }

    async fn get_gateway_info(
        &self,
        _: Request<GetGatewayInfoRequest>,
    ) -> Result<Response<GetGatewayInfoResponse>, Status> {
        // Without a compute driver this gateway does not run sandboxes, and says so by listing none.
        let compute_drivers = self
            .sandboxes
            .driver_info()
            .map(|d| ComputeDriverInfo {
                name: d.name.clone(),
                capabilities: Some(ComputeDriverCapabilities {
                    driver_name: d.name,
                    driver_version: d.version,
                    resource_capabilities: Some(ResourceCapabilities {
                        cpu: Some(CpuResourceCapabilities { limit_supported: d.cpu_limit_supported }),
                        memory: Some(MemoryResourceCapabilities { limit_supported: d.memory_limit_supported }),
                        gpu: None,
                    }),
                }),
            })
            .into_iter()
            .collect();
        Ok(Response::new(GetGatewayInfoResponse {
            status: ServiceStatus::Healthy.into(),
            gateway_version: env!("CARGO_PKG_VERSION").to_owned(),
            compute_drivers,
            extensions: Vec::new(),
        }))
    }

    async fn create_sandbox(&self, req: Request<CreateSandboxRequest>) -> Result<Response<SandboxResponse>, Status> {
        self.sandboxes.create(req.into_inner()).await.map(sandbox)
    }

    async fn get_sandbox(&self, req: Request<GetSandboxRequest>) -> Result<Response<SandboxResponse>, Status> {
        self.sandboxes.get(req.into_inner()).await.map(sandbox)
    }

    async fn list_sandboxes(
        &self,
        req: Request<ListSandboxesRequest>,
    ) -> Result<Response<ListSandboxesResponse>, Status> {
        self.sandboxes.list(req.into_inner()).await.map(Response::new)
    }

    async fn delete_sandbox(
        &self,
        req: Request<DeleteSandboxRequest>,
    ) -> Result<Response<DeleteSandboxResponse>, Status> {
        self.sandboxes.delete(req.into_inner()).await.map(Response::new)
    }

    async fn stop_sandbox(&self, req: Request<StopSandboxRequest>) -> Result<Response<SandboxResponse>, Status> {
        self.sandboxes.stop(req.into_inner()).await.map(sandbox)
    }

    async fn start_sandbox(&self, req: Request<StartSandboxRequest>) -> Result<Response<SandboxResponse>, Status> {
        self.sandboxes.start(req.into_inner()).await.map(sandbox)
    }

    type ExecSandboxStream = sandboxes::ExecEvents;

    async fn exec_sandbox(
        &self,
        req: Request<ExecSandboxRequest>,
    ) -> Result<Response<Self::ExecSandboxStream>, Status> {
        self.sandboxes.exec(req.into_inner()).await.map(Response::new)
    }

    async fn get_workspace(&self, req: Request<GetWorkspaceRequest>) -> Result<Response<GetWorkspaceResponse>, Status> {
        let name = req.into_inner().name;
        if name != sandboxes::DEFAULT_WORKSPACE {
            return Err(Status::not_found(format!(
                "workspace {name:?} does not exist: this gateway has one workspace, {:?}",
                sandboxes::DEFAULT_WORKSPACE
            )));
        }
        Ok(Response::new(GetWorkspaceResponse { workspace: Some(sandboxes::default_workspace()) }))
    }

    async fn list_workspaces(
        &self,
        req: Request<ListWorkspacesRequest>,
    ) -> Result<Response<ListWorkspacesResponse>, Status> {
        let r = req.into_inner();
        let workspaces = sandboxes::list_workspaces(r.page_size, &r.page_token, &r.label_selector)?;
        Ok(Response::new(ListWorkspacesResponse { workspaces, next_page_token: String::new() }))
    }
}

/// [`OpenShellServer`] behind a check of the method each request names.
#[derive(Clone)]
pub struct Served(OpenShellServer<OpenShellService>);

impl Served {
    pub fn new(service: OpenShellService) -> Served {
        Served(OpenShellServer::new(service))
    }
}

impl NamedService for Served {
    const NAME: &'static str = <OpenShellServer<OpenShellService> as NamedService>::NAME;
}

/// The method a gRPC path names under this service (`/openshell.v1.OpenShell/ListSandboxes`).
fn method(path: &str) -> &str {
    path.strip_prefix('/').and_then(|p| p.strip_prefix(Served::NAME)).and_then(|p| p.strip_prefix('/')).unwrap_or(path)
}

/// The status of a call to a method this gateway does not serve.
pub fn unserved(method: &str) -> Status {
    Status::unimplemented(format!(
        "openshell-vm's gateway does not serve {}/{method}; it serves {}",
        Served::NAME,
        SERVED.join(", ")
    ))
}

impl tower_service::Service<http::Request<BoxBody>> for Served {
    type Response = http::Response<BoxBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        tower_service::Service::<http::Request<BoxBody>>::poll_ready(&mut self.0, cx)
    }

    fn call(&mut self, req: http::Request<BoxBody>) -> Self::Future {
        let m = method(req.uri().path());
        if SERVED.contains(&m) {
            return Box::pin(self.0.call(req));
        }
        let status = unserved(m);
        Box::pin(async move { Ok(status.into_http()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_names_its_method() {
        assert_eq!(method("/openshell.v1.OpenShell/ListSandboxes"), "ListSandboxes");
        let s = unserved("ListSandboxes");
        assert_eq!(s.code(), tonic::Code::Unimplemented);
        assert!(s.message().contains("openshell.v1.OpenShell/ListSandboxes") && s.message().contains("Health"));
    }
}
