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

/// Whether the gateway has said it listens.
pub fn gateway_listening(console: &str) -> bool {
    guest_steps(console).iter().any(|(_, s)| s.starts_with(GATEWAY_LISTENING))
}

/// Peak resident set (VmHWM) of a live process, in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmHWM:")?.trim().strip_suffix(" kB")?.trim().parse().ok())
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
    fn reads_our_own_peak_rss() {
        assert!(peak_rss_kib(std::process::id()).unwrap() > 0);
    }
}
