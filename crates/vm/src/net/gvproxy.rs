//! gvproxy (containers/gvisor-tap-vsock): the macOS network backend, and `--net gvproxy` on Linux.
//!
//! Run here against Debian's gvproxy 0.8.1 (trixie's package, fetched into the artifact store by
//! `openshell_artifacts::gvproxy` when the host has none) with both VMMs. What it relies on, as
//! read in `containers/gvisor-tap-vsock` at v0.8.1:
//! - flags (`cmd/gvproxy/main.go`): `-listen unix://API` serves the HTTP API; `-listen-qemu
//!   unix://PATH` is the stream link (`pkg/tap/protocols.go`: a 4-byte big-endian length before
//!   each frame, what QEMU ≥ 7.2's `-netdev stream` and libkrun's unixstream backend speak);
//!   `-listen-vfkit unixgram://PATH` the vfkit datagram link, built for macOS only
//!   (`pkg/transport/unixgram_nondarwin.go` answers "unsupported 'unixgram' scheme"; the Linux
//!   build came in aca08de8, April 2026, in no release through v0.8.9). So libkrun uses the vfkit
//!   link on macOS and the stream link on Linux ([`protocol`]). gvproxy accepts one connection
//!   on the stream link, and refuses to start if a link's socket path exists. `-ssh-port -1`
//!   drops the default `127.0.0.1:2222 → guest:22` forward (`getForwardsMap`). `-pid-file PATH`
//!   writes its pid and removes the file on exit.
//! - network (`main.go`'s configuration, `pkg/services/dhcp`): subnet 192.168.127.0/24, gateway
//!   and DNS 192.168.127.1, static lease 192.168.127.2 for MAC 5a:94:ef:e4:0c:ee.
//! - vfkit link (`pkg/transport/unixgram_darwin.go`, `AcceptVfkit`): gvproxy learns the VMM's
//!   address from its first datagram and consumes it if it is the `VFKT` magic, which libkrun
//!   sends when given `NET_FLAG_VFKIT` (libkrun 1.19.7 `krun_add_net_unixgram`).
//! - forwards (`pkg/services/forwarder/ports.go`, `pkg/virtualnetwork/mux.go`: the API socket's
//!   handler serves `/services/`): `POST /services/forwarder/expose` with
//!   `{"local","remote","protocol"}` and `POST /services/forwarder/unexpose` with
//!   `{"local","protocol"}` (`pkg/types` `ExposeRequest`/`UnexposeRequest`); success is an empty
//!   200, failure a `http.Error` text body with 400 (bad request) or 500 (e.g. the local address
//!   is taken). A TCP expose binds `local` before it answers, so a 200 means the forward listens.
//!
//! Least privilege: started by root, gvproxy runs as `nobody` with no supplementary groups. It
//! accepts no inherited sockets (v0.8.1's `transport.Listen` takes `unix`, `tcp`, `vsock`,
//! `unixpacket` URLs only), so it creates its sockets itself, in a directory of its own inside
//! the VM's state directory, owned by it and mode 0700. The state directory's parents need not
//! be searchable by `nobody`: on Linux gvproxy starts in that directory and names its sockets
//! through `/proc/self/cwd/`, which reaches the directory without walking its parents (and keeps
//! the socket paths far below `sun_path`'s 108 bytes whatever the state directory's length).
//!
//! The HTTP requests are rendered and parsed by pure functions here; sending them is a thin layer
//! over a `UnixStream`.

use std::fs::File;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Attach, GuestNet, PortMap};
use crate::VmError;

/// The guest's address on gvproxy's network: the address gvproxy's DHCP leases to [`GUEST_MAC`],
/// with its gateway (also the DNS server).
pub const GUEST: GuestNet =
    GuestNet { addr: Ipv4Addr::new(192, 168, 127, 2), prefix: 24, gateway: Ipv4Addr::new(192, 168, 127, 1) };
/// The MAC gvproxy's static lease table gives [`GUEST`]'s address to.
pub const GUEST_MAC: [u8; 6] = [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee];
/// How to get gvproxy, on macOS or on Linux.
pub fn install_hint(macos: bool) -> &'static str {
    if macos {
        "install it with `brew install podman` (which ships gvproxy), or pass --gvproxy PATH"
    } else {
        "`cargo xtask vm run --net gvproxy` fetches Debian's gvproxy into the artifact store; or pass --gvproxy PATH"
    }
}
/// Where gvproxy is installed off `PATH`, searched in this order: Homebrew's `bin` (Apple silicon,
/// Intel), Podman Desktop's installer (`/opt/podman/bin`), then podman's helper-binary directories
/// (containers/common's `helper_binaries_dir`: Homebrew's podman on both Macs, then Linux
/// distributions), where podman's packages put it.
pub const SEARCH_DIRS: &[&str] = &[
    "/opt/homebrew/bin",
    "/usr/local/bin",
    "/opt/podman/bin",
    "/opt/homebrew/opt/podman/libexec/podman",
    "/usr/local/opt/podman/libexec/podman",
    "/usr/libexec/podman",
    "/usr/lib/podman",
];

