//! End-to-end checks of the gateway's mutual-TLS contract on loopback: an
//! authenticated host gets answers, and every other kind of peer is turned
//! away (no certificate, a certificate from a foreign CA, TLS 1.2) by the
//! server's own alert, named exactly, right after the same server served the
//! host's client. A closed port or a silent close is never taken for a refusal.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use openshell_gateway::proto::gateway_client::GatewayClient;
use openshell_gateway::proto::InfoRequest;
use openshell_gateway::{
    connect, health, info, serve, ClientBundle, Ended, GatewayConfig, ServerMaterial, ServingStatus, TlsOutcome,
    TlsProbe, GATEWAY_SERVICE_NAME,
};
use openshell_pki::Pki;
use rustls::AlertDescription;
use tokio::sync::oneshot;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn bundle(ca_pem: &str, cert_pem: &str, key_pem: &str) -> ClientBundle {
    ClientBundle { ca_pem: ca_pem.into(), cert_pem: cert_pem.into(), key_pem: key_pem.into() }
}

fn server_material(pki: &Pki) -> ServerMaterial {
    let m = pki.server_material();
    ServerMaterial { client_ca_pem: m.client_ca_pem, cert_pem: m.cert_pem, key_pem: m.key_pem }
}

struct Running {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Ended>,
}

impl Running {
    /// Requests a stop and says how serving ended. The timeout is only a hang guard: the grace
    /// is 2 s, and how the server ended is what the callers assert.
    async fn stop_ended(mut self) -> Ended {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(60), self.task).await.expect("server did not shut down").unwrap()
    }

    /// Stops a server whose clients are all gone or let go at the stop request: it must end with
    /// every connection closed, not by running out its grace.
    async fn stop(self) {
        assert_eq!(self.stop_ended().await, Ended::Drained, "a connection outlived the stop request");
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
        .unwrap()
    });
    Running { addr, stop: Some(stop), task }
}

/// Probes `addr` off the runtime (the probe is blocking, the server runs on this runtime).
async fn probe(addr: SocketAddr, p: &TlsProbe) -> TlsOutcome {
    let p = p.clone();
    tokio::task::spawn_blocking(move || openshell_gateway::probe(&addr.to_string(), &p, Duration::from_secs(5)))
        .await
        .unwrap()
        .unwrap()
}

/// The host's own client, served by `server`: the proof that a refusal that follows comes from
/// the same, working endpoint (a dead server would "refuse" everyone).
async fn served(server: &Running, pki: &Pki) -> TlsProbe {
    let b = pki.client_bundle();
    let good = TlsProbe::with_bundle(&bundle(&b.ca_pem, &b.cert_pem, &b.key_pem), "localhost");
    let outcome = probe(server.addr, &good).await;
    assert!(
        matches!(outcome, TlsOutcome::Served { version: rustls::ProtocolVersion::TLSv1_3 }),
        "the host's own client was not served: {outcome}"
    );
    let ch = connect(&server.addr.to_string(), &bundle(&b.ca_pem, &b.cert_pem, &b.key_pem), "localhost").await.unwrap();
    assert_eq!(health(&ch).await.unwrap(), ServingStatus::Serving);
    good
}

/// `p` is refused by the server itself, with exactly `alert`.
async fn refused_with(server: &Running, p: &TlsProbe, alert: AlertDescription, after_handshake: bool) {
    let outcome = probe(server.addr, p).await;
    match outcome {
        TlsOutcome::Refused { alert: got, after_handshake: after } if got == alert && after == after_handshake => {}
        other => panic!("expected the server's {alert:?} alert (after handshake: {after_handshake}), got: {other}"),
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
            driver: None,
        },
    )
    .await;

    let b = pki.client_bundle();
    let client = bundle(&b.ca_pem, &b.cert_pem, &b.key_pem);
    for name in ["localhost", "127.0.0.1", "gateway"] {
        let ch = connect(&server.addr.to_string(), &client, name).await.unwrap();
        assert_eq!(health(&ch).await.unwrap(), ServingStatus::Serving, "{name}");
    }

    let ch = connect(&server.addr.to_string(), &client, "gateway").await.unwrap();
    let per_service = HealthClient::new(ch.clone())
        .check(HealthCheckRequest { service: GATEWAY_SERVICE_NAME.into() })
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

