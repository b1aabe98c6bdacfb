//! Floods at the gateway's forward: unauthenticated peers must neither starve the host's own
//! client nor grow the guest console without bound, and a burst of authenticated clients must all
//! be served.

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use openshell_vm::VmmChoice;

use crate::support::{self, Artifacts, TrialDir};
use crate::trials::{block_on, own_client, served, with_gateway, Body};

pub const TRIALS: &[(&str, Body)] = &[
    ("gateway::flood::idle_connections_do_not_starve_an_authenticated_client", idle_connections_do_not_starve),
    ("gateway::flood::refused_handshakes_are_summarised_not_logged_one_by_one", refused_handshakes_are_summarised),
    ("gateway::flood::concurrent_mtls_clients_are_all_served", concurrent_mtls_clients_are_all_served),
];

/// The guest kernel's (ListenOverflows, ListenDrops) since boot, from the gateway's Info.
fn listen_queue(endpoint: &str, bundle: &openshell_gateway::ClientBundle) -> Result<(u64, u64), String> {
    block_on(async {
        let ch = openshell_gateway::connect(endpoint, bundle, "localhost").await?;
        openshell_gateway::info(&ch).await
    })
    .map(|i| (i.listen_overflows, i.listen_drops))
    .map_err(|e| format!("the gateway's Info (its listen queue's losses): {e}"))
}

/// Idle peers held open while the host's client asks: the figure of the issue (800 kept the client
/// out for ~10 s before the fix), with margin.
const IDLE: usize = 1000;
/// The client's hang guard for each TLS step, not the property. Before the fix the client's SYN
/// was dropped (the guest's listen queue overflowed) and passt reset it after ~10 s: never served,
/// whatever the deadline, and the guest's ListenOverflows say so. How fast the guest answers with
/// 1000 connections just accepted is the host's speed (2 s was not always enough in the nested L1).
const CLIENT_DEADLINE: Duration = Duration::from_secs(60);

fn idle_connections_do_not_starve(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    with_gateway(a, vmm, dir, |_, endpoint, inst, _| {
        let good = own_client(inst)?;
        served(endpoint, &good)?;
        let bundle = inst.client_bundle().map_err(|e| e.to_string())?;
        let before = listen_queue(endpoint, &bundle)?;
        let t = Instant::now();
        let idle = (0..IDLE)
            .map(|_| TcpStream::connect(endpoint))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("opening {IDLE} idle connections to {endpoint}: {e}"))?;
        support::note(format!("{IDLE} idle connections to the forward opened in {:.2} s", t.elapsed().as_secs_f64()));
        let t = Instant::now();
        let outcome = openshell_gateway::probe(endpoint, &good, CLIENT_DEADLINE).map_err(|e| e.to_string())?;
        support::note(format!(
            "with {IDLE} idle held, the authenticated probe ended after {} ms: {outcome}",
            t.elapsed().as_millis()
        ));
        let after = listen_queue(endpoint, &bundle)?;
        drop(idle);
        if after != before {
            return Err(format!(
                "the guest's listen queue lost connections with {IDLE} idle held (ListenOverflows {} -> {}, ListenDrops \
                 {} -> {}): its backlog is below them, and passt does not retransmit a dropped SYN",
                before.0, after.0, before.1, after.1
            ));
        }
        match outcome {
            openshell_gateway::TlsOutcome::Served { .. } => Ok(()),
            other => Err(format!(
                "with {IDLE} idle connections held, the instance's own client was not served within its {} s \
                 deadline per step: {other}",
                CLIENT_DEADLINE.as_secs()
            )),
        }
    })
}

/// Bad peers, each sending bytes that are not TLS and closing: every one is refused by the gateway.
const BAD: u64 = 500;
/// The gateway's bound (`openshell_gateway::tls::RefusalLog`): this many one by one per window.
const LOGGED_PER_WINDOW: u64 = 5;
const WINDOW: Duration = Duration::from_secs(10);
/// How long the refusals may take to be accounted for: a hang guard, under the nested runner's own
/// limit for the whole L1 run (280 s was seen), so the count is reported before L1 is cut.
const REFUSAL_HANG_GUARD: Duration = Duration::from_secs(200);

