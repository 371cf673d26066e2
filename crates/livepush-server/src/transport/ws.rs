//! The WebSocket transport: framing only. Everything a frame means lives in the session.
//!
//! One task per connection runs a loop over three sources: frames from the peer, the outbox
//! becoming non-empty, and the heartbeat timer. Whatever the outbox holds when the writer
//! wakes goes out as one WebSocket text frame (frames joined by `\n`), so a burst costs one
//! write per connection.

use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use livepush_proto::{ClientEnvelope, ClientFrame, ErrorCode, ServerFrame, Transport, join_frames};
use tokio::time::{Instant, timeout};

use crate::metrics::{ReasonLabel, TransportLabel};
use crate::outbox::{Batch, CloseReason};
use crate::server::App;
use crate::session::{Session, authenticate};

/// WebSocket close codes livepush uses (4000-4999 is the application range).
pub mod close_code {
    /// The peer stopped answering pings.
    pub const HEARTBEAT_TIMEOUT: u16 = 4000;
    /// The outgoing queue passed its hard limit or a write stalled.
    pub const SLOW_CONSUMER: u16 = 4001;
    /// No valid `connect` frame (missing, late, or a bad token).
    pub const UNAUTHORIZED: u16 = 4003;
    /// A normal close (the terminal was told to use another transport).
    pub const NORMAL: u16 = 1000;
    /// The server is shutting down.
    pub const GOING_AWAY: u16 = 1001;
    /// A message too large to read.
    pub const TOO_BIG: u16 = 1009;
}

/// How a session ended. Interruptions (no close frame from the client) will feed the
/// flapping detector of the transport work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The client sent a close frame.
    ClientClose,
    /// The TCP connection ended or failed without a close frame.
    Reset,
    HeartbeatTimeout,
    SlowConsumer,
    Unauthorized,
    TooLarge,
    Shutdown,
    /// Told to use long-polling (a flapping terminal).
    MovedToLongpoll,
}

impl Ending {
    pub fn as_str(self) -> &'static str {
        match self {
            Ending::ClientClose => "client_close",
            Ending::Reset => "reset",
            Ending::HeartbeatTimeout => "heartbeat_timeout",
            Ending::SlowConsumer => "slow_consumer",
            Ending::Unauthorized => "unauthorized",
            Ending::TooLarge => "too_large",
            Ending::Shutdown => "shutdown",
            Ending::MovedToLongpoll => "moved_to_longpoll",
        }
    }

    /// Whether this ending is an interruption of the terminal: the connection ended without
    /// a close frame (TCP reset or end) or stopped answering. These feed the flap detector.
    pub fn is_interruption(self) -> bool {
        matches!(self, Ending::Reset | Ending::HeartbeatTimeout)
    }
}

/// Configure the upgrade (small buffers: an idle connection should cost little) and hand the
/// socket to [`run`].
pub fn upgrade(app: Arc<App>, ws: WebSocketUpgrade) -> Response {
    let l = &app.hub.config().limits;
    ws.read_buffer_size(l.ws_read_buffer)
        .write_buffer_size(0)
        .max_write_buffer_size(l.outbox_max_bytes + l.write_batch_bytes)
        .max_message_size(l.max_frame_bytes.saturating_mul(4))
        .max_frame_size(l.max_frame_bytes.saturating_mul(4))
        .on_upgrade(move |socket| run(app, socket))
}

fn text(b: bytes::Bytes) -> Message {
    match Utf8Bytes::try_from(b) {
        Ok(t) => Message::Text(t),
        // Frames are produced by serde_json and are UTF-8; never reached.
        Err(_) => Message::Text(Utf8Bytes::from_static(
            r#"{"op":"error","code":"internal","message":"bad frame encoding"}"#,
        )),
    }
}

fn close(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }))
}

/// Wait for the `connect` frame and check its token.
/// What a successful handshake yields: the session, the `connect` frame's id, and any frames
/// the client batched after `connect` in the same WebSocket message.
struct Handshake {
    session: Session,
    id: Option<u64>,
    rest: Vec<String>,
}

