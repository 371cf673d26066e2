//! The real `livepush` binary as a child process, and the lines it writes.

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;

/// The `livepush` binary of this build, killed when its handle is dropped (a failing test
/// leaves no process behind).
pub fn livepush() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_livepush"));
    command.kill_on_drop(true);
    command
}

/// The lines of a child's stdout or stderr, each one awaited for at most 10 s.
pub struct Lines<R>(tokio::io::Lines<BufReader<R>>);

impl<R: AsyncRead + Unpin> Lines<R> {
    pub fn new(pipe: R) -> Lines<R> {
        Lines(BufReader::new(pipe).lines())
    }

    /// The next line; fails the test when none comes in time or the stream ends.
    pub async fn next(&mut self) -> String {
        tokio::time::timeout(Duration::from_secs(10), self.0.next_line())
            .await
            .expect("line in time")
            .expect("read")
            .expect("a line")
    }

    /// The next line, which must be one JSON object (the CLI's event output).
    pub async fn next_json(&mut self) -> Value {
        serde_json::from_str(&self.next().await).expect("one JSON object per line")
    }
}
