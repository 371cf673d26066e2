//! The livepush server: a push gateway for live-streaming rooms.
//!
//! # Layout
//!
//! Follow a reliable message from the backend to a viewer's socket:
//!
//! 1. [`server`] wires everything and routes `POST /v1/rooms/{room}/messages` to
//!    [`api::publish`], which reads the JSON body and calls [`hub::Hub::publish`].
//! 2. The [`hub`] validates the message, encodes its `msg` frame once (all but the seq) and
//!    hands it to the [`engine`], the seam behind which everything the nodes of a deployment
//!    share lives. On one node that is [`engine::local::LocalEngine`]: it gives the message
//!    the room's next `seq`, writes it (with the room's new flags, for a control message)
//!    to the [`store`], and once the write is durable hands it to the node as an
//!    [`engine::Event`], strictly in `seq` order, before the publish is answered.
//! 3. The node ([`app::App`], which implements [`engine::Node`]) passes room events to the
//!    hub; the room's [`hub::feed`] keeps order and repairs gaps (across nodes the stream may
//!    skip or repeat), and the room ([`hub::Room`]) appends the message to its history and
//!    its [`ring::Ring`], the same shared [`frame::Frame`] once, all under the room's lock,
//!    so a message races no join: it is in the joiner's replay or delivered live, never
//!    both, never neither. Each member's [`outbox::Outbox`] reads the ring by position.
//! 4. The ring wakes the writers that had read everything. For WebSocket that is the
//!    connection's `transport::ws::Driver` in a shard of the [`reactor`] (one readiness loop
//!    per core); it takes what its outbox queued and what its rooms' rings hold for it, and
//!    writes each run of frames, joined by `\n`, as one WebSocket text frame (framing from
//!    the `livepush-wsframe` crate), copied straight from the shared frames, all in one
//!    write. A parked long-poll answers with the batch as a JSON array, an SSE stream as one
//!    event.
//!
//! The other way, a terminal's frames reach the [`session`] (the one place where client
//! frames turn into hub operations, and where every transport's sessions start and end),
//! through whichever of the [`transport`]s it uses.
//!
//! - [`app`]: the state every request and connection shares.
//! - [`auth`]: terminal tokens, and [`auth::identify`], how every transport names a terminal;
//!   [`transport::authenticate`] adds the connect hook ([`hooks::connect`]) for terminals
//!   without a token.
//! - [`hooks`]: the backend's send and connect hooks (signed HTTP calls).
//! - [`logctx`]: request and connection ids on log lines (`X-Request-Id`, `conn=`).
//! - [`config`], [`metrics`], [`clock`], [`error`] (HTTP errors), [`ratelimit`]: leaves.
//! - [`control`]: control commands (close, open, mute, unmute, stream switch).
//! - [`terminals`], [`inbox`] and [`wake`]: the service list, per-terminal inboxes (behind
//!   the sibling seam [`engine::InboxEngine`]), and UDP wake-up of idle terminals.
//! - [`assets`]: the browser client, the demo page and the admin page, served by the server.
//! - [`admin`]: the admin page's figures (`GET /v1/admin/stats`, handled in `api::admin`) and
//!   their live feed into the reserved admin room.
//! - [`tls`]: `https://` and `wss://` (`Config::tls`): the reloadable certificate, and the
//!   sans-IO TLS layer an open `wss://` connection reads and writes through in the reactor.
//!
//! Start one with [`start`] (in-memory store), [`start_with`] (a given store) or
//! [`start_with_engine`].

#![forbid(unsafe_code)]

pub mod admin;
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
pub mod hooks;
pub mod hub;
pub mod inbox;
pub mod logctx;
pub mod metrics;
pub mod outbox;
pub mod ratelimit;
pub mod reactor;
pub mod ring;
pub mod server;
pub mod session;
pub mod store;
pub mod terminals;
pub mod tls;
pub mod transport;
pub mod wake;

pub use app::App;
pub use config::{ClassMap, Config, Limits, WakeListen};
pub use hub::Hub;
pub use server::{Running, ServerError, start, start_with, start_with_engine};