/// Hang guards, not expectations: gvproxy (a Go program) once took over 5 s to make its sockets
/// inside a nested host under TCG with other guests running, and a gvproxy that exits ends the
/// wait at once, so only a wedged one meets these.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const API_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_GRACE: Duration = Duration::from_secs(2);
const EXPOSE_PATH: &str = "/services/forwarder/expose";
const UNEXPOSE_PATH: &str = "/services/forwarder/unexpose";

/// The one gvproxy search, for the plan (through [`crate::HostFacts`]) and `cargo xtask check`
/// alike: gvproxy on `PATH`, else in [`SEARCH_DIRS`], else (Linux, where distributions before
/// Debian 13 ship none) the copy fetched from Debian into the artifact store, re-hashed against
/// its record. (`--gvproxy PATH` replaces the search.)
pub fn find() -> Option<PathBuf> {
    find_in(std::env::var_os("PATH"), SEARCH_DIRS, |p| which::which(p).is_ok()).or_else(|| {
        if cfg!(target_os = "linux") {
            let store = openshell_artifacts::Store::default_location();
            openshell_artifacts::gvproxy::locate(&store, openshell_artifacts::Arch::host()).map(|g| g.binary)
        } else {
            None
        }
    })
}

/// [`find`] with the search path, the fixed directories and "is an executable file" passed in.
fn find_in(path_var: Option<std::ffi::OsString>, dirs: &[&str], executable: impl Fn(&Path) -> bool) -> Option<PathBuf> {
    let on_path = path_var.map(|v| std::env::split_paths(&v).collect::<Vec<_>>()).unwrap_or_default();
    on_path.into_iter().chain(dirs.iter().map(PathBuf::from)).map(|d| d.join("gvproxy")).find(|p| executable(p))
}

/// gvproxy's files for one VM, all in its own directory inside the VM's state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sockets {
    /// gvproxy's directory: its working directory, owned by it.
    pub dir: PathBuf,
    /// The HTTP API (`-listen`).
    pub api: PathBuf,
    /// The VMM's link (`-listen-vfkit` or `-listen-qemu`).
    pub link: PathBuf,
    pub pid_file: PathBuf,
}

const API: &str = "api.sock";
const LINK: &str = "link.sock";
const PID_FILE: &str = "gvproxy.pid";

impl Sockets {
    pub fn in_dir(state_dir: &Path) -> Sockets {
        let dir = state_dir.join("gvproxy");
        Sockets { api: dir.join(API), link: dir.join(LINK), pid_file: dir.join(PID_FILE), dir }
    }

    /// A file of gvproxy's as gvproxy names it: through its working directory on Linux (see the
    /// module docs), absolute elsewhere.
    fn seen_by_gvproxy(&self, name: &str) -> PathBuf {
        if cfg!(target_os = "linux") {
            Path::new("/proc/self/cwd").join(name)
        } else {
            self.dir.join(name)
        }
    }
}

/// Which of gvproxy's links the VMM attaches to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `-listen-vfkit`: unixgram, libkrun by path with the `VFKT` magic.
    Vfkit,
    /// `-listen-qemu`: a stream the VMM inherits, one length-prefixed frame at a time.
    Qemu,
}

/// The link for `attach`, decided here once: libkrun takes the vfkit link on macOS; everywhere
/// else both VMMs take the stream link, the only one a released gvproxy builds for Linux.
pub fn protocol(attach: Attach) -> Protocol {
    match attach {
        Attach::Krun if cfg!(target_os = "macos") => Protocol::Vfkit,
        _ => Protocol::Qemu,
    }
}

/// The socket libkrun connects to (vfkit protocol) for a VM with this state directory.
pub fn vfkit_socket(state_dir: &Path) -> PathBuf {
    Sockets::in_dir(state_dir).link
}

