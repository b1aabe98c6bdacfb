//! Server-side TLS policy: TLS 1.3 only, ALPN h2, and a client certificate
//! chaining to the configured client CA is required before any byte of gRPC
//! is read. Handshakes run off the accept loop so a slow or hostile peer
//! cannot stall other connections, and only authenticated streams reach
//! tonic. We use our own tokio-rustls acceptor rather than tonic's
//! `ServerTlsConfig` because the latter cannot restrict protocol versions.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Files read from the gateway's `--tls-dir`.
pub const SERVER_CERT_FILE: &str = "server.crt";
pub const SERVER_KEY_FILE: &str = "server.key";
pub const CLIENT_CA_FILE: &str = "ca.crt";

/// A peer that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}; pass --tls-dir pointing at the directory the host wrote server.crt, server.key and ca.crt into")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("parsing {what}: {detail}; regenerate the server material on the host")]
    Pem { what: &'static str, detail: String },
    #[error("building the TLS configuration: {0}; the certificate and key probably do not match, regenerate the server material")]
    Config(#[from] rustls::Error),
    #[error(
        "building the client-certificate verifier: {0}; the client CA is unusable, regenerate the server material"
    )]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// What the server needs, as PEM: its certificate chain and key, and the CA
/// that client certificates must chain to.
#[derive(Clone, Debug)]
pub struct ServerMaterial {
    pub client_ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl ServerMaterial {
    /// Reads `server.crt`, `server.key` and `ca.crt` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| TlsError::Read { path, source })
        };
        Ok(ServerMaterial {
            client_ca_pem: read(CLIENT_CA_FILE)?,
            cert_pem: read(SERVER_CERT_FILE)?,
            key_pem: read(SERVER_KEY_FILE)?,
        })
    }
}

fn certs(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem { what, detail: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::Pem { what, detail: "no CERTIFICATE block".into() });
    }
    Ok(certs)
}

/// The rustls configuration the gateway serves with.
pub fn server_config(material: &ServerMaterial) -> Result<Arc<ServerConfig>, TlsError> {
    // Pinned to ring explicitly so the process-wide default provider (which
    // some other dependency could set to aws-lc-rs) never matters.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for ca in certs(&material.client_ca_pem, "the client CA (ca.crt)")? {
        roots.add(ca)?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    let key = PrivateKeyDer::from_pem_slice(material.key_pem.as_bytes())
        .map_err(|e| TlsError::Pem { what: "the server key (server.key)", detail: e.to_string() })?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&material.cert_pem, "the server certificate (server.crt)")?, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Authenticated connections, ready for `serve_with_incoming`. Dropping it
/// stops the accept loop.
pub struct TlsIncoming {
    rx: mpsc::Receiver<io::Result<TlsStream<TcpStream>>>,
    accept_loop: JoinHandle<()>,
}

impl Drop for TlsIncoming {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

impl tokio_stream::Stream for TlsIncoming {
    type Item = io::Result<TlsStream<TcpStream>>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

/// Accepts on `listener` and yields only connections whose TLS handshake,
/// including client-certificate verification, succeeded.
pub fn incoming(listener: TcpListener, config: Arc<ServerConfig>) -> TlsIncoming {
    let (tx, rx) = mpsc::channel(16);
    let acceptor = TlsAcceptor::from(config);
    let accept_loop = tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    // Usually EMFILE or a connection reset before accept;
                    // backing off beats a hot loop, and the listener stays usable.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Some(tls) = handshake(&acceptor, tcp, peer).await {
                    let _ = tx.send(Ok(tls)).await;
                }
            });
        }
    });
    TlsIncoming { rx, accept_loop }
}

async fn handshake(acceptor: &TlsAcceptor, tcp: TcpStream, peer: SocketAddr) -> Option<TlsStream<TcpStream>> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(e)) => {
            tracing::info!("rejected TLS handshake from {peer}: {e}");
            None
        }
        Err(_) => {
            tracing::info!("TLS handshake from {peer} timed out");
            None
        }
    }
}
