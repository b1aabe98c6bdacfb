//! A TLS probe that says *who* ended a connection and how: the one way the host tells a gateway
//! that serves a client from one that refuses it, and a refusal from a dead port.
//!
//! A gRPC client cannot tell these apart: a refused client certificate, a closed port, a reset and
//! a timeout all come back as "transport error". This probe does the handshake itself (a sync
//! [`rustls::ClientConnection`] over a [`TcpStream`] with timeouts) and then keeps reading until the
//! server speaks, because in TLS 1.3 the server judges the client's certificate only after the
//! client's Finished: the client's handshake is complete before the verdict arrives. What the
//! server says is the [`TlsOutcome`]:
//! - the gateway (tonic over h2) serves a client by sending its HTTP/2 SETTINGS right after the
//!   handshake, unasked: application data means [`TlsOutcome::Served`];
//! - it refuses by sending a fatal alert and closing: [`TlsOutcome::Refused`] with the alert.
//!   Observed against `tls.rs` (rustls `WebPkiClientVerifier`, TLS 1.3 only): no client
//!   certificate gets `CertificateRequired`, a certificate from another CA gets `UnknownCA`,
//!   a TLS 1.2-only client gets `ProtocolVersion` (during the handshake);
//! - anything else is not a refusal: a close without an alert, a reset, a timeout, a refused TCP
//!   connection, or this client distrusting the server.
//!
//! The probe sends nothing after its Finished. A server that closes a socket with unread bytes in
//! its receive buffer sends a TCP reset, and the reset can destroy the alert before the client
//! reads it; with nothing unread, the server's close is a FIN behind its alert.

use std::io::{self, Read};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
/// The outcome's vocabulary, so callers need no rustls of their own.
pub use rustls::{AlertDescription, CertificateError, Error as RustlsError, ProtocolVersion};
use rustls::{ClientConfig, ClientConnection, RootCertStore, SupportedProtocolVersion};

/// What a probe presents: the CA it trusts for the server, its client identity if any, the TLS
/// versions it offers and the name it expects the server's certificate to carry.
#[derive(Clone, Debug)]
pub struct TlsProbe {
    pub server_ca_pem: String,
    /// Client certificate chain and key, as PEM; `None` presents no certificate.
    pub identity: Option<(String, String)>,
    pub versions: &'static [&'static SupportedProtocolVersion],
    pub server_name: String,
}

/// Only TLS 1.3, what the gateway serves.
pub const TLS13: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];
/// Only TLS 1.2, what the gateway must refuse.
pub const TLS12: &[&SupportedProtocolVersion] = &[&rustls::version::TLS12];

/// How the server treated the probe.
#[derive(Debug)]
pub enum TlsOutcome {
    /// The handshake completed and the server then sent application data: it serves this client.
    Served { version: ProtocolVersion },
    /// The server sent a fatal alert. `after_handshake`: the client's side of the handshake had
    /// completed (TLS 1.3's client-certificate verdict arrives then).
    Refused { alert: AlertDescription, after_handshake: bool },
    /// The server closed the connection without an alert (`clean`: after a close_notify).
    Closed { after_handshake: bool, clean: bool },
    /// This client ended the handshake: it does not accept the server (e.g. its certificate
    /// does not chain to the trusted CA). The server's own checks never ran.
    ClientRejected(rustls::Error),
    /// TCP or I/O failed: connection refused, reset, or no answer within the timeout.
    Io(io::Error),
}

impl TlsOutcome {
    /// The alert, when the server refused with one.
    pub fn alert(&self) -> Option<AlertDescription> {
        match self {
            TlsOutcome::Refused { alert, .. } => Some(*alert),
            _ => None,
        }
    }
}

