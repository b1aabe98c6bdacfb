//! `cargo xtask bench load`: one gateway booted as `vm run` boots it, then, for each `--shape
//! CxR`, C concurrent mTLS clients (each its own connection, through the forward) that first all
//! connect, then each make R health RPCs one after another. Reports errors, RPC/s, p50/p99/max
//! latency, and new connections per second (C handshakes over the wall of the connect phase).
//! Figures only: an error is counted and shown, a slow answer is a number.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic_health::pb::health_check_response::ServingStatus;

#[derive(clap::Args)]
pub struct LoadArgs {
    /// Clients × RPCs per client, e.g. 64x100 (repeatable; each runs against the same gateway)
    #[arg(long = "shape", value_parser = parse_shape, default_value = "64x100")]
    shapes: Vec<(usize, usize)>,
    #[arg(long, default_value = "auto")]
    vmm: openshell_vm::VmmChoice,
    /// Machine-readable output
    #[arg(long)]
    json: bool,
}

fn parse_shape(s: &str) -> Result<(usize, usize), String> {
    let bad = || format!("--shape {s:?} is not CLIENTSxRPCS (e.g. 64x100), both at least 1");
    let (c, r) = s.split_once('x').ok_or_else(bad)?;
    let (c, r) = (c.parse().map_err(|_| bad())?, r.parse().map_err(|_| bad())?);
    if c == 0 || r == 0 {
        return Err(bad());
    }
    Ok((c, r))
}

/// One client's part of a round.
#[derive(Default)]
struct ClientRun {
    connect_ms: Option<f64>,
    rpc_ms: Vec<f64>,
    errors: Vec<String>,
}

#[derive(serde::Serialize)]
pub(super) struct Round {
    clients: usize,
    rpcs_per_client: usize,
    pub(super) errors: usize,
    /// Up to five distinct error messages.
    error_kinds: Vec<String>,
    connect_phase_ms: f64,
    new_connections_per_s: f64,
    connect_p50_ms: f64,
    connect_max_ms: f64,
    rpc_phase_ms: f64,
    rpcs_ok: usize,
    rpcs_per_s: f64,
    rpc_p50_ms: f64,
    rpc_p99_ms: f64,
    rpc_max_ms: f64,
}

impl LoadArgs {
    pub fn run(self) -> anyhow::Result<()> {
        let sh = xshell::Shell::new()?;
        let a = super::Artifacts::build(&sh)?;
        crate::artifacts::ensure_vmm(&sh, self.vmm, openshell_vm::Net::Passt, None, openshell_artifacts::Arch::host())?;
        let root = tempfile::Builder::new().prefix("openshell-bench-load-").tempdir()?;
        let pb = crate::progress::spinner("bench load");
        pb.set_message("booting the gateway");
        let (inst, up) = super::gateway(&a, self.vmm, &super::gateways_in(root.path()), "bench-load", None)?;
        let bundle = inst.client_bundle()?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let mut rounds = Vec::new();
        for &(c, r) in &self.shapes {
            pb.set_message(format!("{c} clients × {r} RPCs"));
            rounds.push(rt.block_on(round(&up.endpoint, &bundle, c, r)));
        }
        pb.finish_and_clear();
        let console = std::fs::read_to_string(&up.vm.console).unwrap_or_default();
        let alive = up.vm.pid();
        drop(up);
        if self.json {
            println!("{}", serde_json::to_string_pretty(&rounds)?);
        } else {
            println!("bench load: gateway VMM pid {alive}, {} console lines during the run", console.lines().count());
            println!(
                "  {:>9} {:>6} {:>10} {:>9} {:>8} {:>8} {:>8} {:>10}",
                "clients×R", "errors", "conn/s", "RPC/s", "p50 ms", "p99 ms", "max ms", "conn p50"
            );
            for x in &rounds {
                println!(
                    "  {:>9} {:>6} {:>10.1} {:>9.1} {:>8.1} {:>8.1} {:>8.1} {:>10.1}",
                    format!("{}×{}", x.clients, x.rpcs_per_client),
                    x.errors,
                    x.new_connections_per_s,
                    x.rpcs_per_s,
                    x.rpc_p50_ms,
                    x.rpc_p99_ms,
                    x.rpc_max_ms,
                    x.connect_p50_ms
                );
                for e in &x.error_kinds {
                    println!("    error: {e}");
                }
            }
        }
        Ok(())
    }
}

