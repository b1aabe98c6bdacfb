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

/// Peers the gateway must hold at once while the host's client asks: the figure of the issue (800
/// kept the client out for ~10 s before the listen backlog was raised), with margin, and above the
/// soft open-files limit init starts the gateway with, so only the gateway's raise to its hard
/// limit (4096) lets it hold them.
const IDLE: usize = 1500;
/// The guest kernel's default soft open-files limit, which init passes on to the gateway.
const DEFAULT_SOFT_NOFILE: u64 = 1024;
/// Peers opened before the trial waits for the gateway to report holding every peer so far. All
/// at once, 1500 flows through passt kept the guest's one CPU busy enough (under load, in 1 of 4
/// runs) that it answered passt's SYN for the host's client only after passt's own 10 s budget,
/// and passt reset it: the client was never served, with nothing lost by the gateway. In batches
/// the guest is never asked for more than this many handshakes at once.
const BATCH: usize = 100;
/// How often each held peer sends its next byte: well inside the gateway's slowloris guard (a
/// handshake silent for 10 s is dropped), so a peer opened first is still held when the last batch
/// is, however slowly the host opens them. The margin is for the byte's way through passt to a
/// busy guest; the guard's deadline is read only after the bytes that arrived were.
const TRICKLE: Duration = Duration::from_millis(openshell_gateway::tls::PEER_IDLE_TIMEOUT.as_millis() as u64 / 3);
/// Hang guards, not the property: for the gateway to report a batch it was sent, and for the
/// host's client to connect and get its answer. How fast the guest accepts and answers is the
/// host's speed (2 s was not always enough for the client in the nested L1).
const BATCH_HANG_GUARD: Duration = Duration::from_secs(120);
const CLIENT_DEADLINE: Duration = Duration::from_secs(120);

/// What a held peer sends, one byte at a time: the header of a TLS handshake record announcing
/// 16384 bytes (the most a plaintext record carries), then that body. rustls reads nothing of a
/// record until all of it has arrived, so the peer stays in its handshake for hours, and each
/// byte moves the handshake as the slowloris guard sees it (the guard bounds silence, not time).
fn peer_byte(sent: usize) -> u8 {
    const RECORD_HEADER: [u8; 5] = [0x16, 0x03, 0x01, 0x40, 0x00];
    RECORD_HEADER.get(sent).copied().unwrap_or(0)
}

/// The peers held open, each with how many bytes it has sent, and how any of them ended.
#[derive(Default)]
struct HeldPeers {
    peers: std::sync::Mutex<Vec<(TcpStream, usize)>>,
    ended: std::sync::Mutex<Vec<String>>,
    done: std::sync::atomic::AtomicBool,
}

/// A sent count for a peer whose connection ended: it is written to no more.
const ENDED: usize = usize::MAX;

impl HeldPeers {
    fn open(&self, endpoint: &str) -> Result<(), String> {
        let i = self.peers.lock().unwrap().len();
        let mut s = TcpStream::connect(endpoint).map_err(|e| format!("opening peer {i} to {endpoint}: {e}"))?;
        s.write_all(&[peer_byte(0)]).map_err(|e| format!("peer {i}'s first byte to {endpoint}: {e}"))?;
        self.peers.lock().unwrap().push((s, 1));
        Ok(())
    }

    /// Until `done`, sends each peer its next byte every [`TRICKLE`], spread over the period
    /// rather than in one burst of [`IDLE`] packets.
    fn trickle(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        while !self.done.load(Relaxed) {
            let round = Instant::now();
            let n = self.peers.lock().unwrap().len();
            for i in 0..n {
                if self.done.load(Relaxed) {
                    return;
                }
                let due = round + TRICKLE.mul_f64(i as f64 / n as f64);
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
                let mut peers = self.peers.lock().unwrap();
                let (s, sent) = &mut peers[i];
                if *sent == ENDED {
                    continue;
                }
                match s.write_all(&[peer_byte(*sent)]) {
                    Ok(()) => *sent += 1,
                    Err(e) => {
                        *sent = ENDED;
                        self.ended.lock().unwrap().push(format!("peer {i} after {:?} held: {e}", round.elapsed()));
                    }
                }
            }
            std::thread::sleep(
                (round + TRICKLE).saturating_duration_since(Instant::now()).max(Duration::from_millis(50)),
            );
        }
    }

    fn ended(&self) -> Option<String> {
        let ended = self.ended.lock().unwrap();
        (!ended.is_empty()).then(|| format!("{} held peers' connections ended (first: {})", ended.len(), ended[0]))
    }
}

