//! Logs: `--log-format text|json` and `--log-level` (`LIVEPUSH_LOG`, an `EnvFilter`
//! directive), on stderr. The level is reloadable while the server runs: `SIGHUP` re-reads
//! `log-level` from the configuration file (`--config`), so an operator turns on debug
//! logging of one module and back without a restart.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

/// What is logged when nothing says otherwise.
pub const DEFAULT_LEVEL: &str = "warn,livepush=info,livepush_client=warn";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line (timestamp, level, target, fields, spans), for collectors.
    Json,
}

/// Changes the level of the installed logger.
#[derive(Clone)]
pub struct LogLevel(reload::Handle<EnvFilter, Registry>);

impl LogLevel {
    /// Apply a new filter directive (e.g. `info,livepush_server::inbox=debug`).
    pub fn set(&self, directive: &str) -> anyhow::Result<()> {
        let filter = parse(directive)?;
        self.0
            .reload(filter)
            .map_err(|e| anyhow::anyhow!("cannot change the log level: {e}"))
    }
}

/// A filter directive, checked (clap's value parser for `--log-level`).
pub fn parse(directive: &str) -> anyhow::Result<EnvFilter> {
    EnvFilter::try_new(directive).map_err(|e| anyhow::anyhow!("bad log level {directive:?}: {e}"))
}

/// Install the logger: `directive` (or [`DEFAULT_LEVEL`]) in `format`, on stderr.
pub fn init(format: LogFormat, directive: Option<&str>) -> LogLevel {
    let filter = directive
        .and_then(|d| parse(d).ok())
        .unwrap_or_else(|| EnvFilter::new(DEFAULT_LEVEL));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let lines = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Text => registry.with(lines).init(),
        LogFormat::Json => registry.with(lines.json()).init(),
    }
    LogLevel(handle)
}