impl std::fmt::Display for TlsOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let when = |after: &bool| if *after { "after the handshake" } else { "during the handshake" };
        match self {
            TlsOutcome::Served { version } => write!(f, "served ({version:?})"),
            TlsOutcome::Refused { alert, after_handshake } => {
                write!(f, "refused with the alert {alert:?} {}", when(after_handshake))
            }
            TlsOutcome::Closed { after_handshake, clean } => write!(
                f,
                "closed by the server without an alert {}{}",
                when(after_handshake),
                if *clean { " (close_notify)" } else { "" }
            ),
            TlsOutcome::ClientRejected(e) => write!(f, "this client ended the handshake: {e}"),
            TlsOutcome::Io(e) => write!(f, "I/O failed: {e}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("probe endpoint {endpoint:?}: {detail}; expected host:port such as 127.0.0.1:30051")]
    Endpoint { endpoint: String, detail: String },
    #[error("probe TLS material: {0}; pass the PEM the PKI wrote (ca.crt, tls.crt, tls.key)")]
    Material(String),
}

impl TlsProbe {
    /// What a host client presents: it trusts the bundle's CA and presents its certificate, over
    /// TLS 1.3. Change a field to make an impostor (`identity: None`, a foreign identity, TLS 1.2).
    pub fn with_bundle(bundle: &crate::ClientBundle, server_name: &str) -> TlsProbe {
        TlsProbe {
            server_ca_pem: bundle.ca_pem.clone(),
            identity: Some((bundle.cert_pem.clone(), bundle.key_pem.clone())),
            versions: TLS13,
            server_name: server_name.to_owned(),
        }
    }

    fn client_config(&self) -> Result<Arc<ClientConfig>, ProbeError> {
        let material = |what: &str, e: &dyn std::fmt::Display| ProbeError::Material(format!("{what}: {e}"));
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(self.server_ca_pem.as_bytes()) {
            roots.add(ca.map_err(|e| material("server CA", &e))?).map_err(|e| material("server CA", &e))?;
        }
        if roots.is_empty() {
            return Err(ProbeError::Material("server CA: no CERTIFICATE block".into()));
        }
        // ring, as the server pins it, so a process-wide default provider never matters.
        let builder = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(self.versions)
            .map_err(|e| material("protocol versions", &e))?
            .with_root_certificates(roots);
        let mut config = match &self.identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| material("client certificate", &e))?;
                let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| material("client key", &e))?;
                builder.with_client_auth_cert(chain, key).map_err(|e| material("client identity", &e))?
            }
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

/// Connects to `endpoint`, handshakes as `p` describes and reads until the server speaks or
/// ends the connection; each connect, read and write is bounded by `timeout`. Errs only on bad
/// input (endpoint, PEM); every network result is a [`TlsOutcome`].
pub fn probe(endpoint: &str, p: &TlsProbe, timeout: Duration) -> Result<TlsOutcome, ProbeError> {
    let config = p.client_config()?;
    let name = ServerName::try_from(p.server_name.clone())
        .map_err(|e| ProbeError::Material(format!("server name {:?}: {e}", p.server_name)))?;
    let addr = resolve(endpoint)?;
    let tcp = match TcpStream::connect_timeout(&addr, timeout) {
        Ok(tcp) => tcp,
        Err(e) => return Ok(TlsOutcome::Io(e)),
    };
    if let Err(e) = tcp.set_read_timeout(Some(timeout)).and_then(|()| tcp.set_write_timeout(Some(timeout))) {
        return Ok(TlsOutcome::Io(e));
    }
    let conn = ClientConnection::new(config, name).map_err(|e| ProbeError::Material(e.to_string()))?;
    Ok(exchange(conn, tcp))
}

fn resolve(endpoint: &str) -> Result<SocketAddr, ProbeError> {
    let err = |detail: String| ProbeError::Endpoint { endpoint: endpoint.to_owned(), detail };
    endpoint
        .to_socket_addrs()
        .map_err(|e| err(e.to_string()))?
        .next()
        .ok_or_else(|| err("resolves to no address".into()))
}

fn exchange(mut conn: ClientConnection, mut tcp: TcpStream) -> TlsOutcome {
    let mut buf = [0u8; 512];
    loop {
        while conn.wants_write() {
            if let Err(e) = conn.write_tls(&mut tcp) {
                return TlsOutcome::Io(e);
            }
        }
        let after_handshake = !conn.is_handshaking();
        if after_handshake {
            match conn.reader().read(&mut buf) {
                Ok(n) if n > 0 => {
                    let version = conn.protocol_version().expect("known once the handshake is done");
                    return TlsOutcome::Served { version };
                }
                Ok(_) => return TlsOutcome::Closed { after_handshake, clean: true },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return TlsOutcome::Io(e),
            }
        }
        match conn.read_tls(&mut tcp) {
            Ok(0) => return TlsOutcome::Closed { after_handshake, clean: false },
            Ok(_) => {}
            Err(e) => return TlsOutcome::Io(e),
        }
        match conn.process_new_packets() {
            Ok(_) => {}
            Err(rustls::Error::AlertReceived(alert)) => return TlsOutcome::Refused { alert, after_handshake },
            Err(e) => {
                // Our own verdict (e.g. an untrusted server certificate): tell the server, as a
                // TLS client does, then report that the server was never the one to refuse.
                let _ = conn.write_tls(&mut tcp);
                return TlsOutcome::ClientRejected(e);
            }
        }
    }
}
