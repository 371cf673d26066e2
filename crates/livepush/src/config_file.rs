//! `livepush serve --config FILE` (or `LIVEPUSH_CONFIG`): the server's settings from a TOML
//! file, and `livepush config check|defaults`.
//!
//! Each key is a `serve` flag's long name without its dashes (`history-size = 500`,
//! `class = ["gift=reliable"]`, `dev = true`); precedence is flags > environment > file >
//! defaults (contract v1.1, "Integration surface").
//!
//! The file has no schema of its own: each key is turned into the command-line argument it
//! names and goes through clap, so every flag has a key (today's and the next one added),
//! each value is checked by the same parser as on the command line, and the precedence is
//! clap's: a file value is used only for a flag whose value clap took from its default
//! ([`ArgMatches::value_source`]). Each value is first parsed alone, so that an unknown key
//! or a bad value is reported with the file's line.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command, CommandFactory, FromArgMatches};
use toml::{Spanned, Value};

/// The `serve` flag that names the file (it has no key in the file).
const CONFIG: &str = "config";

#[derive(Debug, clap::Subcommand)]
pub enum ConfigCommand {
    /// Check a configuration file (every key names a `serve` flag, every value parses) without
    /// starting the server. Exits 1 on the first error, naming the key and the line.
    Check {
        /// The TOML file.
        file: PathBuf,
    },
    /// Print a complete configuration file: every `serve` setting with its help and default
    /// (settings without a default are commented out).
    Defaults,
}

/// One setting of the file: the flag it names, as command-line arguments.
#[derive(Debug)]
struct Setting {
    id: String,
    args: Vec<OsString>,
}

/// Parse the command line; for `serve` with a configuration file, every flag that neither the
/// command line nor the environment set takes the file's value. Exits with a message (code
/// 2, like clap) on an error.
pub fn parse<T: CommandFactory + FromArgMatches>() -> T {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    let command = T::command();
    let matches = command.clone().get_matches_from(&args);
    if let Some(("serve", serve)) = matches.subcommand()
        && let Some(file) = serve.get_one::<PathBuf>(CONFIG)
    {
        let settings = read(file, serve_command(&command)).unwrap_or_else(|e| {
            eprintln!("livepush: error: {e:#}");
            std::process::exit(2);
        });
        args.extend(from_file(serve, settings));
        let matches = command.get_matches_from(&args);
        return T::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    }
    T::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// The arguments the file adds: its settings for the flags still at their defaults.
fn from_file(serve: &ArgMatches, settings: Vec<Setting>) -> Vec<OsString> {
    settings
        .into_iter()
        .filter(|s| {
            !matches!(
                serve.value_source(&s.id),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            )
        })
        .flat_map(|s| s.args)
        .collect()
}

fn serve_command(command: &Command) -> &Command {
    command
        .find_subcommand("serve")
        .expect("livepush has a serve command")
}

/// The settings a file may hold: every `serve` flag but the file's own and `--help`.
fn settable(serve: &Command) -> impl Iterator<Item = &Arg> {
    serve.get_arguments().filter(|a| {
        a.get_long().is_some_and(|l| l != CONFIG)
            && !matches!(a.get_action(), ArgAction::Help | ArgAction::Version)
    })
}

/// Read and check a file: each key a settable flag, each value accepted by that flag alone.
fn read(file: &Path, serve: &Command) -> anyhow::Result<Vec<Setting>> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read the configuration file {}", file.display()))?;
    let table: BTreeMap<Spanned<String>, Spanned<Value>> =
        toml::from_str(&text).map_err(|e| anyhow!("{}: {e}", file.display()))?;
    let mut settings = Vec::with_capacity(table.len());
    for (key, value) in table {
        let line = 1 + text[..key.span().start].matches('\n').count();
        let at = |what: String| anyhow!("{}:{line}: `{}`: {what}", file.display(), key.as_ref());
        let Some(arg) = settable(serve).find(|a| a.get_long() == Some(key.as_ref())) else {
            return Err(at(
                "unknown key (each key is a `livepush serve` flag without its \
                           dashes; `livepush config defaults` lists them)"
                    .into(),
            ));
        };
        let args = arguments(arg, key.as_ref(), value.into_inner()).map_err(at)?;
        serve
            .clone()
            .no_binary_name(true)
            .try_get_matches_from(&args)
            .map_err(|e| at(first_line(&e.render().to_string())))?;
        settings.push(Setting {
            id: arg.get_id().to_string(),
            args,
        });
    }
    Ok(settings)
}