/// gvproxy's arguments: the API socket, the one link the VMM uses, no SSH forward, a pid file.
pub fn argv(s: &Sockets, protocol: Protocol) -> Vec<String> {
    let link = s.seen_by_gvproxy(LINK);
    let link = match protocol {
        Protocol::Vfkit => ["-listen-vfkit".to_owned(), socket_url("unixgram", &link)],
        Protocol::Qemu => ["-listen-qemu".to_owned(), socket_url("unix", &link)],
    };
    let mut a = vec!["-listen".to_owned(), socket_url("unix", &s.seen_by_gvproxy(API))];
    a.extend(link);
    let pid_file = s.seen_by_gvproxy(PID_FILE).display().to_string();
    a.extend(["-ssh-port".to_owned(), "-1".to_owned(), "-pid-file".to_owned(), pid_file]);
    a
}

/// `scheme://` + an absolute path, percent-encoded: gvproxy parses these with Go's `url.Parse`
/// and uses the decoded path, so a space or `#` in a state directory must not end the path.
fn socket_url(scheme: &str, path: &Path) -> String {
    let mut url = format!("{scheme}://");
    for &b in path.as_os_str().as_bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            url.push(b as char);
        } else {
            url.push_str(&format!("%{b:02X}"));
        }
    }
    url
}

#[derive(serde::Serialize)]
struct ExposeRequest {
    local: String,
    remote: String,
    protocol: &'static str,
}

#[derive(serde::Serialize)]
struct UnexposeRequest {
    local: String,
    protocol: &'static str,
}

/// The host side of a forward: always loopback, never every interface.
fn local(p: PortMap) -> String {
    format!("{}:{}", Ipv4Addr::LOCALHOST, p.host)
}

/// `POST /services/forwarder/expose` body: 127.0.0.1:HOST → the guest's GUEST port over TCP.
pub fn expose_body(p: PortMap) -> String {
    let req = ExposeRequest { local: local(p), remote: format!("{}:{}", GUEST.addr, p.guest), protocol: "tcp" };
    serde_json::to_string(&req).expect("expose request serializes")
}

/// `POST /services/forwarder/unexpose` body for the forward of `p`.
pub fn unexpose_body(p: PortMap) -> String {
    serde_json::to_string(&UnexposeRequest { local: local(p), protocol: "tcp" }).expect("unexpose request serializes")
}

/// The exact bytes of an HTTP/1.1 JSON `POST` to gvproxy's API. `Connection: close` makes the
/// server end the stream after its answer.
pub fn render_post(path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: gvproxy\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// An HTTP response's status and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// Parses an HTTP/1.x response read so far: `Ok(None)` while more bytes are needed, an error if it
/// is malformed or (`at_eof`) cut short. The body is `Content-Length` long, or runs to EOF.
pub fn parse_response(raw: &[u8], at_eof: bool) -> Result<Option<Response>, String> {
    let Some(head_end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if at_eof {
            Err(format!("the connection closed inside the response head ({} bytes)", raw.len()))
        } else {
            Ok(None)
        };
    };
    let head = String::from_utf8_lossy(&raw[..head_end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = match status_line.split(' ').collect::<Vec<_>>()[..] {
        [version, code, ..] if version.starts_with("HTTP/1.") => code.parse::<u16>().ok(),
        _ => None,
    }
    .ok_or_else(|| format!("not an HTTP/1.x status line: {status_line:?}"))?;
    let length = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.trim().parse::<usize>().map_err(|_| format!("bad Content-Length {v:?}")))
        .transpose()?;
    let rest = &raw[head_end + 4..];
    let body = match length {
        Some(n) if rest.len() >= n => &rest[..n],
        Some(n) if at_eof => return Err(format!("the body ended after {} of {n} bytes", rest.len())),
        None if at_eof => rest,
        _ => return Ok(None),
    };
    Ok(Some(Response { status, body: String::from_utf8_lossy(body).into_owned() }))
}

/// Connects to the unix socket at `path`, however long: on Linux a path past `sun_path`'s 107
/// bytes (a deep state directory) is reached through its directory, held open for the call, as
/// `/proc/self/fd/N/NAME`.
fn connect(path: &Path) -> std::io::Result<UnixStream> {
    const SUN_PATH: usize = 107;
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else { return UnixStream::connect(path) };
    if !cfg!(target_os = "linux") || path.as_os_str().len() <= SUN_PATH {
        return UnixStream::connect(path);
    }
    let dir = File::open(dir)?;
    UnixStream::connect(Path::new(&format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name))
}

/// Sends one request to the API socket and reads the whole response.
fn post(api: &Path, path: &str, body: &str) -> std::io::Result<Response> {
    let mut stream = connect(api)?;
    stream.set_read_timeout(Some(API_TIMEOUT))?;
    stream.set_write_timeout(Some(API_TIMEOUT))?;
    stream.write_all(&render_post(path, body))?;
    let mut raw = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk)?;
        raw.extend_from_slice(&chunk[..n]);
        match parse_response(&raw, n == 0) {
            Ok(Some(r)) => return Ok(r),
            Ok(None) => {}
            Err(e) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        }
    }
}

