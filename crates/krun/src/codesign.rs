//! The macOS code signature a VMM needs: Hypervisor.framework refuses a process whose signature
//! lacks `com.apple.security.hypervisor`, and libkrun then fails late, in `krun_start_enter`, with
//! `-22` (EINVAL). This module owns the entitlement list (one typed definition, rendered as the
//! plist `codesign` takes), the `codesign` command lines that sign and read back a binary, and the
//! reading of what `codesign -d` prints. It does not decide when to sign (`cargo xtask codesign`,
//! the cargo runner under `ci/` and `vm run` do) nor what the host probe makes of the answer.
//!
//! Signatures are ad hoc (`--sign -`): no identity is needed to run on the machine that signed.
//! The hardened runtime (`--options runtime`) is deliberately not used: it strips `DYLD_*` from
//! the environment, which is how the launcher points the VMM at Homebrew's libkrun.

use std::path::Path;
use std::process::Command;

/// The entitlement every binary that creates a VM must carry.
pub const HYPERVISOR: &str = "com.apple.security.hypervisor";

/// What a VM-creating binary is signed with: each key set to `true`.
pub const ENTITLEMENTS: &[&str] = &[HYPERVISOR];

/// What `codesign -d` prints when a binary carries no signature at all.
const UNSIGNED: &str = "code object is not signed at all";

/// Whether a binary may create VMs, as its signature says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entitled {
    /// Signed with every key of [`ENTITLEMENTS`] set to `true`.
    Yes,
    /// Signed, but without this key (or with it not `true`): libkrun fails with -22 at start.
    MissingKey(&'static str),
    /// No signature at all (an Intel build, or a binary stripped after linking).
    Unsigned,
}

/// The entitlements plist for `codesign --entitlements`, rendered from [`ENTITLEMENTS`]. The
/// checked-in `crates/krun/entitlements.plist` is this text (a unit test keeps them equal).
pub fn plist() -> String {
    let keys: String = ENTITLEMENTS.iter().map(|k| format!("\t<key>{k}</key>\n\t<true/>\n")).collect();
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <!DOCTYPE plist PUBLIC \"-//Apple//DTD PLIST 1.0//EN\" \"http://www.apple.com/DTDs/PropertyList-1.0.dtd\">\n\
         <plist version=\"1.0\">\n<dict>\n{keys}</dict>\n</plist>\n"
    )
}

/// `codesign --force --sign - --entitlements PLIST BIN`: replaces any signature (the linker's ad
/// hoc one included) with an ad hoc one carrying the entitlements.
pub fn sign_command(bin: &Path, plist: &Path) -> Command {
    let mut c = Command::new("codesign");
    c.args(["--force", "--sign", "-", "--entitlements"]).arg(plist).arg(bin);
    c
}

/// `codesign -d --entitlements - --xml BIN`: prints the signed entitlements as an XML plist on
/// stdout (nothing when the signature has none) and `Executable=…` or the refusal on stderr.
pub fn display_command(bin: &Path) -> Command {
    let mut c = Command::new("codesign");
    c.args(["-d", "--entitlements", "-", "--xml"]).arg(bin);
    c
}

/// Reads what [`display_command`] printed. `Err` when `codesign` failed for another reason than
/// a missing signature (no such file, not a Mach-O), with its message.
pub fn parse_display(success: bool, stdout: &[u8], stderr: &str) -> Result<Entitled, String> {
    if stderr.contains(UNSIGNED) {
        return Ok(Entitled::Unsigned);
    }
    if !success {
        return Err(format!("codesign -d failed: {}", stderr.trim()));
    }
    let xml = String::from_utf8_lossy(stdout);
    let dict = if xml.trim().is_empty() {
        // Signed without any entitlements (what the arm64 linker's ad hoc signature is).
        plist::Dictionary::new()
    } else {
        match plist::Value::from_reader_xml(xml.trim().as_bytes()) {
            Ok(plist::Value::Dictionary(d)) => d,
            Ok(other) => return Err(format!("codesign -d printed a plist that is not a dict: {other:?}")),
            Err(e) => return Err(format!("codesign -d printed no readable plist ({e}): {xml}")),
        }
    };
    Ok(match ENTITLEMENTS.iter().find(|k| dict.get(k).and_then(plist::Value::as_boolean) != Some(true)) {
        Some(missing) => Entitled::MissingKey(missing),
        None => Entitled::Yes,
    })
}

/// Whether `bin` may create VMs, read back from its signature with `codesign -d`. What the host
/// probe asks before it picks krun on macOS, and what `cargo xtask codesign` verifies after it
/// signed. `Err` when `codesign` cannot be run or cannot read the file.
pub fn entitlement(bin: &Path) -> Result<Entitled, String> {
    let out = display_command(bin)
        .output()
        .map_err(|e| format!("cannot run codesign (Xcode command line tools: `xcode-select --install`): {e}"))?;
    parse_display(out.status.success(), &out.stdout, &String::from_utf8_lossy(&out.stderr))
}

