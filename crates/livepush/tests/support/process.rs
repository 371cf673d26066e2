//! The real `livepush` binary as a child process, and the lines it writes.

use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Child, Stdio};
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

/// A `livepush serve` process on 127.0.0.1:0 with the test key and secret, killed when
/// dropped.
pub struct ServerProcess {
    child: Child,
    pub api: super::Api,
}

impl ServerProcess {
    /// Starts `livepush serve` with `args` added, and waits for its `listening on` line.
    pub fn spawn(args: &[&str]) -> ServerProcess {
        ServerProcess::spawn_in(
            std::process::Command::new(env!("CARGO_BIN_EXE_livepush")),
            args,
        )
    }

    /// Starts `livepush serve` with `args` added under a limit of `files` open files
    /// (`ulimit -n`, through the shell).
    pub fn spawn_with_open_files(files: u32, args: &[&str]) -> ServerProcess {
        let mut shell = std::process::Command::new("sh");
        let script = format!("ulimit -n {files} && exec \"$0\" \"$@\"");
        shell.args(["-c", &script, env!("CARGO_BIN_EXE_livepush")]);
        ServerProcess::spawn_in(shell, args)
    }

    fn spawn_in(mut command: std::process::Command, args: &[&str]) -> ServerProcess {
        let mut child = command
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(["--api-key", super::KEY, "--token-secret", super::SECRET])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn livepush");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read listening line");
        let url = line
            .trim()
            .strip_prefix("livepush listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .to_owned();
        ServerProcess {
            child,
            api: super::Api::new(url),
        }
    }

    pub fn url(&self) -> &str {
        &self.api.url
    }

    /// Its address: HTTP on TCP, and the wake listener on the same port over UDP.
    pub fn addr(&self) -> SocketAddr {
        self.url()
            .trim_start_matches("http://")
            .parse()
            .expect("addr")
    }

    /// `kill -9`: no goodbye to anyone.
    pub fn kill9(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
    }

    /// `kill -INT` and wait: a graceful stop must exit 0.
    pub fn stop(mut self) {
        let pid = self.child.id().to_string();
        std::process::Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .expect("kill -INT");
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "graceful stop exits 0: {status}");
    }
}

impl ServerProcess {
    /// `kill -TERM`, and wait for the exit at most `within`: the exit status and how long it
    /// took, or `None` when the process is still running then.
    pub fn terminate(&mut self, within: Duration) -> Option<(std::process::ExitStatus, Duration)> {
        let pid = self.child.id().to_string();
        let start = std::time::Instant::now();
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill -TERM");
        // Another process's exit: no event to await from here, so look every 10 ms.
        while start.elapsed() < within {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some((status, start.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run `command` (a `livepush serve`), and return the `livepush listening on …` line it prints
/// (empty if it printed none before exiting); the process is then killed.
pub fn listening_line(mut command: std::process::Command) -> String {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn livepush");
    let stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let line = stdout
        .lines()
        .map_while(Result::ok)
        .find(|l| l.starts_with("livepush listening on "))
        .unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    line
}