/// This process's own soft open-files limit raised to its hard one when below what the trial
/// holds (the peers, and everything a trial has open besides): inside the nested L1 it starts at
/// init's 1024, like the gateway.
fn descriptors_for_peers() -> Result<(), String> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let need = IDLE as u64 + 256;
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(|e| format!("getrlimit(RLIMIT_NOFILE): {e}"))?;
    if soft >= need {
        return Ok(());
    }
    if hard < need {
        return Err(format!(
            "this trial holds {IDLE} connections but may open only {hard} files (hard limit); raise it (`ulimit -Hn {need}` \
             as root, or LimitNOFILE for a service)"
        ));
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(|e| format!("raising the open-files limit to {hard}: {e}"))
}

/// [`IDLE`] peers stuck in their handshake are held open while the host's client connects: the
/// gateway itself must report holding all of them at once (Info's `connections`, so more than
/// init's soft limit of descriptors) with no `accept` failed, serve the client, and still hold
/// them after it. Info comes over one authenticated connection opened before the flood, so it is
/// answered even if the gateway is out of descriptors.
fn idle_connections_do_not_starve(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    with_gateway(a, vmm, dir, |_, endpoint, inst, _| {
        served(endpoint, &own_client(inst)?)?;
        descriptors_for_peers()?;
        let bundle = inst.client_bundle().map_err(|e| e.to_string())?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
        let ch = rt
            .block_on(openshell_gateway::connect_with_request_timeout(endpoint, &bundle, "localhost", BATCH_HANG_GUARD))
            .map_err(|e| format!("the channel for the gateway's Info: {e}"))?;
        let info = || rt.block_on(openshell_gateway::info(&ch)).map_err(|e| format!("the gateway's Info: {e}"));
        let before = info()?;
        let held = HeldPeers::default();
        std::thread::scope(|scope| {
            scope.spawn(|| held.trickle());
            let result = hold_and_serve(endpoint, &bundle, &rt, &info, &before, &held);
            held.done.store(true, std::sync::atomic::Ordering::Relaxed);
            result
        })
    })
}

