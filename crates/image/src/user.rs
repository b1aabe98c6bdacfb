//! An image's `User` (`name`, `uid`, `name:group`, `uid:gid`, …) as the numbers a process runs
//! with, read from the image's own `/etc/passwd` and `/etc/group` the way runc reads them: a name
//! must be there; a bare uid without an entry runs with gid 0; the user's supplementary groups are
//! the `/etc/group` lines that list its name.

use std::fs;
use std::path::Path;

use crate::error::{io, ImageError};

/// Who an image's workload runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageUser {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    /// The user's home in `/etc/passwd`, if it has an entry: its `HOME` unless the image sets one.
    pub home: Option<String>,
}

/// `(name, id, primary gid, home)` of each `/etc/passwd` line, or `(name, id, members, "")` of
/// `/etc/group`.
fn table(root: &Path, file: &str) -> Result<Vec<(String, u32, String, String)>, ImageError> {
    let path = root.join(file);
    let meta = match fs::symlink_metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(&path)(e)),
    };
    if !meta.is_file() {
        // A symlink would be read on the host, where an absolute target is not the image's file.
        return Err(ImageError::Unsupported(format!(
            "/{file} in the image is not a plain file; give the user as numbers (--user is not read from it)"
        )));
    }
    let text = fs::read_to_string(&path).map_err(io(&path))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            let id = f.get(2)?.parse().ok()?;
            // passwd: name:x:uid:gid:…   group: name:x:gid:member,member
            let field = |i: usize| f.get(i).copied().unwrap_or("").to_owned();
            Some((f[0].to_owned(), id, field(3), field(5)))
        })
        .collect())
}

/// Resolves `spec` (the image's `User`) against the image root at `root`.
pub fn resolve_user(root: &Path, spec: &str) -> Result<ImageUser, ImageError> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let passwd = table(root, "etc/passwd")?;
    let groups = table(root, "etc/group")?;
    let entry = match user.parse::<u32>() {
        Ok(uid) => passwd.iter().find(|(_, id, _, _)| *id == uid),
        Err(_) => Some(passwd.iter().find(|(name, _, _, _)| name == user).ok_or_else(|| {
            ImageError::Unsupported(format!(
                "the image's User {spec:?} names user {user:?}, which its /etc/passwd does not have; \
                 pass --user UID[:GID] to run as numbers, or fix the image's User"
            ))
        })?),
    };
    let uid = match entry {
        Some((_, id, _, _)) => *id,
        None => user.parse().expect("a number when no entry was required"),
    };
    let gid = match group {
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => groups.iter().find(|(name, _, _, _)| name == g).map(|(_, id, _, _)| *id).ok_or_else(|| {
                ImageError::Unsupported(format!(
                    "the image's User {spec:?} names group {g:?}, which its /etc/group does not have; \
                     pass --user UID:GID, or fix the image's User"
                ))
            })?,
        },
        None => entry.and_then(|(_, _, gid, _)| gid.parse().ok()).unwrap_or(0),
    };
    let mut supplementary: Vec<u32> = match entry {
        Some((name, _, _, _)) => groups
            .iter()
            .filter(|(_, _, members, _)| members.split(',').any(|m| m == name))
            .map(|(_, id, _, _)| *id)
            .collect(),
        None => Vec::new(),
    };
    if !supplementary.contains(&gid) {
        supplementary.insert(0, gid);
    }
    let home = entry.map(|(_, _, _, home)| home.clone()).filter(|h| h.starts_with('/'));
    Ok(ImageUser { uid, gid, groups: supplementary, home })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir_all(t.path().join("etc")).unwrap();
        fs::write(t.path().join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n")
            .unwrap();
        fs::write(t.path().join("etc/group"), "root:x:0:\napp:x:1001:\nwheel:x:10:root,app\nstaff:x:50:\n").unwrap();
        t
    }

    #[test]
    fn names_and_numbers_resolve_as_runc_does() {
        let t = root();
        let r = |s: &str| resolve_user(t.path(), s);
        let home = Some("/home/app".to_owned());
        assert_eq!(r("app").unwrap(), ImageUser { uid: 1000, gid: 1001, groups: vec![1001, 10], home: home.clone() });
        assert_eq!(r("app:staff").unwrap(), ImageUser { uid: 1000, gid: 50, groups: vec![50, 10], home: home.clone() });
        assert_eq!(r("1000:7").unwrap(), ImageUser { uid: 1000, gid: 7, groups: vec![7, 10], home });
        // A uid the image does not list runs with gid 0, no other groups and no home.
        assert_eq!(r("4242").unwrap(), ImageUser { uid: 4242, gid: 0, groups: vec![0], home: None });
        let e = r("nobody-here").unwrap_err().to_string();
        assert!(e.contains("\"nobody-here\"") && e.contains("/etc/passwd") && e.contains("--user"), "{e}");
        let e = r("app:nogroup").unwrap_err().to_string();
        assert!(e.contains("\"nogroup\"") && e.contains("/etc/group"), "{e}");
    }
}