async fn handshake(app: &App, socket: &mut WebSocket) -> Result<Handshake, Ending> {
    let limits = &app.hub.config().limits;
    let first = match timeout(limits.connect_timeout, socket.recv()).await {
        Err(_) => {
            refuse(socket, None, "no connect frame in time (connect_timeout)").await;
            return Err(Ending::Unauthorized);
        }
        Ok(None | Some(Err(_))) => return Err(Ending::Reset),
        Ok(Some(Ok(Message::Text(t)))) => t,
        Ok(Some(Ok(Message::Close(_)))) => return Err(Ending::ClientClose),
        Ok(Some(Ok(_))) => {
            refuse(
                socket,
                None,
                "the first frame must be a text `connect` frame",
            )
            .await;
            return Err(Ending::Unauthorized);
        }
    };
    if first.len() > limits.max_frame_bytes {
        refuse(socket, None, "connect frame too large").await;
        return Err(Ending::TooLarge);
    }
    let mut lines = livepush_proto::split_frames(&first);
    let line = lines.next().unwrap_or("");
    let rest: Vec<String> = lines.map(str::to_owned).collect();
    let env = match ClientEnvelope::parse(line) {
        Ok(env) => env,
        Err(e) => {
            refuse(
                socket,
                e.id,
                &format!("expected a connect frame: {}", e.message),
            )
            .await;
            return Err(Ending::Unauthorized);
        }
    };
    let ClientFrame::Connect { token, .. } = env.frame else {
        refuse(socket, env.id, "the first frame must be `connect`").await;
        return Err(Ending::Unauthorized);
    };
    let terminal = match authenticate(&app.keys, app.hub.config().dev, token.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            refuse(socket, env.id, &e.message).await;
            return Err(Ending::Unauthorized);
        }
    };
    let session = Session::new(app, terminal);
    Ok(Handshake {
        session,
        id: env.id,
        rest,
    })
}

/// Answer `connect` with `transport` instead of `connected`, then close cleanly.
async fn move_to_longpoll(socket: &mut WebSocket, wait: std::time::Duration) {
    let frame = livepush_proto::encode_frame(&ServerFrame::Transport {
        use_: Transport::Longpoll,
        retry_ws_after_ms: wait.as_millis() as u64,
    });
    let _ = socket.send(text(frame)).await;
    let _ = socket.send(close(close_code::NORMAL, "use longpoll")).await;
}

async fn refuse(socket: &mut WebSocket, id: Option<u64>, message: &str) {
    let frame =
        livepush_proto::encode_frame(&ServerFrame::error(id, ErrorCode::Unauthorized, message));
    let _ = socket.send(text(frame)).await;
    let _ = socket
        .send(close(close_code::UNAUTHORIZED, "unauthorized"))
        .await;
}

/// Serve one WebSocket connection until it ends.
pub async fn run(app: Arc<App>, mut socket: WebSocket) {
    let label = TransportLabel { transport: "ws" };
    let metrics = app.hub.metrics();
    metrics.connections_total.get_or_create(&label).inc();
    let ending = match handshake(&app, &mut socket).await {
        Ok(Handshake {
            mut session,
            id,
            rest,
        }) => {
            let terminal = session.terminal().id.clone();
            if let Some(wait) = app.terminals.longpoll_for(&terminal) {
                move_to_longpoll(&mut socket, wait).await;
                Ending::MovedToLongpoll
            } else {
                app.terminals.opened(&terminal, Transport::Ws);
                metrics.connections_open.get_or_create(&label).inc();
                session.open(Transport::Ws, id, None, true);
                for line in &rest {
                    session.handle_text(line);
                }
                let ending = serve(&app, socket, session).await;
                metrics.connections_open.get_or_create(&label).dec();
                app.terminals
                    .closed(&terminal, Transport::Ws, ending.is_interruption());
                ending
            }
        }
        Err(ending) => ending,
    };
    metrics
        .disconnects
        .get_or_create(&ReasonLabel {
            reason: ending.as_str(),
        })
        .inc();
    tracing::debug!(ending = ending.as_str(), "websocket session ended");
}

