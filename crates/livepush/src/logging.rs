//! Logs: `--log-format text|json` and `--log-level` (`LIVEPUSH_LOG`, an `EnvFilter`
//! directive), on stderr. The level is reloadable while the server runs: `SIGHUP` re-reads
//! `log-level` from the configuration file (`--config`), and `PUT /v1/admin/log-level` sets
//! one (the server library reaches the filter through [`LogLevel`] as a
//! [`LogLevelControl`]), so an operator turns on debug logging of one module and back without
//! a restart.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use livepush_server::config::LogLevelControl;

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

/// Changes the level of the installed logger, and knows the directive in force.
#[derive(Clone)]
pub struct LogLevel {
    handle: reload::Handle<EnvFilter, Registry>,
    /// The directive last applied, as given.
    current: Arc<Mutex<String>>,
}

impl std::fmt::Debug for LogLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("LogLevel").field(&*self.lock()).finish()
    }
}

impl LogLevel {
    fn new(handle: reload::Handle<EnvFilter, Registry>, directive: &str) -> LogLevel {
        LogLevel {
            handle,
            current: Arc::new(Mutex::new(directive.to_owned())),
        }
    }

    fn lock(&self) -> MutexGuard<'_, String> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Apply a new filter directive (e.g. `info,livepush_server::inbox=debug`).
    pub fn set(&self, directive: &str) -> anyhow::Result<()> {
        let filter = parse(directive)?;
        // Held across the reload, so that two changes at once leave `current` matching.
        let mut current = self.lock();
        self.handle
            .reload(filter)
            .map_err(|e| anyhow::anyhow!("cannot change the log level: {e}"))?;
        *current = directive.to_owned();
        Ok(())
    }
}

impl LogLevelControl for LogLevel {
    fn current(&self) -> String {
        self.lock().clone()
    }

    fn set(&self, directive: &str) -> Result<(), String> {
        LogLevel::set(self, directive).map_err(|e| e.to_string())
    }
}

/// A filter directive, checked (clap's value parser for `--log-level`).
pub fn parse(directive: &str) -> anyhow::Result<EnvFilter> {
    EnvFilter::try_new(directive).map_err(|e| anyhow::anyhow!("bad log level {directive:?}: {e}"))
}

/// Install the logger: `directive` (or [`DEFAULT_LEVEL`]) in `format`, on stderr.
pub fn init(format: LogFormat, directive: Option<&str>) -> LogLevel {
    let (directive, filter) = match directive.and_then(|d| Some((d, parse(d).ok()?))) {
        Some(valid) => valid,
        None => (DEFAULT_LEVEL, EnvFilter::new(DEFAULT_LEVEL)),
    };
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let lines = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Text => registry.with(lines).init(),
        LogFormat::Json => registry.with(lines.json()).init(),
    }
    LogLevel::new(handle, directive)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The server library sees the level through the trait: set, read back, and a bad
    /// directive changes nothing.
    #[test]
    fn the_level_is_read_and_changed_through_the_control() {
        let (layer, handle) = reload::Layer::new(EnvFilter::new("warn"));
        // The filter lives as long as this subscriber (never installed globally).
        let _subscriber = tracing_subscriber::registry().with(layer);
        let control: Arc<dyn LogLevelControl> = Arc::new(LogLevel::new(handle.clone(), "warn"));
        assert_eq!(control.current(), "warn");
        control.set("info,livepush_server=debug").unwrap();
        assert_eq!(control.current(), "info,livepush_server=debug");
        let in_force = handle.with_current(|f| f.to_string()).unwrap();
        assert!(in_force.contains("livepush_server=debug"), "{in_force}");
        let e = control.set("info,[=").unwrap_err();
        assert!(e.contains("bad log level"), "{e}");
        assert_eq!(control.current(), "info,livepush_server=debug");
    }
}
