//! The pure rules of the sandbox API's input: which names and labels are valid, what a label
//! selector matches, and how a list is cut into pages behind opaque tokens. No records, no I/O.

use std::collections::BTreeMap;

use tonic::Status;

/// Longest sandbox name, label key or label value: a DNS label, as OpenShell's names become
/// Kubernetes object names and container hostnames.
pub const MAX_NAME: usize = 63;
/// Page size when the request says 0, and the most one page holds.
pub const DEFAULT_PAGE_SIZE: usize = 100;
pub const MAX_PAGE_SIZE: usize = 1000;

/// A sandbox name: a DNS-1123 label (lowercase letters, digits and `-`, starting and ending
/// with a letter or digit, at most 63 characters).
pub fn check_name(name: &str) -> Result<(), Status> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "sandbox name {name:?} is not valid: use 1-{MAX_NAME} lowercase letters, digits and '-', \
             starting and ending with a letter or digit (or leave it empty for a generated one)"
        )))
    }
}

/// Labels a selector can name: a key of letters, digits, `-`, `_`, `.` and `/`, a value of the
/// same without `/`, each at most 63 characters (so `,`, `=` and `!` never need escaping).
pub fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), Status> {
    for (k, v) in labels {
        let key_ok = !k.is_empty() && k.len() <= MAX_NAME && k.bytes().all(|b| label_byte(b) || b == b'/');
        let value_ok = v.len() <= MAX_NAME && v.bytes().all(label_byte);
        if !key_ok || !value_ok {
            return Err(Status::invalid_argument(format!(
                "label {k:?}={v:?} is not valid: keys and values are at most {MAX_NAME} letters, digits, \
                 '-', '_' or '.' (keys may hold '/'), and a key is not empty"
            )));
        }
    }
    Ok(())
}

fn label_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')
}

/// One requirement of an equality-based label selector (Kubernetes' syntax).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    Absent(String),
}

/// A parsed label selector: `k=v`, `k==v`, `k!=v`, `k` (has the key), `!k` (lacks it), joined by
/// commas, all of which must hold. "" selects everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector(Vec<Requirement>);

impl Selector {
    pub fn parse(text: &str) -> Result<Selector, Status> {
        let bad = |part: &str, why: &str| {
            Status::invalid_argument(format!(
                "label selector {text:?}: {part:?} {why}; write k=v, k!=v, k or !k, joined by commas"
            ))
        };
        let mut reqs = Vec::new();
        for part in text.split(',').map(str::trim) {
            if part.is_empty() {
                if text.trim().is_empty() {
                    continue;
                }
                return Err(bad(part, "is empty"));
            }
            let (req, key, value) = if let Some((k, v)) = part.split_once("!=") {
                (Requirement::NotEquals(k.trim().into(), v.trim().into()), k.trim(), v.trim())
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                (Requirement::Equals(k.trim().into(), v.trim().into()), k.trim(), v.trim())
            } else if let Some(k) = part.strip_prefix('!') {
                (Requirement::Absent(k.trim().into()), k.trim(), "")
            } else if part.contains(' ') || part.contains('(') {
                return Err(bad(part, "is a set-based requirement (in, notin), which this gateway does not serve"));
            } else {
                (Requirement::Exists(part.into()), part, "")
            };
            if key.is_empty() || !key.bytes().all(|b| label_byte(b) || b == b'/') || !value.bytes().all(label_byte) {
                return Err(bad(part, "does not name a valid label key and value"));
            }
            reqs.push(req);
        }
        Ok(Selector(reqs))
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::Absent(k) => !labels.contains_key(k),
        })
    }
}

/// The page size a request asks for, checked.
pub fn page_size(requested: i32) -> Result<usize, Status> {
    match requested {
        0 => Ok(DEFAULT_PAGE_SIZE),
        n if n < 0 => Err(Status::invalid_argument(format!("page_size {n} is negative; use 0 for the default"))),
        n => Ok((n as usize).min(MAX_PAGE_SIZE)),
    }
}

const TOKEN_PREFIX: &str = "after:";

