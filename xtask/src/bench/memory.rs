//! `cargo xtask bench memory`: where a gateway VM's memory goes, at several `--mem` sizes. Each
//! size boots a gateway (as `vm run` does), puts a short load on it (64 clients × 20 health
//! RPCs, so the figure is of a gateway that has worked, not one that only started), then reads
//! the VMM's `/proc/PID/smaps`: the guest's RAM is the VMM's one anonymous, non-executable
//! mapping of the guest's size (under libkrun, with the root's DAX window merged in), and its
//! resident part is the memory the guest touched; the rest of the VMM's resident set (its
//! `/proc/PID/status` figure) is the VMM's own overhead (under TCG, the translated code included).

use std::time::Duration;

#[derive(clap::Args)]
pub struct MemoryArgs {
    /// Guest memory sizes to try, MiB
    #[arg(long, value_delimiter = ',', default_value = "128,192,256,512,1024")]
    mem: Vec<u32>,
    #[arg(long, default_value = "auto")]
    vmm: openshell_vm::VmmChoice,
    /// Machine-readable output
    #[arg(long)]
    json: bool,
}

#[derive(serde::Serialize)]
struct Row {
    mem_mib: u32,
    /// Why the gateway did not serve at this size, if it did not.
    failed: Option<String>,
    load_errors: Option<usize>,
    /// VMM start → mTLS SERVING at this size (one boot: a hint, not a median).
    ready_ms: Option<f64>,
    vmm_rss_mib: Option<f64>,
    vmm_peak_rss_mib: Option<f64>,
    guest_touched_mib: Option<f64>,
    vmm_overhead_mib: Option<f64>,
}

impl MemoryArgs {
    pub fn run(self) -> anyhow::Result<()> {
        let sh = xshell::Shell::new()?;
        let a = super::Artifacts::build(&sh)?;
        crate::artifacts::ensure_vmm(&sh, self.vmm, openshell_vm::Net::Passt, None, openshell_artifacts::Arch::host())?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let pb = crate::progress::spinner("bench memory");
        let mut rows = Vec::new();
        for &mem in &self.mem {
            pb.set_message(format!("--mem {mem}"));
            let root = tempfile::Builder::new().prefix("openshell-bench-mem-").tempdir()?;
            let mut row = Row {
                mem_mib: mem,
                failed: None,
                load_errors: None,
                ready_ms: None,
                vmm_rss_mib: None,
                vmm_peak_rss_mib: None,
                guest_touched_mib: None,
                vmm_overhead_mib: None,
            };
            match super::gateway(&a, self.vmm, &super::gateways_in(root.path()), "bench-mem", Some(mem)) {
                Err(e) => row.failed = Some(first_line(&format!("{e:#}"))),
                Ok((inst, up)) => {
                    let bundle = inst.client_bundle()?;
                    row.ready_ms = Some(up.ready.as_secs_f64() * 1e3);
                    row.load_errors = Some(rt.block_on(super::load::round(&up.endpoint, &bundle, 64, 20)).errors);
                    std::thread::sleep(Duration::from_millis(500));
                    let pid = up.vm.pid();
                    let kib = |k: u64| k as f64 / 1024.0;
                    // The VMM's resident set from the kernel's counters (beside its peak, from the
                    // same read); the guest's part from its mapping in smaps.
                    let rss = openshell_vm::timeline::rss_kib(pid);
                    row.vmm_rss_mib = rss.map(|(now, _)| kib(now));
                    row.vmm_peak_rss_mib = rss.map(|(_, peak)| kib(peak));
                    if let Some(Split { guest_kib, largest_kib }) = smaps_split(pid, mem) {
                        row.guest_touched_mib = guest_kib.map(kib);
                        row.vmm_overhead_mib = guest_kib.zip(rss).map(|(g, (now, _))| kib(now) - kib(g));
                        if guest_kib.is_none() {
                            let seen: Vec<String> = largest_kib.iter().map(|k| format!("{:.1}", kib(*k))).collect();
                            row.failed = Some(format!(
                                "no mapping of the VMM holds the guest's {mem} MiB; its largest anonymous writable ones are {} MiB",
                                seen.join(", ")
                            ));
                        }
                    }
                }
            }
            rows.push(row);
        }
        pb.finish_and_clear();
        if self.json {
            println!("{}", serde_json::to_string_pretty(&rows)?);
            return Ok(());
        }
        let cell = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
        println!("bench memory: gateway after 64×20 health RPCs, VMM /proc/PID/smaps (MiB):");
        println!(
            "  {:>8} {:>9} {:>9} {:>13} {:>13} {:>7} {:>11}",
            "--mem", "VMM RSS", "peak RSS", "guest touched", "VMM overhead", "errors", "SERVING ms"
        );
        for r in &rows {
            println!(
                "  {:>8} {:>9} {:>9} {:>13} {:>13} {:>7} {:>11}",
                r.mem_mib,
                cell(r.vmm_rss_mib),
                cell(r.vmm_peak_rss_mib),
                cell(r.guest_touched_mib),
                cell(r.vmm_overhead_mib),
                r.load_errors.map_or("-".into(), |e| e.to_string()),
                cell(r.ready_ms)
            );
            if let Some(f) = &r.failed {
                println!("    did not serve: {f}");
            }
        }
        Ok(())
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().to_owned()
}

/// libkrun's root virtio-fs device (`krun_set_root`) reserves a DAX window of this size, mapped
/// right after the guest's RAM (libkrun 1.19's "conservative 512 MB window"), and the kernel
/// merges the two anonymous mappings into one. The window is only reserved (the guest mounts its
/// root without DAX), so that mapping's resident part is still the RAM the guest touched.
const KRUN_ROOT_DAX_WINDOW_KIB: u64 = 512 * 1024;

/// What the VMM's smaps say: the resident KiB of the mapping that holds the guest's RAM.
struct Split {
    guest_kib: Option<u64>,
    /// The largest anonymous writable mappings (KiB), to name when none is the guest's.
    largest_kib: Vec<u64>,
}

/// The VMM's resident KiB in the mapping that holds the guest's RAM (anonymous,
/// writable, not executable, `mem_mib` long, or that plus libkrun's root DAX window, each within
/// 8 MiB), if one is found.
fn smaps_split(pid: u32, mem_mib: u32) -> Option<Split> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    Some(split(&text, mem_mib))
}

