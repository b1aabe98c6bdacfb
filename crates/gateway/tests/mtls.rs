//! End-to-end checks of the gateway's mutual-TLS contract on loopback: an
//! authenticated host gets answers, and every other kind of peer is turned
//! away (no certificate, a certificate from a foreign CA, TLS 1.2), both
//! in-process and through the real binary.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use openshell_gateway::proto::gateway_client::GatewayClient;
use openshell_gateway::proto::InfoRequest;
use openshell_gateway::{
    connect, health, info, serve, ClientBundle, GatewayConfig, ServerMaterial, ServingStatus,
    GATEWAY_SERVICE_NAME,
};
use openshell_pki::Pki;
use tokio::sync::oneshot;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn bundle(ca_pem: &str, cert_pem: &str, key_pem: &str) -> ClientBundle {
    ClientBundle {
        ca_pem: ca_pem.into(),
        cert_pem: cert_pem.into(),
        key_pem: key_pem.into(),
    }
}

fn server_material(pki: &Pki) -> ServerMaterial {
    let m = pki.server_material();
    ServerMaterial {
        client_ca_pem: m.client_ca_pem,
        cert_pem: m.cert_pem,
        key_pem: m.key_pem,
    }
}

struct Running {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("server did not shut down")
            .unwrap();
    }
}

async fn start(pki: &Pki, config: GatewayConfig) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let material = server_material(pki);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        serve(listener, &material, config, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    Running {
        addr,
        stop: Some(stop),
        task,
    }
}

/// A peer is rejected if either the handshake-level connect or the first
/// call fails: with TLS 1.3 the client finishes its side of the handshake
/// before the server has judged the client certificate, so the refusal may
/// only surface on the first request.
async fn rejected(channel: Result<Channel, impl std::fmt::Debug>) -> bool {
    match channel {
        Err(_) => true,
        Ok(ch) => health(&ch).await.is_err(),
    }
}

