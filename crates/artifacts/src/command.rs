//! Running the external programs a build needs (`make`, `tar`, `mmdebstrap`, `dpkg-query`), with
//! their output streamed line by line to the caller and a failure that names the command.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// A build step that could not start or did not succeed.
#[derive(Debug)]
pub(crate) struct CommandFailed {
    pub command: String,
    pub detail: String,
}

/// Runs a build step, streaming its output lines (stdout and stderr merged) to `on_line`.
pub(crate) fn run(cmd: &mut Command, on_line: &mut dyn FnMut(&str)) -> Result<(), CommandFailed> {
    let shown = format!("{cmd:?}");
    let failed = |detail: String| CommandFailed { command: shown.clone(), detail };
    let (reader, writer) = std::io::pipe().map_err(|e| failed(e.to_string()))?;
    // A builder killed mid-step (Ctrl-C sent to it alone, SIGKILL) must not leave `make` and its
    // compilers running into a directory that is about to be swept: SIGTERM reaches the step when
    // we die, and make passes SIGTERM on to its children.
    #[cfg(target_os = "linux")]
    // SAFETY: the closure runs between fork and exec and only calls prctl, which is
    // async-signal-safe and touches no memory of the parent.
    #[allow(unsafe_code)]
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM).map_err(Into::into));
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(writer.try_clone().map_err(|e| failed(e.to_string()))?)
        .stderr(writer)
        .spawn()
        .map_err(|e| failed(e.to_string()))?;
    // Drop our copies of the write end (moved into `cmd`) so the reader sees EOF at exit.
    drop(std::mem::replace(cmd, Command::new("true")));
    for line in BufReader::new(reader).lines() {
        match line {
            Ok(l) => on_line(&l),
            Err(_) => continue,
        }
    }
    let status = child.wait().map_err(|e| failed(e.to_string()))?;
    if status.success() {
        Ok(())
    } else {
        Err(failed(status.to_string()))
    }
}

/// Runs a command and returns its stdout; its stderr goes to ours.
pub(crate) fn capture(cmd: &mut Command) -> Result<String, CommandFailed> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| CommandFailed { command: shown.clone(), detail: e.to_string() })?;
    if !out.status.success() {
        return Err(CommandFailed { command: shown, detail: out.status.to_string() });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
