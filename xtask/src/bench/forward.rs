//! `cargo xtask bench forward`: what a forwarded port carries. One VM, booted as `vm run --exec`
//! boots one (`check::launch_checked`), runs busybox in the guest: an echo server (`nc -ll -e
//! /bin/cat`) and a sink (`nc -l | wc -c`, which prints how many bytes arrived). Through the
//! forwards the host measures 1-byte round trips against the echo, and bytes/s into the sink:
//! from the first byte written until the guest closes the connection after the last, and the
//! guest's own count must equal what was sent.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::Context;
use openshell_instance::check::{self, Verification};
use openshell_vm::{PortMap, VmConfig};

const ECHO_PORT: u16 = 7001;
const SINK_PORT: u16 = 7002;
/// What the guest prints before the sink's byte count.
const SINK_MARK: &str = "sink-bytes:";
/// What the guest prints once the sink listens.
const READY: &str = "forward-bench-ready";

#[derive(clap::Args)]
pub struct ForwardArgs {
    /// 1-byte round trips through the echo
    #[arg(long, default_value_t = 2000)]
    round_trips: usize,
    /// MiB written into the sink
    #[arg(long, default_value_t = 64)]
    mib: usize,
    #[arg(long, default_value = "auto")]
    vmm: openshell_vm::VmmChoice,
    /// Machine-readable output
    #[arg(long)]
    json: bool,
}

impl ForwardArgs {
    pub fn run(self) -> anyhow::Result<()> {
        anyhow::ensure!(self.round_trips > 0 && self.mib > 0, "--round-trips and --mib must be at least 1");
        let sh = xshell::Shell::new()?;
        let a = super::Artifacts::build(&sh)?;
        crate::artifacts::ensure_vmm(&sh, self.vmm, openshell_vm::Net::Passt, None, openshell_artifacts::Arch::host())?;
        let state = tempfile::Builder::new().prefix("openshell-bench-forward-").tempdir()?;
        // Both held at once, so the kernel cannot hand out the same free port twice.
        let (l1, l2) = (std::net::TcpListener::bind("127.0.0.1:0")?, std::net::TcpListener::bind("127.0.0.1:0")?);
        let (echo, sink) = (l1.local_addr()?.port(), l2.local_addr()?.port());
        drop((l1, l2));
        // The guest says when the sink listens (the sink takes one connection, so it cannot be
        // probed). The sink's stdin never ends (a background job's stdin is /dev/null, and nc
        // half-closes the connection at stdin's EOF), so it reads until the host closes.
        let script = format!(
            "(sleep 100000 | nc -l -p {SINK_PORT} | wc -c | sed 's/^ */{SINK_MARK} /') & \\
             while ! netstat -ltn | grep -q ':{SINK_PORT} '; do sleep 0.05; done; echo {READY}; \\
             nc -ll -p {ECHO_PORT} -e /bin/cat"
        );
        let argv = ["/bin/sh", "-c", &script].iter().map(|s| s.to_string()).collect();
        let mut cfg = VmConfig::exec(a.kernel.clone(), a.rootfs.clone(), state.path().to_owned(), argv);
        cfg.net = openshell_vm::Net::Passt;
        cfg.ports = vec![PortMap { host: echo, guest: ECHO_PORT }, PortMap { host: sink, guest: SINK_PORT }];
        cfg.vmm = self.vmm;
        let pb = crate::progress::spinner("bench forward");
        pb.set_message("booting");
        let (mut vm, _) = check::launch_checked(&cfg, Verification::Required)?;
        // Bulk first: measured after the echo exchange, the sink ran ~10× slower here (seen once,
        // cause not found), and this figure should be of the forward alone.
        wait_for_line(&mut vm, READY, Duration::from_secs(120)).with_context(|| {
            format!("the guest never said its sink listens; console ends:\n{}", console_tail(&vm.console))
        })?;
        pb.set_message(format!("{} MiB into the sink", self.mib));
        let total = self.mib * 1024 * 1024;
        let mut s = TcpStream::connect(("127.0.0.1", sink))?;
        // A forward that stops moving data is an error with a message, not a hang.
        s.set_write_timeout(Some(Duration::from_secs(60)))?;
        let chunk = vec![0x5au8; 256 * 1024];
        let t = Instant::now();
        for _ in 0..total / chunk.len() {
            s.write_all(&chunk).with_context(|| {
                format!("writing into the sink failed; console ends:\n{}", console_tail(&vm.console))
            })?;
        }
        s.shutdown(std::net::Shutdown::Write)?;
        // The sink closes its end only after it has read everything we sent.
        s.set_read_timeout(Some(Duration::from_secs(300)))?;
        let _ = s.read(&mut [0u8; 16]);
        let secs = t.elapsed().as_secs_f64();
        let counted = wait_for_count(&vm.console, Duration::from_secs(30));
        anyhow::ensure!(
            counted == Some(total as u64),
            "the guest's sink counted {counted:?} bytes, the host sent {total}: the forward lost or the sink missed \
             data; console ends:\n{}",
            console_tail(&vm.console)
        );
        let mut conn = connect_echo(echo, &mut vm).with_context(|| {
            format!("the guest's echo never answered; console ends:\n{}", console_tail(&vm.console))
        })?;
        pb.set_message(format!("{} round trips", self.round_trips));
        let mut rtt = Vec::with_capacity(self.round_trips);
        let mut b = [0u8; 1];
        // The whole run is timed too: where the clock is coarse (a guest host whose clocksource
        // is jiffies, such as the nested host under TCG), one round trip can read as 0 µs, and the
        // mean over all of them is then the figure that still means something.
        let all = Instant::now();
        for i in 0..self.round_trips {
            let t = Instant::now();
            conn.write_all(&[i as u8])?;
            conn.read_exact(&mut b).context("the echo connection ended mid-benchmark")?;
            anyhow::ensure!(b[0] == i as u8, "the echo sent back {} for {}", b[0], i as u8);
            rtt.push(t.elapsed().as_secs_f64() * 1e6);
        }
        let mean = all.elapsed().as_secs_f64() * 1e6 / self.round_trips as f64;
        drop(conn);
        pb.finish_and_clear();
        drop(vm);
        let mib_s = self.mib as f64 / secs;
        let (p50, p99, max) = (super::quantile(&rtt, 0.5), super::quantile(&rtt, 0.99), super::quantile(&rtt, 1.0));
        if self.json {
            let doc = serde_json::json!({
                "round_trips": self.round_trips, "rtt_us": {"p50": p50, "p99": p99, "max": max, "mean": mean},
                // The guest's own count beside what was sent (equal, or the bench failed above).
                "sink_bytes_sent": total, "sink_bytes_counted": counted,
                "sink_seconds": secs, "sink_mib_per_s": mib_s,
            });
            println!("{}", serde_json::to_string_pretty(&doc)?);
        } else {
            println!("bench forward (passt, 127.0.0.1 → guest busybox nc):");
            println!(
                "  1-byte round trip  p50 {p50:.0} µs, p99 {p99:.0} µs, max {max:.0} µs, mean {mean:.0} µs (n={})",
                self.round_trips
            );
            println!(
                "  into the sink      {} MiB in {secs:.2} s = {mib_s:.1} MiB/s (guest counted {total} bytes)",
                self.mib
            );
        }
        Ok(())
    }
}

