//! OCI images as roots (`vm run --image`), through the CLI as a user runs it. Each trial writes a
//! tiny OCI layout of its own (no registry here): the host's static busybox with its applets as
//! symlinks, a setuid file, a file owned by 1000:1000, an `/etc/passwd` naming user `app`, and a
//! `/sbin/openshell-init` of the image's own that ours must not replace. The config runs a script
//! as `1000:1000` in `/work` that prints what the guest sees and exits 7.
//!
//! The layout is byte-for-byte the same in every trial (fixed mtimes, our rootfs' busybox), so its
//! unpacked root and root disk are baked into the shared store once and found by the next trial.
//! Where libkrun runs only nested, the `krun::image::*` trials run the CLI inside L1 with the
//! host's store read-only and `OPENSHELL_BUILD=never`: they boot the image roots
//! [`bake_on_host`] bakes on the host before L1 boots.

use std::path::{Path, PathBuf};

use libtest_mimic::Failed;
use openshell_artifacts::Digest;
use openshell_vm::VmmChoice;

use crate::cli::{in_cli, Cli};
use crate::support::{Artifacts, TrialDir};
use crate::trials::Body;

pub const TRIALS: &[(&str, Body)] = &[
    ("image::its_own_workload_runs_with_its_config", own_workload_runs_with_its_config),
    ("image::exec_replaces_the_images_command", exec_replaces_the_images_command),
    ("image::env_workdir_and_user_flags_override_the_image", flags_override_the_image),
    ("image::its_files_are_not_overwritten_by_ours", its_files_are_not_overwritten),
    ("image::an_image_without_a_command_needs_exec", an_image_without_a_command_needs_exec),
    ("image::a_corrupt_or_foreign_image_is_refused_before_boot", corrupt_or_foreign_image_is_refused),
    ("image::ready_waits_for_its_service_and_then_it_serves", ready_waits_for_its_service),
    ("image::bench_image_json", bench_image_json),
    ("image::its_tree_is_the_one_podman_run_sees", its_tree_is_the_one_podman_run_sees),
    ("image::a_debian_image_built_here_runs_python_and_dpkg", a_debian_image_built_here_runs),
];

/// A service that comes up late: the page is written, then, after a pause the probe must wait
/// through, busybox's httpd serves it on the guest's port 8080.
const LATE_SERVICE: &str = "mkdir -p /tmp/www && echo served-by-the-guest > /tmp/www/index.html && sleep 2 && \
                            echo httpd-starting && exec /bin/busybox httpd -f -p 8080 -h /tmp/www";

/// What the image's Cmd runs (under Entrypoint `/bin/sh -c`).
const SCRIPT: &str = "echo uid=$(id -u) gid=$(id -g); echo pwd=$(pwd); echo greeting=$GREETING; \
                      stat -c su=%a:%u:%g /bin/su-test; stat -c owned=%a:%u:%g /work/owned; exit 7";

/// The image's own init, which must still be there, unchanged, inside the VM.
const IMAGE_INIT: &[u8] = b"the image's own init\n";

/// The `user.origin` xattr of `/work/owned`, which must reach the root disk.
const XATTR_VALUE: &str = "from-the-image-layer";

/// One PAX extended-header record: `LEN KEY=VALUE\n`, where LEN counts its own digits.
fn pax_record(key: &str, value: &str) -> Vec<u8> {
    let body = format!(" {key}={value}\n");
    let mut len = body.len() + 1;
    while len.to_string().len() + body.len() != len {
        len += 1;
    }
    format!("{len}{body}").into_bytes()
}

const APPLETS: &[&str] =
    &["sh", "id", "stat", "pwd", "echo", "cat", "ls", "true", "find", "sort", "readlink", "md5sum", "cut"];

fn header(kind: tar::EntryType, mode: u32, uid: u64, gid: u64, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(gid);
    // Fixed, so every trial writes the same layer and the store keeps one root for all of them.
    h.set_mtime(1_700_000_000);
    h.set_size(size);
    h
}

