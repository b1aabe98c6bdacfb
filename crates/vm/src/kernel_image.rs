//! A cheap look at the guest kernel file before any VMM loads it: is it the boot image this arch
//! boots ([`Arch::kernel_image`]: an ELF `vmlinux` on x86_64, a flat `Image` on aarch64), and is
//! it whole? A non-ELF or truncated file handed to a VMM fails late and obscurely (QEMU loads what
//! it can and the guest hangs or faults with nothing on its console); this says which file and
//! what is wrong with it. It checks the format, not the provenance: that is the preflight's.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use openshell_artifacts::Arch;

use crate::VmError;

/// ELF64 header fields this check reads (offsets per the ELF specification).
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELF_HEADER_LEN: usize = 64;
/// `e_machine` of an x86_64 vmlinux (aarch64's, 183, only shows up as a foreign one).
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;

/// The arm64 `Image` header: 64 bytes, "ARM\x64" at offset 56 (Documentation/arch/arm64/booting.rst).
const ARM64_IMAGE_MAGIC: &[u8; 4] = b"ARM\x64";

/// What [`check`] says of the other arch's kernel.
const ARM64_GIVEN_TO_X86_64: &str = "this is an arm64 kernel (a flat `Image`); the x86_64 guest needs an x86_64 \
    ELF `vmlinux` (boot this one with `--arch aarch64`)";
const X86_64_GIVEN_TO_ARM64: &str = "this is an x86_64 kernel (an ELF `vmlinux`); the arm64 guest needs an arm64 \
    flat `Image` (`cargo xtask kernel --arch aarch64`)";

/// Checks that `path` is a boot image of `arch` and not cut short; the error names the file, what
/// was found and how to get a good one.
pub fn check(path: &Path, arch: Arch) -> Result<(), VmError> {
    let bad = |why: String| VmError::BadKernel { path: path.to_owned(), why };
    let io = |e: std::io::Error| VmError::Io { path: path.to_owned(), source: e };
    let size = std::fs::metadata(path).map_err(io)?.len();
    let mut head = Vec::with_capacity(ELF_HEADER_LEN);
    std::fs::File::open(path).map_err(io)?.take(ELF_HEADER_LEN as u64).read_to_end(&mut head).map_err(io)?;
    // The other arch's kernel, named as such: the likeliest mix-up (a store entry or `--arch` of
    // the other guest), which "not an ELF file" or "machine 62" would leave to the reader.
    let arm64_image = head.get(56..60).is_some_and(|m| m == ARM64_IMAGE_MAGIC);
    let x86_64_elf = head.starts_with(ELF_MAGIC) && head.get(18..20) == Some(&EM_X86_64.to_le_bytes()[..]);
    match arch {
        Arch::X86_64 if arm64_image => Err(bad(ARM64_GIVEN_TO_X86_64.into())),
        Arch::X86_64 => check_elf(path, &head, size, EM_X86_64).map_err(bad),
        Arch::Aarch64 => match head.get(56..60) {
            Some(m) if m == ARM64_IMAGE_MAGIC => Ok(()),
            _ if x86_64_elf => Err(bad(X86_64_GIVEN_TO_ARM64.into())),
            _ if head.starts_with(ELF_MAGIC) => {
                Err(bad("it is an ELF file, but an arm64 guest boots the flat `Image`, not `vmlinux`".into()))
            }
            _ => {
                Err(bad(format!("no arm64 Image header (\"ARM\\x64\" at offset 56) in its first {} bytes", head.len())))
            }
        },
    }
}

