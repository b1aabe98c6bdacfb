//! VMM process: boots one libkrun VM described by a `KrunSpec` JSON file.
//! libkrun takes over the calling process and exits it when the guest powers
//! off, so each VM runs in its own `openshell-vmm` spawned by a supervisor.

use std::process::ExitCode;

use openshell_krun::KrunSpec;

/// EX_SOFTWARE: distinguishes VMM setup failures from guest exit codes.
const EXIT_SETUP_FAILED: u8 = 70;

fn main() -> ExitCode {
    // A VM whose supervisor died would be unreachable; die with it. The launcher already asks for
    // this between fork and exec; asking again here covers a VMM started by hand. macOS has no
    // parent-death signal: there the supervisor's Drop stops the VMM, and after a crash
    // `supervise::recover` kills what the instance's metadata names.
    if let Err(e) = openshell_krun::child::die_with_parent() {
        eprintln!("openshell-vmm: prctl(PR_SET_PDEATHSIG): {e}");
        return ExitCode::from(EXIT_SETUP_FAILED);
    }
    let mut args = std::env::args_os().skip(1);
    let (Some(path), None) = (args.next(), args.next()) else {
        eprintln!("usage: openshell-vmm SPEC.json");
        return ExitCode::from(2);
    };
    let spec: KrunSpec = match std::fs::read(&path)
        .map_err(|e| e.to_string())
        .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string()))
    {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("openshell-vmm: {}: {e}", path.to_string_lossy());
            return ExitCode::from(EXIT_SETUP_FAILED);
        }
    };
    match openshell_krun::run(&spec) {
        Ok(never) => match never {},
        Err(e) => {
            eprintln!("openshell-vmm: {e}");
            ExitCode::from(EXIT_SETUP_FAILED)
        }
    }
}
