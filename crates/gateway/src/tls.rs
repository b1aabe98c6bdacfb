//! Server-side TLS policy: TLS 1.3 only, ALPN h2, and a client certificate
//! chaining to the configured client CA is required before any byte of gRPC
//! is read. Handshakes run off the accept loop so a slow or hostile peer
//! cannot stall other connections, and only authenticated streams reach
//! tonic. We use our own tokio-rustls acceptor rather than tonic's
//! `ServerTlsConfig` because the latter cannot restrict protocol versions.
//!
//! It also owns the listener's shape under a flood of unauthenticated peers: the listen backlog
//! ([`listen`]) and how refused handshakes are logged ([`RefusalLog`]).

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::Connected;

/// Files read from the gateway's `--tls-dir`.
pub const SERVER_CERT_FILE: &str = "server.crt";
pub const SERVER_KEY_FILE: &str = "server.key";
pub const CLIENT_CA_FILE: &str = "ca.crt";

/// A handshaking peer that has let this long pass since the handshake last moved (a byte read
/// from it, or a byte of ours written to it) is dropped: the slowloris guard. It bounds the peer's
/// silence, not the handshake's wall time, because the wall time is mostly the server's: the
/// gateway serves on one thread, and 256 concurrent handshakes on a guest CPU emulated twice (the
/// nested krun host) queue for that thread longer than any fixed budget a fast host suggests. A
/// total budget of 10 s cut every handshake whose first flight the server wrote after 10 s, the
/// client having done nothing wrong (`tests/starved.rs` reproduces it on loopback).
pub const PEER_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// The listen backlog. The guest kernel has no SYN cookies, so a SYN that finds the listener's
/// request queue full is dropped, and passt sends the guest one SYN per host connection and never
/// retransmits it: with tokio's default backlog (128, std's), 1000 idle host connections left 129
/// half-open in the guest and 871 SYNs dropped (`TCPReqQFullDrop`), the host client's among them,
/// until passt gave up on them 10 s later. The kernel caps this at `net.core.somaxconn` (4096).
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds `addr` with [`LISTEN_BACKLOG`] (and `SO_REUSEADDR`, as tokio's own `bind` sets it).
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// How many refused handshakes each [`REFUSAL_WINDOW`] logs one by one; the rest are counted.
const REFUSALS_LOGGED_PER_WINDOW: u32 = 5;
const REFUSAL_WINDOW: Duration = Duration::from_secs(10);

/// Logging of refused and timed-out handshakes, bounded: any local process can open connections to
/// the forward, and one INFO line each let it grow the console log without limit. The first
/// [`REFUSALS_LOGGED_PER_WINDOW`] of each window are logged with their peer and reason, the rest
/// only counted, and the count is logged as one summary line when the window ends.
#[derive(Debug)]
pub struct RefusalLog {
    window_start: Instant,
    logged: u32,
    suppressed: u64,
}

impl RefusalLog {
    pub fn new(now: Instant) -> RefusalLog {
        RefusalLog { window_start: now, logged: 0, suppressed: 0 }
    }

    /// One refused handshake at `now`: whether to log it on its own line. A refusal after the
    /// window ended starts a new one (its summary, if any, is [`RefusalLog::summary`]'s to take).
    pub fn refused(&mut self, now: Instant) -> bool {
        if now.duration_since(self.window_start) >= REFUSAL_WINDOW && self.suppressed == 0 {
            self.window_start = now;
            self.logged = 0;
        }
        if self.logged < REFUSALS_LOGGED_PER_WINDOW {
            self.logged += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    /// At `now`: once the window has ended, how many refusals it left unlogged (`None` when
    /// none), and a new window starts.
    pub fn summary(&mut self, now: Instant) -> Option<u64> {
        if now.duration_since(self.window_start) < REFUSAL_WINDOW {
            return None;
        }
        let suppressed = std::mem::take(&mut self.suppressed);
        self.window_start = now;
        self.logged = 0;
        (suppressed > 0).then_some(suppressed)
    }
}

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
    rx: mpsc::Receiver<io::Result<TlsStream<Watched>>>,
    accept_loop: JoinHandle<()>,
    open: OpenConnections,
    listener: ListenerStats,
}

impl TlsIncoming {
    /// The count of authenticated connections handed to the server and not yet dropped; it
    /// outlives this stream, so a caller can still read it once serving ended.
    pub fn open_connections(&self) -> OpenConnections {
        self.open.clone()
    }

    /// What the accept loop has seen, for Info.
    pub fn listener_stats(&self) -> ListenerStats {
        self.listener.clone()
    }
}

/// How many connections are open in some stage: each one counts from the moment it entered the
/// stage until it is dropped. Authenticated connections are counted so that `serve` tells a
/// shutdown that drained every connection from one whose grace ran out while clients still held
/// theirs; accepted ones, for [`ListenerStats`].
#[derive(Clone, Debug, Default)]
pub struct OpenConnections(Arc<AtomicUsize>);

impl OpenConnections {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    fn enter(&self) -> OpenGuard {
        self.0.fetch_add(1, Ordering::SeqCst);
        OpenGuard(self.0.clone())
    }
}

/// The gateway's load as its accept loop sees it, reported by Info: under a flood of peers that
/// never finish a handshake, it is the gateway's own word on how many it holds (each one a
/// descriptor, which the open-files limit bounds) and on whether `accept` ever failed.
#[derive(Clone, Debug, Default)]
pub struct ListenerStats {
    held: OpenConnections,
    accept_failures: Arc<AtomicU64>,
}

impl ListenerStats {
    /// Connections accepted and not yet closed, in their handshake or authenticated.
    pub fn connections(&self) -> usize {
        self.held.get()
    }

    /// `accept` calls that failed since the listener started (EMFILE once out of descriptors).
    pub fn accept_failures(&self) -> u64 {
        self.accept_failures.load(Ordering::SeqCst)
    }
}

/// One connection's place in [`OpenConnections`], given back when the connection is dropped.
struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for TlsIncoming {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

impl tokio_stream::Stream for TlsIncoming {
    type Item = io::Result<TlsStream<Watched>>;

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
    let refusals = Arc::new(Mutex::new(RefusalLog::new(Instant::now())));
    let open = OpenConnections::default();
    let counted = open.clone();
    let listener_stats = ListenerStats::default();
    let stats = listener_stats.clone();
    let accept_loop = tokio::spawn(async move {
        let mut summaries = tokio::time::interval(REFUSAL_WINDOW);
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = summaries.tick() => {
                    if let Some(n) = refusals.lock().unwrap().summary(Instant::now()) {
                        tracing::info!(
                            "{n} more TLS handshakes were refused or timed out in the last {} s (not logged one by one)",
                            REFUSAL_WINDOW.as_secs()
                        );
                    }
                    continue;
                }
            };
            let (tcp, peer) = match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Usually EMFILE or a connection reset before accept;
                    // backing off beats a hot loop, and the listener stays usable.
                    stats.accept_failures.fetch_add(1, Ordering::SeqCst);
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let held = stats.held.enter();
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let refusals = refusals.clone();
            let counted = counted.clone();
            tokio::spawn(async move {
                if let Some(mut tls) = handshake(&acceptor, tcp, held, peer, &refusals).await {
                    tls.get_mut().0.open = Some(counted.enter());
                    let _ = tx.send(Ok(tls)).await;
                }
            });
        }
    });
    TlsIncoming { rx, accept_loop, open, listener: listener_stats }
}

async fn handshake(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
    held: OpenGuard,
    peer: SocketAddr,
    refusals: &Mutex<RefusalLog>,
) -> Option<TlsStream<Watched>> {
    let progress = Arc::new(Progress::new());
    let accept = acceptor.accept(Watched { tcp, progress: progress.clone(), _held: held, open: None });
    tokio::pin!(accept);
    let why = loop {
        tokio::select! {
            // The handshake first: bytes that arrived while this task waited for the thread move it
            // on before the idle clock is read, so time spent waiting for the server never counts
            // against the peer.
            biased;
            done = &mut accept => match done {
                Ok(tls) => return Some(tls),
                Err(e) => break format!("rejected TLS handshake from {peer}: {e}"),
            },
            _ = tokio::time::sleep_until(progress.idle_deadline().into()) => {
                if Instant::now() >= progress.idle_deadline() {
                    break format!(
                        "TLS handshake from {peer} dropped: the peer sent nothing for {} s",
                        PEER_IDLE_TIMEOUT.as_secs()
                    );
                }
            }
        }
    };
    if refusals.lock().unwrap().refused(Instant::now()) {
        tracing::info!("{why}");
    }
    None
}

/// When a connection's handshake last moved, as nanoseconds after `start`.
struct Progress {
    start: Instant,
    last_nanos: AtomicU64,
}

impl Progress {
    fn new() -> Progress {
        Progress { start: Instant::now(), last_nanos: AtomicU64::new(0) }
    }

    fn moved(&self) {
        let nanos = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_nanos.store(nanos, Ordering::Relaxed);
    }

    fn idle_deadline(&self) -> Instant {
        self.start + Duration::from_nanos(self.last_nanos.load(Ordering::Relaxed)) + PEER_IDLE_TIMEOUT
    }
}

/// An accepted TCP connection that records each read and write that moved bytes, for
/// [`PEER_IDLE_TIMEOUT`]. After the handshake the record is unused (one clock read per I/O).
pub struct Watched {
    tcp: TcpStream,
    progress: Arc<Progress>,
    /// From the accept on: the connection counts in [`ListenerStats::connections`].
    _held: OpenGuard,
    /// Set once the handshake succeeded: from then on the connection counts as open.
    open: Option<OpenGuard>,
}

impl Watched {
    fn note(&self, moved: bool) {
        if moved {
            self.progress.moved();
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.tcp).poll_read(cx, buf);
        self.note(matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before);
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.tcp).poll_write(cx, data);
        self.note(matches!(polled, Poll::Ready(Ok(n)) if n > 0));
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs);
        self.note(matches!(polled, Poll::Ready(Ok(n)) if n > 0));
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

impl Connected for Watched {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.tcp.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_past_the_first_few_of_a_window_are_counted_then_summarised_once() {
        let t0 = Instant::now();
        let mut log = RefusalLog::new(t0);
        let logged = (0..500).filter(|_| log.refused(t0)).count();
        assert_eq!(logged, REFUSALS_LOGGED_PER_WINDOW as usize);
        assert_eq!(log.summary(t0 + REFUSAL_WINDOW / 2), None, "no summary before the window ends");
        assert_eq!(log.summary(t0 + REFUSAL_WINDOW), Some(500 - REFUSALS_LOGGED_PER_WINDOW as u64));
        assert_eq!(log.summary(t0 + REFUSAL_WINDOW * 2), None, "a count is summarised once");
    }

    #[test]
    fn a_new_window_logs_its_first_refusals_again() {
        let t0 = Instant::now();
        let mut log = RefusalLog::new(t0);
        (0..10).for_each(|_| {
            log.refused(t0);
        });
        // A refusal after the window ended, before the summary tick: still counted, not dropped.
        assert!(!log.refused(t0 + REFUSAL_WINDOW));
        assert_eq!(log.summary(t0 + REFUSAL_WINDOW), Some(6));
        assert!(log.refused(t0 + REFUSAL_WINDOW), "the new window logs again");
        // A quiet window with nothing suppressed starts over on the next refusal.
        let later = t0 + REFUSAL_WINDOW * 5;
        assert!((0..REFUSALS_LOGGED_PER_WINDOW).all(|_| log.refused(later)));
        assert!(!log.refused(later));
    }
}