/// Info's `connections` counts what the gateway holds, handshakes still waiting among them, and
/// gives each back when it closes: the VM flood trial reads it as the gateway's own word that it
/// held more connections than init's soft open-files limit allows.
#[tokio::test]
async fn info_counts_the_connections_the_gateway_holds() {
    use tokio::io::AsyncWriteExt;
    let pki = Pki::generate("test").unwrap();
    let server = start(&pki, GatewayConfig::default()).await;
    let b = pki.client_bundle();
    let ch = connect(&server.addr.to_string(), &bundle(&b.ca_pem, &b.cert_pem, &b.key_pem), "localhost").await.unwrap();
    // Polled, as the counts follow the server's own tasks; the limit is a hang guard.
    let until = |want: u64| {
        let ch = ch.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(60), async {
                loop {
                    let reply = info(&ch).await.unwrap();
                    if reply.connections == want {
                        return reply;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await
            .unwrap_or_else(|_| panic!("Info never reported {want} connections"))
        }
    };
    assert_eq!(until(1).await.accept_failures, 0, "only the channel carrying Info");
    let mut peers = Vec::new();
    for _ in 0..3 {
        // The first byte of a TLS record, then silence: a handshake the gateway waits on.
        let mut peer = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        peer.write_all(&[0x16]).await.unwrap();
        peers.push(peer);
    }
    let reply = until(4).await;
    assert_eq!(reply.accept_failures, 0);
    assert!(reply.open_files_limit > 4, "{reply:?}");
    drop(peers);
    until(1).await;
    server.stop().await;
}

/// TLS 1.3 puts the client-certificate verdict after the client's Finished, so the alert arrives
/// once the client's handshake is done.
#[tokio::test]
async fn client_without_certificate_is_refused_with_certificate_required() {
    let pki = Pki::generate("test").unwrap();
    let server = start(&pki, GatewayConfig::default()).await;
    let good = served(&server, &pki).await;
    let anonymous = TlsProbe { identity: None, ..good };
    refused_with(&server, &anonymous, AlertDescription::CertificateRequired, true).await;
    // Refusing one client does not stop the server.
    served(&server, &pki).await;
    server.stop().await;
}

#[tokio::test]
async fn client_certificate_from_another_ca_is_refused_by_name_or_signature() {
    let pki = Pki::generate("test").unwrap();
    let foreign = Pki::generate("foreign").unwrap();
    let server = start(&pki, GatewayConfig::default()).await;
    let good = served(&server, &pki).await;

    // Trusts the real server, but presents a certificate the gateway's CA never signed.
    let impostor =
        TlsProbe { identity: Some((foreign.client_cert_pem.clone(), foreign.client_key_pem.clone())), ..good.clone() };
    refused_with(&server, &impostor, AlertDescription::UnknownCA, true).await;

    // A CA with the gateway CA's very name but another key: the verifier finds an issuer of
    // that name, and the signature check refuses (two instances of one name in two roots).
    let namesake = Pki::generate("test").unwrap();
    let forged = TlsProbe {
        identity: Some((namesake.client_cert_pem.clone(), namesake.client_key_pem.clone())),
        ..good.clone()
    };
    refused_with(&server, &forged, AlertDescription::DecryptError, true).await;

    // And the host refuses a gateway whose certificate its CA did not sign: this client ends the
    // handshake, before the server could judge anything.
    let wrong_trust = TlsProbe { server_ca_pem: foreign.ca_cert_pem.clone(), ..good };
    match probe(server.addr, &wrong_trust).await {
        TlsOutcome::ClientRejected(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)) => {}
        other => panic!("expected this client to reject the server's certificate (UnknownIssuer), got: {other}"),
    }
    server.stop().await;
}

#[tokio::test]
async fn tls12_is_refused_with_protocol_version_even_with_a_valid_certificate() {
    let pki = Pki::generate("test").unwrap();
    let server = start(&pki, GatewayConfig::default()).await;
    let good = served(&server, &pki).await;
    let tls12 = TlsProbe { versions: openshell_gateway::probe::TLS12, ..good };
    refused_with(&server, &tls12, AlertDescription::ProtocolVersion, false).await;
    server.stop().await;
}

/// What is not a refusal is not reported as one: a closed port, and a peer that accepts TCP and
/// closes without a word (what a dead guest behind a live forward looks like).
#[tokio::test]
async fn closed_port_and_silent_close_are_not_refusals() {
    let pki = Pki::generate("test").unwrap();
    let b = pki.client_bundle();
    let p = TlsProbe::with_bundle(&bundle(&b.ca_pem, &b.cert_pem, &b.key_pem), "localhost");

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    match probe(closed, &p).await {
        TlsOutcome::Io(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
        other => panic!("expected connection refused, got: {other}"),
    }

    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let closer = std::thread::spawn(move || {
        let (mut s, _) = silent.accept().unwrap();
        // Read the ClientHello first, so the close is a FIN rather than a reset.
        let _ = std::io::Read::read(&mut s, &mut [0u8; 4096]);
    });
    let outcome = probe(addr, &p).await;
    closer.join().unwrap();
    assert!(
        matches!(outcome, TlsOutcome::Closed { after_handshake: false, clean: false }),
        "expected a close without an alert, got: {outcome}"
    );
}

/// The real binary (`OPENSHELL_GATEWAY_BIN` points it at another build, e.g. the static one),
/// started with `args` after `--listen` and `--tls-dir`, and `before_exec` run in the child: the
/// child, its address from the readiness line, and its stderr past that line.
fn spawn_binary(
    tls_dir: &std::path::Path,
    args: &[&std::ffi::OsStr],
    before_exec: impl FnMut() -> std::io::Result<()> + Send + Sync + 'static,
) -> (std::process::Child, String, BufReader<std::process::ChildStderr>) {
    use std::os::unix::process::CommandExt;
    // Lets the static guest build be checked with the same tests.
    let bin =
        std::env::var_os("OPENSHELL_GATEWAY_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_openshell-gateway").into());
    let mut cmd = Command::new(bin);
    cmd.arg("--listen=127.0.0.1:0").arg("--tls-dir").arg(tls_dir).args(args);
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    // SAFETY: the callers' `before_exec` only makes system calls (no allocation, no locks), as
    // the forked child of a threaded process may.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(before_exec)
    };
    let mut child = cmd.spawn().unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    // A hang guard: the line comes in milliseconds.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(stderr.read_line(&mut line).map(|_| (line, stderr)));
    });
    let (line, stderr) = rx.recv_timeout(Duration::from_secs(20)).expect("no readiness line").unwrap();
    // `openshell-gateway: [N ms] listening on ADDR`, the boot timeline's format.
    let addr = line
        .trim()
        .strip_prefix("openshell-gateway: [")
        .and_then(|l| l.split_once(" ms] listening on "))
        .map(|(_, addr)| addr.to_owned())
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    (child, addr, stderr)
}