/// A file value as the command-line arguments that set it.
fn arguments(arg: &Arg, key: &str, value: Value) -> Result<Vec<OsString>, String> {
    let flag = |v: String| OsString::from(format!("--{key}={v}"));
    match (arg.get_action(), value) {
        (ArgAction::SetTrue, Value::Boolean(on)) => Ok(on
            .then(|| OsString::from(format!("--{key}")))
            .into_iter()
            .collect()),
        (ArgAction::SetTrue, _) => Err("expected true or false".into()),
        (ArgAction::Append, Value::Array(items)) => items
            .iter()
            .map(|v| scalar(v).map(flag))
            .collect::<Option<_>>()
            .ok_or_else(|| "expected an array of strings or numbers".into()),
        (_, Value::Array(_)) => Err("expected one value, not an array".into()),
        (_, v) => scalar(&v)
            .map(|s| vec![flag(s)])
            .ok_or_else(|| "expected a string, a number or a boolean".into()),
    }
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Integer(i) => Some(i.to_string()),
        Value::Float(f) => Some(f.to_string()),
        Value::Boolean(b) => Some(b.to_string()),
        Value::Datetime(_) | Value::Array(_) | Value::Table(_) => None,
    }
}

/// The `log-level` a configuration file sets, if any (read again on SIGHUP).
pub fn log_level(file: &Path) -> anyhow::Result<Option<String>> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read the configuration file {}", file.display()))?;
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| anyhow!("{}: {e}", file.display()))?;
    match table.get("log-level") {
        None => Ok(None),
        Some(Value::String(level)) => Ok(Some(level.clone())),
        Some(_) => Err(anyhow!("{}: `log-level` must be a string", file.display())),
    }
}

/// clap's message without its `error: ` and the usage lines after it.
fn first_line(rendered: &str) -> String {
    let line = rendered.lines().next().unwrap_or_default();
    line.strip_prefix("error: ").unwrap_or(line).to_owned()
}

/// `livepush config …`.
pub fn run<T: CommandFactory>(command: ConfigCommand) -> anyhow::Result<()> {
    let cli = T::command();
    let serve = serve_command(&cli);
    match command {
        ConfigCommand::Check { file } => {
            let settings = read(&file, serve)?;
            // Together, as `serve` would take them (flags that exclude each other).
            let n = settings.len();
            let args = settings.into_iter().flat_map(|s| s.args);
            serve
                .clone()
                .no_binary_name(true)
                .try_get_matches_from(args)
                .map_err(|e| {
                    anyhow!(
                        "{}: {}",
                        file.display(),
                        first_line(&e.render().to_string())
                    )
                })?;
            println!("{}: ok ({n} settings)", file.display());
        }
        ConfigCommand::Defaults => print!("{}", defaults(serve)),
    }
    Ok(())
}

/// A complete configuration file: every setting with its help, environment variable and
/// default value (commented out when it has none).
fn defaults(serve: &Command) -> String {
    let mut out = String::from(
        "# livepush serve: configuration file (TOML), from `livepush config defaults`.\n\
         # Each key is a `livepush serve` flag without its dashes. Precedence: flags >\n\
         # environment (LIVEPUSH_*) > this file > defaults. Use: livepush serve --config FILE\n",
    );
    for arg in settable(serve) {
        let key = arg.get_long().unwrap_or_default();
        out.push('\n');
        let help = arg.get_long_help().or(arg.get_help());
        for line in help.map(|h| h.to_string()).unwrap_or_default().lines() {
            comment(&mut out, line);
        }
        if let Some(env) = arg.get_env() {
            out.push_str(&format!("# env: {}\n", env.to_string_lossy()));
        }
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| toml_value(&v.to_string_lossy()))
            .collect();
        match (arg.get_action(), defaults.as_slice()) {
            (ArgAction::SetTrue, _) => out.push_str(&format!("{key} = false\n")),
            (ArgAction::Append, d) => out.push_str(&format!(
                "{}{key} = [{}]\n",
                if d.is_empty() { "# " } else { "" },
                d.join(", ")
            )),
            (_, []) => out.push_str(&format!("# {key} = (unset)\n")),
            (_, [d, ..]) => out.push_str(&format!("{key} = {d}\n")),
        }
    }
    out
}

/// `text` as comment lines of at most 96 columns, broken between words.
fn comment(out: &mut String, text: &str) {
    let mut line = String::from("#");
    for word in text.split_whitespace() {
        if line.len() > 1 && line.len() + 1 + word.len() > 96 {
            out.push_str(&line);
            out.push('\n');
            line.truncate(1);
        }
        line.push(' ');
        line.push_str(word);
    }
    out.push_str(&line);
    out.push('\n');
}

/// A default value as TOML: a number or a boolean bare, anything else a quoted string.
fn toml_value(v: &str) -> String {
    if v.parse::<i64>().is_ok() || v == "true" || v == "false" {
        v.to_owned()
    } else {
        Value::String(v.to_owned()).to_string()
    }
}

#[cfg(test)]
#[path = "config_file/tests.rs"]
mod tests;
