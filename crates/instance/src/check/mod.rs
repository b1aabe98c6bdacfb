//! The host capability matrix (`cargo xtask check`) and the preflight every `vm run` passes before
//! a VMM starts: the same rows, so a refused boot says exactly what the check says.
//!
//! [`probe`] gathers [`Facts`] (the only part that touches the system), [`rows`] turns facts into
//! PASS / WARN / FAIL rows, and this module assembles them: [`host_report`] for the whole host,
//! [`preflight`] for one [`VmConfig`] (one usable VMM, passt when it is networked, its ports, and
//! the kernel and rootfs verified against their recorded sha256). [`launch_checked`] is the entry
//! point `vm run` boots through.
//!
//! Rows that cannot apply on this OS are left out rather than shown as "PASS (not applicable)":
//! a PASS claims something was checked, and a JSON consumer should not have to tell real passes
//! from fillers. So Linux shows no `hvf` / `gvproxy` / `entitlement` rows, and macOS no
//! `kvm-device` / `kvm-kind` / `passt` rows.

pub mod facts;
pub mod probe;
pub mod rows;

use openshell_matrix::{Matrix, Row, Status};
use serde_json::json;

pub use facts::{Artifact, Facts, Os};
pub use probe::{probe, ProbeRequest};
pub use rows::Verification;

use openshell_vm::plan::{Need, Net, Planned};
use openshell_vm::{RunningVm, VmConfig, VmError, VmmChoice};

/// What `cargo xtask check` prints: the matrix and where the artifacts came from.
#[derive(Debug, Clone)]
pub struct HostReport {
    pub matrix: Matrix,
    /// `{kernel, rootfs}`: each artifact's recorded provenance, `null` when there is none.
    pub provenance: serde_json::Value,
    provenance_text: String,
}

impl HostReport {
    pub fn exit_code(&self) -> i32 {
        self.matrix.exit_code()
    }

    pub fn render(&self) -> String {
        format!("{}\n{}", self.matrix.render(), self.provenance_text)
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mut v = self.matrix.to_json();
        v["provenance"] = self.provenance.clone();
        v
    }
}

/// Every row for this host, with the plan for `--vmm <choice>` and `--net <net>` (`None`: the
/// platform's network) deciding the `vmm` row and the network helper's row.
pub fn host_report(f: &Facts, choice: VmmChoice, net: Option<Net>) -> HostReport {
    let plan = openshell_vm::plan(&f.host, choice, net.unwrap_or(Net::default_for(f.host.os)));
    let mut m = Matrix::new("host");
    match f.host.os {
        Os::Linux => {
            m.push(rows::hardware_virt(f));
            m.push(rows::kvm_device(f));
            if let Some(r) = rows::kvm_kind(f) {
                m.push(r);
            }
        }
        Os::MacOs => m.push(rows::hvf(f)),
    }
    m.push(rows::backend_krun(f, &plan));
    if f.host.os == Os::Linux {
        m.push(rows::backend_qemu(f));
    }
    m.push(rows::vmm(&plan));
    // The network helper the plan needs (passt or gvproxy, none for --net none).
    for need in &plan.needs {
        match need {
            Need::Passt => m.push(rows::passt(f)),
            Need::Gvproxy => m.push(rows::gvproxy(f)),
            Need::Qemu | Need::VmmBinary => {}
        }
    }
    if f.host.os == Os::MacOs {
        m.push(rows::entitlement(f));
    }
    m.push(rows::kernel(f, Verification::Required));
    m.push(rows::rootfs(f, Verification::Required));
    for p in &f.ports {
        m.push(rows::port("gateway-port", p));
    }
    if let Some(r) = rows::disk(f) {
        m.push(r);
    }
    let (provenance, provenance_text) = provenance(f);
    HostReport { matrix: m, provenance, provenance_text }
}

/// `cfg` with the plan for booting it on this host, and the rows that boot needs: the VMM the plan
/// picks, what the plan says the boot needs (passt or gvproxy; the VMM's entitlement on macOS),
/// its ports and its artifacts.
pub fn preflight_matrix(f: &Facts, cfg: VmConfig, verification: Verification) -> (Planned, Matrix) {
    let planned = Planned::new(&f.host, cfg);
    let plan = planned.plan();
    let mut m = Matrix::new("preflight");
    m.push(rows::vmm(plan));
    for need in &plan.needs {
        match need {
            // The vmm row above already fails when QEMU is missing.
            Need::Qemu => {}
            Need::Passt => m.push(rows::passt(f)),
            Need::Gvproxy => m.push(match &plan.gvproxy {
                Some(binary) => rows::gvproxy_for_boot(f, binary, binary.is_file()),
                None => rows::gvproxy(f),
            }),
            Need::VmmBinary if f.host.os == Os::MacOs => m.push(rows::entitlement(f)),
            Need::VmmBinary => {}
        }
    }
    for p in &f.ports {
        let id = if f.ports.len() == 1 { "host-port".to_owned() } else { format!("host-port-{}", p.port) };
        m.push(rows::port(&id, p));
    }
    m.push(rows::kernel(f, verification));
    m.push(rows::rootfs(f, verification));
    if let Some(r) = rows::root_disk(f, verification) {
        m.push(r);
    }
    (planned, m)
}