/// The real binary: flags, the readiness line on stderr, and a served Info.
#[tokio::test]
async fn binary_announces_and_serves() {
    let pki = Pki::generate("bin").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tls_dir = dir.path().join("tls");
    pki.write_server_material(&tls_dir).unwrap();
    let rootfs_digest = dir.path().join("rootfs.sha256");
    std::fs::write(&rootfs_digest, "cd".repeat(32)).unwrap();
    let (mut child, addr, _stderr) =
        spawn_binary(&tls_dir, &["--rootfs-digest-file".as_ref(), rootfs_digest.as_os_str()], || Ok(()));
    let addr = addr.as_str();

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

/// The real binary out of descriptors: held at a hard open-files limit of `LIMIT` (so its raise
/// to the hard limit cannot help), peers that never finish a handshake make `accept` fail
/// (EMFILE). Once they close, the accept loop must still be there: a new client is served, over
/// a new connection. The VM flood trial cannot show this, as there the raise keeps the gateway
/// from running out; here it is the only defence left.
#[tokio::test]
async fn binary_accepts_again_after_running_out_of_descriptors() {
    use tokio::io::AsyncWriteExt;
    const LIMIT: u64 = 64;
    let pki = Pki::generate("bin").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tls_dir = dir.path().join("tls");
    pki.write_server_material(&tls_dir).unwrap();
    let (mut child, addr, _stderr) = spawn_binary(&tls_dir, &[], || {
        nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, LIMIT, LIMIT).map_err(Into::into)
    });
    let b = pki.client_bundle();
    let b = bundle(&b.ca_pem, &b.cert_pem, &b.key_pem);
    let result = async {
        // Opened before the flood, so Info is answered while the gateway is out of descriptors.
        let ch = connect(&addr, &b, "gateway").await.map_err(|e| e.to_string())?;
        let before = info(&ch).await.map_err(|e| e.to_string())?;
        if (before.open_files_limit, before.accept_failures) != (LIMIT, 0) {
            return Err(format!("before the flood: {before:?}"));
        }
        // Twice the limit: more peers than the gateway can hold descriptors for, each sending the
        // first byte of a TLS record and then nothing (a handshake the gateway waits on).
        let mut peers = Vec::new();
        for i in 0..2 * LIMIT {
            let mut peer = tokio::net::TcpStream::connect(&addr).await.map_err(|e| format!("peer {i}: {e}"))?;
            peer.write_all(&[0x16]).await.map_err(|e| format!("peer {i}: {e}"))?;
            peers.push(peer);
        }
        // Polled, as the count follows the gateway's accept loop; the limit is a hang guard (the
        // slowloris guard frees descriptors after 10 s, and accept then fails again).
        let out = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                let reply = info(&ch).await.map_err(|e| e.to_string())?;
                if reply.accept_failures > 0 {
                    return Ok::<_, String>(reply);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .map_err(|_| format!("with {} peers and an open-files limit of {LIMIT}, accept never failed", peers.len()))??;
        drop(peers);
        // A new connection, which only a live accept loop takes; the timeout is a hang guard.
        let served = tokio::time::timeout(Duration::from_secs(60), async {
            let fresh = connect(&addr, &b, "gateway").await.map_err(|e| e.to_string())?;
            health(&fresh).await.map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|_| Err("no answer within 60 s (hang guard)".into()));
        Ok((out, served))
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let (out, served) = result.unwrap();
    assert_eq!(
        served,
        Ok(ServingStatus::Serving),
        "after {} failed accepts with {} connections held, a new client",
        out.accept_failures,
        out.connections
    );
}

/// A failed connect says why: tonic's own message is only "transport error", and a user told
/// that cannot tell a closed port from a reset or a timeout.
#[tokio::test]
async fn a_connect_error_names_its_cause() {
    let pki = Pki::generate("test").unwrap();
    let b = pki.client_bundle();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let err = connect(&closed.to_string(), &bundle(&b.ca_pem, &b.cert_pem, &b.key_pem), "localhost")
        .await
        .expect_err("nothing listens on a port just released");
    let text = err.to_string();
    assert!(text.contains("Connection refused"), "the cause is missing: {text}");
    assert_eq!(text.matches("Connection refused").count(), 1, "the cause is said more than once: {text}");
}

/// A client that completed its mutual-TLS handshake and then says nothing (no HTTP/2 preface)
/// holds one of the server's connections open. A stop request must still end the server: graceful
/// shutdown waits for open connections, so without a bounded grace this client would keep the
/// gateway up until init's SIGKILL (a foreground `vm run` stopped by Ctrl-C then exits 137).
#[tokio::test]
async fn a_silent_authenticated_connection_does_not_hold_a_stop_request_hostage() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let pki = Pki::generate("localhost").unwrap();
    let server = start(&pki, GatewayConfig::default()).await;
    served(&server, &pki).await;
    let b = pki.client_bundle();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(b.ca_pem.as_bytes()).unwrap()).unwrap();
    let config =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(b.cert_pem.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(b.key_pem.as_bytes()).unwrap(),
            )
            .unwrap();
    let addr = server.addr;
    let held = tokio::task::spawn_blocking(move || {
        let mut tcp = std::net::TcpStream::connect(addr).unwrap();
        let mut conn =
            rustls::ClientConnection::new(std::sync::Arc::new(config), ServerName::try_from("localhost").unwrap())
                .unwrap();
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp).unwrap();
        }
        // Let the server read the client's Finished and hand the stream to the HTTP/2 layer.
        conn.complete_io(&mut tcp).ok();
        (tcp, conn)
    })
    .await
    .unwrap();
    // The server ends because its grace ran out with this one connection still open (the host's
    // probe and channel from `served` are closed by then), not because the client let go: it
    // holds the connection until after serving ended.
    assert_eq!(server.stop_ended().await, Ended::GraceExpired { open: 1 });
    drop(held);
}
