//! QEMU microvm: the backend where libkrun cannot run (no hardware KVM, or nested PVM KVM).
//!
//! `acpi=off` matters: with ACPI on, QEMU does not announce virtio-mmio devices on the kernel
//! command line and our ACPI-less kernel would see none. `reboot=t` plus `-no-reboot` makes the
//! guest's restart request end QEMU at once (microvm without ACPI cannot power off).
//!
//! The guest's arch ([`VmConfig::arch`]) picks everything arch-specific here, and only here: the
//! binary, the machine, the CPU and the console ([`Machine::of`]). aarch64 boots on `-M virt`, whose
//! PL011 UART is `ttyAMA0` and whose virtio-mmio transports carry the same `virtio-*-device`s as
//! microvm's (they are announced in the device tree, so the kernel needs no command-line devices).
//!
//! `rtc=on` matters too: without a CMOS RTC the kernel's wall-clock read at boot polls the absent
//! chip's update-in-progress bit for up to a second ("Unable to read current time from RTC"),
//! and under TCG that stall hit about half the boots. With KVM, kvmclock answers instead.

use std::path::{Path, PathBuf};
use std::process::Command;

use openshell_guest::{DATA_DISK_ID, ROOT_DISK_ID, SHARE_TAG, SHARE_TRANSPORT_PARAM};

use crate::child::CHILD_FD;
use crate::net::Link;
use crate::sandbox::{fd_path, HandedFds, QEMU_SECCOMP};
use crate::VmConfig;
use openshell_artifacts::Arch;

/// What QEMU emulates for a guest of one arch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Machine {
    /// The QEMU binary, looked up on PATH.
    pub binary: &'static str,
    /// `-M`.
    pub machine: &'static str,
    /// The serial console's device name in the guest (`console=`).
    pub console: &'static str,
    /// The Debian package that provides `binary`.
    pub package: &'static str,
}

impl Machine {
    pub fn of(arch: Arch) -> Machine {
        match arch {
            Arch::X86_64 => Machine {
                binary: "qemu-system-x86_64",
                machine: "microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=off",
                console: "ttyS0",
                package: "qemu-system-x86",
            },
            Arch::Aarch64 => Machine {
                binary: "qemu-system-aarch64",
                machine: "virt",
                console: "ttyAMA0",
                package: "qemu-system-arm",
            },
        }
    }
}

pub fn kernel_cmdline(cfg: &VmConfig, kvm: bool) -> String {
    let tsc = cfg.guest_tsc_khz.map(|khz| format!(" tsc_early_khz={khz}")).unwrap_or_default();
    let tcg = if kvm { "" } else { tcg_params(cfg.arch) };
    format!("{}{tcg}{tsc} {}", base_cmdline(cfg), super::init_params(cfg))
}

/// What an x86_64 kernel under TCG is better off without, measured with `init=/bin/false` boots
/// (QEMU start to exit, wall) on the development host:
/// - `nolapic_timer`: calibrating the local APIC timer waits for 100 ms of PIT ticks, which took
///   ~250 ms under TCG (the gap between "Mountpoint-cache" and "smpboot: CPU0" in the boot log);
///   microvm's PIT serves as the clock event device instead (broadcast to every vCPU). With KVM
///   the TSC-deadline timer needs no calibration, so this is for TCG only.
/// - `no_timer_check`: skips the IO-APIC timer check, a 40 ms `mdelay` ("..TIMER:" in the log).
fn tcg_params(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => " nolapic_timer no_timer_check",
        // The architected timer needs no calibration.
        Arch::Aarch64 => "",
    }
}

