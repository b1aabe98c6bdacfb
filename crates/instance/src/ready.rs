//! Readiness: whether a VM's workload is up, asked the way its probe says (the gateway's mTLS gRPC
//! health, a workload's plain gRPC health, a TCP connection the guest keeps, an HTTP answer)
//! through the host side of the forward to the probed guest port, and the one wait that polls the
//! probe while it watches the VM (a guest panic, the VM or its network helper exiting, a stop).

use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

use openshell_vm::{timeline, PortMap, RunningVm, VmError};

/// What asks the workload whether it is up.
#[derive(Clone, Debug)]
pub enum Check {
    /// `grpc.health.v1.Health/Check` of the "" service over mutual TLS, SERVING: the gateway's.
    MtlsHealth(Box<openshell_gateway::ClientBundle>),
    /// `grpc.health.v1.Health/Check` of the "" service in plaintext (h2c), SERVING.
    GrpcHealth,
    /// A TCP connection that the guest side keeps open (or answers on) for [`TCP_HOLD`]. The host
    /// end of a forward (passt, gvproxy) accepts every connection itself and closes it once the
    /// guest refuses, so an accepted connect alone says nothing about the guest.
    Tcp,
    /// `GET path` over HTTP/1.1 answers with a status below 400.
    Http { path: String },
}

/// A probe: a [`Check`] of a guest port, reached through the `-p` forward to that port.
#[derive(Clone, Debug)]
pub struct Probe {
    pub check: Check,
    pub guest_port: u16,
}

/// How long a [`Check::Tcp`] connection must stay open, unanswered, to count as kept by the
/// guest: the time a forwarder takes to pass on the guest's refusal, with room for a slow guest.
pub const TCP_HOLD: Duration = Duration::from_millis(500);
/// One attempt of a probe, bounded so that a connection into a guest that is not up yet (the
/// forwarder holds it until the guest answers) is retried rather than waited on for the whole
/// ready timeout. Once the gateway says it listens, its handshake gets longer (below).
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(1500);
/// The gateway's: before it says it listens, probes are rare and short, since each blocks the
/// loop for its bound and would delay noticing the line on a loaded host; after, a probe is a
/// real handshake under a possibly slow (emulated, loaded) guest.
const GATEWAY_BLIND_TIMEOUT: Duration = Duration::from_millis(500);
const GATEWAY_BLIND_EVERY: Duration = Duration::from_secs(5);
const GATEWAY_LISTENING_TIMEOUT: Duration = Duration::from_secs(5);

impl Probe {
    /// The gateway's probe: mTLS health with the instance's client `bundle` on `guest_port`.
    pub fn mtls_health(bundle: openshell_gateway::ClientBundle, guest_port: u16) -> Probe {
        Probe { check: Check::MtlsHealth(Box::new(bundle)), guest_port }
    }

    /// `127.0.0.1:HOST`, the host side of the forward in `ports` to the probed guest port.
    pub fn endpoint(&self, ports: &[PortMap]) -> Result<String, VmError> {
        host_endpoint(ports, self.guest_port, &format!("the readiness probe {self}"))
    }

    /// What "ready" means for this probe, for the line that says it was.
    pub fn said(&self) -> &'static str {
        match self.check {
            Check::MtlsHealth(_) => "answered mTLS health SERVING",
            Check::GrpcHealth => "answered gRPC health SERVING",
            Check::Tcp => "kept a TCP connection open",
            Check::Http { .. } => "answered HTTP",
        }
    }

    /// One attempt: `Ok(())` when the workload is up, else what it said instead.
    async fn attempt(&self, endpoint: &str) -> Result<(), String> {
        match &self.check {
            Check::MtlsHealth(bundle) => {
                let ch = openshell_gateway::connect(endpoint, bundle, "localhost").await.map_err(|e| e.to_string())?;
                serving(openshell_gateway::health(&ch).await)
            }
            Check::GrpcHealth => {
                let ch = openshell_gateway::connect_plaintext(endpoint).await.map_err(|e| e.to_string())?;
                serving(openshell_gateway::health(&ch).await)
            }
            Check::Tcp => tcp_kept(endpoint).await,
            Check::Http { path } => http_get(endpoint, path).await,
        }
    }
}