/// Signs `bin` with [`ENTITLEMENTS`] (the plist written next to it) and reads the signature back:
/// `Err` names the binary and the key it still lacks, or `codesign`'s own refusal.
pub fn sign(bin: &Path) -> Result<(), String> {
    let plist_path = bin.with_extension("entitlements.plist");
    std::fs::write(&plist_path, plist()).map_err(|e| format!("cannot write {}: {e}", plist_path.display()))?;
    let out = sign_command(bin, &plist_path)
        .output()
        .map_err(|e| format!("cannot run codesign (Xcode command line tools: `xcode-select --install`): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "codesign could not sign {}: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    match entitlement(bin)? {
        Entitled::Yes => Ok(()),
        Entitled::MissingKey(key) => Err(format!("{} was signed but its signature lacks {key}", bin.display())),
        Entitled::Unsigned => Err(format!("{} is still unsigned after codesign reported success", bin.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `codesign -d --entitlements - --xml target/debug/openshell-vmm` after `cargo xtask
    /// codesign` (macOS 14, Apple silicon): the plist on stdout on one line, the path on stderr.
    const SIGNED_STDOUT: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><!DOCTYPE plist PUBLIC \"-//Apple//DTD PLIST 1.0//EN\" \"http://www.apple.com/DTDs/PropertyList-1.0.dtd\"><plist version=\"1.0\"><dict><key>com.apple.security.hypervisor</key><true/></dict></plist>";
    const SIGNED_STDERR: &str = "Executable=/Users/runner/work/openshell-vm/openshell-vm/target/debug/openshell-vmm\n";
    /// The same binary straight from `cargo build`: the arm64 linker's ad hoc signature carries no
    /// entitlements, so stdout is empty and the exit status 0.
    const LINKER_SIGNED_STDERR: &str = SIGNED_STDERR;
    /// Re-signed with another entitlement only (e.g. a debugger's `get-task-allow`).
    const OTHER_KEY_STDOUT: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><!DOCTYPE plist PUBLIC \"-//Apple//DTD PLIST 1.0//EN\" \"http://www.apple.com/DTDs/PropertyList-1.0.dtd\"><plist version=\"1.0\"><dict><key>com.apple.security.get-task-allow</key><true/></dict></plist>";
    /// The key present but false.
    const FALSE_KEY_STDOUT: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><plist version=\"1.0\"><dict><key>com.apple.security.hypervisor</key><false/></dict></plist>";
    /// After `codesign --remove-signature` (or an x86_64 build): exit status 1.
    const UNSIGNED_STDERR: &str =
        "/Users/runner/work/openshell-vm/openshell-vm/target/debug/openshell-vmm: code object is not signed at all\n";
    /// A path that does not exist: exit status 1, and not a missing signature.
    const MISSING_FILE_STDERR: &str = "/nonexistent/openshell-vmm: No such file or directory\n";

    #[test]
    fn plist_is_well_formed_and_carries_every_entitlement() {
        let value = plist::Value::from_reader_xml(plist().as_bytes()).expect("the generated plist parses");
        let dict = value.as_dictionary().expect("a dict at the top");
        assert_eq!(dict.len(), ENTITLEMENTS.len());
        for key in ENTITLEMENTS {
            assert_eq!(dict.get(key).and_then(plist::Value::as_boolean), Some(true), "{key}");
        }
        // And it reads back as entitled, as codesign would print it.
        assert_eq!(parse_display(true, plist().as_bytes(), SIGNED_STDERR), Ok(Entitled::Yes));
    }

    /// The checked-in plist (what the cargo runner script signs with) is the generated one.
    #[test]
    fn checked_in_plist_matches_the_definition() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/entitlements.plist");
        let on_disk = std::fs::read_to_string(path).unwrap();
        assert_eq!(
            on_disk,
            plist(),
            "{path} differs from openshell_krun::codesign::plist(); regenerate it with `cargo xtask codesign --write-plist`"
        );
    }

    #[test]
    fn command_lines() {
        let bin = Path::new("target/debug/openshell-vmm");
        let argv = |c: Command| -> Vec<String> {
            std::iter::once(c.get_program()).chain(c.get_args()).map(|a| a.to_string_lossy().into_owned()).collect()
        };
        assert_eq!(
            argv(sign_command(bin, Path::new("e.plist"))),
            ["codesign", "--force", "--sign", "-", "--entitlements", "e.plist", "target/debug/openshell-vmm"]
        );
        assert_eq!(
            argv(display_command(bin)),
            ["codesign", "-d", "--entitlements", "-", "--xml", "target/debug/openshell-vmm"]
        );
    }

    #[test]
    fn reads_real_codesign_output() {
        assert_eq!(parse_display(true, SIGNED_STDOUT.as_bytes(), SIGNED_STDERR), Ok(Entitled::Yes));
        assert_eq!(parse_display(true, b"", LINKER_SIGNED_STDERR), Ok(Entitled::MissingKey(HYPERVISOR)));
        assert_eq!(
            parse_display(true, OTHER_KEY_STDOUT.as_bytes(), SIGNED_STDERR),
            Ok(Entitled::MissingKey(HYPERVISOR))
        );
        assert_eq!(
            parse_display(true, FALSE_KEY_STDOUT.as_bytes(), SIGNED_STDERR),
            Ok(Entitled::MissingKey(HYPERVISOR))
        );
        assert_eq!(parse_display(false, b"", UNSIGNED_STDERR), Ok(Entitled::Unsigned));
        let err = parse_display(false, b"", MISSING_FILE_STDERR).unwrap_err();
        assert!(err.contains("No such file"), "{err}");
        let err = parse_display(true, b"<plist><dict><key>", SIGNED_STDERR).unwrap_err();
        assert!(err.contains("no readable plist"), "{err}");
    }
}