/// The layer: deliberately without /proc, /sys, /dev, /run and /tmp, which the root disk adds.
/// The busybox is our rootfs' (the host's busybox-static), which is there inside the nested host too.
fn layer(a: &Artifacts) -> Result<Vec<u8>, String> {
    let path = a.rootfs.join("bin/busybox");
    let busybox = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut b = tar::Builder::new(Vec::new());
    let put = |b: &mut tar::Builder<Vec<u8>>, mut h: tar::Header, path: &str, data: &[u8]| {
        h.set_path(path).map_err(|e| e.to_string())?;
        h.set_cksum();
        b.append(&h, data).map_err(|e| e.to_string())
    };
    for (dir, uid) in [("bin", 0), ("sbin", 0), ("etc", 0), ("work", 0), ("home", 0), ("home/app", 1000)] {
        put(&mut b, header(tar::EntryType::Directory, 0o755, uid, uid, 0), dir, b"")?;
    }
    // A working directory the image's user (1000:1000) may not enter. Group 65534 (nogroup) may:
    // where libkrun runs only nested, L1's QEMU shares the store into L1 as nobody:nogroup, and
    // xtask there walks the tree to size its root disk.
    put(&mut b, header(tar::EntryType::Directory, 0o750, 0, 65534, 0), "private", b"")?;
    put(&mut b, header(tar::EntryType::Regular, 0o755, 0, 0, busybox.len() as u64), "bin/busybox", &busybox)?;
    for applet in APPLETS {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0, 0, 0);
        h.set_link_name("busybox").map_err(|e| e.to_string())?;
        put(&mut b, h, &format!("bin/{applet}"), b"")?;
    }
    let su = b"not really su\n";
    put(&mut b, header(tar::EntryType::Regular, 0o4755, 0, 0, su.len() as u64), "bin/su-test", su)?;
    // A PAX header with an xattr for the next entry, as `podman save` writes them.
    let record = pax_record("SCHILY.xattr.user.origin", XATTR_VALUE);
    put(&mut b, header(tar::EntryType::XHeader, 0o644, 0, 0, record.len() as u64), "PaxHeader", &record)?;
    let owned = b"app's file\n";
    put(&mut b, header(tar::EntryType::Regular, 0o640, 1000, 1000, owned.len() as u64), "work/owned", owned)?;
    put(
        &mut b,
        header(tar::EntryType::Regular, 0o755, 0, 0, IMAGE_INIT.len() as u64),
        "sbin/openshell-init",
        IMAGE_INIT,
    )?;
    let passwd = b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n";
    put(&mut b, header(tar::EntryType::Regular, 0o644, 0, 0, passwd.len() as u64), "etc/passwd", passwd)?;
    let group = b"root:x:0:\napp:x:1000:\n";
    put(&mut b, header(tar::EntryType::Regular, 0o644, 0, 0, group.len() as u64), "etc/group", group)?;
    b.into_inner().map_err(|e| e.to_string())
}

fn blob(dir: &Path, bytes: &[u8]) -> Result<Digest, String> {
    let d = Digest::of_bytes(bytes);
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).map_err(|e| e.to_string())?;
    std::fs::write(blobs.join(d.hex()), bytes).map_err(|e| e.to_string())?;
    Ok(d)
}

/// Writes the OCI layout at `dir/name` with `config` as its config's `config` section; returns
/// the layout's path.
fn layout(a: &Artifacts, dir: &Path, name: &str, config: serde_json::Value) -> Result<PathBuf, String> {
    layout_for(a, dir, name, config, openshell_artifacts::Arch::host().debian())
}

/// [`layout`] for the OCI architecture `arch` (`amd64`, `arm64`).
fn layout_for(a: &Artifacts, dir: &Path, name: &str, config: serde_json::Value, arch: &str) -> Result<PathBuf, String> {
    let out = dir.join(name);
    std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
    std::fs::write(out.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).map_err(|e| e.to_string())?;
    write_layout(&out, config, &[layer(a)?], arch)?;
    Ok(out)
}