/// `127.0.0.1:HOST`, the host side of the forward in `ports` to `guest_port`, which `who` (what
/// the error names) needs.
pub fn host_endpoint(ports: &[PortMap], guest_port: u16, who: &str) -> Result<String, VmError> {
    match ports.iter().find(|p| p.guest == guest_port) {
        Some(p) => Ok(format!("127.0.0.1:{}", p.host)),
        None => Err(VmError::Invalid(format!(
            "{who} is on the guest's port {guest_port}, which no -p forward reaches (got {}): add -p HOST:{guest_port}",
            if ports.is_empty() {
                "none".to_owned()
            } else {
                ports.iter().map(|p| format!("{}:{}", p.host, p.guest)).collect::<Vec<_>>().join(", ")
            },
        ))),
    }
}

fn serving(h: Result<openshell_gateway::ServingStatus, openshell_gateway::ClientError>) -> Result<(), String> {
    match h {
        Ok(openshell_gateway::ServingStatus::Serving) => Ok(()),
        Ok(other) => Err(format!("health said {}", other.as_str_name())),
        Err(e) => Err(e.to_string()),
    }
}

async fn tcp_kept(endpoint: &str) -> Result<(), String> {
    use tokio::io::AsyncReadExt;
    let mut s = tokio::net::TcpStream::connect(endpoint).await.map_err(|e| format!("connect: {e}"))?;
    let mut byte = [0u8; 1];
    match tokio::time::timeout(TCP_HOLD, s.read(&mut byte)).await {
        // Still open: the forwarder has a guest connection behind it.
        Err(_) => Ok(()),
        Ok(Ok(n)) if n > 0 => Ok(()),
        Ok(Ok(_)) => Err("the connection was closed at once (the guest does not listen yet)".into()),
        Ok(Err(e)) => Err(format!("the connection was reset ({e}): the guest does not listen yet")),
    }
}

