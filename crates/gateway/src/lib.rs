//! The gateway control plane: a small gRPC service that runs inside the
//! microVM and tells the host that the guest is up and what it is running.
//! This crate owns the wire contract (`proto/gateway.proto`), the server
//! (mutual TLS 1.3, client certificates required), the host-side client
//! used for readiness checks, and the TLS probe that tells a refusal from a
//! dead port. It does not generate certificates; PEM material
//! comes in as plain strings so the PKI crate stays independent of gRPC.

pub mod client;
pub mod openshell;
pub mod probe;
pub mod sandboxes;
pub mod server;
pub mod sysinfo;
pub mod tls;

/// Generated messages, client and server for `openshell.gateway.v1`, and for the part of
/// OpenShell's `openshell.v1` this gateway serves (`proto::openshell`).
pub mod proto {
    tonic::include_proto!("openshell.gateway.v1");

    /// OpenShell's shared data model (`openshell.datamodel.v1`), the part the sandbox calls carry.
    pub mod datamodel {
        pub mod v1 {
            tonic::include_proto!("openshell.datamodel.v1");
        }
    }

    pub mod openshell {
        tonic::include_proto!("openshell.v1");

        /// The compiled `proto/openshell.proto` (a `FileDescriptorSet`), for comparing it with the
        /// OpenShell SDK's own descriptors.
        pub const DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("openshell_descriptor");
    }
}

pub use client::{connect, connect_plaintext, connect_with_request_timeout, health, info, ClientBundle, ClientError};
pub use probe::{probe, ProbeError, TlsOutcome, TlsProbe};
pub use proto::InfoReply;
pub use server::{serve, Ended, GatewayConfig, GatewayService, ServeError};
pub use tls::{ServerMaterial, TlsError};
pub use tonic_health::pb::health_check_response::ServingStatus;

/// Fully qualified name of the Gateway service, as health checks name it.
pub const GATEWAY_SERVICE_NAME: &str = "openshell.gateway.v1.Gateway";