fn split(smaps: &str, mem_mib: u32) -> Split {
    let want = u64::from(mem_mib) * 1024;
    let sizes = [want, want + KRUN_ROOT_DAX_WINDOW_KIB];
    let mut guest = None::<u64>;
    let (mut candidate, mut size) = (false, 0u64);
    let mut anonymous = Vec::new();
    let kb = |l: &str, key: &str| l.strip_prefix(key)?.trim().strip_suffix(" kB")?.trim().parse::<u64>().ok();
    for line in smaps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // A mapping's header: "start-end perms offset dev inode [path]".
        if fields.len() >= 5 && fields[0].contains('-') && fields[1].len() == 4 {
            let perms = fields[1];
            candidate = perms.starts_with("rw") && !perms.contains('x') && fields.len() == 5;
            size = 0;
        } else if let Some(s) = kb(line, "Size:") {
            size = s;
            if candidate {
                anonymous.push(s);
            }
        } else if let Some(rss) = kb(line, "Rss:") {
            if candidate && sizes.iter().any(|w| (*w..w + 8 * 1024).contains(&size)) {
                guest = Some(guest.map_or(rss, |g| g.max(rss)));
            }
        }
    }
    anonymous.sort_unstable_by(|a, b| b.cmp(a));
    anonymous.truncate(3);
    Split { guest_kib: guest, largest_kib: anonymous }
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_the_guest_ram_among_the_mappings() {
        let smaps = "\
55d0-55e0 r-xp 00000000 08:01 123 /usr/bin/qemu-system-x86_64
Size:               4096 kB
Rss:                3000 kB
7f00-7f40 rw-p 00000000 00:00 0
Size:             526336 kB
Rss:              100000 kB
7f40-7f80 rwxp 00000000 00:00 0
Size:             524288 kB
Rss:               20000 kB
";
        assert_eq!(super::split(smaps, 512).guest_kib, Some(100000));
        let none = super::split(smaps, 256);
        assert_eq!(none.guest_kib, None);
        assert_eq!(none.largest_kib, [526336]);
    }

    #[test]
    fn under_libkrun_the_guest_ram_is_merged_with_the_root_dax_window() {
        let smaps = "\
7f00-7f40 rw-p 00000000 00:00 0
Size:             786432 kB
Rss:               41000 kB
7f40-7f80 rw-p 00000000 00:00 0
Size:               2048 kB
Rss:                2000 kB
";
        assert_eq!(super::split(smaps, 256).guest_kib, Some(41000));
    }
}