/// The error for a forward gvproxy would not open or close, with gvproxy's own message.
fn refused(what: &str, p: PortMap, r: &Response) -> VmError {
    let msg = r.body.trim();
    let hint = if msg.contains("address already in use") {
        "; stop what listens there or map another port with -p HOST:GUEST"
    } else {
        ""
    };
    VmError::Gvproxy(format!(
        "gvproxy refused to {what} the forward 127.0.0.1:{} → guest port {} (HTTP {}): {msg}{hint}",
        p.host, p.guest, r.status
    ))
}

fn api_err(what: &str, p: PortMap, api: &Path, e: std::io::Error) -> VmError {
    VmError::Gvproxy(format!(
        "cannot {what} the forward of host port {} through gvproxy's API at {}: {e}",
        p.host,
        api.display()
    ))
}

/// Asks gvproxy to forward 127.0.0.1:HOST to the guest; a 200 means the host port listens.
pub fn expose(api: &Path, p: PortMap) -> Result<(), VmError> {
    let r = post(api, EXPOSE_PATH, &expose_body(p)).map_err(|e| api_err("open", p, api, e))?;
    if (200..300).contains(&r.status) {
        Ok(())
    } else {
        Err(refused("open", p, &r))
    }
}

/// Asks gvproxy to close the forward of `p`.
pub fn unexpose(api: &Path, p: PortMap) -> Result<(), VmError> {
    let r = post(api, UNEXPOSE_PATH, &unexpose_body(p)).map_err(|e| api_err("close", p, api, e))?;
    if (200..300).contains(&r.status) {
        Ok(())
    } else {
        Err(refused("close", p, &r))
    }
}

