//! The host's client for the gateway: a mutually authenticated channel and
//! the two calls readiness needs. The bundle is plain PEM so callers can
//! fill it from the PKI crate, from files, or from anywhere else.

use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::proto::gateway_client::GatewayClient;
use crate::proto::{InfoReply, InfoRequest};

/// Bounds for readiness polling: a guest that is not up yet should fail a
/// probe quickly so the caller can retry, not hang in connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The host's credentials, as PEM: the CA the gateway's certificate chains
/// to, and the client certificate and key it presents.
#[derive(Clone, Debug)]
pub struct ClientBundle {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid gateway endpoint {endpoint:?}: {source}; expected host:port such as 127.0.0.1:30051")]
    Endpoint {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("connecting to the gateway at {endpoint}: {}; the guest may still be booting (retry), or the port forward / TLS material is wrong", causes(source))]
    Connect {
        endpoint: String,
        // Not `#[source]`: the message already carries the whole chain, which a reporter walking
        // sources would print twice.
        source: tonic::transport::Error,
    },
    #[error("gateway call {call} failed: {status}; if the status mentions certificates, the client bundle does not match the gateway's CA")]
    Rpc {
        call: &'static str,
        #[source]
        status: tonic::Status,
    },
    #[error("gateway health answered an unknown status {0}; the gateway is newer than this client")]
    UnknownStatus(i32),
}

/// `e` and its causes on one line: tonic's own message is only "transport error", while what a
/// user acts on (timed out, connection refused, reset by peer, a certificate verdict) is below it.
fn causes(e: &tonic::transport::Error) -> String {
    let mut text = e.to_string();
    let mut next = std::error::Error::source(e);
    while let Some(cause) = next {
        let line = cause.to_string();
        // hyper and io errors repeat their inner message; say each once.
        if !text.ends_with(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        next = cause.source();
    }
    text
}

/// Opens a TLS channel to `endpoint` (`host:port`, or a full `https://` URI),
/// verifying the server as `server_name` and presenting the bundle's client
/// certificate.
pub async fn connect(endpoint: &str, bundle: &ClientBundle, server_name: &str) -> Result<Channel, ClientError> {
    connect_with_request_timeout(endpoint, bundle, server_name, REQUEST_TIMEOUT).await
}

/// [`connect`] with each call's deadline `request` instead of 10 s: for callers whose deadline is a
/// hang guard (a load trial on a slow host), not a readiness probe's quick failure.
pub async fn connect_with_request_timeout(
    endpoint: &str,
    bundle: &ClientBundle,
    server_name: &str,
    request: Duration,
) -> Result<Channel, ClientError> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&bundle.ca_pem))
        .identity(Identity::from_pem(&bundle.cert_pem, &bundle.key_pem))
        .domain_name(server_name);
    open_channel(endpoint, Some(tls), request).await
}

/// A plaintext (h2c) channel to `endpoint`: for asking a workload's own gRPC health (a readiness
/// probe of a VM that is not the gateway), never for the gateway, which serves mTLS only.
pub async fn connect_plaintext(endpoint: &str) -> Result<Channel, ClientError> {
    open_channel(endpoint, None, REQUEST_TIMEOUT).await
}

/// One place that turns an endpoint and a TLS config (none: plaintext) into a connected channel
/// with our timeouts.
async fn open_channel(endpoint: &str, tls: Option<ClientTlsConfig>, request: Duration) -> Result<Channel, ClientError> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let uri = if endpoint.contains("://") { endpoint.to_string() } else { format!("{scheme}://{endpoint}") };
    let invalid = |source| ClientError::Endpoint { endpoint: endpoint.to_string(), source };
    let mut e = Endpoint::from_shared(uri).map_err(invalid)?;
    if let Some(tls) = tls {
        e = e.tls_config(tls).map_err(invalid)?;
    }
    e.connect_timeout(CONNECT_TIMEOUT)
        .timeout(request)
        .connect()
        .await
        .map_err(|source| ClientError::Connect { endpoint: endpoint.to_string(), source })
}

/// Health of the gateway as a whole (the "" service).
pub async fn health(channel: &Channel) -> Result<ServingStatus, ClientError> {
    let reply = HealthClient::new(channel.clone())
        .check(HealthCheckRequest { service: String::new() })
        .await
        .map_err(|status| ClientError::Rpc { call: "grpc.health.v1.Health/Check", status })?
        .into_inner();
    ServingStatus::try_from(reply.status).map_err(|_| ClientError::UnknownStatus(reply.status))
}

pub async fn info(channel: &Channel) -> Result<InfoReply, ClientError> {
    GatewayClient::new(channel.clone())
        .info(InfoRequest {})
        .await
        .map(tonic::Response::into_inner)
        .map_err(|status| ClientError::Rpc { call: "openshell.gateway.v1.Gateway/Info", status })
}