/// The OCI layout files in `out`: `layers` (uncompressed tars, bottom first) under `config`.
fn write_layout(out: &Path, config: serde_json::Value, layers: &[Vec<u8>], arch: &str) -> Result<(), String> {
    let mut diff_ids = Vec::new();
    let mut descriptors = Vec::new();
    for tar in layers {
        let d = format!("sha256:{}", blob(out, tar)?.hex());
        descriptors.push(
            serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": tar.len()}),
        );
        diff_ids.push(d);
    }
    let cfg = serde_json::json!({
        "architecture": arch, "os": "linux", "config": config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    })
    .to_string();
    let cfg_digest = blob(out, cfg.as_bytes())?;
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": format!("sha256:{}", cfg_digest.hex()), "size": cfg.len()},
        "layers": descriptors,
    })
    .to_string();
    let manifest_digest = blob(out, manifest.as_bytes())?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": format!("sha256:{}", manifest_digest.hex()), "size": manifest.len(),
                       "platform": {"os": "linux", "architecture": arch}}],
    });
    std::fs::write(out.join("index.json"), index.to_string()).map_err(|e| e.to_string())
}

/// The test image: Entrypoint `/bin/sh -c`, Cmd [`SCRIPT`], as 1000:1000 in /work.
fn test_image(a: &Artifacts, cli: &Cli) -> Result<String, String> {
    Ok(format!("oci:{}", layout(a, &cli.dir, "image-layout", test_config())?.display()))
}

fn test_config() -> serde_json::Value {
    serde_json::json!({
        "Entrypoint": ["/bin/sh", "-c"], "Cmd": [SCRIPT],
        "Env": ["PATH=/bin", "GREETING=hello-from-the-image"],
        "WorkingDir": "/work", "User": "1000:1000",
    })
}

fn no_command_config() -> serde_json::Value {
    serde_json::json!({"Env": ["PATH=/bin"]})
}

/// Where libkrun runs only nested, the `krun::image::*` trials run the CLI inside L1 on the
/// host's store, read-only, with an xtask that builds nothing: the image roots they boot are
/// baked here first, on the host, by `rootfs --image` of the same layouts (byte for byte the same,
/// so the same digests) into the store L1 is given.
pub fn bake_on_host(a: &Artifacts, dir: &TrialDir) -> Result<(), String> {
    let cli = Cli::new(dir, VmmChoice::Qemu).map_err(|e| e.message().unwrap_or("no xtask").to_owned())?;
    let host = cli.dir.join("host-bake");
    for (name, config) in [("image-layout", test_config()), ("no-command-layout", no_command_config())] {
        let image = format!("oci:{}", layout(a, &host, name, config)?.display());
        let r = cli.run(&["rootfs", "--image", &image])?;
        if r.code != Some(0) {
            return Err(format!("baking {name} on the host for L1:\n{}", r.show()));
        }
    }
    Ok(())
}

/// `vm run --image IMAGE --vmm VMM --net none EXTRA`.
fn run_image(cli: &Cli, image: &str, extra: &[&str]) -> Result<crate::cli::Ran, String> {
    let mut args = vec!["vm", "run", "--image", image, "--vmm", cli.vmm, "--net", "none", "--disk-size", "128M"];
    args.extend_from_slice(extra);
    cli.run(&args)
}

/// Each of `want` is a line of the guest's output.
fn expect_lines(r: &crate::cli::Ran, code: i32, want: &[&str], what: &str) -> Result<(), String> {
    let missing: Vec<&&str> = want.iter().filter(|w| !r.stdout.lines().any(|l| l.trim() == **w)).collect();
    if r.code != Some(code) || !missing.is_empty() {
        return Err(format!("{what}: expected exit {code} and the lines {missing:?}:\n{}", r.show()));
    }
    Ok(())
}

fn own_workload_runs_with_its_config(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    in_cli(dir, vmm, |cli| {
        let image = test_image(a, cli)?;
        let r = run_image(cli, &image, &[])?;
        expect_lines(
            &r,
            7,
            &[
                "uid=1000 gid=1000",
                "pwd=/work",
                "greeting=hello-from-the-image",
                // The setuid bit and the non-root owner, as the image's tar has them.
                "su=4755:0:0",
                "owned=640:1000:1000",
            ],
            "the image's own Entrypoint+Cmd as its User in its WorkingDir with its Env",
        )?;
        // And as a person reads it: the image's root on a disk root, and init dropping to 1000.
        if !r.stdout.contains("exec /bin/sh as 1000:1000") || !r.stdout.contains("root: overlay of /dev/vda") {
            return Err(format!(
                "init did not say it ran the image's command as 1000:1000 on the disk root:\n{}",
                r.show()
            ));
        }
        Ok(())
    })
}

