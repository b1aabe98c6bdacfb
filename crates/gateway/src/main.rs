//! `openshell-gateway`: the control-plane process inside the microVM. It
//! owns only process concerns (flags, logging, runtime, signals); the
//! service itself lives in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use openshell_gateway::{serve, GatewayConfig, ServerMaterial};

#[derive(Parser, Debug)]
#[command(version, about = "Gateway control plane (gRPC over mutual TLS)")]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "GATEWAY_LISTEN", default_value = "0.0.0.0:30051")]
    listen: SocketAddr,
    /// Directory holding server.crt, server.key and ca.crt (the client CA).
    #[arg(long, env = "GATEWAY_TLS_DIR")]
    tls_dir: PathBuf,
    /// File holding the booted kernel's sha256 (reported by Info; optional).
    #[arg(long, env = "GATEWAY_KERNEL_DIGEST_FILE")]
    kernel_digest_file: Option<PathBuf>,
    /// File holding the rootfs's sha256 (reported by Info; optional).
    #[arg(long, env = "GATEWAY_ROOTFS_DIGEST_FILE")]
    rootfs_digest_file: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();

    // One thread is plenty for a control plane, and keeps the guest's
    // footprint small on a 1-vCPU VM.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("openshell-gateway: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("openshell-gateway: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let material = ServerMaterial::load(&args.tls_dir)?;
    raise_open_files_limit();
    let listener = openshell_gateway::tls::listen(args.listen)
        .map_err(|e| format!("binding {}: {e}; is another gateway already running?", args.listen))?;
    let addr = listener.local_addr()?;
    // No compute driver is built into this binary yet: sandbox calls say so (sandboxes::NO_DRIVER).
    let config = GatewayConfig {
        kernel_digest_file: args.kernel_digest_file,
        rootfs_digest_file: args.rootfs_digest_file,
        driver: None,
    };
    // Validate TLS before announcing readiness: a supervisor that waits for
    // this line should not see it from a gateway about to exit.
    openshell_gateway::tls::server_config(&material)?;
    // In init's timeline format (guest ms since boot), so the host's boot timeline shows it and
    // readiness knows when probing can succeed.
    eprintln!("openshell-gateway: [{:>6} ms] listening on {addr}", openshell_gateway::sysinfo::uptime_ms());
    serve(listener, &material, config, shutdown_signal()).await?;
    Ok(())
}

/// Each connection waiting for its handshake holds a descriptor, and init starts us with a soft
/// limit of 1024 (hard 4096): a thousand idle peers would then make `accept` fail with EMFILE and
/// stall the authenticated client behind them. Take the hard limit; failing that, keep going.
/// Info reports the limit in force (`open_files_limit`).
fn raise_open_files_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return };
    if soft < hard {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            eprintln!("openshell-gateway: raising the open-files limit: {e}");
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
