//! The boot timeline, read back from the guest console: init and the gateway print
//! `openshell-<program>: [N ms] step` with the guest's clock since boot.

/// The gateway's step once its TLS listener is bound.
const GATEWAY_LISTENING: &str = "gateway: listening on ";

/// (milliseconds since guest boot, step) for each stamped step on the console. Init's steps are
/// bare (`network up: …`); other programs' are prefixed with their name (`gateway: listening …`).
pub fn guest_steps(console: &str) -> Vec<(u64, String)> {
    console
        .lines()
        .filter_map(|l| {
            let (prog, rest) = l.strip_prefix("openshell-")?.split_once(": [")?;
            let (ms, what) = rest.split_once(" ms] ")?;
            let what = if prog == "init" { what.to_owned() } else { format!("{prog}: {what}") };
            Some((ms.trim().parse().ok()?, what))
        })
        .collect()
}

/// The boot timeline of a gateway boot, as `vm run` prints it and a detached supervisor logs it:
/// init's millisecond stamps from the `console` text (guest clock since its kernel started) between
/// the host's VMM start and its readiness `ready` after it. Two clocks: the VMM's own startup
/// (~0.1-0.3 s under TCG) sits between them and is observable from neither.
pub fn render(console: &str, ready: std::time::Duration) -> String {
    let mut out = String::from("boot timeline (host: ms since VMM start; guest: ms since its kernel started):\n");
    out.push_str(&format!("  host  {:>6} ms  VMM started\n", 0));
    out.push_str(&format!("  guest {:>6} ms  kernel started\n", 0));
    for (ms, what) in guest_steps(console) {
        out.push_str(&format!("  guest {ms:>6} ms  {what}\n"));
    }
    out.push_str(&format!("  host  {:>6} ms  mTLS health SERVING", ready.as_millis()));
    out
}

/// A step's phase name, without its details: `network up: eth0 …` → `network up`,
/// `gateway: listening on …` → `gateway listening`, `exec /usr/bin/x` → `exec`.
pub fn phase(step: &str) -> String {
    if let Some(rest) = step.strip_prefix("gateway: ") {
        return format!("gateway {}", rest.split(" on ").next().unwrap_or(rest));
    }
    let head = step.split(':').next().unwrap_or(step);
    match head.split_once(' ') {
        Some(("exec", _)) => "exec workload".to_owned(),
        _ => head.to_owned(),
    }
}

/// How a wait words a guest that stayed silent: not one step of init on its console, so its
/// kernel never got as far as running init (or its console never reached us). Where libkrun runs
/// nested under TCG this is a fault of the emulation, and the harness's nested retry keys on it.
pub const SILENT_GUEST: &str = "the guest printed no step of init on its console: it never reached userspace";

/// Whether the `console` text holds no step of init (see [`SILENT_GUEST`]).
pub fn silent(console: &str) -> bool {
    !console.lines().any(|l| l.starts_with("openshell-init: ["))
}

/// Whether the gateway has said it listens.
pub fn gateway_listening(console: &str) -> bool {
    guest_steps(console).iter().any(|(_, s)| s.starts_with(GATEWAY_LISTENING))
}

/// What the guest kernel prints when it gives up on the boot: init missing or not executable
/// (`Requested init … failed`), init exiting or crashing (`Attempted to kill init!`), a fault.
const KERNEL_PANIC: &str = "Kernel panic - not syncing: ";

/// The cause of a guest crash, when the `console` text holds the kernel's panic line: that line
/// from "Kernel panic" on (the console may prefix it with a timestamp).
pub fn guest_crash(console: &str) -> Option<String> {
    console.lines().find_map(|l| l.find(KERNEL_PANIC).map(|at| l[at..].trim_end().to_owned()))
}

/// Watches a console read in chunks for [`guest_crash`], across chunks that split a line, so a
/// run can end the moment the guest panics instead of waiting for a timeout.
#[derive(Debug, Default)]
pub struct CrashWatch {
    partial: Vec<u8>,
}

impl CrashWatch {
    /// A guest that prints without newlines must not grow the carried line without bound; the
    /// panic line is far shorter.
    const MAX_PARTIAL: usize = 4096;

    /// Feeds the console bytes read since the last call; the crash's cause once a complete line
    /// names one.
    pub fn feed(&mut self, new: &[u8]) -> Option<String> {
        self.partial.extend_from_slice(new);
        let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') else {
            let excess = self.partial.len().saturating_sub(Self::MAX_PARTIAL);
            self.partial.drain(..excess);
            return None;
        };
        let complete: Vec<u8> = self.partial.drain(..=end).collect();
        guest_crash(&String::from_utf8_lossy(&complete))
    }
}

/// What init prints first, and only init: its stamped step lines start with it (`init started` is
/// the first). Seen on a console, the guest's kernel handed over to our PID 1: the guest reached
/// userspace. The kernel's own lines, a VMM's banner or a guest that panics before init never
/// print it.
const INIT_STAMP: &[u8] = b"openshell-init: [";