/// An ELF64 little-endian executable for `machine` whose program segments and section headers
/// all lie within its `size` bytes.
fn check_elf(path: &Path, head: &[u8], size: u64, machine: u16) -> Result<(), String> {
    if !head.starts_with(ELF_MAGIC) {
        return Err(format!("not an ELF file (it starts with {:02x?})", &head[..head.len().min(4)]));
    }
    if head.len() < ELF_HEADER_LEN || head[4] != 2 || head[5] != 1 {
        return Err("not a complete 64-bit little-endian ELF header".into());
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
    let found = u16_at(head, 18);
    if found != machine {
        return Err(format!("an ELF file for machine {found}, not {machine} (built for another arch?)"));
    }
    let (phoff, shoff) = (u64_at(head, 32), u64_at(head, 40));
    let (phentsize, phnum) = (u64::from(u16_at(head, 54)), u64::from(u16_at(head, 56)));
    let (shentsize, shnum) = (u64::from(u16_at(head, 58)), u64::from(u16_at(head, 60)));
    let cut = |what: &str, end: u64| format!("truncated: its {what} end at byte {end}, but the file has {size}");
    let ph_end = phoff.saturating_add(phentsize.saturating_mul(phnum));
    if phnum == 0 || ph_end > size {
        return Err(cut("program headers", ph_end));
    }
    let sh_end = shoff.saturating_add(shentsize.saturating_mul(shnum));
    if shoff != 0 && sh_end > size {
        return Err(cut("section headers", sh_end));
    }
    if phentsize < 56 {
        return Err(format!("program header entries of {phentsize} bytes; ELF64's are 56"));
    }
    let mut phdrs = vec![0u8; (phentsize * phnum) as usize];
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    f.seek(SeekFrom::Start(phoff)).and_then(|_| f.read_exact(&mut phdrs)).map_err(|e| e.to_string())?;
    for i in 0..phnum {
        let at = (i * phentsize) as usize;
        let ph = &phdrs[at..at + phentsize as usize];
        if u32_at(ph, 0) == PT_LOAD {
            let end = u64_at(ph, 8).saturating_add(u64_at(ph, 32));
            if end > size {
                return Err(cut(&format!("loadable segment {i}'s bytes"), end));
            }
        }
    }
    Ok(())
}

/// The smallest file [`check`] accepts as a kernel of `arch`, for tests that need a kernel file
/// but never boot it.
#[cfg(test)]
pub(crate) fn minimal_image(arch: Arch) -> Vec<u8> {
    match arch {
        Arch::X86_64 => tests::elf(EM_X86_64, 0x1000, 0x2000),
        Arch::Aarch64 => {
            let mut image = vec![0u8; 4096];
            image[56..60].copy_from_slice(ARM64_IMAGE_MAGIC);
            image
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EM_AARCH64: u16 = 183;

    /// A minimal ELF64 header with one PT_LOAD of `filesz` bytes at offset 0x1000.
    pub(super) fn elf(machine: u16, filesz: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        b[..4].copy_from_slice(ELF_MAGIC);
        (b[4], b[5]) = (2, 1);
        b[18..20].copy_from_slice(&machine.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&1u16.to_le_bytes());
        b[64..68].copy_from_slice(&PT_LOAD.to_le_bytes());
        b[72..80].copy_from_slice(&0x1000u64.to_le_bytes());
        b[96..104].copy_from_slice(&filesz.to_le_bytes());
        b
    }

    fn check_bytes(bytes: &[u8], arch: Arch) -> Result<(), String> {
        let t = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(t.path(), bytes).unwrap();
        check(t.path(), arch).map_err(|e| e.to_string())
    }

    #[test]
    fn a_whole_elf_passes_and_a_cut_or_foreign_one_is_named() {
        assert_eq!(check_bytes(&elf(EM_X86_64, 0x1000, 0x2000), Arch::X86_64), Ok(()));
        let err = check_bytes(&elf(EM_X86_64, 0x1000, 0x1800), Arch::X86_64).unwrap_err();
        assert!(err.contains("truncated") && err.contains("8192") && err.contains("6144"), "{err}");
        let err = check_bytes(&elf(EM_AARCH64, 0x1000, 0x2000), Arch::X86_64).unwrap_err();
        assert!(err.contains("machine 183"), "{err}");
        let err = check_bytes(b"#!/bin/sh\necho not a kernel\n", Arch::X86_64).unwrap_err();
        assert!(err.contains("not an ELF file") && err.contains("cargo xtask kernel"), "{err}");
        let err = check_bytes(b"\x7fELF", Arch::X86_64).unwrap_err();
        assert!(err.contains("complete 64-bit"), "{err}");
    }

    #[test]
    fn an_arm64_image_needs_its_header() {
        let image = minimal_image(Arch::Aarch64);
        assert_eq!(check_bytes(&image, Arch::Aarch64), Ok(()));
        let err = check_bytes(&elf(EM_AARCH64, 0x1000, 0x2000), Arch::Aarch64).unwrap_err();
        assert!(err.contains("flat `Image`"), "{err}");
        assert!(check_bytes(&image[..40], Arch::Aarch64).unwrap_err().contains("no arm64 Image header"));
    }

    #[test]
    fn the_other_archs_kernel_is_named_as_such() {
        let err = check_bytes(&minimal_image(Arch::Aarch64), Arch::X86_64).unwrap_err();
        assert!(err.contains("this is an arm64 kernel") && err.contains("the x86_64 guest needs"), "{err}");
        let err = check_bytes(&minimal_image(Arch::X86_64), Arch::Aarch64).unwrap_err();
        assert!(err.contains("this is an x86_64 kernel") && err.contains("the arm64 guest needs"), "{err}");
        // An arm64 ELF `vmlinux` is told to boot the `Image` instead, not taken for x86_64.
        let err = check_bytes(&elf(EM_AARCH64, 0x1000, 0x2000), Arch::Aarch64).unwrap_err();
        assert!(err.contains("flat `Image`") && !err.contains("x86_64 kernel"), "{err}");
    }
}