fn base_cmdline(cfg: &VmConfig) -> String {
    let arch = cfg.arch;
    // cache=loose on the root: it is read-only and content-addressed (verified before boot, never
    // changed while a VM uses it), so the guest may keep what it read instead of asking the host
    // again on every lookup and page; the gateway's start (exec to listening) fell from ~150 to
    // ~80 ms with it. The share keeps 9p's default (no cache): the host writes into it while the
    // guest runs (`stop-request`).
    // reboot=t: x86's triple fault, so the guest's restart request ends QEMU at once; arm64 resets
    // through PSCI, which -no-reboot turns into QEMU's exit by itself.
    let reboot = if arch == Arch::X86_64 { " reboot=t" } else { "" };
    let init = cfg.root.init();
    let root = match cfg.root {
        crate::Root::Share => {
            format!(
                "root={} rootfstype=9p rootflags=trans=virtio,version=9p2000.L,msize=262144,cache=loose",
                super::ROOT_TAG
            )
        }
        crate::Root::Disk { .. } => super::disk_root_params(),
    };
    format!(
        "console={} {root} ro init={init} panic=-1{reboot} quiet {SHARE_TRANSPORT_PARAM}=9p",
        Machine::of(arch).console,
    )
}

/// QEMU for `cfg`, its files named by the fds it inherits (`files`, see [`crate::sandbox`]) and
/// its syscalls filtered: the kernel loader and the 9p exports open `/proc/self/fd/N`, the console
/// chardev takes its fd through an fdset.
pub fn command(qemu: &Path, cfg: &VmConfig, kvm: bool, link: &Link, files: &HandedFds) -> Command {
    let mut c = Command::new(qemu);
    let (accel, cpu) = if kvm { ("kvm", "host") } else { ("tcg", "max") };
    c.args(["-M", Machine::of(cfg.arch).machine])
        .args(["-accel", accel, "-cpu", cpu])
        .args(["-m", &cfg.mem_mib.to_string(), "-smp", &cfg.vcpus.to_string()])
        .args(["-no-reboot", "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none"])
        .args(["-sandbox", QEMU_SECCOMP])
        .arg("-add-fd")
        .arg(format!("fd={0},set={0}", files.console))
        .arg("-chardev")
        // append=on: without it QEMU truncates what it opens, and a pipe cannot be truncated.
        .arg(format!("file,id=con,path=/dev/fdset/{},append=on", files.console))
        .args(["-serial", "chardev:con"])
        .arg("-kernel")
        .arg(fd_path(files.kernel))
        .arg("-append")
        .arg(kernel_cmdline(cfg, kvm));
    match files.disks {
        // The 9p root export, and nothing else, is what `booted_artifacts` reads back.
        None => {
            c.arg("-fsdev")
                .arg(format!("local,id=root,path={},security_model=none,readonly=on", fd_path(files.rootfs)))
                .args(["-device", &format!("virtio-9p-device,fsdev=root,mount_tag={}", super::ROOT_TAG)]);
        }
        // QEMU runs as nobody and opens neither disk by path. The root image as the kernel is
        // given: by its fd path, which QEMU keeps open, so `booted_artifacts` reads it back (the
        // file is world-readable, as the kernel is). The data disk (0600, written) through an
        // fdset, as the console, which hands a drive the fd whose access mode matches its open;
        // QEMU closes what `-add-fd` names once it has its own copy. The root is the first
        // virtio-blk device (`/dev/vda`, what the kernel mounts); the guest also checks serials.
        Some(d) => {
            c.arg("-drive").arg(format!("file={},format=raw,if=none,id=rootdisk,readonly=on", fd_path(d.root)));
            c.args(["-device", &format!("virtio-blk-device,drive=rootdisk,serial={ROOT_DISK_ID}")]);
            for fd in [d.data, d.data_read] {
                c.arg("-add-fd").arg(format!("fd={fd},set={}", d.data));
            }
            c.arg("-drive").arg(format!("file=/dev/fdset/{},format=raw,if=none,id=datadisk", d.data));
            c.args(["-device", &format!("virtio-blk-device,drive=datadisk,serial={DATA_DISK_ID}")]);
        }
    }
    c.arg("-fsdev")
        .arg(format!("local,id=share,path={},security_model=none", fd_path(files.share)))
        .args(["-device", &format!("virtio-9p-device,fsdev=share,mount_tag={SHARE_TAG}")])
        .args(["-device", "virtio-rng-device"]);
    for (i, (share, fd)) in cfg.shares.iter().zip(&files.shares).enumerate() {
        let ro = if share.mount.read_only { ",readonly=on" } else { "" };
        c.arg("-fsdev").arg(format!("local,id=x{i},path={},security_model=none{ro}", fd_path(*fd)));
        c.args(["-device", &format!("virtio-9p-device,fsdev=x{i},mount_tag={}", share.mount.tag)]);
    }
    match link {
        Link::None => {}
        // A stream socket inherited at CHILD_FD (see `child::inherit_as_child_fd`). gvproxy leases
        // its guest address by MAC; give the guest that one.
        Link::Stream { mac } => {
            c.args(["-netdev", &format!("stream,id=n0,server=off,addr.type=fd,addr.str={CHILD_FD}")]);
            let device = match mac {
                Some(m) => format!(
                    "virtio-net-device,netdev=n0,mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                    m[0], m[1], m[2], m[3], m[4], m[5]
                ),
                None => "virtio-net-device,netdev=n0".to_owned(),
            };
            c.args(["-device", &device]);
        }
        Link::Unixgram { .. } => unreachable!("QEMU attaches to a stream socket (net::Link::of with Attach::Qemu)"),
    }
    c
}

