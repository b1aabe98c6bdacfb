//! VMM process: boots one libkrun VM described by the `KrunSpec` JSON on its command line.
//! libkrun takes over the calling process and exits it when the guest powers off, so each VM runs
//! in its own `openshell-vmm` spawned by a supervisor. Started by root, it is started as `nobody`
//! already, with its files open (`openshell_vm::sandbox`): it never holds root itself.

use std::process::ExitCode;

use openshell_krun::KrunSpec;

/// EX_SOFTWARE: distinguishes VMM setup failures from guest exit codes.
const EXIT_SETUP_FAILED: u8 = 70;

/// `openshell-vmm --check-confinement PID OP:PATH…`: confine as the running VMM `PID` is confined
/// (its spec, read from its command line, with the very files it holds: each fd it names is opened
/// here through `/proc/PID/fd/N`), then try each operation and print one line for it,
/// `OP PATH: allowed` or `OP PATH: denied: ERROR`. A PATH names the VMM's files as its spec does
/// (`/proc/self/fd/N` is the VMM's fd N, also below it). `read` opens for reading, `write` opens an
/// existing file for writing, `create` creates a new file. Exits 0 once every operation was tried.
/// How a test asks what the VMM may touch.
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
    let argv: Vec<String> = match std::env::args_os().map(|a| a.into_string()).collect() {
        Ok(argv) => argv,
        Err(bad) => {
            eprintln!("openshell-vmm: an argument is not UTF-8: {bad:?}");
            return ExitCode::from(2);
        }
    };
    #[cfg(target_os = "linux")]
    if argv.get(1).map(String::as_str) == Some(CHECK_CONFINEMENT) {
        return check_confinement(&argv[2..]);
    }
    let spec = match KrunSpec::from_argv(&argv) {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("openshell-vmm: {e}");
            eprintln!("usage: openshell-vmm --spec JSON | openshell-vmm {CHECK_CONFINEMENT} PID OP:PATH…");
            return ExitCode::from(2);
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
    match openshell_krun::run(&spec) {
        Ok(never) => match never {},
        Err(e) => {
            eprintln!("openshell-vmm: {e}");
            ExitCode::from(EXIT_SETUP_FAILED)
        }
    }
}

/// See [`CHECK_CONFINEMENT`].
#[cfg(target_os = "linux")]
fn check_confinement(args: &[String]) -> ExitCode {
    let Some((pid, ops)) = args.split_first().and_then(|(pid, ops)| Some((pid.parse::<u32>().ok()?, ops))) else {
        eprintln!("usage: openshell-vmm {CHECK_CONFINEMENT} PID OP:PATH…");
        return ExitCode::from(2);
    };
    let cmdline = match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(bytes) => bytes,
        Err(e) => {
            eprintln!("openshell-vmm: /proc/{pid}/cmdline: {e}");
            return ExitCode::from(EXIT_SETUP_FAILED);
        }
    };
    let argv: Vec<String> =
        cmdline.split(|&b| b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    let theirs = match KrunSpec::from_argv(&argv) {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("openshell-vmm: pid {pid}: {e}");
            return ExitCode::from(EXIT_SETUP_FAILED);
        }
    };
    // Their files become fds of ours before confining: once confined, landlock keeps this process
    // out of another domain's `/proc/PID/fd` (a ptrace-class access), and the VMM reaches its files
    // through its own fds too.
    let mut ours = std::collections::HashMap::new();
    for fd in theirs.fds() {
        use std::os::unix::fs::OpenOptionsExt;
        let path = format!("/proc/{pid}/fd/{fd}");
        match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_PATH).open(&path) {
            Ok(f) => ours.insert(fd, std::os::fd::OwnedFd::from(f)),
            Err(e) => {
                eprintln!("openshell-vmm: {path}: {e}");
                return ExitCode::from(EXIT_SETUP_FAILED);
            }
        };
    }
    let map = |fd| ours.get(&fd).map_or(fd, std::os::fd::AsRawFd::as_raw_fd);
    let spec = theirs.refd(&map);
    match openshell_krun::confine::confine(&spec) {
        Ok(how) => eprintln!("openshell-vmm: {how}"),
        Err(e) => {
            eprintln!("openshell-vmm: cannot confine the check: {e}");
            return ExitCode::from(EXIT_SETUP_FAILED);
        }
    }
    for op in ops {
        let Some((kind, path)) = op.split_once(':') else {
            eprintln!("openshell-vmm: {op:?} is not OP:PATH");
            return ExitCode::from(2);
        };
        let mut how = std::fs::OpenOptions::new();
        match kind {
            "read" => how.read(true),
            "write" => how.write(true),
            "create" => how.write(true).create_new(true),
            _ => {
                eprintln!("openshell-vmm: unknown operation {kind:?} (read, write, create)");
                return ExitCode::from(2);
            }
        };
        match how.open(openshell_krun::child::refd(std::path::Path::new(path), &map)) {
            Ok(_) => println!("{kind} {path}: allowed"),
            Err(e) => println!("{kind} {path}: denied: {e}"),
        }
    }
    ExitCode::SUCCESS
}