/// Waits until every path exists, while `alive` says the process that creates them still runs.
pub fn wait_for_paths(
    paths: &[&Path],
    timeout: Duration,
    mut alive: impl FnMut() -> Result<(), String>,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        alive()?;
        let Some(missing) = paths.iter().find(|p| !p.exists()) else { return Ok(()) };
        if Instant::now() > deadline {
            return Err(format!("{} did not appear within {} ms", missing.display(), timeout.as_millis()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The longest unix socket path macOS takes (`sun_path` less its NUL). On Linux gvproxy names
/// its sockets through `/proc/self/cwd/`, whatever the state directory's length.
const MAX_SOCKET_PATH: usize = 103;
/// The descriptor gvproxy's binary is executed through when it runs as `nobody` (after stdio).
const EXEC_FD: i32 = 3;
const EXEC_FD_PATH: &str = "/proc/self/fd/3";

/// The uid and gid gvproxy runs as when we are root: `nobody`'s (65534 when the passwd database
/// has no such user). `None` when we are not root: it runs as us.
/// Linux only: the drop executes through `/proc/self/fd`.
fn unprivileged() -> Option<(nix::unistd::Uid, nix::unistd::Gid)> {
    if !cfg!(target_os = "linux") || !nix::unistd::geteuid().is_root() {
        return None;
    }
    let nobody = nix::unistd::User::from_name("nobody").ok().flatten();
    Some(nobody.map_or((nix::unistd::Uid::from_raw(65534), nix::unistd::Gid::from_raw(65534)), |u| (u.uid, u.gid)))
}

/// A running gvproxy; stopped on drop (SIGTERM, a grace period, then SIGKILL).
#[derive(Debug)]
pub struct Gvproxy {
    child: Option<Child>,
    sockets: Sockets,
}

/// Starts gvproxy for one VM: waits for its API and link sockets, opens every forward, and on the
/// stream link connects and returns that stream for the VMM to inherit (libkrun connects to the
/// vfkit socket by path itself). On any failure gvproxy is stopped again.
pub fn start(
    binary: &Path,
    ports: &[PortMap],
    attach: Attach,
    state_dir: &Path,
    log: File,
) -> Result<(Gvproxy, Option<OwnedFd>), VmError> {
    let sockets = Sockets::in_dir(state_dir);
    let protocol = protocol(attach);
    if !cfg!(target_os = "linux") {
        for path in [&sockets.api, &sockets.link] {
            if path.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(VmError::Invalid(format!(
                    "gvproxy's socket path {} is longer than the {MAX_SOCKET_PATH} bytes a unix socket takes; use a shorter --state-dir",
                    path.display(),
                )));
            }
        }
    }
    // Left by an earlier run in our own state directory; gvproxy refuses to start over them.
    let _ = std::fs::remove_dir_all(&sockets.dir);
    let io = |source| VmError::Io { path: sockets.dir.clone(), source };
    std::fs::create_dir_all(&sockets.dir).map_err(io)?;
    std::fs::set_permissions(&sockets.dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).map_err(io)?;
    let drop_to = unprivileged();
    if let Some((uid, gid)) = drop_to {
        nix::unistd::chown(&sockets.dir, Some(uid), Some(gid)).map_err(|e| io(e.into()))?;
    }
    let err = log.try_clone().map_err(|source| VmError::Spawn { what: "gvproxy".into(), source })?;
    let cstr = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| VmError::Invalid(format!("{} has a NUL byte", p.display())))
    };
    let (dir, program) = (cstr(&sockets.dir)?, cstr(binary)?);
    // Dropping to `nobody`, the binary is opened as root and executed through that descriptor:
    // `nobody` may not be able to walk to it either (the store lives under root's home).
    let mut cmd = Command::new(if drop_to.is_some() { Path::new(EXEC_FD_PATH) } else { binary });
    cmd.arg0(binary).args(argv(&sockets, protocol)).stdin(Stdio::null()).stdout(log).stderr(err);
    // SAFETY: only async-signal-safe calls (open, dup2, close, chdir, setgroups, setgid, setuid,
    // setpgid, prctl) between fork and exec, on memory allocated before the fork.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            // Here, not through Command::current_dir/uid/gid: std changes the ids before the
            // directory, and `nobody` may not be able to walk to it.
            if libc::chdir(dir.as_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some((uid, gid)) = drop_to {
                // Without close-on-exec, so a script (the unit tests' stand-in) can be read back
                // by its interpreter; gvproxy keeps a read-only descriptor of its own binary.
                let fd = libc::open(program.as_ptr(), libc::O_RDONLY);
                if fd < 0 || (fd != EXEC_FD && (libc::dup2(fd, EXEC_FD) < 0 || libc::close(fd) != 0)) {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid.as_raw()) != 0
                    || libc::setuid(uid.as_raw()) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // Its own process group, so a terminal's Ctrl-C reaches the supervisor, which stops
            // the VMM before the network; and on Linux it dies with the supervisor (set after
            // the uid change, which clears the parent-death signal).
            nix::unistd::setpgid(nix::unistd::Pid::from_raw(0), nix::unistd::Pid::from_raw(0))?;
            crate::child::die_with_parent()
        });
    }
    let child =
        cmd.spawn().map_err(|source| VmError::Spawn { what: format!("gvproxy ({})", binary.display()), source })?;
    tracing::debug!(pid = child.id(), ?cmd, as_uid = ?drop_to.map(|(u, _)| u), "gvproxy started");
    let mut gv = Gvproxy { child: Some(child), sockets };
    let log_path = state_dir.join("gvproxy.log");
    let child = gv.child.as_mut().expect("just started");
    wait_for_paths(&[&gv.sockets.api, &gv.sockets.link], READY_TIMEOUT, || match child.try_wait() {
        Ok(Some(status)) => Err(format!("gvproxy exited ({status}) before its sockets appeared")),
        _ => Ok(()),
    })
    .map_err(|why| VmError::Gvproxy(with_log_tail(&why, &log_path)))?;
    for &p in ports {
        expose(&gv.sockets.api, p)?;
    }
    let link = match protocol {
        Protocol::Vfkit => None,
        Protocol::Qemu => {
            let s = connect(&gv.sockets.link).map_err(|e| {
                VmError::Gvproxy(format!(
                    "cannot connect to gvproxy's stream socket {}: {e}",
                    gv.sockets.link.display()
                ))
            })?;
            Some(OwnedFd::from(s))
        }
    };
    Ok((gv, link))
}

/// `why` and the last lines of gvproxy's log, with a hint for the one failure we can predict.
fn with_log_tail(why: &str, log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(10)..].join("\n");
    let hint = if text.contains("ssh-port") {
        " (this gvproxy predates `-ssh-port -1`; upgrade it, e.g. `brew upgrade podman`)"
    } else {
        ""
    };
    format!("{why}{hint}; {}:\n{tail}", log.display())
}

