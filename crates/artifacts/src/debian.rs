//! Debian roots from the archive: `mmdebstrap` bakes a suite and its packages into a tree, the
//! recipe's links, files and guest programs go on their paths, and the tree is recorded by the
//! rootfs [`Manifest`](crate::rootfs::Manifest), which [`rootfs::verify`](crate::rootfs::verify)
//! re-hashes. The one way a Debian tree is made: the nested host's root
//! ([`nested_root`](crate::nested_root)) and the `debian` profile's are recipes of it.
//!
//! Content-addressed by the recipe (suite, sources, packages, options, links, files) and each
//! program's digest. The archive moves, so two bakes of one key on different days can differ in
//! content; the manifest and [`PROVENANCE`] (every package with its version) record what one holds.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::command::{capture, run};
use crate::rootfs::{self, GuestFile, RootfsBundle, RootfsError, MANIFEST};
use crate::store::StoreError;
use crate::{sha256_file, Digest, DigestBuilder, Store};

pub const INSTALL_HINT: &str = "apt-get install -y mmdebstrap";
/// Where a bake records what it installed, inside the tree (so the manifest covers it too).
pub const PROVENANCE: &str = "debian-root.json";

/// Debian's archive, security updates included, for `suite`.
pub fn sources(suite: &str) -> Vec<String> {
    vec![
        format!("deb http://deb.debian.org/debian {suite} main"),
        format!("deb http://deb.debian.org/debian-security {suite}-security main"),
    ]
}

