//! `openshell-guest-check [--json] [--out FILE]`: runs the guest capability checks inside the VM
//! and prints the matrix (a table, or one line of JSON with `--json`). With `--out`, the JSON is
//! also written to FILE (temp file + rename), which is how the host reads it back from the share.
//! Exit code: 0 every required row passed, 1 one failed, 2 the checker itself could not run.

use openshell_matrix::EXIT_CHECKER_FAILED;

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("openshell-guest-check runs inside the Linux guest (`cargo xtask check --guest` boots one)");
    std::process::exit(EXIT_CHECKER_FAILED);
}

#[cfg(target_os = "linux")]
fn main() {
    use std::io::Write;

    let mut json = false;
    let mut out = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--json" => json = true,
            "--out" => out = args.next(),
            "-h" | "--help" => {
                println!("usage: openshell-guest-check [--json] [--out FILE]");
                return;
            }
            other => {
                eprintln!("openshell-guest-check: unknown argument {other:?}; usage: openshell-guest-check [--json] [--out FILE]");
                std::process::exit(EXIT_CHECKER_FAILED);
            }
        }
    }
    let matrix = openshell_guest_check::run();
    let doc = matrix.to_json().to_string();
    if let Some(path) = out {
        let tmp = format!("{path}.tmp");
        let written = std::fs::write(&tmp, &doc).and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            eprintln!("openshell-guest-check: cannot write {path}: {e}");
            std::process::exit(EXIT_CHECKER_FAILED);
        }
    }
    let text = if json { format!("{doc}\n") } else { matrix.render() };
    let _ = std::io::stdout().write_all(text.as_bytes());
    std::process::exit(matrix.exit_code());
}
