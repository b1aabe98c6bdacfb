//! OpenShell's gateway API (`openshell.v1.OpenShell`) as its CLI and SDK call it: the methods in
//! `proto/openshell.proto` are served; every other method of OpenShell's service answers
//! UNIMPLEMENTED naming itself and what is served, instead of tonic's bare status.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::body::BoxBody;
use tonic::server::NamedService;
use tonic::{Request, Response, Status};

use crate::proto::openshell::open_shell_server::{OpenShell, OpenShellServer};
use crate::proto::openshell::{
    GetGatewayInfoRequest, GetGatewayInfoResponse, HealthRequest, HealthResponse, ServiceStatus,
};

/// The methods of `openshell.v1.OpenShell` this gateway serves (those in `proto/openshell.proto`).
pub const SERVED: &[&str] = &["Health", "GetGatewayInfo"];

#[derive(Clone, Debug, Default)]
pub struct OpenShellService;

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
        // No compute driver yet: this gateway does not run sandboxes, and says so by listing none.
        Ok(Response::new(GetGatewayInfoResponse {
            status: ServiceStatus::Healthy.into(),
            gateway_version: env!("CARGO_PKG_VERSION").to_owned(),
            compute_drivers: Vec::new(),
            extensions: Vec::new(),
        }))
    }
}

/// [`OpenShellServer`] behind a check of the method each request names.
#[derive(Clone)]
pub struct Served(OpenShellServer<OpenShellService>);

impl Served {
    pub fn new() -> Served {
        Served(OpenShellServer::new(OpenShellService))
    }
}

impl Default for Served {
    fn default() -> Self {
        Served::new()
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
