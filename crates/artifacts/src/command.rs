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

    /// Set (to a scratch directory holding a Makefile) only in the builder process that
    /// [`a_build_step_dies_with_its_builder`] starts from this test binary.
    const BUILDER_DIR: &str = "OPENSHELL_TEST_BUILDER_DIR";

    /// Bound on how long a process may take to start or to be gone: a hang guard, never a measurement.
    const HANG_GUARD: std::time::Duration = std::time::Duration::from_secs(60);

    /// Processes (other than this one) whose command line mentions `marker`, as (pid, cmdline).
    fn mentioning(marker: &str) -> Vec<(i32, String)> {
        let me = std::process::id() as i32;
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let pid = e.file_name().to_str()?.parse::<i32>().ok()?;
                let cmd =
                    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).ok()?).replace('\0', " ");
                (pid != me && cmd.contains(marker)).then_some((pid, cmd))
            })
            .collect()
    }

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + HANG_GUARD;
        while !done() {
            assert!(std::time::Instant::now() < deadline, "{what}: not within {} s", HANG_GUARD.as_secs());
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// The builder half of [`a_build_step_dies_with_its_builder`]: run in a process of its own
    /// (this test binary started again with [`BUILDER_DIR`] set), it runs `make` as a build step,
    /// whose recipe never ends, and is killed there by the test.
    #[test]
    #[ignore = "the builder process of a_build_step_dies_with_its_builder, which starts it"]
    fn builder_process() {
        let dir = std::env::var_os(BUILDER_DIR).expect("started by a_build_step_dies_with_its_builder");
        let mut make = Command::new("make");
        make.arg("-C").arg(&dir);
        let _ = run(&mut make, &mut |l| println!("{l}"));
        panic!("the build step ended: it should have been killed with this builder");
    }

    /// What the comment in [`run`] promises: a builder killed mid-step, by SIGKILL or by a Ctrl-C
    /// sent to it alone (SIGINT to its pid, not its group, as when it runs in a terminal's
    /// background job or under a supervisor), leaves no `make` and none of make's children
    /// running. Every process of the step carries the scratch directory in its command line
    /// (`make -C DIR`, and the recipe's `DIR/sleeper`), so a leftover is found by name even after
    /// it was reparented.
    #[test]
    fn a_build_step_dies_with_its_builder() {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        for signal in [Signal::SIGKILL, Signal::SIGINT] {
            let dir = tempfile::tempdir().unwrap();
            let marker = dir.path().to_string_lossy().into_owned();
            // A recipe program of its own name (a copy of sleep), so it is found by its path.
            std::fs::copy("/bin/sleep", dir.path().join("sleeper")).unwrap();
            std::fs::write(dir.path().join("Makefile"), "all:\n\t$(CURDIR)/sleeper 300\n").unwrap();
            let mut builder = Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "command::tests::builder_process", "--ignored", "--nocapture"])
                .env(BUILDER_DIR, dir.path())
                .stdout(Stdio::null())
                .spawn()
                .unwrap();
            let sleeper = dir.path().join("sleeper").to_string_lossy().into_owned();
            wait_for("make's recipe started", || mentioning(&sleeper).iter().any(|(_, c)| c.starts_with(&sleeper)));
            let step = mentioning(&marker);
            assert!(step.iter().any(|(_, c)| c.starts_with("make ")), "no make among {step:?}");
            kill(Pid::from_raw(builder.id() as i32), signal).unwrap();
            let status = builder.wait().unwrap();
            assert!(!status.success(), "the builder survived {signal}: {status}");
            let deadline = std::time::Instant::now() + HANG_GUARD;
            let left = loop {
                let left = mentioning(&marker);
                if left.is_empty() || std::time::Instant::now() > deadline {
                    break left;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            };
            // Ours to clean up whatever the verdict: they carry this test's own scratch directory.
            for (pid, _) in &left {
                let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
            }
            assert!(left.is_empty(), "after {signal} to the builder, its build step is still running: {left:?}");
        }
    }
}