fn exec_replaces_the_images_command(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    in_cli(dir, vmm, |cli| {
        let image = test_image(a, cli)?;
        let r = run_image(
            cli,
            &image,
            &["--exec", "/bin/sh", "--", "-c", "echo exec-ran uid=$(id -u) pwd=$(pwd); exit 3"],
        )?;
        // Only the command changes: the image's User and WorkingDir still apply.
        expect_lines(&r, 3, &["exec-ran uid=1000 pwd=/work"], "--exec in an image")?;
        if r.stdout.lines().any(|l| l.starts_with("greeting=")) {
            return Err(format!("the image's own command ran as well as --exec:\n{}", r.show()));
        }
        Ok(())
    })
}

fn flags_override_the_image(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    in_cli(dir, vmm, |cli| {
        let image = test_image(a, cli)?;
        let r =
            run_image(cli, &image, &["--env", "GREETING=from-the-flag", "--workdir", "/home/app", "--user", "app"])?;
        expect_lines(
            &r,
            7,
            &["greeting=from-the-flag", "pwd=/home/app", "uid=1000 gid=1000"],
            "--env/--workdir/--user over the image's",
        )?;
        let r = run_image(cli, &image, &["--user", "0:0"])?;
        expect_lines(&r, 7, &["uid=0 gid=0", "pwd=/work"], "--user 0:0 over the image's 1000:1000")?;
        // The working directory is entered as the user, not as root before the drop.
        let r = run_image(cli, &image, &["--user", "app", "--workdir", "/private"])?;
        if r.code != Some(127) || !r.stdout.contains("cannot start /bin/sh as 1000:1000 in /private: Permission denied")
        {
            return Err(format!(
                "--user app --workdir /private (root:nogroup, 0750) must fail to start:\n{}",
                r.show()
            ));
        }
        let r = run_image(cli, &image, &["--user", "nobody-in-this-image"])?;
        if r.code == Some(0) || r.code == Some(7) || !r.stderr.contains("\"nobody-in-this-image\"") {
            return Err(format!("an unknown user name must be refused, naming it:\n{}", r.show()));
        }
        Ok(())
    })
}

