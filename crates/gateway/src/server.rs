//! The Gateway gRPC service and the function that serves it, together with
//! `grpc.health.v1.Health`, over the mutual-TLS listener from [`crate::tls`].

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;

use crate::proto::gateway_server::{Gateway, GatewayServer};
use crate::proto::{InfoReply, InfoRequest};
use crate::sandboxes::{Driver, Sandboxes};
use crate::sysinfo;
use crate::tls::{self, ServerMaterial, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("gRPC server failed: {0}; check the log above for the connection that broke it")]
    Transport(#[from] tonic::transport::Error),
}

/// Where the booted artifacts' digests were provisioned in the guest, and what runs sandboxes.
#[derive(Clone, Default)]
pub struct GatewayConfig {
    pub kernel_digest_file: Option<PathBuf>,
    pub rootfs_digest_file: Option<PathBuf>,
    /// `None`: sandbox calls answer FAILED_PRECONDITION ([`crate::sandboxes::NO_DRIVER`]).
    pub driver: Option<Arc<dyn Driver>>,
}

impl std::fmt::Debug for GatewayConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayConfig")
            .field("kernel_digest_file", &self.kernel_digest_file)
            .field("rootfs_digest_file", &self.rootfs_digest_file)
            .field("driver", &self.driver.as_ref().map(|d| d.info().name))
            .finish()
    }
}

#[derive(Clone, Debug, Default)]
pub struct GatewayService {
    config: GatewayConfig,
    listener: tls::ListenerStats,
}

impl GatewayService {
    /// The service for a gateway whose accept loop keeps `listener`'s counts.
    pub fn new(config: GatewayConfig, listener: tls::ListenerStats) -> Self {
        GatewayService { config, listener }
    }
}

#[tonic::async_trait]
impl Gateway for GatewayService {
    async fn info(&self, _request: Request<InfoRequest>) -> Result<Response<InfoReply>, Status> {
        // Digests are read per call, not at startup, so a file provisioned
        // after the gateway started is still reported.
        let listen = sysinfo::listen_queue();
        Ok(Response::new(InfoReply {
            version: env!("CARGO_PKG_VERSION").to_string(),
            boot_id: sysinfo::boot_id(),
            uptime_ms: sysinfo::uptime_ms(),
            kernel_release: sysinfo::kernel_release(),
            vcpus: sysinfo::vcpus(),
            memory_kib: sysinfo::memory_kib(),
            kernel_sha256: sysinfo::read_digest(self.config.kernel_digest_file.as_deref()),
            rootfs_sha256: sysinfo::read_digest(self.config.rootfs_digest_file.as_deref()),
            listen_overflows: listen.overflows,
            listen_drops: listen.drops,
            connections: self.listener.connections() as u64,
            accept_failures: self.listener.accept_failures(),
            open_files_limit: sysinfo::open_files_limit(),
            root: sysinfo::mount_at("/").map(mount_fact),
            data_disk: sysinfo::mount_at(openshell_guest::DATA_DISK_MOUNT).map(mount_fact),
        }))
    }
}

fn mount_fact(m: sysinfo::Mount) -> crate::proto::MountFact {
    let sysinfo::Mount { mount_point, fs_type, source, read_write, total_bytes, free_bytes } = m;
    crate::proto::MountFact { mount_point, fs_type, source, read_write, total_bytes, free_bytes }
}

/// How serving ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Every connection closed (after a stop request, or the listener's stream ended).
    Drained,
    /// [`SHUTDOWN_GRACE`] passed after the stop request with `open` authenticated connections
    /// still held by their clients; serving ended anyway.
    GraceExpired { open: usize },
}

/// Serves Gateway and Health on `listener` until `shutdown` resolves, and says how it ended.
/// TLS material is checked before anything is served, so a bad `--tls-dir`
/// fails at startup rather than on the first connection.
pub async fn serve(
    listener: TcpListener,
    material: &ServerMaterial,
    config: GatewayConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<Ended, ServeError> {
    let tls_config = tls::server_config(material)?;

    let (mut reporter, health_service) = tonic_health::server::health_reporter();
    // "" is the whole server: it is serving as soon as the listener is.
    reporter.set_service_status("", ServingStatus::Serving).await;
    reporter.set_serving::<GatewayServer<GatewayService>>().await;

    // Graceful shutdown waits for every open connection to end; a client that keeps one open
    // (idle after its handshake, or stalled behind passt) must not hold a stop request hostage
    // until init's SIGKILL. So `shutdown` starts a bounded grace, after which serving ends anyway.
    let (stopping, stopped) = tokio::sync::oneshot::channel();
    let signal = async move {
        shutdown.await;
        let _ = stopping.send(());
    };
    let incoming = tls::incoming(listener, tls_config);
    let open = incoming.open_connections();
    let sandboxes = Sandboxes::new(config.driver.clone());
    let service = GatewayService::new(config, incoming.listener_stats());
    let server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(GatewayServer::new(service))
        .add_service(crate::openshell::Served::new(crate::openshell::OpenShellService::new(sandboxes)))
        .serve_with_incoming_shutdown(incoming, signal);
    tokio::pin!(server);
    tokio::select! {
        served = &mut server => served?,
        Ok(()) = stopped => {
            eprintln!("openshell-gateway: [{:>6} ms] stopping", sysinfo::uptime_ms());
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
                Ok(served) => served?,
                Err(_) => {
                    let open = open.get();
                    eprintln!(
                        "openshell-gateway: {open} connections still open {} s after the stop request; exiting",
                        SHUTDOWN_GRACE.as_secs()
                    );
                    return Ok(Ended::GraceExpired { open });
                }
            }
        }
    }
    Ok(Ended::Drained)
}

/// How long open connections may take to close once a stop is requested.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);