/// The preflight that passed: its rows, WARNs included, for the caller to show.
#[derive(Debug, Clone)]
pub struct Preflight {
    pub matrix: Matrix,
    /// What the boot that passed runs: the config with its plan, which [`openshell_vm::launch`] takes.
    pub planned: Planned,
}

impl Preflight {
    pub fn warnings(&self) -> impl Iterator<Item = &Row> {
        self.matrix.rows.iter().filter(|r| r.status == Status::Warn)
    }
}

/// Probes what booting `cfg` needs and refuses (naming the failing rows, as `cargo xtask check`
/// would) when a required row fails. A kernel or rootfs that does not match its record fails
/// unless `verification` allows it, in which case it is a logged warning. A forward asking for
/// host port 0 gets its free port here, so the checked config (and the endpoint read from it)
/// names the port the boot binds.
pub fn preflight(mut cfg: VmConfig, verification: Verification) -> Result<Preflight, VmError> {
    if cfg.net != Net::None {
        openshell_vm::net::assign_free_ports(&mut cfg.ports)?;
    }
    let req = ProbeRequest {
        kernel: Ok(cfg.kernel.clone()),
        rootfs: Ok(cfg.rootfs.clone()),
        root_disk: match &cfg.root {
            openshell_vm::Root::Disk { image, .. } => Some(image.clone()),
            openshell_vm::Root::Share => None,
        },
        ports: if cfg.net == Net::None { Vec::new() } else { cfg.ports.iter().map(|p| p.host).collect() },
        store_root: None,
        gateways_root: crate::state::gateways_root(),
    };
    let facts = probe(&req);
    let (planned, matrix) = preflight_matrix(&facts, cfg, verification);
    for r in matrix.rows.iter().filter(|r| r.status == Status::Warn) {
        tracing::warn!(row = %r.id, reason = %r.reason, "preflight warning");
    }
    if matrix.exit_code() != openshell_matrix::EXIT_OK {
        return Err(VmError::Refused(matrix.render()));
    }
    Ok(Preflight { matrix, planned })
}

/// [`preflight`], then [`openshell_vm::launch`]: the way `vm run` boots, so no VMM starts with an
/// unverified artifact or a missing requirement.
pub fn launch_checked(cfg: &VmConfig, verification: Verification) -> Result<(RunningVm, Preflight), VmError> {
    let pre = preflight(cfg.clone(), verification)?;
    Ok((openshell_vm::launch(&pre.planned)?, pre))
}

/// Each artifact's provenance: JSON for `--json`, and indented lines for the table.
fn provenance(f: &Facts) -> (serde_json::Value, String) {
    let mut text = String::from("provenance:\n");
    let kernel = match &f.kernel {
        Artifact::Checked(c) => {
            let p = &c.provenance;
            text.push_str(&format!(
                "  kernel  {} for {} from {} {}, built {} in {:.0} s on {}\n",
                p.kernel_release,
                p.arch,
                p.source_package,
                p.source_version,
                utc(p.built_at_unix),
                p.build_seconds,
                p.host
            ));
            let image = p.arch.kernel_image().file_name;
            text.push_str(&format!("          {image} sha256 {}, build key {}\n", p.vmlinux_sha256, p.key.short()));
            let frags: Vec<String> =
                p.fragments.iter().map(|fr| format!("{} {}", fr.name, fr.sha256.short())).collect();
            text.push_str(&format!("          fragments: {}\n", frags.join(", ")));
            serde_json::to_value(p).expect("provenance serializes")
        }
        _ => {
            text.push_str("  kernel  (none recorded)\n");
            serde_json::Value::Null
        }
    };
    let rootfs = match &f.rootfs {
        Artifact::Checked(c) => {
            let p = &c.provenance;
            text.push_str(&format!(
                "  rootfs  manifest sha256 {}: {} files, {} symlinks, baked {}\n",
                p.manifest_sha256,
                p.files,
                p.symlinks,
                p.baked_at_unix.map_or("at an unknown time".into(), utc)
            ));
            serde_json::to_value(p).expect("provenance serializes")
        }
        _ => {
            text.push_str("  rootfs  (none recorded)\n");
            serde_json::Value::Null
        }
    };
    (json!({ "kernel": kernel, "rootfs": rootfs }), text)
}

/// `YYYY-MM-DD HH:MM UTC` from Unix seconds (civil-from-days, so no date crate is needed).
fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02} UTC", rem / 3600, rem % 3600 / 60)
}