fn hold_and_serve(
    endpoint: &str,
    bundle: &openshell_gateway::ClientBundle,
    rt: &tokio::runtime::Runtime,
    info: &dyn Fn() -> Result<openshell_gateway::InfoReply, String>,
    before: &openshell_gateway::InfoReply,
    held: &HeldPeers,
) -> Result<(), String> {
    // The counts Info reports, and whether they already say the gateway failed.
    let failed = |i: &openshell_gateway::InfoReply| {
        (i.accept_failures != before.accept_failures).then(|| {
            format!(
                "the gateway failed {} accepts while holding {} connections: its open-files limit is {} (init's default \
                 soft limit is {DEFAULT_SOFT_NOFILE}; the gateway raises it to its hard limit)",
                i.accept_failures - before.accept_failures,
                i.connections,
                i.open_files_limit
            )
        })
    };
    let t = Instant::now();
    for opened in (BATCH..=IDLE).step_by(BATCH) {
        while held.peers.lock().unwrap().len() < opened {
            held.open(endpoint)?;
        }
        // The connection carrying Info is one of those the gateway holds.
        let want = opened as u64 + 1;
        let guard = Instant::now() + BATCH_HANG_GUARD;
        loop {
            let reported = info()?;
            if let Some(e) = failed(&reported).or_else(|| held.ended()) {
                return Err(e);
            }
            if reported.connections >= want {
                break;
            }
            if Instant::now() > guard {
                return Err(format!(
                    "{opened} peers are open, but the gateway reports holding {} connections of {want} after {} s (hang \
                     guard); its open-files limit is {}, no accept failed",
                    reported.connections,
                    BATCH_HANG_GUARD.as_secs(),
                    reported.open_files_limit
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let opened_in = t.elapsed();
    // However fast the host opened them, the first peers are held past the slowloris guard before
    // the client asks, so the trial holds them by their trickle on every host, not only where
    // opening took longer than the guard (4.7 s in one nested run, 24.3 s in another).
    std::thread::sleep(
        (t + openshell_gateway::tls::PEER_IDLE_TIMEOUT + TRICKLE).saturating_duration_since(Instant::now()),
    );
    let reported = info()?;
    if let Some(e) = failed(&reported).or_else(|| held.ended()) {
        return Err(e);
    }
    if reported.connections <= IDLE as u64 {
        return Err(format!(
            "the gateway held all {IDLE} peers, but {:.1} s after the first was opened it holds {} connections: it \
             dropped peers (each is sent a byte every {} ms; its slowloris guard drops a handshake silent for {} s)",
            t.elapsed().as_secs_f64(),
            reported.connections,
            TRICKLE.as_millis(),
            openshell_gateway::tls::PEER_IDLE_TIMEOUT.as_secs()
        ));
    }
    support::note(format!(
        "{IDLE} peers opened in batches of {BATCH} in {:.1} s; {:.1} s after the first, the gateway holds {} \
         connections (open-files limit {})",
        opened_in.as_secs_f64(),
        t.elapsed().as_secs_f64(),
        reported.connections,
        reported.open_files_limit
    ));
    let t = Instant::now();
    let served = rt.block_on(async {
        let client = async {
            let ch = openshell_gateway::connect_with_request_timeout(endpoint, bundle, "localhost", CLIENT_DEADLINE)
                .await
                .map_err(|e| e.to_string())?;
            openshell_gateway::health(&ch).await.map_err(|e| e.to_string())
        };
        tokio::time::timeout(CLIENT_DEADLINE, client)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {} s (hang guard)", CLIENT_DEADLINE.as_secs())))
    });
    support::note(format!(
        "with {IDLE} peers held, the host's mTLS client was answered after {} ms: {served:?}",
        t.elapsed().as_millis()
    ));
    let after = info()?;
    if let Some(e) = failed(&after).or_else(|| held.ended()) {
        return Err(e);
    }
    if let Err(e) = served {
        return Err(format!("with {IDLE} peers held, the instance's own mTLS client was not served: {e}"));
    }
    if served != Ok(openshell_gateway::ServingStatus::Serving) {
        return Err(format!("with {IDLE} peers held, the gateway's health said {served:?}"));
    }
    if after.connections <= IDLE as u64 {
        return Err(format!(
            "the gateway served the host's client but then held {} connections, not the {IDLE} peers and Info's",
            after.connections
        ));
    }
    if (after.listen_overflows, after.listen_drops) != (before.listen_overflows, before.listen_drops) {
        return Err(format!(
            "the guest's listen queue lost connections with {IDLE} peers held (ListenOverflows {} -> {}, ListenDrops \
             {} -> {}): its backlog is below them, and passt does not retransmit a dropped SYN",
            before.listen_overflows, after.listen_overflows, before.listen_drops, after.listen_drops
        ));
    }
    Ok(())
}

/// Bad peers, each sending bytes that are not TLS: every one is refused by the gateway.
const BAD: u64 = 200;
/// How many bad peers are open at once. Each waits for the gateway to close it, so passt never
/// holds more than this many flows for the guest to answer: fired all at once and closed at once,
/// 74 of 500 never reached the gateway in a loaded nested run (passt gives up a flow whose SYN
/// the guest has not answered within its own 10 s), which the trial then read as refusals lost.
const BAD_AT_ONCE: u64 = 8;
/// The gateway's bound (`openshell_gateway::tls::RefusalLog`): this many one by one per window.
const LOGGED_PER_WINDOW: u64 = 5;
/// `RefusalLog`'s window: a summary line comes at the end of each.
const WINDOW: Duration = Duration::from_secs(10);
/// How long one bad peer waits for the gateway to close it, and how long the last summary may
/// take after the last close: hang guards, not the property. How fast the guest refuses is the
/// host's speed (one refusal took seconds in a loaded nested run).
const BAD_PEER_HANG_GUARD: Duration = Duration::from_secs(60);
const SUMMARY_HANG_GUARD: Duration = Duration::from_secs(60);

/// What the gateway logged of refused handshakes in `console` (the log since some point): lines
/// of handshakes it rejected, lines of peers it dropped as silent (its slowloris guard), and the
/// refusals its summaries counted without a line each.
struct Refusals {
    rejected: u64,
    silent: u64,
    summarised: u64,
}

fn refusals_in(console: &str) -> Refusals {
    let count = |needle: &str| console.lines().filter(|l| l.contains(needle)).count() as u64;
    let summarised = console
        .lines()
        .filter_map(|l| {
            l.split(" more TLS handshakes were refused").next().filter(|_| l.contains(" more TLS handshakes"))
        })
        .filter_map(|head| head.rsplit(' ').next().and_then(|n| n.parse::<u64>().ok()))
        .sum();
    Refusals { rejected: count("rejected TLS handshake"), silent: count("the peer sent nothing for"), summarised }
}

/// One bad peer: connects, sends bytes that are not TLS and reads until the gateway closes the
/// connection. The gateway logs or counts a refusal before it closes, so once every peer has seen
/// its close, every refusal is in the log or in a summary still to come.
fn bad_peer(endpoint: &str, i: u64) -> Result<(), String> {
    use std::io::Read;
    let fail = |what: &str, e: std::io::Error| format!("bad peer {i}: {what}: {e}");
    let mut s = TcpStream::connect(endpoint).map_err(|e| fail("connect", e))?;
    s.set_read_timeout(Some(BAD_PEER_HANG_GUARD)).map_err(|e| fail("set_read_timeout", e))?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").map_err(|e| fail("write", e))?;
    let mut sink = [0u8; 512];
    loop {
        match s.read(&mut sink) {
            Ok(0) => return Ok(()),
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return Err(format!(
                    "bad peer {i}: the gateway did not close the connection within {} s (hang guard)",
                    BAD_PEER_HANG_GUARD.as_secs()
                ))
            }
            // A reset instead of the gateway's close: the flow ended before the gateway refused
            // it (passt gave it up), so no refusal of it can be in the log.
            Err(e) => return Err(fail("waiting for the gateway's close", e)),
        }
    }
}

fn refused_handshakes_are_summarised(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    with_gateway(a, vmm, dir, |vm, endpoint, inst, _| {
        served(endpoint, &own_client(inst)?)?;
        let console = || std::fs::read_to_string(&vm.console).unwrap_or_default();
        let before = console().len();
        let t = Instant::now();
        let next = std::sync::atomic::AtomicU64::new(0);
        let peers: Vec<String> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..BAD_AT_ONCE)
                .map(|_| {
                    scope.spawn(|| {
                        let mut failed = Vec::new();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            if i >= BAD {
                                return failed;
                            }
                            if let Err(e) = bad_peer(endpoint, i) {
                                failed.push(e);
                            }
                        }
                    })
                })
                .collect();
            workers.into_iter().flat_map(|w| w.join().unwrap_or_else(|_| vec!["a bad peer panicked".into()])).collect()
        });
        let closed = t.elapsed();
        if !peers.is_empty() {
            return Err(format!(
                "{} of {BAD} bad peers were not closed by the gateway, so their refusals cannot be counted: {}",
                peers.len(),
                peers.iter().take(5).cloned().collect::<Vec<_>>().join("; ")
            ));
        }
        // Every refusal is logged or counted now; the count of the last window is logged when the
        // window ends, so wait for it (a hang guard, not the property).
        let deadline = Instant::now() + WINDOW + SUMMARY_HANG_GUARD;
        let (lines, summarised, grown) = loop {
            let text = console();
            let new = &text[before.min(text.len())..];
            let Refusals { rejected, silent, summarised } = refusals_in(new);
            let lines = rejected + silent;
            if lines + summarised >= BAD || Instant::now() > deadline {
                break (lines, summarised, new.len());
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        let windows = t.elapsed().as_secs() / WINDOW.as_secs() + 2;
        support::note(format!(
            "{BAD} refused handshakes ({BAD_AT_ONCE} at once), all closed by the gateway after {:.1} s: {lines} logged \
             one by one, {summarised} in summaries; the console grew by {grown} bytes in {:.1} s",
            closed.as_secs_f64(),
            t.elapsed().as_secs_f64()
        ));
        if lines + summarised != BAD {
            return Err(format!(
                "the gateway closed all {BAD} bad peers, but the console accounts for {lines} + {summarised} refusals \
                 {} s after the last close (hang guard {} s past the window)",
                (t.elapsed() - closed).as_secs(),
                SUMMARY_HANG_GUARD.as_secs()
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
    with_gateway(a, vmm, dir, |vm, endpoint, inst, _| {
        served(endpoint, &own_client(inst)?)?;
        let console_before = std::fs::read_to_string(&vm.console).map(|c| c.len()).unwrap_or(0);
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
        let console = std::fs::read_to_string(&vm.console).unwrap_or_default();
        let gateway = refusals_in(&console[console_before.min(console.len())..]);
        support::note(format!(
            "the gateway's log over the burst: {} handshakes rejected, {} peers dropped as silent, {} more in summaries",
            gateway.rejected, gateway.silent, gateway.summarised
        ));
        match failures.first() {
            None => Ok(()),
            Some(first) => Err(format!(
                "{} of {CONCURRENT} concurrent mTLS clients through the forward were not served (first: {first}); the \
                 guest's listen queue lost none; the gateway logged {} rejected handshakes, {} peers dropped as silent \
                 and {} more in summaries",
                failures.len(),
                gateway.rejected,
                gateway.silent,
                gateway.summarised
            )),
        }
    })
}