impl Gvproxy {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// How gvproxy ended, once it has; reaps it.
    pub fn ended(&mut self) -> Option<crate::child::Ended> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()).map(crate::child::Ended::of)
    }

    pub fn sockets(&self) -> &Sockets {
        &self.sockets
    }

    /// Closes one forward on the running gvproxy (the others and the guest link stay up).
    pub fn unexpose(&self, p: PortMap) -> Result<(), VmError> {
        unexpose(&self.sockets.api, p)
    }
}

impl Drop for Gvproxy {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        if matches!(child.try_wait(), Ok(None)) {
            // Our unreaped child, so the pid is still ours.
            let _ = crate::child::signal(child.id(), nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + STOP_GRACE;
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
        }
        let _ = child.wait();
        // gvproxy removes its pid file on a clean exit, never its sockets (it removes the
        // link by its URL, not its path), and nothing after SIGKILL.
        let _ = std::fs::remove_dir_all(&self.sockets.dir);
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::{UnixDatagram, UnixListener};

    use super::*;

    const GATEWAY: PortMap = PortMap { host: 30051, guest: 30051 };

    #[test]
    fn expose_body_binds_loopback_and_targets_the_guest() {
        assert_eq!(
            expose_body(GATEWAY),
            r#"{"local":"127.0.0.1:30051","remote":"192.168.127.2:30051","protocol":"tcp"}"#
        );
        assert_eq!(
            expose_body(PortMap { host: 18080, guest: 80 }),
            r#"{"local":"127.0.0.1:18080","remote":"192.168.127.2:80","protocol":"tcp"}"#
        );
        assert_eq!(
            unexpose_body(PortMap { host: 18080, guest: 80 }),
            r#"{"local":"127.0.0.1:18080","protocol":"tcp"}"#
        );
    }