fn refused_handshakes_are_summarised(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    with_gateway(a, vmm, dir, |vm, endpoint, inst, _| {
        served(endpoint, &own_client(inst)?)?;
        let console = || std::fs::read_to_string(&vm.console).unwrap_or_default();
        let before = console().len();
        let t = Instant::now();
        for i in 0..BAD {
            let mut s = TcpStream::connect(endpoint).map_err(|e| format!("bad connection {i}: {e}"))?;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n").map_err(|e| format!("bad connection {i}: {e}"))?;
        }
        // Every refusal is either on its own line or in a summary's count; wait until all of them
        // are accounted for, as summaries come at the end of each window. How long the guest takes
        // to refuse 500 handshakes is the host's speed (92 s was not enough inside the nested krun
        // host under load), so the bound is only a hang guard; the property is the count.
        let deadline = Instant::now() + REFUSAL_HANG_GUARD;
        let (lines, summarised, grown) = loop {
            let text = console();
            let new = &text[before.min(text.len())..];
            let lines = new
                .lines()
                .filter(|l| l.contains("rejected TLS handshake") || l.contains("the peer sent nothing for"))
                .count() as u64;
            let summarised: u64 = new
                .lines()
                .filter_map(|l| {
                    l.split(" more TLS handshakes were refused").next().filter(|_| l.contains(" more TLS handshakes"))
                })
                .filter_map(|head| head.rsplit(' ').next().and_then(|n| n.parse::<u64>().ok()))
                .sum();
            if lines + summarised >= BAD || Instant::now() > deadline {
                break (lines, summarised, new.len());
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        let windows = t.elapsed().as_secs() / WINDOW.as_secs() + 2;
        support::note(format!(
            "{BAD} refused handshakes: {lines} logged one by one, {summarised} in summaries; the console grew by {grown} bytes in {:.1} s",
            t.elapsed().as_secs_f64()
        ));
        if lines + summarised != BAD {
            return Err(format!(
                "the console accounts for {lines} + {summarised} refusals, not the {BAD} made, after {} s (hang guard)",
                REFUSAL_HANG_GUARD.as_secs()
            ));
        }
        if summarised == 0 || lines > LOGGED_PER_WINDOW * windows {
            return Err(format!(
                "{lines} refusals were logged one by one (at most {LOGGED_PER_WINDOW} per {} s window, {windows} windows \
                 elapsed) and {summarised} summarised: the log is not bounded",
                WINDOW.as_secs()
            ));
        }
        Ok(())
    })
}

/// Authenticated clients that connect at the same moment (`bench load --shape 256x20`'s burst):
/// twice what a listen backlog of std's default (128) lets through. With it, the guest dropped the
/// SYNs beyond its queue (no SYN cookies), passt sends the guest one SYN per host connection and
/// never retransmits it, and 127 of 256 clients were reset by passt when it gave those flows up,
/// 10 s in (measured here: 129 served, 127 `Connection reset by peer` after 10000 ms; the host's
/// `ListenOverflows` stayed 0, so passt's own backlog of 128 on the host was not the limit).
const CONCURRENT: usize = 256;

/// Each client's hang guard for connecting and for its health call, not the property: how long
/// 256 handshakes queue for the guest's one gateway thread is the host's speed (~1.4 s under QEMU
/// TCG here, ~12 s inside the nested L1, 35-38 s on a slower fresh host). A client whose SYN the
/// guest dropped is never served, whatever the deadline; the guest's ListenOverflows say so. Under
/// the nested runner's limit for the whole L1 run (280 s was seen).
const HANG_GUARD: Duration = Duration::from_secs(200);

/// All [`CONCURRENT`] clients connect at once through the forward with the production client
/// (`openshell_gateway::connect_with_request_timeout`, mTLS, [`HANG_GUARD`]); every connection is
/// held open until all have connected, then each must be answered SERVING, and the guest's listen
/// queue must not have overflowed (no SYN lost) over the burst.
fn concurrent_mtls_clients_are_all_served(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    with_gateway(a, vmm, dir, |_, endpoint, inst, _| {
        served(endpoint, &own_client(inst)?)?;
        let bundle = inst.client_bundle().map_err(|e| e.to_string())?;
        let listen_queue = || listen_queue(endpoint, &bundle);
        let before = listen_queue()?;
        let t = Instant::now();
        let results = block_on(async {
            let all_connected = std::sync::Arc::new(tokio::sync::Barrier::new(CONCURRENT + 1));
            let mut clients = tokio::task::JoinSet::new();
            for i in 0..CONCURRENT {
                let (endpoint, bundle, all_connected) = (endpoint.to_owned(), bundle.clone(), all_connected.clone());
                clients.spawn(async move {
                    let t = Instant::now();
                    let channel = tokio::time::timeout(
                        HANG_GUARD,
                        openshell_gateway::connect_with_request_timeout(&endpoint, &bundle, "localhost", HANG_GUARD),
                    )
                    .await
                    .map_err(|_| format!("not connected within {} s (hang guard)", HANG_GUARD.as_secs()))
                    .and_then(|r| r.map_err(|e| format!("after {} ms: {e}", t.elapsed().as_millis())));
                    // Held until every client has its connection (or its error): the RPCs below run
                    // over CONCURRENT open connections, not one after another.
                    all_connected.wait().await;
                    match channel {
                        Ok(ch) => match openshell_gateway::health(&ch).await {
                            Ok(openshell_gateway::ServingStatus::Serving) => Ok(()),
                            Ok(other) => Err(format!("client {i}: health said {other:?}")),
                            Err(e) => Err(format!("client {i}: {e}")),
                        },
                        Err(e) => Err(format!("client {i}: {e}")),
                    }
                });
            }
            all_connected.wait().await;
            support::note(format!(
                "{CONCURRENT} concurrent mTLS clients: connect phase {:.2} s",
                t.elapsed().as_secs_f64()
            ));
            let mut results = Vec::with_capacity(CONCURRENT);
            while let Some(joined) = clients.join_next().await {
                results.push(joined.unwrap_or_else(|e| Err(format!("client task: {e}"))));
            }
            results
        });
        let failures: Vec<String> = results.into_iter().filter_map(Result::err).collect();
        support::note(format!(
            "{CONCURRENT} concurrent mTLS clients: {} served, {} failed, all done after {:.2} s",
            CONCURRENT - failures.len(),
            failures.len(),
            t.elapsed().as_secs_f64()
        ));
        // After the figures, so a forward that no longer answers still leaves them.
        let after = listen_queue()?;
        support::note(format!(
            "guest listen queue over the burst: ListenOverflows {} -> {}, ListenDrops {} -> {}",
            before.0, after.0, before.1, after.1
        ));
        if after != before {
            return Err(format!(
                "the guest's listen queue lost connections during the burst of {CONCURRENT} (ListenOverflows {} -> {}, \
                 ListenDrops {} -> {}): its backlog is below the burst, and passt does not retransmit a dropped SYN",
                before.0, after.0, before.1, after.1
            ));
        }
        match failures.first() {
            None => Ok(()),
            Some(first) => Err(format!(
                "{} of {CONCURRENT} concurrent mTLS clients through the forward were not served (first: {first}); a \
                 listen backlog below {CONCURRENT} in the guest drops their SYNs, which passt does not retransmit",
                failures.len()
            )),
        }
    })
}
