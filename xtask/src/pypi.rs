//! Python packages from PyPI that a command needs (zig for the macOS check, the OpenShell SDK for
//! the suites), each in a venv of its own under `target/`, made the first time it is needed.

use std::path::{Path, PathBuf};

use anyhow::Context;
use xshell::{cmd, Shell};

/// The python of a venv at `dir` holding `package==version`, installing it first if the venv is
/// missing or holds another version.
pub fn ensure(sh: &Shell, dir: &Path, package: &str, version: &str) -> anyhow::Result<PathBuf> {
    let python = dir.join("bin/python");
    if installed(sh, &python, package).as_deref() == Some(version) {
        return Ok(python);
    }
    eprintln!("installing {package} {version} (PyPI) into {}", dir.display());
    cmd!(sh, "python3 -m venv --clear {dir}")
        .run()
        .with_context(|| format!("cannot make a venv at {}: on Debian, apt-get install python3-venv", dir.display()))?;
    let pip = dir.join("bin/pip");
    cmd!(sh, "{pip} install --quiet --disable-pip-version-check {package}=={version}")
        .run()
        .with_context(|| format!("cannot install {package}=={version} from PyPI into {}", dir.display()))?;
    match installed(sh, &python, package) {
        Some(v) if v == version => Ok(python),
        other => anyhow::bail!("{package}=={version} installed into {}, but it reports {other:?}", dir.display()),
    }
}

/// The version of `package` the venv's python has installed, if any.
fn installed(sh: &Shell, python: &Path, package: &str) -> Option<String> {
    if !python.is_file() {
        return None;
    }
    let script = format!("import importlib.metadata as m; print(m.version({package:?}))");
    cmd!(sh, "{python} -c {script}").quiet().ignore_stderr().read().ok().map(|v| v.trim().to_owned())
}