/// A connection on which one byte came back, retried while the guest boots (passt accepts on the
/// host at once; until the guest listens, the connection is reset).
fn connect_echo(port: u16, vm: &mut openshell_vm::RunningVm) -> anyhow::Result<TcpStream> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Some(status) = vm.exited() {
            anyhow::bail!("the VM exited ({status}) before the echo answered");
        }
        let attempt = || -> std::io::Result<TcpStream> {
            let mut c = TcpStream::connect(("127.0.0.1", port))?;
            c.set_nodelay(true)?;
            c.set_read_timeout(Some(Duration::from_secs(5)))?;
            c.write_all(b"?")?;
            let mut b = [0u8; 1];
            c.read_exact(&mut b)?;
            Ok(c)
        };
        match attempt() {
            Ok(c) => return Ok(c),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!("no echo within 120 s (last: {last})")
}

/// Waits for `line` on the console; a VM that exits first is that error, not a wait to the end.
fn wait_for_line(vm: &mut openshell_vm::RunningVm, line: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::fs::read_to_string(&vm.console).unwrap_or_default().lines().any(|l| l.trim() == line) {
            return Ok(());
        }
        if let Some(status) = vm.exited() {
            anyhow::bail!("the VM exited ({status}) before its console said {line:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let console = std::fs::read_to_string(&vm.console).unwrap_or_default();
    let silent = if openshell_vm::timeline::silent(&console) { openshell_vm::timeline::SILENT_GUEST } else { "" };
    anyhow::bail!(
        "no {line:?} on the console within {} s{}{silent}",
        timeout.as_secs(),
        if silent.is_empty() { "" } else { "; " }
    )
}

fn wait_for_count(console: &std::path::Path, timeout: Duration) -> Option<u64> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let text = std::fs::read_to_string(console).unwrap_or_default();
        if let Some(n) = text.lines().find_map(|l| l[l.find(SINK_MARK)? + SINK_MARK.len()..].trim().parse().ok()) {
            return Some(n);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

fn console_tail(console: &std::path::Path) -> String {
    super::tail(&std::fs::read_to_string(console).unwrap_or_default(), 20)
}