/// Whether a guest reached userspace, decided here and nowhere else: init's first stamped line on
/// its console, or (see [`crate::launch`]) the exit-code file init writes into the share. Fed
/// the console in chunks as it grows; a stamp split across two chunks is still seen.
#[derive(Debug, Default)]
pub struct UserspaceEvidence {
    /// The end of the last chunk, short of a whole stamp: where a split stamp begins.
    carry: Vec<u8>,
    seen: bool,
}

impl UserspaceEvidence {
    /// Feeds the console bytes read since the last call; true once init's stamp has appeared.
    pub fn feed(&mut self, new: &[u8]) -> bool {
        if self.seen {
            return true;
        }
        self.carry.extend_from_slice(new);
        self.seen = self.carry.windows(INIT_STAMP.len()).any(|w| w == INIT_STAMP);
        let keep = INIT_STAMP.len() - 1;
        let excess = self.carry.len().saturating_sub(keep);
        self.carry.drain(..excess);
        self.seen
    }
}

/// Peak resident set (VmHWM) of a live process, in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    rss_kib(pid).map(|(_, peak)| peak)
}

/// The resident set of a live process now and at its peak (VmRSS, VmHWM), in KiB, from one read
/// of its status: the kernel's own counters, so the peak is never below the figure beside it (a
/// sum over `smaps` can be, as the counters lag the page tables).
pub fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |key: &str| {
        status.lines().find_map(|l| l.strip_prefix(key)?.trim().strip_suffix(" kB")?.trim().parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_steps_and_skips_other_lines() {
        let c = "Linux version 6.1\nopenshell-init: [   718 ms] init started\nnoise\nopenshell-init: [  1035 ms] network up: eth0\n";
        assert_eq!(guest_steps(c), vec![(718, "init started".into()), (1035, "network up: eth0".into())]);
        assert!(!gateway_listening(c));
        let c = format!("{c}openshell-gateway: [  1210 ms] listening on 0.0.0.0:30051\n");
        assert_eq!(guest_steps(&c)[2], (1210, "gateway: listening on 0.0.0.0:30051".into()));
        assert!(gateway_listening(&c));
    }

    #[test]
    fn phases_drop_details() {
        assert_eq!(phase("network up: eth0 192.0.2.2/24 via 192.0.2.1 (static)"), "network up");
        assert_eq!(phase("gateway: listening on 0.0.0.0:30051"), "gateway listening");
        assert_eq!(phase("exec /usr/bin/openshell-gateway"), "exec workload");
        assert_eq!(phase("init started"), "init started");
    }

    #[test]
    fn a_panic_line_is_the_cause_even_when_split_across_reads() {
        let panic = "[    0.61] Kernel panic - not syncing: Requested init /sbin/openshell-init failed (error -8).\n";
        assert_eq!(guest_crash("Linux version 6.1\nok\n"), None);
        let cause = "Kernel panic - not syncing: Requested init /sbin/openshell-init failed (error -8).";
        assert_eq!(guest_crash(panic).as_deref(), Some(cause));
        let mut w = CrashWatch::default();
        let (a, b) = panic.split_at(30);
        assert_eq!(w.feed(b"Linux version 6.1\n"), None);
        assert_eq!(w.feed(a.as_bytes()), None);
        assert_eq!(w.feed(b.as_bytes()).as_deref(), Some(cause));
        // A line without end keeps only its tail.
        let mut w = CrashWatch::default();
        assert_eq!(w.feed(&vec![b'x'; 100_000]), None);
        assert!(w.partial.len() <= CrashWatch::MAX_PARTIAL);
    }

    #[test]
    fn userspace_is_init_stamp_only_even_when_split() {
        let mut e = UserspaceEvidence::default();
        assert!(!e.feed(b"Linux version 6.1\n[    0.5] Run /sbin/openshell-init as init process\n"));
        assert!(!e.feed(b"Kernel panic - not syncing: Attempted to kill init!\n"));
        let line = b"openshell-init: [   718 ms] init started\n";
        let (a, b) = line.split_at(9);
        assert!(!e.feed(a));
        assert!(e.feed(b));
        assert!(e.feed(b""), "once seen, stays seen");
        // A console that never says it keeps only a stamp's length, however long it grows.
        let mut e = UserspaceEvidence::default();
        assert!(!e.feed(&vec![b'x'; 100_000]));
        assert!(e.carry.len() < INIT_STAMP.len());
    }

    #[test]
    #[cfg_attr(not(target_os = "linux"), ignore = "peak RSS is read from /proc/<pid>/status, which macOS lacks")]
    fn reads_our_own_peak_rss() {
        assert!(peak_rss_kib(std::process::id()).unwrap() > 0);
        let (now, peak) = rss_kib(std::process::id()).unwrap();
        assert!(0 < now && now <= peak, "{now} {peak}");
    }
}
