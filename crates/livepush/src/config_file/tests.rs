use std::io::Write;

use clap::CommandFactory;

use super::*;
use crate::Cli;

fn file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(text.as_bytes()).expect("write");
    f
}

fn read_str(text: &str) -> anyhow::Result<Vec<Setting>> {
    let f = file(text);
    read(f.path(), serve_command(&Cli::command()))
}

/// `serve` matches for `flags` with the file's settings below them.
fn serve_with(flags: &[&str], text: &str) -> ArgMatches {
    let cli = Cli::command();
    let mut args: Vec<OsString> = ["livepush", "serve"].iter().map(OsString::from).collect();
    args.extend(flags.iter().map(OsString::from));
    let first = cli.clone().get_matches_from(&args);
    let settings = read_str(text).expect("valid file");
    args.extend(from_file(
        first.subcommand_matches("serve").unwrap(),
        settings,
    ));
    cli.get_matches_from(&args)
        .subcommand_matches("serve")
        .unwrap()
        .clone()
}

#[test]
fn the_defaults_file_is_complete_and_valid() {
    let cli = Cli::command();
    let serve = serve_command(&cli);
    let text = defaults(serve);
    let keys: Vec<&str> = settable(serve).filter_map(|a| a.get_long()).collect();
    assert!(keys.len() > 30, "{keys:?}");
    for key in &keys {
        assert!(
            text.lines()
                .any(|l| l.trim_start_matches("# ").starts_with(&format!("{key} = "))),
            "`{key}` missing from:\n{text}"
        );
    }
    let settings = read_str(&text).expect("the defaults file reads back");
    assert!(settings.len() > 20);
}

#[test]
fn an_unknown_key_is_named_with_its_line() {
    let e = read_str("listen = \"127.0.0.1:0\"\n\nhistroy-size = 5\n").unwrap_err();
    let e = e.to_string();
    assert!(e.contains(":3: `histroy-size`: unknown key"), "{e}");
}

#[test]
fn a_bad_value_is_named_with_its_line_and_the_flag_s_own_message() {
    let e = read_str("history-size = 5\nredis-timeout = \"soon\"\n").unwrap_err();
    let e = e.to_string();
    assert!(
        e.contains(":2: `redis-timeout`: invalid value 'soon'"),
        "{e}"
    );
    let e = read_str("dev = \"yes\"\n").unwrap_err().to_string();
    assert!(e.contains(":1: `dev`: expected true or false"), "{e}");
    let e = read_str("listen = [\"a\", \"b\"]\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("expected one value, not an array"), "{e}");
    let e = read_str("listen = \n").unwrap_err().to_string();
    assert!(
        e.contains("line 1"),
        "a TOML syntax error names its place: {e}"
    );
}

#[test]
fn flags_win_over_the_file_and_the_file_over_defaults() {
    let text = "history-size = 5\nredis-prefix = \"from-file\"\nclass = [\"gift=reliable\", \"chat=transient\"]\n";
    let m = serve_with(&["--history-size", "7"], text);
    assert_eq!(m.get_one::<usize>("history_size"), Some(&7));
    assert_eq!(
        m.get_one::<String>("redis_prefix").map(String::as_str),
        Some("from-file")
    );
    let classes: Vec<&String> = m.get_many::<String>("classes").unwrap().collect();
    assert_eq!(classes, ["gift=reliable", "chat=transient"]);
    let m = serve_with(&[], "history-size = 5\n");
    assert_eq!(m.get_one::<usize>("history_size"), Some(&5));
}