    #[test]
    fn renders_the_exact_request_bytes() {
        let body = expose_body(GATEWAY);
        let want = format!(
            "POST /services/forwarder/expose HTTP/1.1\r\nHost: gvproxy\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        assert_eq!(String::from_utf8(render_post(EXPOSE_PATH, &body)).unwrap(), want);
        assert_eq!(body.len(), 75);
    }

    #[test]
    fn parses_responses() {
        let ok = b"HTTP/1.1 200 OK\r\nDate: x\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(parse_response(ok, false).unwrap(), Some(Response { status: 200, body: String::new() }));
        let err = b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 25\r\n\r\nproxy already running\n...";
        let r = parse_response(err, false).unwrap().unwrap();
        assert_eq!((r.status, r.body.as_str()), (500, "proxy already running\n..."));
        // more to come, or cut short
        assert_eq!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Len", false).unwrap(), None);
        assert_eq!(parse_response(b"HTTP/1.1 500 x\r\nContent-Length: 9\r\n\r\nabc", false).unwrap(), None);
        assert!(parse_response(b"HTTP/1.1 500 x\r\nContent-Length: 9\r\n\r\nabc", true)
            .unwrap_err()
            .contains("3 of 9"));
        assert!(parse_response(b"HTTP/1.1 200", true).is_err());
        // no length: the body runs to EOF
        let r = parse_response(b"HTTP/1.0 400 Bad Request\r\n\r\npost only\n", true).unwrap().unwrap();
        assert_eq!((r.status, r.body.as_str()), (400, "post only\n"));
        assert!(parse_response(b"SSH-2.0-x\r\n\r\n", true).unwrap_err().contains("status line"));
    }

    #[test]
    fn argv_per_protocol() {
        let s = Sockets::in_dir(Path::new("/st"));
        assert_eq!((s.api.to_str(), s.link.to_str()), (Some("/st/gvproxy/api.sock"), Some("/st/gvproxy/link.sock")));
        let at = if cfg!(target_os = "linux") { "/proc/self/cwd" } else { "/st/gvproxy" };
        assert_eq!(
            argv(&s, Protocol::Vfkit),
            [
                "-listen".to_owned(),
                format!("unix://{at}/api.sock"),
                "-listen-vfkit".to_owned(),
                format!("unixgram://{at}/link.sock"),
                "-ssh-port".to_owned(),
                "-1".to_owned(),
                "-pid-file".to_owned(),
                format!("{at}/gvproxy.pid"),
            ]
        );
        let q = argv(&s, Protocol::Qemu);
        assert_eq!(&q[2..4], ["-listen-qemu".to_owned(), format!("unix://{at}/link.sock")]);
        assert_eq!(vfkit_socket(Path::new("/st")), s.link);
        // QEMU always takes the stream; libkrun the vfkit link only where gvproxy builds it.
        assert_eq!(protocol(Attach::Qemu), Protocol::Qemu);
        assert_eq!(protocol(Attach::Krun), if cfg!(target_os = "macos") { Protocol::Vfkit } else { Protocol::Qemu });
    }

    #[test]
    fn socket_urls_are_percent_encoded() {
        assert_eq!(socket_url("unix", Path::new("/a b/#1%/x.sock")), "unix:///a%20b/%231%25/x.sock");
    }

    /// Serves one request on `listener` with `response`; returns the raw request.
    fn serve_once(listener: UnixListener, response: &'static str) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut raw = Vec::new();
            let mut buf = [0u8; 1024];
            // A request is complete once its Content-Length bytes follow the head.
            loop {
                let n = s.read(&mut buf).unwrap();
                raw.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&raw).into_owned();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len =
                        head.lines().find_map(|l| l.strip_prefix("Content-Length: ")).map_or(0, |v| v.parse().unwrap());
                    if body.len() >= len || n == 0 {
                        break;
                    }
                }
            }
            s.write_all(response.as_bytes()).unwrap();
            raw
        })
    }

    #[test]
    fn expose_round_trip_over_a_unix_socket() {
        let dir = tempfile::tempdir().unwrap();
        let api = dir.path().join("api.sock");
        let server = serve_once(UnixListener::bind(&api).unwrap(), "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        expose(&api, GATEWAY).unwrap();
        assert_eq!(server.join().unwrap(), render_post(EXPOSE_PATH, &expose_body(GATEWAY)));
    }

    #[test]
    fn refused_forward_names_the_port_and_gvproxys_message() {
        let dir = tempfile::tempdir().unwrap();
        let api = dir.path().join("api.sock");
        let msg = "listen tcp 127.0.0.1:30051: bind: address already in use\n";
        let resp: &'static str = Box::leak(
            format!("HTTP/1.1 500 Internal Server Error\r\nContent-Length: {}\r\n\r\n{msg}", msg.len())
                .into_boxed_str(),
        );
        let server = serve_once(UnixListener::bind(&api).unwrap(), resp);
        let err = expose(&api, GATEWAY).unwrap_err().to_string();
        server.join().unwrap();
        assert!(err.contains("127.0.0.1:30051") && err.contains("HTTP 500"), "{err}");
        assert!(err.contains("bind: address already in use") && err.contains("-p HOST:GUEST"), "{err}");

        let server = serve_once(
            UnixListener::bind(dir.path().join("api2.sock")).unwrap(),
            "HTTP/1.1 500 x\r\nContent-Length: 16\r\n\r\nproxy not found\n",
        );
        let err = unexpose(&dir.path().join("api2.sock"), GATEWAY).unwrap_err().to_string();
        let req = server.join().unwrap();
        assert_eq!(req, render_post(UNEXPOSE_PATH, &unexpose_body(GATEWAY)));
        assert!(err.contains("close") && err.contains("proxy not found"), "{err}");
    }

    #[test]
    fn a_socket_past_sun_path_is_reached_through_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("d".repeat(60)).join("e".repeat(60));
        std::fs::create_dir_all(&deep).unwrap();
        // Bound the same way (through the directory), since bind has the same limit.
        let held = File::open(&deep).unwrap();
        let short = Path::new(&format!("/proc/self/fd/{}", held.as_raw_fd())).join("api.sock");
        let api = deep.join("api.sock");
        assert!(api.as_os_str().len() > 107);
        let server = serve_once(UnixListener::bind(&short).unwrap(), "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        expose(&api, GATEWAY).unwrap();
        assert_eq!(server.join().unwrap(), render_post(EXPOSE_PATH, &expose_body(GATEWAY)));
    }

    #[test]
    fn api_without_gvproxy_is_an_error_naming_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let err = expose(&dir.path().join("api.sock"), GATEWAY).unwrap_err().to_string();
        assert!(err.contains("api.sock") && err.contains("30051"), "{err}");
    }

    #[test]
    fn waits_for_sockets_to_appear() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
        let (a2, b2) = (a.clone(), b.clone());
        let binder = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            let l = UnixListener::bind(a2).unwrap();
            let d = UnixDatagram::bind(b2).unwrap();
            (l, d)
        });
        wait_for_paths(&[&a, &b], Duration::from_secs(5), || Ok(())).unwrap();
        // It returned because both exist, not because its time ran out.
        assert!(a.exists() && b.exists());
        drop(binder.join().unwrap());

        let err = wait_for_paths(&[&dir.path().join("never.sock")], Duration::from_millis(50), || Ok(())).unwrap_err();
        assert!(err.contains("never.sock") && err.contains("50 ms"), "{err}");
        let err = wait_for_paths(&[&dir.path().join("never.sock")], Duration::from_secs(5), || Err("gone".into()))
            .unwrap_err();
        assert_eq!(err, "gone");
    }

    /// A stand-in for the gvproxy binary: records its uid and argv and sleeps; the test binds the
    /// sockets and answers the API the way gvproxy does. This tests our process owner and client,
    /// not gvproxy. `argv.txt` appears last and whole (renamed into place): the test waits for it,
    /// and a loaded CI run once read `uid.txt` between the shell creating it and `id` writing it.
    fn fake_gvproxy(dir: &Path) -> PathBuf {
        let path = dir.join("fake-gvproxy");
        std::fs::write(
            &path,
            "#!/bin/sh\nid -u > uid.txt\nprintf '%s\\n' \"$@\" > argv.tmp\nmv argv.tmp argv.txt\nexec sleep 30\n",
        )
        .unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn start_waits_exposes_connects_and_drop_stops_the_process() {
        let dir = tempfile::tempdir().unwrap();
        let bin = fake_gvproxy(dir.path());
        let sockets = Sockets::in_dir(dir.path());
        let (argv_file, s2) = (sockets.dir.join("argv.txt"), sockets.clone());
        let server = std::thread::spawn(move || {
            while !argv_file.exists() {
                std::thread::sleep(Duration::from_millis(5));
            }
            let link = UnixListener::bind(&s2.link).unwrap();
            let req = serve_once(UnixListener::bind(&s2.api).unwrap(), "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                .join()
                .unwrap();
            (req, link.accept().unwrap().0)
        });
        let log = File::create(dir.path().join("gvproxy.log")).unwrap();
        let (gv, link) = start(&bin, &[GATEWAY], Attach::Qemu, dir.path(), log).unwrap();
        let (req, mut accepted) = server.join().unwrap();
        assert_eq!(req, render_post(EXPOSE_PATH, &expose_body(GATEWAY)));
        // The returned fd is the connection gvproxy's stream link accepted.
        let mut ours = UnixStream::from(link.expect("the stream link is handed to the VMM"));
        ours.write_all(b"\0\0\0\x01x").unwrap();
        let mut got = [0u8; 5];
        accepted.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"\0\0\0\x01x");
        let recorded = std::fs::read_to_string(sockets.dir.join("argv.txt")).unwrap();
        assert_eq!(recorded.lines().collect::<Vec<_>>(), argv(&sockets, Protocol::Qemu));
        // Least privilege: as root it runs as nobody, in a directory of its own.
        let uid = std::fs::read_to_string(sockets.dir.join("uid.txt")).unwrap();
        let meta = std::fs::metadata(&sockets.dir).unwrap();
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
        match unprivileged() {
            Some((u, _)) => assert_eq!((uid.trim(), meta.uid()), (u.to_string().as_str(), u.as_raw())),
            None => assert_eq!(uid.trim(), nix::unistd::geteuid().to_string()),
        }
        let pid = gv.pid().unwrap();
        drop(gv);
        // Signal 0 only checks that the (reaped) pid no longer exists.
        assert!(crate::child::signal(pid, None).is_err(), "gvproxy still running after drop");
        assert!(!sockets.dir.exists());
    }

    #[test]
    fn gvproxy_that_exits_at_once_is_reported_with_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("old-gvproxy");
        std::fs::write(
            &bin,
            "#!/bin/sh\necho 'level=error msg=\"ssh-port value must be between 1024 and 65535\"' >&2\nexit 1\n",
        )
        .unwrap();
        std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let log = File::create(dir.path().join("gvproxy.log")).unwrap();
        let err = start(&bin, &[GATEWAY], Attach::Qemu, dir.path(), log).unwrap_err().to_string();
        assert!(err.contains("exited") && err.contains("before its sockets appeared"), "{err}");
        assert!(err.contains("ssh-port value must be") && err.contains("upgrade"), "{err}");
    }

    /// macOS only: on Linux gvproxy reaches its sockets through `/proc/self/cwd`.
    #[cfg(target_os = "macos")]
    #[test]
    fn too_long_socket_path_is_refused_before_starting() {
        let long = PathBuf::from("/").join("d".repeat(120));
        let log = tempfile::tempfile().unwrap();
        let err = start(Path::new("/bin/false"), &[], Attach::Krun, &long, log).unwrap_err().to_string();
        assert!(err.contains("shorter --state-dir"), "{err}");
    }
}
