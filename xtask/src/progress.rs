//! Progress display for long work: a spinner that shows the latest line of output.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// A spinner with a message; hidden when stderr is not a terminal (CI logs get plain lines).
pub fn spinner(msg: impl Into<String>) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {prefix} {wide_msg}")
            .expect("valid template"),
    );
    pb.set_prefix(msg.into());
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}
