//! `livepush serve --config FILE` as a user runs it: flags > environment > file > defaults,
//! `LIVEPUSH_CONFIG` names the file, and a bad file stops the server with the key's line.

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
    let mut child = livepush(&["serve", "--data-dir", ":memory:"], env)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn livepush");
    let stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let line = stdout
        .lines()
        .map_while(Result::ok)
        .find(|l| l.starts_with("livepush listening on "))
        .unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
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
