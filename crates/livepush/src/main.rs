//! `livepush`: the server and its command-line tools.
//!
//! - `serve`: run the push gateway.
//! - `publish`: publish a message to a room through the HTTP API.
//! - `token`: mint a terminal token.
//! - `tail`: connect as a terminal and print every event as one JSON line.
//! - `agent`: a terminal that sleeps (UDP only) until woken, then prints its inbox.
//! - `demo`: drive rooms like a live show (for the demo page).
//! - `bench`: the load generator that measures livepush (and its peers).
//! - `config`: check a configuration file, or print one with every default.

#![forbid(unsafe_code)]

mod agent;
mod bench;
mod config_file;
mod demo;
mod firstrun;
mod logging;
mod proxy;
mod publish;
mod serve;
mod tail;
mod token;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "livepush",
    version,
    about = "Real-time push gateway for live-streaming rooms"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server.
    Serve(Box<serve::ServeArgs>),
    /// Publish a message to a room through the HTTP API and print the answer.
    Publish(publish::PublishArgs),
    /// Mint a terminal token signed with the server's token secret.
    Token(token::TokenArgs),
    /// Connect as a terminal, join rooms, and print every event as one JSON line.
    Tail(tail::TailArgs),
    /// Run a terminal that holds no connection while idle, is woken over UDP, and prints
    /// every inbox message as one JSON line.
    Agent(agent::AgentArgs),
    /// Drive rooms like a live show: chat, entries, gifts, quizzes, controls, viewers.
    Demo(demo::DemoArgs),
    /// Load generator: measure livepush (see `livepush bench --help`).
    Bench(bench::BenchArgs),
    /// Print the OpenAPI 3.1 document of the HTTP API (default limits; docs/openapi.json).
    Openapi,
    /// Configuration files of `livepush serve --config FILE`.
    Config {
        #[command(subcommand)]
        command: config_file::ConfigCommand,
    },
}

/// Arguments every client command shares.
#[derive(Debug, clap::Args)]
pub struct ServerArg {
    /// Base URL of the livepush server.
    #[arg(long, env = "LIVEPUSH_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
}

/// jemalloc, not glibc's malloc: an idle connection is a dozen small allocations, which
/// jemalloc packs in size classes without a header each (docs/performance.md measures it).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    let cli: Cli = config_file::parse();
    let log_level = match &cli.command {
        Command::Serve(a) => logging::init(a.log_format, a.log_level.as_deref()),
        _ => logging::init(
            logging::LogFormat::Text,
            std::env::var("LIVEPUSH_LOG").ok().as_deref(),
        ),
    };
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| {
            rt.block_on(async move {
                match cli.command {
                    Command::Serve(a) => serve::run(*a, log_level).await,
                    Command::Publish(a) => publish::run(a).await,
                    Command::Token(a) => token::run(a),
                    Command::Tail(a) => tail::run(a).await,
                    Command::Agent(a) => agent::run(a).await,
                    Command::Bench(a) => bench::run(a).await,
                    Command::Demo(a) => demo::run(a).await,
                    Command::Config { command } => config_file::run::<Cli>(command),
                    Command::Openapi => {
                        print!(
                            "{}",
                            livepush_server::api::openapi::json(&Default::default())
                        );
                        Ok(())
                    }
                }
            })
        });
    if let Err(e) = result {
        eprintln!("livepush: error: {}", describe(&e));
        std::process::exit(1);
    }
}

/// The error and its causes on one line, skipping a cause its parent already quoted.
fn describe(e: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut previous = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if previous.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
        previous = text;
    }
    out
}