/// `mmdebstrap` options of every recipe: minbase, and no documentation (a third of the tree,
/// never read in a VM).
const COMMON_OPTIONS: &[&str] = &[
    "--variant=minbase",
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/info/*",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
];

/// What every guest root needs beyond minbase: the root is read-only, and init writes the
/// nameserver it learns to `/run/resolv.conf` (as in the busybox rootfs), so without this link the
/// guest keeps the build host's resolver, which it cannot reach.
const COMMON_LINKS: &[(&str, &str)] = &[("etc/resolv.conf", "../run/resolv.conf")];
/// Files minbase leaves out that programs read: gvproxy refuses to start without `/etc/hosts`,
/// and resolvers look up `localhost` there.
const COMMON_FILES: &[(&str, &str)] =
    &[("etc/hosts", "127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n")];

#[derive(Debug, thiserror::Error)]
pub enum DebianRootError {
    #[error("mmdebstrap is not installed; install it with: {INSTALL_HINT}")]
    NoMmdebstrap,
    #[error("{path} is missing; build the guest programs (`cargo xtask rootfs` does)")]
    NoProgram { path: PathBuf },
    #[error(
        "`{command}` failed: {detail}; its output is above. Is Debian's archive reachable (http://deb.debian.org)?"
    )]
    Command { command: String, detail: String },
    #[error("Debian root I/O at {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("no {kind} has been baked for the current recipe; {hint}")]
    NotBuilt { kind: &'static str, hint: &'static str },
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<crate::command::CommandFailed> for DebianRootError {
    fn from(crate::command::CommandFailed { command, detail }: crate::command::CommandFailed) -> Self {
        DebianRootError::Command { command, detail }
    }
}

/// What a Debian root is made of.
#[derive(Debug, Clone)]
pub struct DebianRecipe {
    /// The store kind it is baked into: each use has its own.
    pub kind: &'static str,
    /// The command that bakes it, for "not baked" errors.
    pub bake_hint: &'static str,
    pub suite: String,
    pub sources: Vec<String>,
    /// On top of minbase.
    pub packages: Vec<String>,
    /// `mmdebstrap` options after the common ones (hooks, say).
    pub options: Vec<String>,
    /// Symlinks (path in the tree, target) after the common ones.
    pub links: Vec<(String, String)>,
    /// Files (path in the tree, contents) after the common ones.
    pub files: Vec<(String, String)>,
    /// Our programs, each on its own path (`dest` absolute in the guest).
    pub programs: Vec<GuestFile>,
    /// About how much room a bake takes in the store.
    pub bytes: u64,
}

/// [`PROVENANCE`]: what the bake installed, from where, and when.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DebianProvenance {
    pub suite: String,
    pub sources: Vec<String>,
    pub key: Digest,
    /// `name version` of every installed package, sorted.
    pub packages: Vec<String>,
    /// Each program's guest path and sha256.
    pub programs: Vec<(String, Digest)>,
    pub built_at_unix: u64,
    pub build_seconds: f64,
}

impl DebianRecipe {
    fn options(&self) -> impl Iterator<Item = &str> {
        COMMON_OPTIONS.iter().copied().chain(self.options.iter().map(String::as_str))
    }

    fn links(&self) -> impl Iterator<Item = (&str, &str)> {
        COMMON_LINKS.iter().copied().chain(self.links.iter().map(|(l, t)| (l.as_str(), t.as_str())))
    }

    fn files(&self) -> impl Iterator<Item = (&str, &str)> {
        COMMON_FILES.iter().copied().chain(self.files.iter().map(|(f, t)| (f.as_str(), t.as_str())))
    }

    /// Content address: the recipe and each program's digest.
    pub fn key(&self) -> Result<Digest, DebianRootError> {
        let mut b = DigestBuilder::new("openshell-debian-root/v1");
        b.str("kind", self.kind).str("suite", &self.suite);
        for s in &self.sources {
            b.str("source", s);
        }
        for p in &self.packages {
            b.str("package", p);
        }
        for o in self.options() {
            b.str("option", o);
        }
        for (link, target) in self.links() {
            b.str("link", &format!("{link} -> {target}"));
        }
        for (file, text) in self.files() {
            b.str("file", &format!("{file}: {text}"));
        }
        for p in &self.programs {
            let digest = sha256_file(&p.source).map_err(|_| DebianRootError::NoProgram { path: p.source.clone() })?;
            b.str("program", &p.dest).digest("sha256", &digest).str("mode", &format!("{:o}", p.mode));
        }
        Ok(b.finish())
    }

    fn check(&self) -> Result<(), DebianRootError> {
        match self.programs.iter().find(|p| !p.source.is_file()) {
            Some(p) => Err(DebianRootError::NoProgram { path: p.source.clone() }),
            None => Ok(()),
        }
    }
}

/// The root already baked for `recipe`, without baking.
pub fn locate(store: &Store, recipe: &DebianRecipe) -> Result<RootfsBundle, DebianRootError> {
    recipe.check()?;
    let dir = store
        .get(recipe.kind, &recipe.key()?)
        .ok_or(DebianRootError::NotBuilt { kind: recipe.kind, hint: recipe.bake_hint })?;
    Ok(RootfsBundle::open(&dir)?)
}

/// Reads the provenance a bake recorded in the tree.
pub fn provenance(bundle: &RootfsBundle) -> Result<DebianProvenance, DebianRootError> {
    let path = bundle.dir.join(PROVENANCE);
    let text = fs::read_to_string(&path).map_err(io(&path))?;
    serde_json::from_str(&text)
        .map_err(|e| DebianRootError::Io { path, source: std::io::Error::new(std::io::ErrorKind::InvalidData, e) })
}

/// Bakes the root for `recipe` unless the store has it (a minute or two: the packages come from
/// the archive). `on_line` sees every line of `mmdebstrap`'s output.
pub fn bake(
    store: &Store,
    recipe: &DebianRecipe,
    on_line: &mut dyn FnMut(&str),
) -> Result<RootfsBundle, DebianRootError> {
    recipe.check()?;
    let key = recipe.key()?;
    if let Some(dir) = store.get(recipe.kind, &key) {
        return Ok(RootfsBundle::open(&dir)?);
    }
    if which::which("mmdebstrap").is_err() {
        return Err(DebianRootError::NoMmdebstrap);
    }
    let dir = store.get_or_build(recipe.kind, &key, recipe.bytes, |out| bake_into(recipe, &key, out, on_line))?;
    Ok(RootfsBundle::open(&dir)?)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DebianRootError {
    let path = path.to_owned();
    move |source| DebianRootError::Io { path, source }
}

fn bake_into(
    recipe: &DebianRecipe,
    key: &Digest,
    out: &Path,
    on_line: &mut dyn FnMut(&str),
) -> Result<(), DebianRootError> {
    let started = Instant::now();
    let mut cmd = Command::new("mmdebstrap");
    cmd.args(recipe.options());
    if !recipe.packages.is_empty() {
        cmd.arg(format!("--include={}", recipe.packages.join(",")));
    }
    cmd.arg(&recipe.suite).arg(out).args(&recipe.sources);
    run(&mut cmd, on_line)?;
    // Device nodes: mmdebstrap makes a few in /dev, which init covers with devtmpfs anyway, and a
    // manifest must not hash /dev/zero.
    let dev = out.join("dev");
    fs::remove_dir_all(&dev).and_then(|()| fs::create_dir(&dev)).map_err(io(&dev))?;
    for (link, target) in recipe.links() {
        let path = out.join(link);
        let _ = fs::remove_file(&path);
        std::os::unix::fs::symlink(target, &path).map_err(io(&path))?;
    }
    for (file, text) in recipe.files() {
        let path = out.join(file);
        fs::write(&path, text).map_err(io(&path))?;
    }
    let mut programs = Vec::new();
    for p in &recipe.programs {
        // Debian's /sbin and /bin are relative links into /usr, which resolve inside the tree.
        let dest = out.join(p.dest.trim_start_matches('/'));
        fs::copy(&p.source, &dest).map_err(io(&dest))?;
        fs::set_permissions(&dest, fs::Permissions::from_mode(p.mode)).map_err(io(&dest))?;
        programs.push((p.dest.clone(), sha256_file(&dest).map_err(io(&dest))?));
    }
    let admindir = out.join("var/lib/dpkg");
    let listed = capture(
        Command::new("dpkg-query").arg("--admindir").arg(&admindir).args(["-W", "-f=${Package} ${Version}\\n"]),
    )?;
    let mut packages: Vec<String> = listed.lines().filter(|l| !l.is_empty()).map(str::to_owned).collect();
    packages.sort();
    let provenance = DebianProvenance {
        suite: recipe.suite.clone(),
        sources: recipe.sources.clone(),
        key: key.clone(),
        packages,
        programs,
        built_at_unix: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        build_seconds: started.elapsed().as_secs_f64(),
    };
    let path = out.join(PROVENANCE);
    fs::write(&path, serde_json::to_string_pretty(&provenance).expect("provenance serializes")).map_err(io(&path))?;
    let manifest = rootfs::scan(out)?;
    let path = out.join(MANIFEST);
    fs::write(&path, serde_json::to_string_pretty(&manifest).expect("manifest serializes")).map_err(io(&path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe(dir: &Path) -> DebianRecipe {
        let init = dir.join("openshell-init");
        fs::write(&init, b"\x7fELF init").unwrap();
        DebianRecipe {
            kind: "debian-test",
            bake_hint: "run the test's bake",
            suite: "bookworm".into(),
            sources: sources("bookworm"),
            packages: vec!["python3".into()],
            options: vec![],
            links: vec![],
            files: vec![],
            programs: vec![GuestFile { source: init, dest: "/sbin/openshell-init".into(), mode: 0o755 }],
            bytes: 1 << 20,
        }
    }

    #[test]
    fn key_follows_the_recipe_and_the_programs() {
        let t = tempfile::tempdir().unwrap();
        let base = recipe(t.path());
        let key = base.key().unwrap();
        assert_eq!(key, base.clone().key().unwrap());
        let mut more = base.clone();
        more.packages.push("curl".into());
        assert_ne!(more.key().unwrap(), key);
        let mut other_suite = base.clone();
        other_suite.suite = "trixie".into();
        assert_ne!(other_suite.key().unwrap(), key);
        let mut other_kind = base.clone();
        other_kind.kind = "nested-root";
        assert_ne!(other_kind.key().unwrap(), key);
        let mut moved = base.clone();
        moved.programs[0].dest = "/usr/sbin/openshell-init".into();
        assert_ne!(moved.key().unwrap(), key);
        fs::write(&base.programs[0].source, b"\x7fELF newer init").unwrap();
        assert_ne!(base.key().unwrap(), key);
    }

    #[test]
    fn a_missing_program_names_the_file_and_the_fix() {
        let t = tempfile::tempdir().unwrap();
        let mut r = recipe(t.path());
        r.programs[0].source = t.path().join("nope");
        let err = bake(&Store::new(t.path()), &r, &mut |_| {}).unwrap_err().to_string();
        assert!(err.contains("nope") && err.contains("cargo xtask rootfs"), "{err}");
    }

    #[test]
    fn an_unbaked_root_says_how_to_bake_it() {
        let t = tempfile::tempdir().unwrap();
        let err = locate(&Store::new(t.path()), &recipe(t.path())).unwrap_err().to_string();
        assert!(err.contains("debian-test") && err.contains("run the test's bake"), "{err}");
    }
}
