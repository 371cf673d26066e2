//! `livepush serve --config FILE` as a user runs it: flags > environment > file > defaults,
//! `LIVEPUSH_CONFIG` names the file, and a bad file stops the server with the key's line.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

fn livepush(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_livepush"));
    c.args(args)
        .env_remove("LIVEPUSH_LISTEN")
        .env_remove("LIVEPUSH_CONFIG")
        .envs(env.iter().copied());
    c
}

/// The address `livepush serve` says it listens on.
fn listening(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut command = livepush(&["serve", "--data-dir", ":memory:"], env);
    command.args(args);
    let line = support::process::listening_line(command);
    line.trim_start_matches("livepush listening on http://")
        .rsplit_once(':')
        .map(|(host, _)| host.to_owned())
        .unwrap_or(line)
}

fn file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(text.as_bytes()).expect("write");
    f
}

#[test]
fn flags_beat_the_environment_which_beats_the_file() {
    let f = file("listen = \"127.0.0.2:0\"\nwake-listen = \"off\"\n");
    let path = f.path().to_str().expect("utf-8 path");
    assert_eq!(listening(&["--config", path], &[]), "127.0.0.2");
    let env = [("LIVEPUSH_LISTEN", "127.0.0.3:0")];
    assert_eq!(listening(&["--config", path], &env), "127.0.0.3");
    assert_eq!(
        listening(&["--config", path, "--listen", "127.0.0.4:0"], &env),
        "127.0.0.4"
    );
    assert_eq!(
        listening(&[], &[("LIVEPUSH_CONFIG", path)]),
        "127.0.0.2",
        "LIVEPUSH_CONFIG names the file"
    );
}

#[test]
fn a_bad_file_stops_the_server_and_config_check_names_the_line() {
    let f = file("listen = \"127.0.0.2:0\"\nhistory-size = \"many\"\n");
    let path = f.path().to_str().expect("utf-8 path");
    let out = livepush(&["serve", "--config", path], &[])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(":2: `history-size`: invalid value 'many'"),
        "{err}"
    );
    let out = livepush(&["config", "check", path], &[])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let defaults = livepush(&["config", "defaults"], &[])
        .output()
        .expect("run");
    let all = file(&String::from_utf8_lossy(&defaults.stdout));
    let out = livepush(&["config", "check", all.path().to_str().unwrap()], &[])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `--log-format json` writes one JSON object per line, and SIGHUP applies the file's
/// `log-level` again while the server runs.
#[test]
fn json_logs_and_a_log_level_reloaded_on_sighup() {
    let f = file("listen = \"127.0.0.1:0\"\nwake-listen = \"off\"\nlog-level = \"info\"\n");
    let path = f.path().to_str().expect("utf-8 path");
    let mut child = livepush(
        &[
            "serve",
            "--data-dir",
            ":memory:",
            "--config",
            path,
            "--log-format",
            "json",
        ],
        &[],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn livepush");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("listening line");
    assert!(line.starts_with("livepush listening on"), "{line}");
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = BufReader::new(child.stderr.take().expect("stderr"));
    std::thread::spawn(move || {
        for l in stderr.lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let next_json = |what: &str| -> serde_json::Value {
        loop {
            let l = rx
                .recv_timeout(std::time::Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("no log line: {what}"));
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&l)
                && v["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains(what))
            {
                return v;
            }
            assert!(
                !l.starts_with('{') || l.ends_with('}'),
                "not one object per line: {l}"
            );
        }
    };
    let first = next_json("settings from a configuration file");
    assert_eq!(first["level"], "INFO", "{first}");
    std::fs::write(
        f.path(),
        "listen = \"127.0.0.1:0\"\nlog-level = \"debug\"\n",
    )
    .expect("write");
    let pid = child.id().to_string();
    Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill -HUP");
    let reloaded = next_json("log level reloaded");
    assert_eq!(reloaded["fields"]["level"], "debug", "{reloaded}");
    let _ = child.kill();
    let _ = child.wait();
}
