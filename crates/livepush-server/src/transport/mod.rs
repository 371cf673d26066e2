//! Transports: how frames travel between a terminal and its session. Each transport is only
//! framing; the session (`crate::session`) decides what every frame means.

pub mod longpoll;
pub mod sse;
pub mod ws;