async fn http_get(endpoint: &str, path: &str) -> Result<(), String> {
    use http_body_util::Empty;
    let tcp = tokio::net::TcpStream::connect(endpoint).await.map_err(|e| format!("connect: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    let driver = tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, endpoint)
        .body(Empty::<hyper::body::Bytes>::new())
        .map_err(|e| format!("GET {path}: {e}"))?;
    let answer = sender.send_request(req).await;
    driver.abort();
    let status = answer.map_err(|e| format!("GET {path}: {e}"))?.status();
    if status.as_u16() < 400 {
        Ok(())
    } else {
        Err(format!("GET {path} answered {status}"))
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let port = self.guest_port;
        match &self.check {
            Check::MtlsHealth(_) => write!(f, "mtls:{port}"),
            Check::GrpcHealth => write!(f, "grpc:{port}"),
            Check::Tcp => write!(f, "tcp:{port}"),
            Check::Http { path } => write!(f, "http:{port}{path}"),
        }
    }
}

/// `tcp:PORT`, `http:PORT[/PATH]` (path `/` by default) or `grpc:PORT`, with PORT the guest's.
/// The mTLS check is the gateway's own, with its instance's bundle: it is not written by hand.
impl std::str::FromStr for Probe {
    type Err = String;
    fn from_str(s: &str) -> Result<Probe, String> {
        let bad =
            || format!("readiness probe {s:?}: expected tcp:PORT, http:PORT[/PATH] or grpc:PORT (the guest's port)");
        let (kind, rest) = s.split_once(':').ok_or_else(bad)?;
        let (port, path) = match rest.find('/') {
            Some(i) if kind == "http" => (&rest[..i], &rest[i..]),
            _ => (rest, "/"),
        };
        let guest_port: u16 = port.parse().ok().filter(|&p| p != 0).ok_or_else(bad)?;
        let check = match kind {
            "tcp" => Check::Tcp,
            "http" => Check::Http { path: path.to_owned() },
            "grpc" => Check::GrpcHealth,
            _ => return Err(bad()),
        };
        Ok(Probe { check, guest_port })
    }
}

/// Polls `probe` through `endpoint` until the workload is up, and returns the time since the VM
/// started. Fails at once, with the kernel's cause, when the guest panics; with the console's last
/// lines if the VM or its network helper exits first or `timeout` passes; on a signal in `stop`.
/// The caller's `RunningVm` then stops the VM when dropped, so nothing is left running.
pub fn wait(
    vm: &mut RunningVm,
    probe: &Probe,
    endpoint: &str,
    timeout: Duration,
    stop: Option<&openshell_vm::launch::StopSignals>,
) -> Result<Duration, VmError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(crate::state::io_err(Path::new("tokio runtime")))?;
    let gateway = matches!(probe.check, Check::MtlsHealth(_));
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no probe yet");
    let mut last_probe: Option<Instant> = None;
    let mut console = openshell_vm::launch::Tail::new(&vm.console);
    let mut seen = Vec::new();
    let mut listening = false;
    let mut crash = timeline::CrashWatch::default();
    // The attempt in flight, run beside the watch below rather than in its way: a blind attempt
    // into a guest that is not up yet takes its whole bound, and the console's "listening" line,
    // which starts a fresh one at once, must not wait for it.
    type Attempt<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + 'a>>;
    let mut in_flight: Option<(Attempt<'_>, Instant, Duration, bool)> = None;
    rt.block_on(async {
        loop {
            // A stop asked for during the boot (a restart's, where the supervisor listens) ends it
            // now rather than once it is ready, or after the whole ready timeout if it never will be.
            if let Some(signal) = stop.and_then(|s| s.take()) {
                return Err(VmError::StopRequested(signal));
            }
            // A guest that panicked is done whether or not its VMM has exited yet: say why at once.
            let new = console.read_new();
            if let Some(cause) = crash.feed(&new) {
                return Err(vm.crashed(cause));
            }
            if let Some(status) = vm.exited() {
                let text = std::fs::read_to_string(&vm.console).unwrap_or_default();
                if let Some(cause) = timeline::guest_crash(&text) {
                    return Err(vm.crashed(cause));
                }
                return Err(not_ready(
                    vm,
                    &format!("the VM exited ({status}) before its workload was ready ({probe})"),
                ));
            }
            if let Some((helper, how)) = vm.net_ended() {
                return Err(not_ready(vm, &format!("{helper} exited ({how}) before the workload was ready ({probe})")));
            }
            // The gateway says on the console when it listens; its probes wait for that (a slow
            // fallback probe covers a gateway that never prints the line).
            if gateway && !listening && !new.is_empty() {
                seen.extend(new);
                listening = timeline::gateway_listening(&String::from_utf8_lossy(&seen));
                if listening && in_flight.as_ref().is_some_and(|(_, _, _, blind)| *blind) {
                    in_flight = None;
                }
            }
            if in_flight.is_none() {
                let (due, bound) = match (gateway, listening) {
                    (true, true) => (true, GATEWAY_LISTENING_TIMEOUT),
                    (true, false) => {
                        (last_probe.is_none_or(|t| t.elapsed() >= GATEWAY_BLIND_EVERY), GATEWAY_BLIND_TIMEOUT)
                    }
                    (false, _) => (true, ATTEMPT_TIMEOUT),
                };
                if due {
                    last_probe = Some(Instant::now());
                    in_flight = Some((Box::pin(probe.attempt(endpoint)), Instant::now(), bound, gateway && !listening));
                }
            }
            let pause = Duration::from_millis(if gateway && !listening { 10 } else { 25 });
            if let Some((attempt, started, bound, _)) = in_flight.as_mut() {
                let left = bound.saturating_sub(started.elapsed());
                let outcome = tokio::select! {
                    r = attempt.as_mut() => Some(r),
                    _ = tokio::time::sleep(pause.min(left)) => (started.elapsed() >= *bound)
                        .then(|| Err(format!("no answer within {} ms", bound.as_millis()))),
                };
                if let Some(r) = outcome {
                    let attempt_ms = started.elapsed().as_millis() as u64;
                    in_flight = None;
                    match r {
                        Ok(()) => {
                            vm.userspace_shown(if gateway {
                                "the guest's gateway answered mTLS health SERVING"
                            } else {
                                "the guest's workload answered its readiness probe"
                            });
                            return Ok(vm.started.elapsed());
                        }
                        Err(e) => last = e,
                    }
                    tracing::debug!(
                        probe = %probe,
                        attempt_ms,
                        at_ms = vm.started.elapsed().as_millis() as u64,
                        listening,
                        %last,
                        "not ready yet"
                    );
                }
            } else {
                tokio::time::sleep(pause).await;
            }
            if Instant::now() > deadline {
                let what = if gateway { "not SERVING".to_owned() } else { format!("{probe} not ready") };
                return Err(not_ready(vm, &format!("{what} within {}s (last: {last})", timeout.as_secs())));
            }
        }
    })
}

fn not_ready(vm: &RunningVm, why: &str) -> VmError {
    let console = std::fs::read_to_string(&vm.console).unwrap_or_default();
    let lines: Vec<&str> = console.lines().collect();
    let tail = lines[lines.len().saturating_sub(50)..].join("\n");
    let silent = if timeline::silent(&console) { format!("; {}", timeline::SILENT_GUEST) } else { String::new() };
    VmError::NotReady(format!("{why}{silent}\n--- console (last 50 lines) ---\n{tail}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_parse_and_print_back() {
        for s in ["tcp:8080", "http:8000/", "http:80/healthz?x=1", "grpc:50051"] {
            assert_eq!(s.parse::<Probe>().unwrap().to_string(), s);
        }
        assert_eq!("http:8000".parse::<Probe>().unwrap().to_string(), "http:8000/");
        for bad in ["tcp", "tcp:0", "tcp:70000", "udp:53", "mtls:30051", "grpc:1/x", "http:/x"] {
            let err = bad.parse::<Probe>().unwrap_err();
            assert!(err.contains("tcp:PORT, http:PORT[/PATH] or grpc:PORT"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_endpoint_is_the_forward_to_the_probed_port() {
        let p: Probe = "http:80/".parse().unwrap();
        let ports = [PortMap { host: 30051, guest: 30051 }, PortMap { host: 8080, guest: 80 }];
        assert_eq!(p.endpoint(&ports).unwrap(), "127.0.0.1:8080");
        let err = p.endpoint(&ports[..1]).unwrap_err().to_string();
        assert!(err.contains("port 80") && err.contains("30051:30051") && err.contains("add -p HOST:80"), "{err}");
    }

    /// Each check against a real server on the loopback address, and against a port that
    /// refuses: what a probe says is what the server did.
    #[test]
    fn checks_against_real_servers() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let attempt = |spec: &str, port: u16| {
            let p: Probe = format!("{spec}:{port}").parse().unwrap();
            rt.block_on(p.attempt(&format!("127.0.0.1:{port}")))
        };
        let refused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed = refused.local_addr().unwrap().port();
        drop(refused);
        for spec in ["tcp", "http", "grpc"] {
            assert!(attempt(spec, closed).is_err(), "{spec} on a closed port");
        }

        // TCP: a server that keeps the connection is up; one that closes at once is not.
        let keeps = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closes = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (kp, cp) = (keeps.local_addr().unwrap().port(), closes.local_addr().unwrap().port());
        let _keeper = std::thread::spawn(move || {
            let held: Vec<_> = keeps.incoming().take(1).collect();
            std::thread::sleep(TCP_HOLD * 4);
            drop(held);
        });
        let _closer = std::thread::spawn(move || {
            for c in closes.incoming().take(1) {
                drop(c);
            }
        });
        assert_eq!(attempt("tcp", kp), Ok(()));
        let err = attempt("tcp", cp).unwrap_err();
        assert!(err.contains("closed") || err.contains("reset"), "{err}");

        // HTTP: the status decides.
        let web = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let wp = web.local_addr().unwrap().port();
        let _web = std::thread::spawn(move || {
            use std::io::{BufRead, Write};
            for c in web.incoming().take(2) {
                let mut c = c.unwrap();
                let mut line = String::new();
                std::io::BufReader::new(&c).read_line(&mut line).unwrap();
                let status = if line.starts_with("GET /up ") { "200 OK" } else { "404 Not Found" };
                write!(c, "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").unwrap();
            }
        });
        let p = |path: &str| format!("http:{wp}{path}").parse::<Probe>().unwrap();
        assert_eq!(rt.block_on(p("/up").attempt(&format!("127.0.0.1:{wp}"))), Ok(()));
        let err = rt.block_on(p("/down").attempt(&format!("127.0.0.1:{wp}"))).unwrap_err();
        assert!(err.contains("404"), "{err}");

        // gRPC: tonic-health's own server in plaintext, first NOT_SERVING, then SERVING.
        let (reporter, service) = rt.block_on(async { tonic_health::server::health_reporter() });
        let grpc = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let gp = grpc.local_addr().unwrap().port();
        grpc.set_nonblocking(true).unwrap();
        rt.spawn(async move {
            let l = tokio::net::TcpListener::from_std(grpc).unwrap();
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l))
                .await
                .unwrap();
        });
        let mut reporter = reporter;
        rt.block_on(reporter.set_service_status("", tonic_health::ServingStatus::NotServing));
        let err = attempt("grpc", gp).unwrap_err();
        assert!(err.contains("NOT_SERVING"), "{err}");
        rt.block_on(reporter.set_service_status("", tonic_health::ServingStatus::Serving));
        assert_eq!(attempt("grpc", gp), Ok(()));
    }
}