async fn serve(app: &App, socket: WebSocket, mut session: Session) -> Ending {
    let config = app.hub.config();
    let heartbeat = config.heartbeat;
    let dead_after = heartbeat + config.heartbeat_timeout;
    let batch_bytes = config.limits.write_batch_bytes;
    let write_timeout = config.limits.write_timeout;
    let outbox = session.outbox().clone();
    let (mut sink, mut stream) = socket.split();
    let mut ticks = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    let mut shutdown = app.shutdown.clone();

    loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => {
                let _ = send_within(&mut sink, write_timeout, close(close_code::GOING_AWAY, "shutdown")).await;
                return Ending::Shutdown;
            }
            incoming = stream.next() => {
                last_heard = Instant::now();
                match incoming {
                    Some(Ok(Message::Text(t))) => session.handle_text(&t),
                    Some(Ok(Message::Binary(_))) => session.error(livepush_proto::FrameError::bad_frame(
                        "binary frames are not part of the protocol; send JSON text",
                    )),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Ok(Message::Close(_))) => return Ending::ClientClose,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "websocket read error");
                        if is_capacity(&e) {
                            let frame = livepush_proto::encode_frame(&ServerFrame::error(
                                None,
                                ErrorCode::TooLarge,
                                "message exceeds the readable size; closing",
                            ));
                            let _ = send_within(&mut sink, write_timeout, text(frame)).await;
                            let _ = send_within(&mut sink, write_timeout, close(close_code::TOO_BIG, "too_large")).await;
                            return Ending::TooLarge;
                        }
                        return Ending::Reset;
                    }
                    None => return Ending::Reset,
                }
            }
            _ = outbox.ready() => {
                match outbox.take(batch_bytes) {
                    Batch::Frames(frames) if frames.is_empty() => {}
                    Batch::Frames(frames) => {
                        if let Err(ending) = send_within(&mut sink, write_timeout, text(join_frames(&frames))).await {
                            if ending == Ending::SlowConsumer {
                                outbox.close(CloseReason::SlowConsumer);
                            }
                            return ending;
                        }
                    }
                    Batch::Closed(reason) => {
                        let code = match reason {
                            CloseReason::SlowConsumer => close_code::SLOW_CONSUMER,
                            CloseReason::Shutdown => close_code::GOING_AWAY,
                        };
                        let _ = send_within(&mut sink, write_timeout, close(code, reason.as_str())).await;
                        return match reason {
                            CloseReason::SlowConsumer => Ending::SlowConsumer,
                            CloseReason::Shutdown => Ending::Shutdown,
                        };
                    }
                }
            }
            _ = ticks.tick() => {
                if last_heard.elapsed() >= dead_after {
                    let _ = send_within(&mut sink, write_timeout, close(close_code::HEARTBEAT_TIMEOUT, "heartbeat_timeout")).await;
                    return Ending::HeartbeatTimeout;
                }
                if let Err(ending) = send_within(&mut sink, write_timeout, Message::Ping(bytes::Bytes::new())).await {
                    return ending;
                }
            }
        }
    }
}

type Sink = futures_util::stream::SplitSink<WebSocket, Message>;

/// Send one message, or say how the connection ended if it cannot be sent in time.
async fn send_within(
    sink: &mut Sink,
    limit: std::time::Duration,
    m: Message,
) -> Result<(), Ending> {
    match timeout(limit, sink.send(m)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Ending::Reset),
        Err(_) => Err(Ending::SlowConsumer),
    }
}

fn is_capacity(e: &axum::Error) -> bool {
    // axum wraps tungstenite's error; its message is the only stable thing we can look at.
    let s = e.to_string();
    s.contains("Space limit exceeded") || s.contains("capacity") || s.contains("too long")
}
