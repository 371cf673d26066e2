//! Integration tests: a real server on 127.0.0.1:0, real sockets.

mod admin;
mod api;
mod batch;
mod connect_hook;
mod connections;
mod depth;
mod durability;
mod errors;
mod faulty;
mod heartbeat;
mod hooks;
mod inbox;
mod loglevel;
mod logs;
mod merge;
mod openapi;
mod redis;
mod redis_server;
mod resume;
mod support;
mod tls;
mod transports;
mod websocket;