/// The kernel and root directory a running QEMU was started with, from its argv (as
/// `/proc/<pid>/cmdline` gives it): `-kernel PATH`, and the `path=` of the `-fsdev` that the
/// 9p device tagged [`super::ROOT_TAG`] serves. Follows QEMU's own option syntax (`-opt` or
/// `--opt`; `,,` is a literal comma in a value), so it reads any QEMU command line, not only ours.
pub fn booted_artifacts(argv: &[String]) -> Result<super::BootedArtifacts, String> {
    let values = |opt: &str| -> Vec<&str> {
        argv.windows(2)
            .filter(|w| w[0].strip_prefix('-').map(|o| o.strip_prefix('-').unwrap_or(o)) == Some(opt))
            .map(|w| w[1].as_str())
            .collect()
    };
    let kernel = match values("kernel")[..] {
        [k] => PathBuf::from(k),
        [] => return Err("no -kernel on its command line".into()),
        _ => return Err("more than one -kernel on its command line".into()),
    };
    // A disk root: the virtio-blk device with the root image's serial and its drive's file.
    let root_drive = values("device")
        .into_iter()
        .map(qemu_opts)
        .find(|o| opt(o, "serial") == Some(ROOT_DISK_ID))
        .map(|o| opt(&o, "drive").map(str::to_owned));
    if let Some(drive) = root_drive {
        let drive = drive.ok_or_else(|| format!("its serial={ROOT_DISK_ID} device names no drive"))?;
        let file = values("drive")
            .into_iter()
            .map(qemu_opts)
            .find(|o| opt(o, "id") == Some(&drive))
            .and_then(|o| opt(&o, "file").map(str::to_owned))
            .ok_or_else(|| format!("no -drive with id={drive} and a file= on its command line"))?;
        if file.starts_with("/dev/fdset/") {
            return Err(format!("its root disk is {file}, an fd QEMU no longer holds under that number"));
        }
        return Ok(super::BootedArtifacts { kernel, rootfs: PathBuf::from(file) });
    }
    let root_fsdev = values("device")
        .into_iter()
        .map(qemu_opts)
        .find(|o| {
            o.first().is_some_and(|(k, v)| k.is_none() && v.starts_with("virtio-9p"))
                && opt(o, "mount_tag") == Some(super::ROOT_TAG)
        })
        .and_then(|o| opt(&o, "fsdev").map(str::to_owned))
        .ok_or_else(|| format!("no virtio-9p device with mount_tag={} on its command line", super::ROOT_TAG))?;
    let rootfs = values("fsdev")
        .into_iter()
        .map(qemu_opts)
        .find(|o| opt(o, "id") == Some(&root_fsdev))
        .and_then(|o| opt(&o, "path").map(PathBuf::from))
        .ok_or_else(|| format!("no -fsdev with id={root_fsdev} and a path= on its command line"))?;
    Ok(super::BootedArtifacts { kernel, rootfs })
}

