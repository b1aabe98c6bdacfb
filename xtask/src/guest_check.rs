//! `cargo xtask check --guest`: boots a VM that runs `openshell-guest-check` and prints the guest
//! capability matrix. Exit 0: every required row passed; 1: a required row failed; 2: the
//! checker could not run (no VM, or the guest program crashed or wrote nothing).

use openshell_artifacts::Store;
use openshell_instance::profile::Profile;
use openshell_matrix::EXIT_CHECKER_FAILED;
use openshell_vm::VmmChoice;
use xshell::Shell;

/// Runs the guest check in a guest of `profile` (its root, as a disk when the profile's is) and
/// returns the exit code; prints the table (or JSON) on stdout.
pub fn run(json: bool, vmm: VmmChoice, profile: &Profile) -> anyhow::Result<i32> {
    let sh = Shell::new()?;
    let store = Store::default_location();
    let kernel = crate::artifacts::ensure_kernel(
        &sh,
        &store,
        openshell_artifacts::kernel::KernelRole::Guest,
        openshell_artifacts::Arch::host(),
    )?;
    let rootfs = crate::artifacts::profile_root(&sh, &store, profile, openshell_artifacts::Arch::host(), true)?;
    let state = tempfile::Builder::new().prefix("openshell-guest-check-").tempdir()?;
    let mut cfg =
        openshell_instance::guest_check::config(kernel.vmlinux.clone(), rootfs.dir.clone(), state.path().join("state"));
    cfg.vmm = vmm;
    if profile.disk_root {
        // A fresh data disk in the check's own state: what the profile's first boot gets.
        cfg.root = openshell_vm::Root::disk(
            crate::artifacts::ensure_root_disk(&sh, &store, &rootfs)?,
            openshell_artifacts::disk::DEFAULT_DATA_DISK_MIB,
        );
    }
    crate::artifacts::ensure_vmm(&sh, cfg.vmm, cfg.net, cfg.gvproxy.as_deref(), cfg.arch)?;
    eprintln!(
        "guest check: booting kernel {} with the {profile} profile's root {}",
        kernel.provenance.kernel_release,
        rootfs.digest().hex()
    );
    let started = std::time::Instant::now();
    match openshell_instance::guest_check::run(&cfg, openshell_instance::check::Verification::Required) {
        Ok(matrix) => {
            eprintln!("guest check: done in {:.1}s", started.elapsed().as_secs_f64());
            if json {
                println!("{}", matrix.to_json());
            } else {
                print!("{}", matrix.render());
            }
            Ok(matrix.exit_code())
        }
        Err(e) => {
            // Keep the VM's state (console log, share) for the error to point at.
            let kept = state.keep();
            eprintln!("guest check: {e}\nguest check: state kept at {}", kept.display());
            if json {
                let doc = serde_json::json!({"subject": "guest", "ok": false, "exit_code": EXIT_CHECKER_FAILED, "error": e.to_string()});
                println!("{doc}");
            }
            Ok(EXIT_CHECKER_FAILED)
        }
    }
}
