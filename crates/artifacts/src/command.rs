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

/// Runs a build step, streaming its output lines (stdout and stderr merged) to `on_line`. The step
/// is a `duct` expression made from `cmd`, whose reader handle kills the step if we stop reading
/// early (an error, a panic in `on_line`).
pub(crate) fn run(cmd: &mut Command, on_line: &mut dyn FnMut(&str)) -> Result<(), CommandFailed> {
    let shown = format!("{cmd:?}");
    let failed = |detail: String| CommandFailed { command: shown.clone(), detail };
    let mut step = duct::cmd(cmd.get_program(), cmd.get_args()).stdin_null().stderr_to_stdout().unchecked();
    if let Some(dir) = cmd.get_current_dir() {
        step = step.dir(dir);
    }
    for (key, value) in cmd.get_envs() {
        step = match value {
            Some(value) => step.env(key, value),
            None => step.env_remove(key),
        };
    }
    // A builder killed mid-step (Ctrl-C sent to it alone, SIGKILL) must not leave `make` and its
    // compilers running into a directory that is about to be swept: SIGTERM reaches the step when
    // we die, and make passes SIGTERM on to its children.
    #[cfg(target_os = "linux")]
    {
        step = step.before_spawn(|c| {
            use std::os::unix::process::CommandExt;
            // SAFETY: the closure runs between fork and exec and only calls prctl, which is
            // async-signal-safe and touches no memory of the parent.
            #[allow(unsafe_code)]
            unsafe {
                c.pre_exec(|| nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM).map_err(Into::into));
            }
            Ok(())
        });
    }
    let reader = step.reader().map_err(|e| failed(e.to_string()))?;
    for line in BufReader::new(&reader).lines() {
        match line {
            Ok(l) => on_line(&l),
            // Not UTF-8: skip the line, keep streaming.
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => continue,
            Err(e) => return Err(failed(e.to_string())),
        }
    }
    let status = match reader.try_wait().map_err(|e| failed(e.to_string()))? {
        Some(output) => output.status,
        None => return Err(failed("the step's output ended but it has not exited".into())),
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_stdout_and_stderr_lines_with_the_commands_env_and_dir_and_names_a_failure() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo \"out $GREETING\"; pwd; echo err >&2; exit 3"])
            .env("GREETING", "hi")
            .current_dir(dir.path());
        let mut lines = Vec::new();
        let err = run(&mut cmd, &mut |l| lines.push(l.to_owned())).unwrap_err();
        let cwd = dir.path().canonicalize().unwrap();
        assert_eq!(lines, ["out hi".to_owned(), cwd.display().to_string(), "err".to_owned()]);
        assert!(err.command.contains("sh") && err.detail.contains('3'), "{err:?}");
        let mut ok = Command::new("true");
        run(&mut ok, &mut |_| {}).unwrap();
    }
}
