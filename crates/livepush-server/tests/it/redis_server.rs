//! A private `redis-server` for one test, on a free port and without persistence, so that
//! killing or flushing it harms nobody (tests never use the machine's Redis on 6379).
//! Shared with the `livepush` crate's tests (`crates/livepush/tests/support/mod.rs` includes
//! this file), so it depends on nothing but std and tempfile.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Longest wait for `redis-server` to answer `PING`.
const STARTUP: Duration = Duration::from_secs(10);

/// A private `redis-server` for one test.
pub struct Redis {
    child: Child,
    pub port: u16,
    persistent: bool,
    _dir: tempfile::TempDir,
}

impl Redis {
    /// Without persistence: a restart loses everything.
    pub fn start() -> Redis {
        Redis::start_with(false)
    }

    /// With an append-only file synced at every write: a restart, even after SIGKILL, loses
    /// nothing that was answered.
    pub fn start_persistent() -> Redis {
        Redis::start_with(true)
    }

    fn start_with(persistent: bool) -> Redis {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut r = Redis {
            child: Redis::spawn(port, &dir, persistent),
            port,
            persistent,
            _dir: dir,
        };
        r.wait_ready();
        r
    }

    fn spawn(port: u16, dir: &tempfile::TempDir, persistent: bool) -> Child {
        let aof: &[&str] = if persistent {
            &["--appendonly", "yes", "--appendfsync", "always"]
        } else {
            &["--appendonly", "no"]
        };
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(aof)
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (./scripts/test installs it: apt install redis-server)")
    }

    fn wait_ready(&mut self) {
        let deadline = std::time::Instant::now() + STARTUP;
        while self.cli(&["PING"]) != "PONG" {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, then start again on the same port and directory: with persistence it comes
    /// back with its data, without it empty.
    pub fn restart(&mut self) {
        self.kill();
        self.child = Redis::spawn(self.port, &self._dir, self.persistent);
        self.wait_ready();
    }

    /// Kill it now (SIGKILL): a Redis that is gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Run `redis-cli` against it; its output, trimmed.
    pub fn cli(&self, args: &[&str]) -> String {
        Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}