/// `c` clients connect at once; when all have connected (or failed), each makes `r` health RPCs.
pub(super) async fn round(endpoint: &str, bundle: &openshell_gateway::ClientBundle, c: usize, r: usize) -> Round {
    let barrier = Arc::new(tokio::sync::Barrier::new(c + 1));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..c {
        let (endpoint, bundle, barrier) = (endpoint.to_owned(), bundle.clone(), barrier.clone());
        tasks.spawn(async move {
            let mut run = ClientRun::default();
            let t = Instant::now();
            let channel = match openshell_gateway::connect(&endpoint, &bundle, "localhost").await {
                Ok(ch) => {
                    run.connect_ms = Some(t.elapsed().as_secs_f64() * 1e3);
                    Some(ch)
                }
                Err(e) => {
                    run.errors.push(format!("connect: {e}"));
                    None
                }
            };
            // Everyone connects first, so the RPC phase measures RPCs, not handshakes.
            barrier.wait().await;
            if let Some(ch) = channel {
                for _ in 0..r {
                    let t = Instant::now();
                    match openshell_gateway::health(&ch).await {
                        Ok(ServingStatus::Serving) => run.rpc_ms.push(t.elapsed().as_secs_f64() * 1e3),
                        Ok(other) => run.errors.push(format!("health said {other:?}")),
                        Err(e) => run.errors.push(format!("rpc: {e}")),
                    }
                }
            }
            run
        });
    }
    let t0 = Instant::now();
    barrier.wait().await;
    let connect_phase = t0.elapsed();
    let t1 = Instant::now();
    let mut runs = Vec::with_capacity(c);
    while let Some(res) = tasks.join_next().await {
        runs.push(
            res.unwrap_or_else(|e| ClientRun { errors: vec![format!("client task: {e}")], ..Default::default() }),
        );
    }
    let rpc_phase = t1.elapsed();
    summarize(c, r, &runs, connect_phase, rpc_phase)
}

fn summarize(c: usize, r: usize, runs: &[ClientRun], connect_phase: Duration, rpc_phase: Duration) -> Round {
    let connects: Vec<f64> = runs.iter().filter_map(|x| x.connect_ms).collect();
    let rpcs: Vec<f64> = runs.iter().flat_map(|x| x.rpc_ms.iter().copied()).collect();
    let errors: Vec<&String> = runs.iter().flat_map(|x| &x.errors).collect();
    let mut kinds: Vec<String> = Vec::new();
    for e in &errors {
        if kinds.len() < 5 && !kinds.contains(e) {
            kinds.push((*e).clone());
        }
    }
    let per_s = |n: usize, d: Duration| n as f64 / d.as_secs_f64().max(1e-9);
    Round {
        clients: c,
        rpcs_per_client: r,
        errors: errors.len(),
        error_kinds: kinds,
        connect_phase_ms: connect_phase.as_secs_f64() * 1e3,
        new_connections_per_s: per_s(connects.len(), connect_phase),
        connect_p50_ms: super::quantile(&connects, 0.5),
        connect_max_ms: super::quantile(&connects, 1.0),
        rpc_phase_ms: rpc_phase.as_secs_f64() * 1e3,
        rpcs_ok: rpcs.len(),
        rpcs_per_s: per_s(rpcs.len(), rpc_phase),
        rpc_p50_ms: super::quantile(&rpcs, 0.5),
        rpc_p99_ms: super::quantile(&rpcs, 0.99),
        rpc_max_ms: super::quantile(&rpcs, 1.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_parse_and_refuse_zero() {
        assert_eq!(parse_shape("256x20"), Ok((256, 20)));
        assert!(parse_shape("0x5").unwrap_err().contains("CLIENTSxRPCS"));
        assert!(parse_shape("64").is_err());
    }

    #[test]
    fn errors_are_counted_not_hidden() {
        let runs = [
            ClientRun { connect_ms: Some(2.0), rpc_ms: vec![1.0, 3.0], errors: vec![] },
            ClientRun { connect_ms: None, rpc_ms: vec![], errors: vec!["connect: refused".into()] },
        ];
        let r = summarize(2, 2, &runs, Duration::from_secs(1), Duration::from_secs(1));
        assert_eq!((r.errors, r.rpcs_ok, r.error_kinds.len()), (1, 2, 1));
        assert_eq!(r.rpc_max_ms, 3.0);
        assert_eq!(r.new_connections_per_s, 1.0);
    }
}
