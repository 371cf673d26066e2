//! The livepush server: a push gateway for live-streaming rooms.
//!
//! - [`hub`]: rooms, sequencing, history, fan-out, control commands, online counts.
//! - [`outbox`]: each connection's bounded outgoing queue and the slow-consumer policy.
//! - [`session`]: what each client frame does, shared by every transport.
//! - [`transport`]: framing for WebSocket (long-poll and SSE join it later).
//! - [`api`]: the HTTP API for the app's backend.
//! - [`store`] and [`broker`]: the traits behind which durability and cross-node fan-out sit.
//! - [`auth`]: terminal tokens.
//! - [`terminals`], [`inbox`] and [`wake`]: the service list, per-terminal inboxes, and UDP
//!   wake-up of terminals that hold no connection.
//!
//! Start one with [`start`] (in-memory store) or [`start_with`].

#![forbid(unsafe_code)]

pub mod api;
pub mod app;
pub mod assets;
pub mod auth;
pub mod clock;
pub mod config;
pub mod control;
pub mod engine;
pub mod error;
pub mod frame;
pub mod hub;
pub mod inbox;
pub mod metrics;
pub mod outbox;
pub mod ratelimit;
pub mod reactor;
pub mod server;
pub mod session;
pub mod store;
pub mod terminals;
pub mod transport;
pub mod wake;

pub use app::App;
pub use config::{ClassMap, Config, Limits, WakeListen};
pub use hub::Hub;
pub use server::{Running, ServerError, start, start_with, start_with_engine};
