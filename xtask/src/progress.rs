//! Progress display for long work: a spinner that shows the latest line of output.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// A spinner with a message; hidden when stderr is not a terminal (CI logs get plain lines).
pub fn spinner(msg: impl Into<String>) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {prefix} {wide_msg}").expect("valid template"),
    );
    pb.set_prefix(msg.into());
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

/// Progress of a long build that prints lines: a spinner showing the latest one on a terminal;
/// elsewhere (CI logs) every `every`-th line, prefixed with `label`, so the log shows it moving.
pub struct BuildLines {
    pb: ProgressBar,
    label: String,
    every: u64,
    seen: u64,
}

impl BuildLines {
    pub fn new(msg: impl Into<String>, label: impl Into<String>, every: u64) -> BuildLines {
        BuildLines { pb: spinner(msg), label: label.into(), every, seen: 0 }
    }

    pub fn line(&mut self, line: &str) {
        self.seen += 1;
        self.pb.set_message(line.to_owned());
        if self.pb.is_hidden() && self.seen.is_multiple_of(self.every) {
            eprintln!("{}: {line}", self.label);
        }
    }

    pub fn finish(self) {
        self.pb.finish_and_clear();
    }
}
