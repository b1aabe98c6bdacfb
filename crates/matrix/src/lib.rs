//! A capability or verification matrix: rows of PASS / WARN / FAIL, each with a one-line reason
//! and, when it is not PASS, the fix. Shared by `cargo xtask check` (host), the guest capability
//! program and `cargo xtask verify`, so all three print the same table, emit the same JSON and
//! follow the same exit-code rule.
//!
//! This crate decides nothing about any particular capability; it only holds and renders rows.
//! It has no dependencies beyond serde so the statically linked guest program can use it.

use serde::{Deserialize, Serialize};

/// Exit code when every required row passed.
pub const EXIT_OK: i32 = 0;
/// Exit code when at least one required row failed.
pub const EXIT_REQUIRED_FAILED: i32 = 1;
/// Exit code when the checker itself could not run (the caller decides when that is).
pub const EXIT_CHECKER_FAILED: i32 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    Pass,
    Warn,
    Fail,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Pass => "PASS",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        })
    }
}

/// One capability: its stable id (for `--json` and tests), whether a FAIL blocks, what was
/// found, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    /// Stable, kebab-case: `kvm-device`, `passt`, `netns`, `forward-loopback-only`.
    pub id: String,
    pub status: Status,
    /// A FAIL on a required row makes the matrix fail (exit 1); on an optional row it is shown
    /// but does not change the exit code.
    pub required: bool,
    /// One line: what was found.
    pub reason: String,
    /// One line: what to do next. Empty for PASS.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub fix: String,
}

impl Row {
    pub fn pass(id: &str, reason: impl Into<String>) -> Row {
        Row { id: id.into(), status: Status::Pass, required: true, reason: reason.into(), fix: String::new() }
    }

    pub fn warn(id: &str, reason: impl Into<String>, fix: impl Into<String>) -> Row {
        Row { id: id.into(), status: Status::Warn, required: true, reason: reason.into(), fix: fix.into() }
    }

    pub fn fail(id: &str, reason: impl Into<String>, fix: impl Into<String>) -> Row {
        Row { id: id.into(), status: Status::Fail, required: true, reason: reason.into(), fix: fix.into() }
    }

    /// Marks the row optional: its FAIL is reported but does not fail the matrix.
    pub fn optional(mut self) -> Row {
        self.required = false;
        self
    }

    pub fn blocks(&self) -> bool {
        self.required && self.status == Status::Fail
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Matrix {
    /// What was checked: `host`, `guest`, `verify gateway default`.
    pub subject: String,
    pub rows: Vec<Row>,
}

impl Matrix {
    pub fn new(subject: impl Into<String>) -> Matrix {
        Matrix { subject: subject.into(), rows: Vec::new() }
    }

    pub fn push(&mut self, row: Row) {
        self.rows.push(row);
    }

    pub fn row(&self, id: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.id == id)
    }

    /// The required rows that failed; empty means the matrix passes.
    pub fn blocking(&self) -> Vec<&Row> {
        self.rows.iter().filter(|r| r.blocks()).collect()
    }

    pub fn exit_code(&self) -> i32 {
        if self.blocking().is_empty() {
            EXIT_OK
        } else {
            EXIT_REQUIRED_FAILED
        }
    }

    /// The JSON document `--json` prints: `{subject, ok, exit_code, rows:[…]}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "subject": self.subject,
            "ok": self.exit_code() == EXIT_OK,
            "exit_code": self.exit_code(),
            "rows": self.rows,
        })
    }

    /// A human table: one line per row, its fix indented beneath when there is one, and a
    /// closing summary line that names the blocking rows.
    pub fn render(&self) -> String {
        let width = self.rows.iter().map(|r| r.id.len()).max().unwrap_or(0);
        let mut out = String::new();
        for r in &self.rows {
            let opt = if r.required { "" } else { " (optional)" };
            out.push_str(&format!("{:<4}  {:<width$}  {}{}\n", r.status, r.id, r.reason, opt));
            if !r.fix.is_empty() && r.status != Status::Pass {
                out.push_str(&format!("{:<4}  {:<width$}  fix: {}\n", "", "", r.fix));
            }
        }
        let count = |s: Status| self.rows.iter().filter(|r| r.status == s).count();
        let blocking: Vec<&str> = self.blocking().iter().map(|r| r.id.as_str()).collect();
        let optional_fails = self.rows.iter().filter(|r| r.status == Status::Fail && !r.required).count();
        let fails = match optional_fails {
            0 => format!("{} fail", count(Status::Fail)),
            n => format!("{} fail ({n} optional)", count(Status::Fail)),
        };
        out.push_str(&format!(
            "{}: {} pass, {} warn, {fails}{}\n",
            self.subject,
            count(Status::Pass),
            count(Status::Warn),
            if blocking.is_empty() { String::new() } else { format!("; required failing: {}", blocking.join(", ")) }
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn required_fail_blocks_optional_fail_does_not() {
        let mut m = Matrix::new("host");
        m.push(Row::pass("a", "ok"));
        m.push(Row::fail("b", "missing", "install b").optional());
        m.push(Row::warn("c", "slow", "use hardware KVM"));
        assert_eq!(m.exit_code(), EXIT_OK);
        m.push(Row::fail("d", "missing", "install d"));
        assert_eq!(m.exit_code(), EXIT_REQUIRED_FAILED);
        assert_eq!(m.blocking().iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["d"]);
    }

    #[test]
    fn table_names_blocking_rows_and_fixes() {
        let mut m = Matrix::new("guest");
        m.push(Row::fail("netns", "unshare(CLONE_NEWNET): EINVAL", "enable CONFIG_NET_NS"));
        m.push(Row::fail("landlock", "ENOSYS", "enable CONFIG_SECURITY_LANDLOCK").optional());
        let t = m.render();
        assert!(t.contains("FAIL  netns     unshare"), "{t}");
        assert!(t.contains("0 pass, 0 warn, 2 fail (1 optional)"), "{t}");
        assert!(t.contains("fix: enable CONFIG_NET_NS"), "{t}");
        assert!(t.contains("required failing: netns"), "{t}");
    }

    #[test]
    fn json_round_trips_with_uppercase_status() {
        let mut m = Matrix::new("verify");
        m.push(Row::pass("tcp", "127.0.0.1:30051 reachable"));
        let v = m.to_json();
        assert_eq!(v["rows"][0]["status"], "PASS");
        assert_eq!(v["ok"], true);
        let back: Vec<Row> = serde_json::from_value(v["rows"].clone()).unwrap();
        assert_eq!(back, m.rows);
    }
}
