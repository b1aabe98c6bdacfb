//! The boot timeline, read back from the guest console: init prints `openshell-init: [N ms] step`
//! with the guest's clock since boot.

/// (milliseconds since guest boot, step) for each init step on the console.
pub fn init_steps(console: &str) -> Vec<(u64, String)> {
    console
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("openshell-init: [")?;
            let (ms, what) = rest.split_once(" ms] ")?;
            Some((ms.trim().parse().ok()?, what.to_owned()))
        })
        .collect()
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
        assert_eq!(init_steps(c), vec![(718, "init started".into()), (1035, "network up: eth0".into())]);
    }

    #[test]
    fn reads_our_own_peak_rss() {
        assert!(peak_rss_kib(std::process::id()).unwrap() > 0);
    }
}