/// A page of `sorted` (ascending, unique keys) after the position `token` names, and the token of
/// the next page ("" when this is the last). A token is the hex of the last key served, so it
/// stays valid when entries before or after it come and go.
pub fn page<'a, T>(sorted: &'a [(String, T)], token: &str, size: usize) -> Result<(Vec<&'a T>, String), Status> {
    let start = if token.is_empty() {
        0
    } else {
        let after = decode_token(token).ok_or_else(|| {
            Status::invalid_argument(format!(
                "page_token {token:?} was not made by this gateway; pass the next_page_token of the previous page"
            ))
        })?;
        sorted.partition_point(|(k, _)| k.as_str() <= after.as_str())
    };
    let items: Vec<&T> = sorted[start..].iter().take(size).map(|(_, v)| v).collect();
    let next = if start + items.len() < sorted.len() {
        encode_token(&sorted[start + items.len() - 1].0)
    } else {
        String::new()
    };
    Ok((items, next))
}

fn encode_token(key: &str) -> String {
    let hex: String = key.bytes().map(|b| format!("{b:02x}")).collect();
    format!("{TOKEN_PREFIX}{hex}")
}

fn decode_token(token: &str) -> Option<String> {
    let hex = token.strip_prefix(TOKEN_PREFIX)?;
    if hex.len() % 2 != 0 {
        return None;
    }
    let bytes: Option<Vec<u8>> =
        (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok()).collect();
    String::from_utf8(bytes?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn names_are_dns_labels() {
        for good in ["a", "sb-1", "0x", &"a".repeat(63)] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"a".repeat(64), "ä"] {
            assert_eq!(check_name(bad).unwrap_err().code(), tonic::Code::InvalidArgument, "{bad}");
        }
    }

    #[test]
    fn labels_a_selector_cannot_name_are_refused() {
        assert!(check_labels(&labels(&[("team", "runtime"), ("app.io/x", "")])).is_ok());
        for (k, v) in [("", "x"), ("a=b", "x"), ("a", "x,y"), ("a", "x/y"), ("a", &"v".repeat(64))] {
            assert_eq!(check_labels(&labels(&[(k, v)])).unwrap_err().code(), tonic::Code::InvalidArgument);
        }
    }

    #[test]
    fn a_selector_requires_every_part() {
        let l = labels(&[("team", "runtime"), ("tier", "gold")]);
        let yes =
            ["", "team=runtime", "team==runtime", " team = runtime , tier=gold", "team", "!owner", "tier!=silver"];
        for s in yes {
            assert!(Selector::parse(s).unwrap().matches(&l), "{s:?} should match");
        }
        let no = ["team=other", "team=runtime,tier=silver", "owner", "!team", "tier!=gold"];
        for s in no {
            assert!(!Selector::parse(s).unwrap().matches(&l), "{s:?} should not match");
        }
        for s in ["team in (a,b)", "=x", "a=b,", ",", "!", "a=b=c"] {
            assert_eq!(Selector::parse(s).unwrap_err().code(), tonic::Code::InvalidArgument, "{s:?}");
        }
    }

    #[test]
    fn pages_cover_the_list_once_in_order() {
        let list: Vec<(String, usize)> = (0..7).map(|i| (format!("sb-{i}"), i)).collect();
        let mut seen = Vec::new();
        let mut token = String::new();
        let mut pages = 0;
        loop {
            let (items, next) = page(&list, &token, 3).unwrap();
            pages += 1;
            seen.extend(items.into_iter().copied());
            if next.is_empty() {
                break;
            }
            token = next;
        }
        assert_eq!(seen, (0..7).collect::<Vec<_>>());
        assert_eq!(pages, 3);
        // Exactly one full page: no token promising an empty one.
        assert_eq!(page(&list[..3], "", 3).unwrap().1, "");
    }

    #[test]
    fn a_token_survives_its_entry_going_away() {
        let list: Vec<(String, u8)> = ["a", "b", "c", "d"].iter().map(|k| (k.to_string(), k.as_bytes()[0])).collect();
        let (_, token) = page(&list, "", 2).unwrap();
        let without_b: Vec<_> = list.iter().filter(|(k, _)| k != "b").cloned().collect();
        let (items, next) = page(&without_b, &token, 2).unwrap();
        assert_eq!(items, vec![&b'c', &b'd']);
        assert_eq!(next, "");
    }

    #[test]
    fn foreign_tokens_and_sizes_are_refused() {
        let list: Vec<(String, u8)> = vec![("a".into(), 1)];
        for t in ["x", "after:zz", "after:6", "1"] {
            assert_eq!(page(&list, t, 1).unwrap_err().code(), tonic::Code::InvalidArgument, "{t}");
        }
        assert_eq!(page_size(-1).unwrap_err().code(), tonic::Code::InvalidArgument);
        assert_eq!(page_size(0).unwrap(), DEFAULT_PAGE_SIZE);
        assert_eq!(page_size(5000).unwrap(), MAX_PAGE_SIZE);
    }
}
