//! QEMU microvm: the backend where libkrun cannot run (no hardware KVM, or nested PVM KVM).
//!
//! `acpi=off` matters: with ACPI on, QEMU does not announce virtio-mmio devices on the kernel
//! command line and our ACPI-less kernel would see none. `reboot=t` plus `-no-reboot` makes the
//! guest's restart request end QEMU at once (microvm without ACPI cannot power off).
//!
//! `rtc=on` matters too: without a CMOS RTC the kernel's wall-clock read at boot polls the absent
//! chip's update-in-progress bit for up to a second ("Unable to read current time from RTC"),
//! and under TCG that stall hit about half the boots. With KVM, kvmclock answers instead.

use std::path::Path;
use std::process::Command;

use openshell_guest::{SHARE_TAG, SHARE_TRANSPORT_PARAM};

use crate::VmConfig;

pub fn kernel_cmdline(cfg: &VmConfig) -> String {
    let tsc = cfg.guest_tsc_khz.map(|khz| format!(" tsc_early_khz={khz}")).unwrap_or_default();
    format!("{}{tsc} {}", base_cmdline(), super::init_params(cfg))
}

fn base_cmdline() -> String {
    format!(
        "console=ttyS0 root=rootfs rootfstype=9p rootflags=trans=virtio,version=9p2000.L,msize=262144 ro \
         init=/sbin/openshell-init panic=-1 reboot=t quiet {SHARE_TRANSPORT_PARAM}=9p"
    )
}

pub fn command(qemu: &Path, cfg: &VmConfig, kvm: bool) -> Command {
    let mut c = Command::new(qemu);
    let (accel, cpu) = if kvm { ("kvm", "host") } else { ("tcg", "max") };
    let console = cfg.console_path();
    c.args(["-M", "microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=off"])
        .args(["-accel", accel, "-cpu", cpu])
        .args(["-m", &cfg.mem_mib.to_string(), "-smp", &cfg.vcpus.to_string()])
        .args(["-no-reboot", "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none"])
        .arg("-chardev")
        .arg(format!("file,id=con,path={}", console.display()))
        .args(["-serial", "chardev:con"])
        .arg("-kernel")
        .arg(&cfg.kernel)
        .arg("-append")
        .arg(kernel_cmdline(cfg))
        .arg("-fsdev")
        .arg(format!("local,id=root,path={},security_model=none,readonly=on", cfg.rootfs.display()))
        .args(["-device", "virtio-9p-device,fsdev=root,mount_tag=rootfs"])
        .arg("-fsdev")
        .arg(format!("local,id=share,path={},security_model=none", cfg.share_dir().display()))
        .args(["-device", &format!("virtio-9p-device,fsdev=share,mount_tag={SHARE_TAG}")])
        .args(["-device", "virtio-rng-device"]);
    for (i, share) in cfg.shares.iter().enumerate() {
        let ro = if share.mount.read_only { ",readonly=on" } else { "" };
        c.arg("-fsdev").arg(format!("local,id=x{i},path={},security_model=none{ro}", share.host.display()));
        c.args(["-device", &format!("virtio-9p-device,fsdev=x{i},mount_tag={}", share.mount.tag)]);
    }
    if cfg.net != crate::NetMode::None {
        // A stream socket inherited as fd 3 (see `net::inherit_as_child_fd`): passt's socketpair
        // end, or our connection to gvproxy's `-listen-qemu` socket (same framing: a 4-byte length
        // per frame). gvproxy leases its guest address by MAC; give the guest that one.
        c.args(["-netdev", &format!("stream,id=n0,server=off,addr.type=fd,addr.str={}", crate::net::CHILD_FD)]);
        match cfg.net {
            crate::NetMode::Gvproxy { .. } => {
                let m = crate::net::gvproxy::GUEST_MAC;
                let mac = format!("{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5]);
                c.args(["-device", &format!("virtio-net-device,netdev=n0,mac={mac}")]);
            }
            _ => {
                c.args(["-device", "virtio-net-device,netdev=n0"]);
            }
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_carries_size_shares_and_acpi_off() {
        let cfg = VmConfig::exec("/k/vmlinux".into(), "/r".into(), "/s".into(), vec!["/bin/true".into()]);
        let mut cfg = cfg;
        cfg.vcpus = 2;
        cfg.mem_mib = 256;
        let args: Vec<String> = command(Path::new("qemu"), &cfg, false)
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(joined.contains("acpi=off"));
        assert!(joined.contains("rtc=on"));
        assert!(joined.contains("-m 256 -smp 2"));
        assert!(joined.contains("-accel tcg"));
        assert!(joined.contains("path=/r,security_model=none,readonly=on"));
        assert!(joined.contains("path=/s/share,security_model=none"));
        assert!(joined.contains("path=/s/console.log"));
        assert!(!joined.contains("-netdev"), "no NIC without a network");
    }

    #[test]
    fn extra_shares_and_the_tsc_rate_reach_qemu_and_the_command_line() {
        let mut cfg = VmConfig::exec("/k".into(), "/r".into(), "/s".into(), vec!["/bin/true".into()]);
        let mount = |tag: &str, ro| openshell_guest::GuestMount { tag: tag.into(), path: format!("/run/{tag}"), read_only: ro };
        cfg.shares = vec![
            crate::config::DirShare { host: "/h/bin".into(), mount: mount("bin", true) },
            crate::config::DirShare { host: "/h/work".into(), mount: mount("work", false) },
        ];
        cfg.guest_tsc_khz = Some(2_596_148);
        let joined = command(Path::new("qemu"), &cfg, false).get_args().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ");
        assert!(joined.contains("-fsdev local,id=x0,path=/h/bin,security_model=none,readonly=on -device virtio-9p-device,fsdev=x0,mount_tag=bin"), "{joined}");
        assert!(joined.contains("-fsdev local,id=x1,path=/h/work,security_model=none -device virtio-9p-device,fsdev=x1,mount_tag=work"), "{joined}");
        assert!(joined.contains(" tsc_early_khz=2596148 "), "{joined}");
        assert!(joined.contains("openshell.mounts=bin:/run/bin:ro,work:/run/work"), "{joined}");
        cfg.guest_tsc_khz = None;
        assert!(!kernel_cmdline(&cfg).contains("tsc_early_khz"));
    }

    #[test]
    fn gvproxy_nic_is_a_stream_on_fd_3_with_gvproxys_guest_mac() {
        let mut cfg = VmConfig::exec("/k".into(), "/r".into(), "/s".into(), vec!["/bin/true".into()]);
        cfg.net = crate::NetMode::Gvproxy { binary: "/gv".into() };
        let args: Vec<String> = command(Path::new("qemu"), &cfg, false).get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        let joined = args.join(" ");
        assert!(joined.contains("-netdev stream,id=n0,server=off,addr.type=fd,addr.str=3"), "{joined}");
        assert!(joined.contains("virtio-net-device,netdev=n0,mac=5a:94:ef:e4:0c:ee"), "{joined}");
        assert!(joined.contains("openshell.net=192.168.127.2/24,192.168.127.1"), "{joined}");
        cfg.net = crate::NetMode::Passt;
        let joined = command(Path::new("qemu"), &cfg, false).get_args().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ");
        assert!(joined.ends_with("-device virtio-net-device,netdev=n0"), "{joined}");
        assert!(joined.contains("openshell.net=192.0.2.2/24,192.0.2.1"), "{joined}");
    }
}
