//! The gateway's handshakes on a CPU-starved server, on loopback: every one of 256 concurrent
//! mTLS clients is served when the server's only thread is slower than the handshake budget a
//! fast host suggests. The gateway serves on one thread (a current-thread runtime), so on a slow
//! guest the handshakes queue for it; the nested krun host showed it (0 and 45 of 256 served, the
//! rest cut when the server's first flight went out after its old 10 s total handshake budget).
//!
//! The slow CPU is made deterministic: the server's signing key blocks its thread for
//! [`SIGN_COST`] per handshake, so the last of [`CLIENTS`] handshakes writes its first flight
//! ~`CLIENTS x SIGN_COST` after it was accepted whatever the host's speed (a slower host only
//! adds to it). Everything else is the production path: `tls::incoming`'s acceptor and
//! slowloris guard, tonic's server, and the production client (`connect_with_request_timeout`,
//! whose deadline here is a hang guard, and `health`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use openshell_gateway::tls::{self, PEER_IDLE_TIMEOUT};
use openshell_gateway::{connect_with_request_timeout, health, ClientBundle, ServingStatus};
use openshell_pki::Pki;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::{CertifiedKey, Signer, SigningKey, SingleCertAndKey};
use rustls::{RootCertStore, ServerConfig, SignatureAlgorithm, SignatureScheme};

const CLIENTS: usize = 256;
/// The server's CPU per handshake: `CLIENTS x SIGN_COST` (~20 s) is twice [`PEER_IDLE_TIMEOUT`],
/// so a budget on the handshake's wall time cuts the later half whatever its value's margin here.
const SIGN_COST: Duration = Duration::from_millis(80);
/// Each client's hang guard, not the property: a served client takes ~`CLIENTS x SIGN_COST`.
/// Under the e2e profile's terminate-after (300 s), so a client that is never served is named.
const HANG_GUARD: Duration = Duration::from_secs(200);

/// A signing key whose every signature holds the calling thread, as a slow CPU does.
#[derive(Debug)]
struct SlowKey(Arc<dyn SigningKey>);

#[derive(Debug)]
struct SlowSigner(Box<dyn Signer>);

impl SigningKey for SlowKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        self.0.choose_scheme(offered).map(|s| Box::new(SlowSigner(s)) as Box<dyn Signer>)
    }
    fn algorithm(&self) -> SignatureAlgorithm {
        self.0.algorithm()
    }
}

impl Signer for SlowSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        std::thread::sleep(SIGN_COST);
        self.0.sign(message)
    }
    fn scheme(&self) -> SignatureScheme {
        self.0.scheme()
    }
}

/// The production policy (`tls::server_config`: TLS 1.3, ALPN h2, client certificates from the CA)
/// with the slow key.
fn slow_server_config(pki: &Pki) -> Arc<ServerConfig> {
    let m = pki.server_material();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(m.client_ca_pem.as_bytes()) {
        roots.add(ca.unwrap()).unwrap();
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build().unwrap();
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(m.cert_pem.as_bytes()).collect::<Result<_, _>>().unwrap();
    let key = provider.key_provider.load_private_key(PrivateKeyDer::from_pem_slice(m.key_pem.as_bytes()).unwrap());
    let certified = CertifiedKey::new(chain, Arc::new(SlowKey(key.unwrap())));
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

#[test]
fn every_concurrent_client_is_served_by_a_starved_server() {
    let pki = Pki::generate("test").unwrap();
    let config = slow_server_config(&pki);
    // The server on its own current-thread runtime, as the gateway's main runs it, on the
    // gateway's own listener: with std's backlog (128) half of the 256 SYNs found the accept queue
    // full while the server's thread was busy, and their kernel retransmits (1, 3, 7... s apart)
    // kept a loaded CI run past nextest's 300 s.
    let server_rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let listener = {
        let _in_runtime = server_rt.enter();
        tls::listen("127.0.0.1:0".parse().unwrap()).unwrap()
    };
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::spawn(move || {
        server_rt.block_on(async move {
            let (mut reporter, health_service) = tonic_health::server::health_reporter();
            reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
            tonic::transport::Server::builder()
                .add_service(health_service)
                .serve_with_incoming_shutdown(tls::incoming(listener, config), async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
    });
    let b = pki.client_bundle();
    let bundle = ClientBundle { ca_pem: b.ca_pem, cert_pem: b.cert_pem, key_pem: b.key_pem };
    let endpoint = addr.to_string();
    let t = Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let results: Vec<Result<Duration, String>> = rt.block_on(async {
        let mut clients = tokio::task::JoinSet::new();
        for i in 0..CLIENTS {
            let (endpoint, bundle) = (endpoint.clone(), bundle.clone());
            clients.spawn(async move {
                let served = async {
                    let ch = connect_with_request_timeout(&endpoint, &bundle, "localhost", HANG_GUARD)
                        .await
                        .map_err(|e| e.to_string())?;
                    match health(&ch).await.map_err(|e| e.to_string())? {
                        ServingStatus::Serving => Ok(t.elapsed()),
                        other => Err(format!("health said {other:?}")),
                    }
                };
                match tokio::time::timeout(HANG_GUARD, served).await {
                    Ok(r) => r.map_err(|e| format!("client {i} after {:.1} s: {e}", t.elapsed().as_secs_f64())),
                    Err(_) => Err(format!("client {i}: no answer in {} s (hang guard)", HANG_GUARD.as_secs())),
                }
            });
        }
        let mut results = Vec::new();
        while let Some(joined) = clients.join_next().await {
            results.push(joined.unwrap());
        }
        results
    });
    // The clients' connections live in their runtime's background tasks: closed with it, or the
    // server's graceful shutdown waits for them forever (tonic's, unbounded here; the gateway's
    // own `serve` bounds it).
    drop(rt);
    let _ = stop.send(());
    server.join().unwrap();
    let slowest = results.iter().filter_map(|r| r.as_ref().ok()).max().copied().unwrap_or_default();
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    eprintln!(
        "{CLIENTS} clients, server CPU {} ms per handshake: {} served, the last after {:.1} s",
        SIGN_COST.as_millis(),
        CLIENTS - failed.len(),
        slowest.as_secs_f64()
    );
    // The starvation was real: the slowest client waited past the slowloris guard's window.
    assert!(
        failed.is_empty(),
        "{} of {CLIENTS} prompt clients were not served by a starved server (first: {})",
        failed.len(),
        failed[0]
    );
    assert!(
        slowest > PEER_IDLE_TIMEOUT,
        "the server was not starved past {} s ({:.1} s): the test no longer tests the guard",
        PEER_IDLE_TIMEOUT.as_secs(),
        slowest.as_secs_f64()
    );
}