#[tokio::test]
async fn authenticated_client_gets_health_and_info() {
    let pki = Pki::generate("test").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kernel_digest = dir.path().join("kernel.sha256");
    std::fs::write(&kernel_digest, format!("{}  vmlinux\n", "ab".repeat(32))).unwrap();
    let server = start(
        &pki,
        GatewayConfig {
            kernel_digest_file: Some(kernel_digest),
            rootfs_digest_file: Some(dir.path().join("absent")),
        },
    )
    .await;

    let b = pki.client_bundle();
    let client = bundle(&b.ca_pem, &b.cert_pem, &b.key_pem);
    for name in ["localhost", "127.0.0.1", "gateway"] {
        let ch = connect(&server.addr.to_string(), &client, name)
            .await
            .unwrap();
        assert_eq!(health(&ch).await.unwrap(), ServingStatus::Serving, "{name}");
    }

    let ch = connect(&server.addr.to_string(), &client, "gateway")
        .await
        .unwrap();
    let per_service = HealthClient::new(ch.clone())
        .check(HealthCheckRequest {
            service: GATEWAY_SERVICE_NAME.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(per_service.status, ServingStatus::Serving as i32);

    let reply = info(&ch).await.unwrap();
    assert_eq!(reply.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(reply.kernel_sha256, "ab".repeat(32));
    assert_eq!(reply.rootfs_sha256, "");
    assert!(!reply.kernel_release.is_empty());
    assert_eq!(reply.boot_id.len(), 36, "{:?}", reply.boot_id);
    assert!(reply.vcpus >= 1 && reply.memory_kib > 0 && reply.uptime_ms > 0);

    server.stop().await;
}

#[tokio::test]
async fn client_without_certificate_is_rejected() {
    let pki = Pki::generate("test").unwrap();
    let server = start(&pki, GatewayConfig::default()).await;

    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca_cert_pem))
        .domain_name("localhost");
    let channel = Endpoint::from_shared(format!("https://{}", server.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await;
    assert!(
        rejected(channel).await,
        "a client without a certificate was served"
    );

    // The same server still serves an authenticated client afterwards.
    let b = pki.client_bundle();
    let ch = connect(
        &server.addr.to_string(),
        &bundle(&b.ca_pem, &b.cert_pem, &b.key_pem),
        "localhost",
    )
    .await
    .unwrap();
    assert_eq!(health(&ch).await.unwrap(), ServingStatus::Serving);
    server.stop().await;
}

#[tokio::test]
async fn client_certificate_from_foreign_ca_is_rejected() {
    let pki = Pki::generate("test").unwrap();
    let foreign = Pki::generate("foreign").unwrap();
    let server = start(&pki, GatewayConfig::default()).await;

    // Trusts the real server, but presents a certificate the gateway's CA never signed.
    let impostor = bundle(
        &pki.ca_cert_pem,
        &foreign.client_cert_pem,
        &foreign.client_key_pem,
    );
    let channel = connect(&server.addr.to_string(), &impostor, "localhost").await;
    assert!(rejected(channel).await, "a foreign-CA client was served");

    // And the host refuses a gateway whose certificate its CA did not sign.
    let fb = foreign.client_bundle();
    let wrong_trust = bundle(&fb.ca_pem, &pki.client_cert_pem, &pki.client_key_pem);
    let channel = connect(&server.addr.to_string(), &wrong_trust, "localhost").await;
    assert!(
        rejected(channel).await,
        "client accepted a server from another CA"
    );

    server.stop().await;
}

#[tokio::test]
async fn tls12_is_refused_even_with_a_valid_certificate() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

    let pki = Pki::generate("test").unwrap();
    let server = start(&pki, GatewayConfig::default()).await;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.ca_cert_pem.as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_slice(pki.client_cert_pem.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(pki.client_key_pem.as_bytes()).unwrap(),
        )
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let result = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await;
    assert!(result.is_err(), "TLS 1.2 handshake succeeded");

    server.stop().await;
}

/// The real binary: flags, the readiness line on stderr, and a served Info.
/// `OPENSHELL_GATEWAY_BIN` points it at another build (e.g. the static one).
#[tokio::test]
async fn binary_announces_and_serves() {
    let pki = Pki::generate("bin").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tls_dir = dir.path().join("tls");
    pki.write_server_material(&tls_dir).unwrap();
    let rootfs_digest = dir.path().join("rootfs.sha256");
    std::fs::write(&rootfs_digest, "cd".repeat(32)).unwrap();

    // Lets the static guest build be checked with the same test.
    let bin = std::env::var_os("OPENSHELL_GATEWAY_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_openshell-gateway").into());
    let mut child = Command::new(bin)
        .arg("--listen=127.0.0.1:0")
        .arg("--tls-dir")
        .arg(&tls_dir)
        .arg("--rootfs-digest-file")
        .arg(&rootfs_digest)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let read =
        tokio::task::spawn_blocking(move || stderr.read_line(&mut line).map(|_| (line, stderr)));
    let (line, _stderr) = tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .expect("no readiness line")
        .unwrap()
        .unwrap();
    // `openshell-gateway: [N ms] listening on ADDR`, the boot timeline's format.
    let addr = line
        .trim()
        .strip_prefix("openshell-gateway: [")
        .and_then(|l| l.split_once(" ms] listening on "))
        .map(|(_, addr)| addr)
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));

    let b = pki.client_bundle();
    let result = async {
        let ch = connect(addr, &bundle(&b.ca_pem, &b.cert_pem, &b.key_pem), "gateway").await?;
        let status = health(&ch).await?;
        let reply = GatewayClient::new(ch).info(InfoRequest {}).await;
        Ok::<_, openshell_gateway::ClientError>((status, reply))
    }
    .await;

    let _ = child.kill();
    let _ = child.wait();
    let (status, reply) = result.unwrap();
    assert_eq!(status, ServingStatus::Serving);
    assert_eq!(reply.unwrap().into_inner().rootfs_sha256, "cd".repeat(32));
}
