//! VMM process: boots one libkrun VM described by a `KrunSpec` JSON file.
//! libkrun takes over the calling process and exits it when the guest powers
//! off, so each VM runs in its own `openshell-vmm` spawned by a supervisor.

use std::process::ExitCode;

use openshell_krun::KrunSpec;

/// EX_SOFTWARE: distinguishes VMM setup failures from guest exit codes.
const EXIT_SETUP_FAILED: u8 = 70;

/// `openshell-vmm --check-confinement SPEC.json PATH`: confine as for `SPEC.json`, then try to
/// open PATH for reading; exit 0 when it opened, 1 when not (the error on stdout).
pub const CHECK_CONFINEMENT: &str = "--check-confinement";

fn main() -> ExitCode {
    // A VM whose supervisor died would be unreachable; die with it. The launcher already asks for
    // this between fork and exec; asking again here covers a VMM started by hand. macOS has no
    // parent-death signal: there the supervisor's Drop stops the VMM, and after a crash
    // `supervise::recover` kills what the instance's metadata names.
    if let Err(e) = openshell_krun::child::die_with_parent() {
        eprintln!("openshell-vmm: prctl(PR_SET_PDEATHSIG): {e}");
        return ExitCode::from(EXIT_SETUP_FAILED);
    }
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let (spec_path, probe) = match &args[..] {
        [spec] => (spec, None),
        [flag, spec, path] if flag == CHECK_CONFINEMENT => (spec, Some(path)),
        _ => {
            eprintln!("usage: openshell-vmm SPEC.json | openshell-vmm {CHECK_CONFINEMENT} SPEC.json PATH");
            return ExitCode::from(2);
        }
    };
    let spec: KrunSpec = match std::fs::read(spec_path)
        .map_err(|e| e.to_string())
        .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string()))
    {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("openshell-vmm: {}: {e}", spec_path.to_string_lossy());
            return ExitCode::from(EXIT_SETUP_FAILED);
        }
    };
    // libkrun parses guest-controlled device traffic: from here on it reaches only what the spec
    // names. A kernel without landlock leaves it unconfined, which the log says.
    #[cfg(target_os = "linux")]
    match openshell_krun::confine::confine(&spec) {
        Ok(how) => eprintln!("openshell-vmm: {how}"),
        Err(e) => {
            eprintln!("openshell-vmm: cannot confine the VMM: {e}");
            return ExitCode::from(EXIT_SETUP_FAILED);
        }
    }
    if let Some(path) = probe {
        // The same confinement as a boot's, then one open: how a test asks what the VMM may read.
        return match std::fs::File::open(path) {
            Ok(_) => {
                println!("{}: opened", path.to_string_lossy());
                ExitCode::SUCCESS
            }
            Err(e) => {
                println!("{}: {e}", path.to_string_lossy());
                ExitCode::from(1)
            }
        };
    }
    match openshell_krun::run(&spec) {
        Ok(never) => match never {},
        Err(e) => {
            eprintln!("openshell-vmm: {e}");
            ExitCode::from(EXIT_SETUP_FAILED)
        }
    }
}