fn its_files_are_not_overwritten(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    in_cli(dir, vmm, |cli| {
        let image = test_image(a, cli)?;
        let script = "cat /sbin/openshell-init; ls -1 /.openshell/sbin /.openshell/usr/bin; \
                      stat -c sizes=%s /bin/busybox";
        let r = run_image(cli, &image, &["--user", "0", "--exec", "/bin/sh", "--", "-c", script])?;
        let busybox = std::fs::metadata(a.rootfs.join("bin/busybox")).map_err(|e| e.to_string())?.len();
        let sizes = format!("sizes={busybox}");
        let image_init = String::from_utf8_lossy(IMAGE_INIT);
        expect_lines(
            &r,
            0,
            &[image_init.trim(), "openshell-init", "openshell-gateway", &sizes],
            "the image's /sbin/openshell-init and busybox unchanged, ours under /.openshell",
        )?;
        // `rootfs --image --json` names the disk that booted (found, not baked again), and the
        // layer's xattr is in it: busybox has no getfattr, so it is read off the image itself.
        let r = cli.run(&["rootfs", "--image", &image, "--json"])?;
        let doc: serde_json::Value =
            serde_json::from_str(&r.stdout).map_err(|e| format!("rootfs --json: {e}:\n{}", r.show()))?;
        let disk = doc["disk"].as_str().ok_or_else(|| format!("rootfs --json has no disk:\n{}", r.show()))?;
        if r.code != Some(0) || doc["fresh"] != false || doc["init"] != openshell_guest::IMAGE_INIT_BIN {
            return Err(format!("rootfs --image --json after a boot of that image:\n{}", r.show()));
        }
        let out = std::process::Command::new("debugfs")
            .args(["-R", "ea_get /work/owned user.origin", disk])
            .output()
            .map_err(|e| format!("debugfs (apt-get install -y e2fsprogs): {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !text.contains(XATTR_VALUE) {
            return Err(format!(
                "the layer's user.origin xattr on /work/owned is not in {disk}: debugfs said {text:?} {:?}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    })
}

fn an_image_without_a_command_needs_exec(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    dir.expect_no_vm();
    in_cli(dir, vmm, |cli| {
        let image = format!("oci:{}", layout(a, &cli.dir, "no-command-layout", no_command_config())?.display());
        let r = run_image(cli, &image, &[])?;
        if r.code != Some(1) || !r.stderr.contains("the image names no command") || !r.stderr.contains("--exec") {
            return Err(format!(
                "an image without Entrypoint or Cmd must be refused with the --exec hint:\n{}",
                r.show()
            ));
        }
        Ok(())
    })
}

fn corrupt_or_foreign_image_is_refused(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    dir.expect_no_vm();
    in_cli(dir, vmm, |cli| {
        let config = serde_json::json!({"Cmd": ["/bin/true"]});
        let foreign = match openshell_artifacts::Arch::host() {
            openshell_artifacts::Arch::X86_64 => "arm64",
            openshell_artifacts::Arch::Aarch64 => "amd64",
        };
        let image = format!("oci:{}", layout_for(a, &cli.dir, "foreign-layout", config.clone(), foreign)?.display());
        let r = run_image(cli, &image, &[])?;
        if r.code != Some(1) || !r.stderr.contains("no manifest for") || !r.stderr.contains(foreign) {
            return Err(format!("an image for {foreign} only must be refused, naming what it has:\n{}", r.show()));
        }
        // One flipped byte in the layer: its blob no longer matches its digest.
        let out = layout(a, &cli.dir, "corrupt-layout", config)?;
        let blobs = out.join("blobs/sha256");
        let layer = std::fs::read_dir(&blobs)
            .map_err(|e| e.to_string())?
            .flatten()
            .map(|e| e.path())
            .max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
            .ok_or("the layout has no blobs")?;
        let mut bytes = std::fs::read(&layer).map_err(|e| e.to_string())?;
        bytes[700] ^= 1;
        std::fs::write(&layer, bytes).map_err(|e| e.to_string())?;
        let r = run_image(cli, &format!("oci:{}", out.display()), &[])?;
        let name = layer.file_name().unwrap_or_default().to_string_lossy().into_owned();
        if r.code != Some(1) || !r.stderr.contains("does not match its digest") || !r.stderr.contains(&name) {
            return Err(format!("a corrupt layer must be refused, naming its blob {name}:\n{}", r.show()));
        }
        Ok(())
    })
}

/// `vm run --image --ready http:8080/index.html` (with `-p`) says it is ready only once the guest's
/// service answers: the first GET after that line gets the guest's page. Without a forward to the
/// probed port it is refused before boot, naming the flag to add. Ctrl-C then stops the guest,
/// whose exit code `vm run` reports.
fn ready_waits_for_its_service(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    in_cli(dir, vmm, |cli| {
        let image = test_image(a, cli)?;
        let base = ["vm", "run", "--image", &image, "--vmm", cli.vmm, "--net", "passt", "--disk-size", "128M"];
        let unforwarded = [&base[..], &["--ready", "http:8080/", "--exec", "/bin/true"]].concat();
        let r = cli.run(&unforwarded)?;
        if r.code == Some(0) || !r.stderr.contains("add -p HOST:8080") {
            return Err(format!("a probe of an unforwarded port must be refused before boot:\n{}", r.show()));
        }
        crate::support::with_free_port(|port| {
            let publish = format!("{port}:8080");
            let extra =
                ["-p", &publish, "--ready", "http:8080/index.html", "--exec", "/bin/sh", "--", "-c", LATE_SERVICE];
            let args = [&base[..], &extra[..]].concat();
            let mut cmd = cli.command(&args);
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
            let mut run = cli.spawn_with(cmd, &args)?;
            let said = "vm: ready: http:8080/index.html answered HTTP at 127.0.0.1:";
            run.wait_for(crate::support::GUEST_TIMEOUT, |_, err| err.contains(said) || err.contains("in use"))?;
            if !run.stderr_text().contains(said) {
                return Err(format!("port {port} in use: {}", run.stderr_text()));
            }
            let page = http_get(port, "/index.html");
            let group = nix::unistd::Pid::from_raw(run.pid() as i32);
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGINT);
            let ran = run.wait(std::time::Duration::from_secs(120))?;
            match page {
                Ok(body) if body.contains("served-by-the-guest") => {}
                Ok(body) => return Err(format!("the first GET after the ready line got {body:?}:\n{}", ran.show())),
                Err(e) => return Err(format!("the first GET after the ready line failed: {e}\n{}", ran.show())),
            }
            if !ran.stdout.contains("httpd-starting") || !ran.stderr.contains("the guest reported exit code") {
                return Err(format!(
                    "expected the late service's line and the guest's exit code after Ctrl-C:\n{}",
                    ran.show()
                ));
            }
            Ok(())
        })
    })
}

/// One HTTP/1.0 GET to 127.0.0.1:`port`, its whole answer.
fn http_get(port: u16, path: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(60))).map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").map_err(|e| e.to_string())?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).map_err(|e| e.to_string())?;
    Ok(answer)
}

/// `bench image --ready tcp:8080 --json`, one cold and one warm run, on an image of its own (its
/// cold run removes the image's store entries, which no other trial may be booting from): both
/// modes report the time to ready.
fn bench_image_json(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    in_cli(dir, vmm, |cli| {
        let config = serde_json::json!({
            "Entrypoint": ["/bin/sh", "-c"], "Cmd": [LATE_SERVICE], "Env": ["PATH=/bin", "BENCHED=yes"],
        });
        let image = format!("oci:{}", layout(a, &cli.dir, "bench-layout", config)?.display());
        let doc = crate::cli::bench_json(cli, &["image", &image, "-n", "1", "--vmm", cli.vmm, "--ready", "tcp:8080"])?;
        for mode in ["cold", "warm"] {
            crate::cli::positive(&doc, &format!("{mode}/host: vm run → ready (tcp:8080)/median"))?;
        }
        if doc["image"] != serde_json::json!(image) {
            return Err(format!("the report names another image than {image}: {doc:#}"));
        }
        Ok(())
    })
}

/// What both sides list of an image's tree, one `L `-prefixed line per path, sorted: type, mode,
/// owner; a regular file's link count, size and md5; a symlink's target; a device's numbers. The
/// paths each runtime makes or mounts on its own (kernel filesystems, `/tmp`, podman's
/// `/etc/hosts` and friends and its `/etc/mtab` link, the root disk's `lost+found`, our
/// `/.openshell*`) are left out.
const TREE_LISTING: &str = r#"cd / && find . -xdev \( -path ./proc -o -path ./sys -o -path ./dev -o -path ./run \
 -o -path ./tmp -o -path ./lost+found -o -path './.openshell*' -o -path ./etc/hosts -o -path ./etc/hostname \
 -o -path ./etc/resolv.conf -o -path ./etc/mtab \) -prune -o -print | sort | while read -r p; do
 [ "$p" = . ] && continue
 if [ -L "$p" ]; then echo "L $p symlink $(readlink "$p")"
 elif [ -d "$p" ]; then stat -c "L %n dir %a %u:%g" "$p"
 elif [ -f "$p" ]; then echo "$(stat -c 'L %n file %a %u:%g links=%h size=%s' "$p") $(md5sum "$p" | cut -d' ' -f1)"
 else stat -c "L %n %F %a %u:%g %t:%T" "$p"; fi
done"#;

/// The layers above the test image's own: the lower adds files the upper deletes (a whiteout),
/// hides (an opaque directory) or sits beside; the upper adds a hard link, a setuid file, a
/// character device and a symlink.
fn purpose_layers() -> Result<[Vec<u8>; 2], String> {
    let put = |b: &mut tar::Builder<Vec<u8>>, mut h: tar::Header, path: &str, data: &[u8]| {
        h.set_path(path).map_err(|e| e.to_string())?;
        h.set_cksum();
        b.append(&h, data).map_err(|e| e.to_string())
    };
    let file = |b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, data: &[u8]| {
        put(b, header(tar::EntryType::Regular, mode, 0, 0, data.len() as u64), path, data)
    };
    let dir = |b: &mut tar::Builder<Vec<u8>>, path: &str| {
        put(b, header(tar::EntryType::Directory, 0o755, 0, 0, 0), path, b"")
    };
    let mut lower = tar::Builder::new(Vec::new());
    dir(&mut lower, "data")?;
    file(&mut lower, "data/gone", 0o644, b"deleted by the upper layer\n")?;
    file(&mut lower, "data/kept", 0o644, b"kept from the lower layer\n")?;
    dir(&mut lower, "opaque")?;
    file(&mut lower, "opaque/old", 0o644, b"hidden by the opaque directory\n")?;
    dir(&mut lower, "opaque/sub")?;
    file(&mut lower, "opaque/sub/deep", 0o644, b"hidden too\n")?;
    let mut upper = tar::Builder::new(Vec::new());
    dir(&mut upper, "data")?;
    file(&mut upper, "data/.wh.gone", 0o644, b"")?;
    dir(&mut upper, "opaque")?;
    file(&mut upper, "opaque/.wh..wh..opq", 0o644, b"")?;
    file(&mut upper, "opaque/new", 0o600, b"the opaque directory's only file\n")?;
    file(&mut upper, "data/original", 0o640, b"two names, one file\n")?;
    let mut h = header(tar::EntryType::Link, 0o640, 0, 0, 0);
    h.set_link_name("data/original").map_err(|e| e.to_string())?;
    put(&mut upper, h, "data/hard", b"")?;
    file(&mut upper, "data/suid", 0o4755, b"#!/bin/sh\n")?;
    let mut h = header(tar::EntryType::Char, 0o666, 0, 0, 0);
    h.set_device_major(1).map_err(|e| e.to_string())?;
    h.set_device_minor(3).map_err(|e| e.to_string())?;
    put(&mut upper, h, "data/null", b"")?;
    let mut h = header(tar::EntryType::Symlink, 0o777, 0, 0, 0);
    h.set_link_name("kept").map_err(|e| e.to_string())?;
    put(&mut upper, h, "data/link", b"")?;
    Ok([lower.into_inner().map_err(|e| e.to_string())?, upper.into_inner().map_err(|e| e.to_string())?])
}

/// The `L ` lines of a listing, sorted.
fn listing(out: &str) -> Vec<String> {
    let mut lines: Vec<String> = out.lines().filter(|l| l.starts_with("L ")).map(|l| l.trim_end().to_owned()).collect();
    lines.sort();
    lines
}

/// `podman` under the containers.conf this kind of host needs, in the trial's own directory.
fn podman(cli: &Cli, args: &[&str]) -> Result<String, String> {
    let conf = cli.dir.join("containers.conf");
    std::fs::write(&conf, openshell_image::PODMAN_CONF).map_err(|e| e.to_string())?;
    let out = std::process::Command::new("podman")
        .args(args)
        .env("CONTAINERS_CONF", &conf)
        .output()
        .map_err(|e| format!("podman {}: {e} (apt-get install -y podman runc)", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "podman {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The same OCI archive loaded into podman: runs `f` with the image's id, then removes it.
fn with_podman_image<T>(cli: &Cli, archive: &Path, f: impl FnOnce(&str) -> Result<T, String>) -> Result<T, String> {
    let loaded = podman(cli, &["load", "-q", "-i", &archive.to_string_lossy()])?;
    let id = loaded
        .lines()
        .find_map(|l| l.trim().strip_prefix("Loaded image: "))
        .map(|id| id.trim_start_matches("sha256:").to_owned())
        .ok_or_else(|| format!("podman load printed no image id: {loaded}"))?;
    let result = f(&id);
    let _ = podman(cli, &["rmi", "-f", &id]);
    result
}

fn its_tree_is_the_one_podman_run_sees(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    in_cli(dir, vmm, |cli| {
        let out = cli.dir.join("purpose-layout");
        std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
        std::fs::write(out.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).map_err(|e| e.to_string())?;
        let [lower, upper] = purpose_layers()?;
        let config = serde_json::json!({"Entrypoint": ["/bin/sh", "-c"], "Cmd": [TREE_LISTING], "Env": ["PATH=/bin"], "User": "0:0"});
        write_layout(&out, config, &[layer(a)?, lower, upper], openshell_artifacts::Arch::host().debian())?;
        // One archive for both: the layout as `podman save --format oci-archive` writes one.
        let archive = cli.dir.join("purpose.oci.tar");
        let st = std::process::Command::new("tar")
            .arg("-C")
            .arg(&out)
            .arg("-cf")
            .arg(&archive)
            .arg(".")
            .status()
            .map_err(|e| e.to_string())?;
        if !st.success() {
            return Err(format!("tar of {} failed ({st})", out.display()));
        }
        let r = run_image(cli, &format!("oci-archive:{}", archive.display()), &[])?;
        if r.code != Some(0) {
            return Err(format!("the listing in the VM did not exit 0:\n{}", r.show()));
        }
        let in_vm = listing(&r.stdout);
        let in_podman = with_podman_image(cli, &archive, |id| {
            podman(cli, &["run", "--rm", "--network", "none", id]).map(|out| listing(&out))
        })?;
        // What the layers were made to show, so an empty or partial listing cannot pass.
        for want in [
            "L ./data/hard file 640 0:0 links=2",
            "L ./data/suid file 4755 0:0 links=1",
            "L ./data/null character special file 666 0:0 1:3",
            "L ./data/link symlink kept",
            "L ./opaque/new file 600 0:0 links=1",
        ] {
            if !in_vm.iter().any(|l| l.starts_with(want)) {
                return Err(format!("the VM's listing lacks {want:?}:\n{}", in_vm.join("\n")));
            }
        }
        for gone in ["L ./data/gone ", "L ./opaque/old ", "L ./opaque/sub "] {
            if let Some(l) = in_vm.iter().find(|l| l.starts_with(gone)) {
                return Err(format!("the VM shows what the upper layer removed: {l}"));
            }
        }
        if in_vm != in_podman {
            let only = |a: &[String], b: &[String]| a.iter().filter(|l| !b.contains(l)).cloned().collect::<Vec<_>>();
            return Err(format!(
                "the VM's tree differs from podman run's of the same archive:\nonly in the VM:\n{}\nonly under podman:\n{}",
                only(&in_vm, &in_podman).join("\n"),
                only(&in_podman, &in_vm).join("\n")
            ));
        }
        println!(
            "image::its_tree_is_the_one_podman_run_sees: {} paths, the same in the VM and under podman run",
            in_vm.len()
        );
        Ok(())
    })
}

/// What the Debian image's Entrypoint (`python3 -c`) prints: the interpreter, where it runs, as
/// whom, with what from its Env.
const PYTHON_SCRIPT: &str =
    "import os, sys; print('python', sys.version_info[0], os.getcwd(), os.getuid(), os.environ.get('GREETING'))";

fn a_debian_image_built_here_runs(_a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    in_cli(dir, vmm, |cli| {
        // From Debian's archive, as a user without a registry makes one.
        let tree = cli.dir.join("bookworm-python.tar");
        let mut cmd = std::process::Command::new("mmdebstrap");
        cmd.args(["--variant=minbase", "--include=python3", "bookworm"]).arg(&tree);
        cmd.args(openshell_artifacts::debian::sources("bookworm"));
        let out =
            cmd.output().map_err(|e| format!("mmdebstrap: {e} ({})", openshell_artifacts::debian::INSTALL_HINT))?;
        if !out.status.success() {
            return Err(format!("mmdebstrap failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr)));
        }
        let name = format!("localhost/openshell-trial-bookworm-python:{}", std::process::id());
        let cmd_json = serde_json::to_string(&[PYTHON_SCRIPT]).map_err(|e| e.to_string())?;
        podman(
            cli,
            &[
                "import",
                "--change",
                r#"ENTRYPOINT ["/usr/bin/python3", "-c"]"#,
                "--change",
                &format!("CMD {cmd_json}"),
                "--change",
                "ENV GREETING=from-the-debian-image",
                "--change",
                "WORKDIR /var/lib",
                "--change",
                "USER nobody",
                &tree.to_string_lossy(),
                &name,
            ],
        )?;
        let archive = cli.dir.join("bookworm-python.oci.tar");
        let saved = podman(cli, &["save", "--format", "oci-archive", "-o", &archive.to_string_lossy(), &name]);
        let _ = podman(cli, &["rmi", "-f", &name]);
        saved?;
        let image = format!("oci-archive:{}", archive.display());
        let r = run_image(cli, &image, &[])?;
        expect_lines(&r, 0, &["python 3 /var/lib 65534 from-the-debian-image"], "the Debian image's Entrypoint + Cmd")?;
        let r = run_image(
            cli,
            &image,
            &["--user", "0", "--exec", "/usr/bin/dpkg-query", "--", "-W", "-f", "${Package} ${Status}\\n", "python3"],
        )?;
        expect_lines(&r, 0, &["python3 install ok installed"], "dpkg-query in the Debian image")?;
        Ok(())
    })
}
