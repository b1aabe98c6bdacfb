//! Legacy iptables (x_tables): asks the kernel for a table's description with
//! `getsockopt(IPT_SO_GET_INFO)`, as `iptables-legacy -t nat -L` does first. The kernel creates the
//! table in the namespace on that request, so an answer means the table really exists there.
// `unsafe` is allowed in this module only: the checker probes the kernel with raw syscalls, which is what it exists to test; each block carries its `SAFETY:`.
#![allow(unsafe_code)]

/// `IPT_BASE_CTL` + 0 in `linux/netfilter_ipv4/ip_tables.h`.
const IPT_SO_GET_INFO: libc::c_int = 64;

/// `struct ipt_getinfo`.
#[repr(C)]
struct IptGetinfo {
    name: [libc::c_char; 32],
    valid_hooks: libc::c_uint,
    hook_entry: [libc::c_uint; 5],
    underflow: [libc::c_uint; 5],
    num_entries: libc::c_uint,
    size: libc::c_uint,
}

/// Netfilter hooks by number, for the reason text.
const HOOKS: [&str; 5] = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];

/// The chains (hooks) of `table` in the current network namespace, e.g. `["INPUT", "FORWARD",
/// "OUTPUT"]` for `filter`, or the errno the kernel answered.
pub fn table_chains(table: &str) -> Result<Vec<&'static str>, std::io::Error> {
    // SAFETY: a plain socket(2) call; the descriptor is closed below on every path.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut info =
        IptGetinfo { name: [0; 32], valid_hooks: 0, hook_entry: [0; 5], underflow: [0; 5], num_entries: 0, size: 0 };
    for (dst, src) in info.name.iter_mut().zip(table.bytes().take(31)) {
        *dst = src as libc::c_char;
    }
    let mut len = std::mem::size_of::<IptGetinfo>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into the struct we own.
    let rc = unsafe {
        libc::getsockopt(fd, libc::IPPROTO_IP, IPT_SO_GET_INFO, (&mut info as *mut IptGetinfo).cast(), &mut len)
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: closing the descriptor opened above.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return Err(err);
    }
    Ok(hook_names(info.valid_hooks))
}

pub fn hook_names(valid_hooks: u32) -> Vec<&'static str> {
    HOOKS.iter().enumerate().filter(|(i, _)| valid_hooks & (1 << i) != 0).map(|(_, h)| *h).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hook_bits_name_the_chains() {
        // The kernel's valid_hooks for the filter and nat tables.
        assert_eq!(hook_names(0x0e), ["INPUT", "FORWARD", "OUTPUT"]);
        assert_eq!(hook_names(0x1b), ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"]);
    }

    #[test]
    fn getinfo_matches_the_kernel_struct_size() {
        assert_eq!(std::mem::size_of::<IptGetinfo>(), 84);
    }
}