#[cfg(test)]
mod tests {
    use super::rows::tests::{healthy, pvm};
    use super::*;

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(utc(1_795_548_776), "2026-11-24 19:32 UTC");
    }

    #[test]
    fn pvm_host_passes_with_warnings_and_shows_provenance() {
        let r = host_report(&pvm(), VmmChoice::Auto, None);
        assert_eq!(r.exit_code(), 0, "{}", r.render());
        let ids: Vec<&str> = r.matrix.rows.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "hardware-virt",
                "kvm-device",
                "kvm-kind",
                "backend-krun",
                "backend-qemu",
                "vmm",
                "passt",
                "kernel",
                "rootfs",
                "gateway-port",
                "disk"
            ]
        );
        let text = r.render();
        assert!(text.contains("linux-source-6.1 6.1.192-2") && text.contains("2026-11-24 19:32 UTC"), "{text}");
        assert_eq!(r.to_json()["provenance"]["kernel"]["source_version"], "6.1.192-2");
    }

    #[test]
    fn a_required_failure_makes_the_host_report_exit_1() {
        let mut f = healthy();
        f.host.passt = None;
        let r = host_report(&f, VmmChoice::Auto, None);
        assert_eq!(r.exit_code(), 1);
        assert!(r.render().contains("required failing: passt"));
    }

    #[test]
    fn preflight_checks_only_what_the_boot_needs() {
        let mut f = healthy();
        f.host.passt = None;
        f.disk = None;
        f.ports.clear();
        let cfg = VmConfig::exec("/k".into(), "/r".into(), "/s".into(), vec!["/bin/true".into()]);
        let (_, m) = preflight_matrix(&f, cfg.clone(), Verification::Required);
        assert_eq!(m.rows.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["vmm", "kernel", "rootfs"]);
        let mut cfg = cfg;
        cfg.net = Net::Passt;
        let (_, m) = preflight_matrix(&f, cfg, Verification::Required);
        assert_eq!(m.exit_code(), 1, "networked boot without passt must be refused");
    }

    #[test]
    fn the_preflight_checks_the_gvproxy_the_boot_runs_not_the_search() {
        let mut f = healthy();
        f.host.gvproxy = None;
        let bin = tempfile::NamedTempFile::new().unwrap();
        let mut cfg = VmConfig::exec("/k".into(), "/r".into(), "/s".into(), vec!["/bin/true".into()]);
        cfg.net = Net::Gvproxy;
        cfg.gvproxy = Some(bin.path().into());
        let (_, m) = preflight_matrix(&f, cfg.clone(), Verification::Required);
        let row = m.row("gvproxy").expect("a gvproxy row");
        assert_eq!(row.status, Status::Pass, "{}", m.render());
        assert!(row.reason.contains(&bin.path().display().to_string()), "{}", m.render());
        cfg.gvproxy = Some("/no/such/gvproxy".into());
        let (_, m) = preflight_matrix(&f, cfg.clone(), Verification::Required);
        assert_eq!(m.row("gvproxy").map(|r| r.status), Some(Status::Fail), "{}", m.render());
        // None given and none found: the row says where it looked.
        cfg.gvproxy = None;
        let (_, m) = preflight_matrix(&f, cfg, Verification::Required);
        assert_eq!(m.row("gvproxy").map(|r| r.status), Some(Status::Fail), "{}", m.render());
    }

    #[test]
    fn macos_host_shows_its_own_rows_and_not_linux_ones() {
        let mut f = healthy();
        f.host = openshell_vm::host::fake::macos(true, Some(true));
        let ids: Vec<String> = host_report(&f, VmmChoice::Auto, None).matrix.rows.into_iter().map(|r| r.id).collect();
        assert!(ids.contains(&"hvf".into()) && ids.contains(&"entitlement".into()) && ids.contains(&"gvproxy".into()));
        assert!(!ids.contains(&"kvm-device".into()) && !ids.contains(&"passt".into()));
    }

    #[test]
    fn linux_with_net_gvproxy_shows_and_requires_the_gvproxy_row_instead_of_passt() {
        let mut f = healthy();
        let ids = |r: &HostReport| r.matrix.rows.iter().map(|r| r.id.clone()).collect::<Vec<_>>();
        let r = host_report(&f, VmmChoice::Auto, Some(Net::Gvproxy));
        assert!(ids(&r).contains(&"gvproxy".into()) && !ids(&r).contains(&"passt".into()), "{:?}", ids(&r));
        assert_eq!(r.exit_code(), 1, "no gvproxy found: {}", r.render());
        assert!(r.render().contains("fetches Debian's gvproxy"), "{}", r.render());
        f.host.gvproxy = Some(openshell_vm::host::Tool {
            path: "/store/gvproxy/x/bin/gvproxy".into(),
            version: Some("v0.8.1".into()),
        });
        let r = host_report(&f, VmmChoice::Auto, Some(Net::Gvproxy));
        assert_eq!(r.exit_code(), 0, "{}", r.render());
        assert!(r.render().contains("gvproxy v0.8.1 at /store/gvproxy/x/bin/gvproxy"), "{}", r.render());
        // The default network on Linux stays passt, and --net none needs neither.
        assert!(!ids(&host_report(&f, VmmChoice::Auto, None)).contains(&"gvproxy".into()));
        let none = ids(&host_report(&f, VmmChoice::Auto, Some(Net::None)));
        assert!(!none.contains(&"gvproxy".into()) && !none.contains(&"passt".into()), "{none:?}");
    }
}
