//! `livepush serve --tls-cert FILE --tls-key FILE` as a user runs it.

mod support;

use std::process::Command;

fn livepush(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_livepush"));
    c.args(["serve", "--data-dir", ":memory:", "--listen", "127.0.0.1:0"])
        .args(args)
        .env_remove("LIVEPUSH_LISTEN")
        .env_remove("LIVEPUSH_CONFIG")
        .env_remove("LIVEPUSH_TLS_CERT")
        .env_remove("LIVEPUSH_TLS_KEY");
    c
}

#[test]
fn the_certificate_needs_its_key_and_both_need_each_other() {
    for (args, says) in [
        (["--tls-cert", "cert.pem"], "--tls-cert needs --tls-key"),
        (["--tls-key", "key.pem"], "--tls-key needs --tls-cert"),
    ] {
        let out = livepush(&args).output().expect("run");
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{err}");
    }
}

/// With a certificate (here from a configuration file), `serve` says `https://`.
#[test]
fn serve_with_a_certificate_listens_on_https() {
    let dir = tempfile::tempdir().expect("temp dir");
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("rcgen");
    let (cert, key, config) = (
        dir.path().join("cert.pem"),
        dir.path().join("key.pem"),
        dir.path().join("livepush.toml"),
    );
    std::fs::write(&cert, made.cert.pem()).expect("write");
    std::fs::write(&key, made.signing_key.serialize_pem()).expect("write");
    std::fs::write(
        &config,
        format!("tls-cert = {:?}\ntls-key = {:?}\n", cert, key),
    )
    .expect("write");
    let line = support::process::listening_line(livepush(&[
        "--config",
        config.to_str().expect("utf-8 path"),
    ]));
    assert!(
        line.starts_with("livepush listening on https://127.0.0.1:"),
        "{line:?}"
    );
}