/// QEMU's `a,key=value,key2=va,,lue` option syntax: `(None, "a")` for a bare value, `,,` unescaped.
fn qemu_opts(s: &str) -> Vec<(Option<String>, String)> {
    let mut parts = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ',' if chars.peek() == Some(&',') => {
                chars.next();
                parts.last_mut().expect("never empty").push(',');
            }
            ',' => parts.push(String::new()),
            c => parts.last_mut().expect("never empty").push(c),
        }
    }
    parts
        .into_iter()
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (Some(k.to_owned()), v.to_owned()),
            None => (None, p),
        })
        .collect()
}

fn opt<'a>(opts: &'a [(Option<String>, String)], key: &str) -> Option<&'a str> {
    opts.iter().find(|(k, _)| k.as_deref() == Some(key)).map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::FD_DIR;

    /// Fd numbers as a [`crate::sandbox::Handover`] would hand them over: 10, 11, … in order.
    fn files(cfg: &VmConfig) -> HandedFds {
        HandedFds {
            kernel: 10,
            rootfs: 11,
            share: 12,
            console: 13,
            shares: (14..).take(cfg.shares.len()).collect(),
            disks: None,
        }
    }

    /// `command`'s arguments for `cfg` under TCG, with its own network link and the fds above.
    fn argv(qemu: &str, cfg: &VmConfig) -> Vec<String> {
        let link = Link::of(cfg.net, crate::net::Attach::Qemu, &cfg.state_dir);
        command(Path::new(qemu), cfg, false, &link, &files(cfg))
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn command_carries_size_shares_and_acpi_off() {
        let cfg = VmConfig::exec("/k/vmlinux".into(), "/r".into(), "/s".into(), vec!["/bin/true".into()]);
        let mut cfg = cfg;
        cfg.vcpus = 2;
        cfg.mem_mib = 256;
        let args = argv("qemu", &cfg);
        let joined = args.join(" ");
        assert!(joined.contains("acpi=off"));
        assert!(joined.contains("rtc=on"));
        assert!(joined.contains("-m 256 -smp 2"));
        assert!(joined.contains("-accel tcg"));
        // Every file by the fd it inherits, none by path: started as nobody, QEMU reaches no path.
        assert!(joined.contains(&format!("-kernel {FD_DIR}/10 ")), "{joined}");
        assert!(joined.contains(&format!("path={FD_DIR}/11,security_model=none,readonly=on")), "{joined}");
        assert!(joined.contains(&format!("path={FD_DIR}/12,security_model=none ")), "{joined}");
        assert!(joined.contains("-add-fd fd=13,set=13 -chardev file,id=con,path=/dev/fdset/13,append=on"), "{joined}");
        assert!(!joined.contains("/k/vmlinux") && !joined.contains("/s/"), "{joined}");
        assert!(
            joined.contains("-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"),
            "{joined}"
        );
        assert!(!joined.contains("-netdev"), "no NIC without a network");
    }

    #[test]
    fn an_image_root_boots_our_init_at_its_own_path() {
        let mut cfg = VmConfig::exec("/k".into(), "/r".into(), "/s".into(), vec!["/bin/true".into()]);
        assert!(kernel_cmdline(&cfg, true).contains(" init=/sbin/openshell-init "));
        cfg.root = crate::Root::Disk {
            image: "/store/rootdisk/x/root.ext4".into(),
            data_mib: 64,
            init: openshell_guest::IMAGE_INIT_BIN.into(),
        };
        let line = kernel_cmdline(&cfg, true);
        assert!(line.contains(" init=/.openshell/sbin/openshell-init ") && !line.contains("init=/sbin/"), "{line}");
        assert!(crate::backend::krun::kernel_cmdline(&cfg).contains(" init=/.openshell/sbin/openshell-init "));
        // A request written before the field existed is our own rootfs' disk.
        let old: crate::Root = serde_json::from_str(r#"{"disk":{"image":"/i","data_mib":64}}"#).unwrap();
        assert_eq!(old.init(), openshell_guest::INIT_BIN);
    }

    #[test]
    fn a_disk_root_attaches_the_image_read_only_then_the_data_disk_through_fdsets() {
        let mut cfg = VmConfig::exec("/k".into(), "/r".into(), "/s".into(), vec!["/bin/true".into()]);
        cfg.root = crate::Root::disk("/store/rootdisk/x/root.ext4".into(), 64);
        let mut fds = files(&cfg);
        fds.disks = Some(crate::sandbox::DiskFds { root: 20, data: 21, data_read: 22 });
        let joined = command(Path::new("qemu"), &cfg, false, &Link::None, &fds)
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        let root = format!(
            "-drive file={FD_DIR}/20,format=raw,if=none,id=rootdisk,readonly=on \
             -device virtio-blk-device,drive=rootdisk,serial=openshell-root"
        );
        let data =
            "-add-fd fd=21,set=21 -add-fd fd=22,set=21 -drive file=/dev/fdset/21,format=raw,if=none,id=datadisk \
                    -device virtio-blk-device,drive=datadisk,serial=openshell-data";
        assert!(joined.contains(&format!("{root} {data}")), "{joined}");
        assert!(
            joined.contains(" root=/dev/vda rootfstype=ext4 ro ") && joined.contains(" openshell.root=disk"),
            "{joined}"
        );
        // No 9p root beside it, and no host path of either disk.
        assert!(!joined.contains("mount_tag=rootfs") && !joined.contains("/store/"), "{joined}");
        assert!(joined.contains("mount_tag=openshell"), "the share stays: {joined}");
        let mut argv = vec!["qemu-system-x86_64".to_owned()];
        argv.extend(joined.split(' ').map(str::to_owned));
        // The root image, as the fd its fdset holds (`backend::booted_artifacts` resolves it).
        assert_eq!(booted_artifacts(&argv).unwrap().rootfs, Path::new(&fd_path(20)));
        cfg.root = crate::Root::Share;
        let share = kernel_cmdline(&cfg, false);
        assert!(share.contains("root=rootfs rootfstype=9p") && !share.contains("openshell.root"), "{share}");
    }

    #[test]
    fn extra_shares_and_the_tsc_rate_reach_qemu_and_the_command_line() {
        let mut cfg = VmConfig::exec("/k".into(), "/r".into(), "/s".into(), vec!["/bin/true".into()]);
        let mount =
            |tag: &str, ro| openshell_guest::GuestMount { tag: tag.into(), path: format!("/run/{tag}"), read_only: ro };
        cfg.shares = vec![
            crate::config::DirShare { host: "/h/bin".into(), mount: mount("bin", true) },
            crate::config::DirShare { host: "/h/work".into(), mount: mount("work", false) },
        ];
        cfg.guest_tsc_khz = Some(2_596_148);
        let joined = argv("qemu", &cfg).join(" ");
        assert!(joined.contains(&format!("-fsdev local,id=x0,path={FD_DIR}/14,security_model=none,readonly=on -device virtio-9p-device,fsdev=x0,mount_tag=bin")), "{joined}");
        assert!(
            joined.contains(&format!("-fsdev local,id=x1,path={FD_DIR}/15,security_model=none -device virtio-9p-device,fsdev=x1,mount_tag=work")),
            "{joined}"
        );
        assert!(joined.contains(" tsc_early_khz=2596148 "), "{joined}");
        assert!(joined.contains("openshell.mounts=bin:/run/bin:ro,work:/run/work"), "{joined}");
        cfg.guest_tsc_khz = None;
        assert!(!kernel_cmdline(&cfg, false).contains("tsc_early_khz"));
    }

    #[test]
    fn the_arch_picks_machine_console_and_the_timer_params() {
        let mut cfg = VmConfig::exec("/k".into(), "/r".into(), "/s".into(), vec!["/bin/true".into()]);
        cfg.arch = Arch::Aarch64;
        let joined = command(Path::new("qemu-system-aarch64"), &cfg, false, &Link::None, &files(&cfg))
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        assert!(joined.starts_with("-M virt -accel tcg -cpu max"), "{joined}");
        assert!(joined.contains("console=ttyAMA0 ") && !joined.contains("reboot=t"), "{joined}");
        assert!(!joined.contains("nolapic_timer"), "{joined}");
        cfg.arch = Arch::X86_64;
        let tcg = kernel_cmdline(&cfg, false);
        assert!(tcg.starts_with("console=ttyS0 ") && tcg.contains(" nolapic_timer no_timer_check "), "{tcg}");
        assert!(!kernel_cmdline(&cfg, true).contains("nolapic_timer"), "KVM keeps its APIC timer");
    }

    #[test]
    fn gvproxy_nic_is_a_stream_on_fd_3_with_gvproxys_guest_mac() {
        let mut cfg = VmConfig::exec("/k".into(), "/r".into(), "/s".into(), vec!["/bin/true".into()]);
        cfg.net = crate::Net::Gvproxy;
        let args = argv("qemu", &cfg);
        let joined = args.join(" ");
        assert!(joined.contains("-netdev stream,id=n0,server=off,addr.type=fd,addr.str=3"), "{joined}");
        assert!(joined.contains("virtio-net-device,netdev=n0,mac=5a:94:ef:e4:0c:ee"), "{joined}");
        assert!(joined.contains("openshell.net=192.168.127.2/24,192.168.127.1"), "{joined}");
        cfg.net = crate::Net::Passt;
        let joined = argv("qemu", &cfg).join(" ");
        assert!(joined.ends_with("-device virtio-net-device,netdev=n0"), "{joined}");
        assert!(joined.contains("openshell.net=192.0.2.2/24,192.0.2.1"), "{joined}");
    }

    /// `/proc/<pid>/cmdline` of a gateway's QEMU, captured from `cargo xtask vm run --detach` on
    /// the development host (TCG, passt).
    const REAL_GATEWAY_ARGV: &[&str] = &[
        "/usr/bin/qemu-system-x86_64",
        "-M",
        "microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=off",
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-m",
        "512",
        "-smp",
        "1",
        "-no-reboot",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-monitor",
        "none",
        "-chardev",
        "file,id=con,path=/tmp/mtls-cfg/openshell/gateways/mtls/vm/console.log",
        "-serial",
        "chardev:con",
        "-kernel",
        "/root/.cache/openshell-vm/kernel/646f113c0432205b/vmlinux",
        "-append",
        "console=ttyS0 root=rootfs rootfstype=9p rootflags=trans=virtio,version=9p2000.L,msize=262144 ro \
         init=/sbin/openshell-init panic=-1 reboot=t quiet openshell.share=9p openshell.time=1795564043 \
         openshell.net=192.0.2.2/24,192.0.2.1 openshell.dns=192.0.2.1",
        "-fsdev",
        "local,id=root,path=/root/.cache/openshell-vm/rootfs/d30be489612c4283,security_model=none,readonly=on",
        "-device",
        "virtio-9p-device,fsdev=root,mount_tag=rootfs",
        "-fsdev",
        "local,id=share,path=/tmp/mtls-cfg/openshell/gateways/mtls/vm/share,security_model=none",
        "-device",
        "virtio-9p-device,fsdev=share,mount_tag=openshell",
        "-device",
        "virtio-rng-device",
        "-netdev",
        "stream,id=n0,server=off,addr.type=fd,addr.str=3",
        "-device",
        "virtio-net-device,netdev=n0",
    ];

    fn strings(argv: &[&str]) -> Vec<String> {
        argv.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    #[cfg_attr(
        not(target_os = "linux"),
        ignore = "a Linux QEMU's captured command line: its /proc/self/fd paths are /dev/fd on macOS"
    )]
    fn booted_artifacts_of_a_real_gateway_qemu() {
        let b = booted_artifacts(&strings(REAL_GATEWAY_ARGV)).unwrap();
        assert_eq!(b.kernel, Path::new("/root/.cache/openshell-vm/kernel/646f113c0432205b/vmlinux"));
        // The root device's fsdev, not the share's (both are `local` 9p exports).
        assert_eq!(b.rootfs, Path::new("/root/.cache/openshell-vm/rootfs/d30be489612c4283"));
    }

    #[test]
    fn booted_artifacts_read_back_what_command_writes() {
        let mut cfg = VmConfig::exec("/k/vm linux".into(), "/r/root fs".into(), "/s".into(), vec!["/bin/true".into()]);
        cfg.net = crate::Net::Passt;
        let mut argv = vec!["qemu-system-x86_64".to_owned()];
        argv.extend(self::argv("qemu-system-x86_64", &cfg));
        // The VMM's own names for them; `backend::booted_artifacts` resolves the fds.
        let b = booted_artifacts(&argv).unwrap();
        assert_eq!((b.kernel.as_path(), b.rootfs.as_path()), (Path::new(&fd_path(10)), Path::new(&fd_path(11))));
    }

    #[test]
    fn booted_artifacts_follow_qemu_option_syntax() {
        // `--opt` spelling, the root export declared after its device and with another id, and
        // a path with an escaped comma.
        let argv = strings(&[
            "qemu-system-x86_64",
            "--kernel",
            "/k,v/vmlinux",
            "--device",
            "virtio-9p-device,mount_tag=rootfs,fsdev=r2",
            "-fsdev",
            "local,id=share,path=/share",
            "-fsdev",
            "local,path=/roots/a,,b,id=r2,readonly=on",
        ]);
        let b = booted_artifacts(&argv).unwrap();
        assert_eq!((b.kernel.as_path(), b.rootfs.as_path()), (Path::new("/k,v/vmlinux"), Path::new("/roots/a,b")));
    }

    #[test]
    fn booted_artifacts_refuse_what_they_cannot_tell() {
        let without_kernel: Vec<String> =
            strings(REAL_GATEWAY_ARGV).into_iter().filter(|a| !a.contains("vmlinux") && a != "-kernel").collect();
        assert!(booted_artifacts(&without_kernel).unwrap_err().contains("no -kernel"));
        let twice = strings(&["qemu", "-kernel", "/a", "-kernel", "/b"]);
        assert!(booted_artifacts(&twice).unwrap_err().contains("more than one -kernel"));
        let no_root = strings(&[
            "qemu",
            "-kernel",
            "/a",
            "-fsdev",
            "local,id=share,path=/s",
            "-device",
            "virtio-9p-device,fsdev=share,mount_tag=openshell",
        ]);
        assert!(
            booted_artifacts(&no_root).unwrap_err().contains("mount_tag=rootfs"),
            "{:?}",
            booted_artifacts(&no_root)
        );
        let no_fsdev = strings(&["qemu", "-kernel", "/a", "-device", "virtio-9p-device,fsdev=root,mount_tag=rootfs"]);
        assert!(booted_artifacts(&no_fsdev).unwrap_err().contains("no -fsdev with id=root"));
    }
}
