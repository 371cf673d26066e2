//! Wiring: build the hub, the routes and the background upkeep, and run them on a listener.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, HttpBody};
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, get, on, post};
use futures_util::StreamExt;
use futures_util::future::Either;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use livepush_proto::ErrorCode;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api;
use crate::app::App;
use crate::assets;
use crate::auth::TokenKeys;
use crate::config::Config;
use crate::config::WakeListen;
use crate::engine::local::{LocalEngine, RoomLimits};
use crate::engine::{Engine, InboxEngine, Node, Retention};
use crate::error::ApiError;
use crate::hub::Hub;
use crate::inbox::{InboxSettings, Inboxes};
use crate::metrics::Metrics;
use crate::ratelimit::{Admission, Counts, Limiters};
use crate::store::{MemoryStore, Store};
use crate::terminals::{TerminalSettings, Terminals};
use crate::tls::{Tls, TlsError};
use crate::transport;
use crate::wake::{WakeKeys, WakeSocket};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("invalid configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot create the WebSocket reactor's epoll set: {0}")]
    Reactor(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Accept connections and serve HTTP/1.1 on them until `stop`, then wait for the requests in
/// flight, each for at most `drain`: a client that never sends its body, or stops reading
/// a response (an SSE stream), is dropped then, so that shutdown finishes whatever clients
/// do.
///
/// This is `axum::serve` without one layer. axum serves through hyper-util's automatic
/// HTTP/1-or-2 connection, which wraps the socket in a private type, so a WebSocket upgrade
/// comes out as a boxed socket behind two indirections (~180 bytes per connection for the
/// box and the wrapper). Serving HTTP/1.1 with hyper directly lets the WebSocket transport
/// take the `TcpStream` (or the `TlsStream` over it) itself back ([`transport::ws`] downcasts the
/// upgrade). livepush
/// speaks HTTP/1.1 only (WebSocket, long-poll and SSE all work over it).
///
/// With `tls`, every connection is a TLS one: the handshake (within `header_timeout`) comes
/// first, with the certificate loaded last, and hyper serves the `TlsStream` (which a
/// WebSocket upgrade hands to the reactor). Without it nothing is wrapped.
///
/// Each connection is admitted against `addresses` (`max_connections_per_address`) first: a
/// source address past it gets a 429 and the connection is closed. The [`Admission`] rides
/// in every request's extensions, so that a WebSocket handshake keeps its address counted
/// until the session opens.
async fn serve(
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    router: Router,
    addresses: Arc<Counts<IpAddr>>,
    header_timeout: Duration,
    drain: Duration,
    mut stop: watch::Receiver<bool>,
) {
    // Every connection task holds a receiver; `closed()` resolves once they are all gone.
    let (all_done, done) = watch::channel(());
    let mut http = hyper::server::conn::http1::Builder::new();
    // The timer is what makes hyper enforce the header timeout.
    http.timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let http = http;
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => break,
        };
        let Some(admission) = addresses.admit(peer.ip()) else {
            refuse_address(tcp, addresses.max());
            continue;
        };
        // Nagle would only delay pushes: the outbox already coalesces them into few writes.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let service = Admitted {
            router: TowerToHyperService::new(router.clone()),
            admission,
            peer,
        };
        let stop = stop.clone();
        let done = done.clone();
        let http = http.clone();
        let Some(tls) = &tls else {
            tokio::spawn(async move {
                serve_connection(&http, TokioIo::new(tcp), service, stop, drain).await;
                drop(done);
            });
            continue;
        };
        let acceptor = tls.acceptor();
        tokio::spawn(async move {
            let mut stop = stop;
            let accepted = tokio::select! {
                accepted = tokio::time::timeout(header_timeout, acceptor.accept(tcp)) => accepted,
                () = stopped(&mut stop) => return,
            };
            match accepted {
                Ok(Ok(tls)) => {
                    serve_connection(&http, TokioIo::new(tls), service, stop, drain).await;
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!("no TLS handshake in time (header_timeout)"),
            }
            drop(done);
        });
    }
    drop(listener);
    drop(done);
    all_done.closed().await;
}

/// Serve HTTP/1.1 on one connection (upgrades included) until it ends, or until `stop` and
/// then for at most `drain`.
async fn serve_connection<I>(
    http: &hyper::server::conn::http1::Builder,
    io: I,
    service: Admitted,
    mut stop: watch::Receiver<bool>,
    drain: Duration,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let conn = http.serve_connection(io, service).with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let ended = tokio::select! {
        ended = conn.as_mut() => ended,
        () = stopped(&mut stop) => {
            // Finish the request in flight, then close (long-polls answer at once on
            // shutdown, SSE streams end; upgraded connections are no longer hyper's).
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(drain, conn).await {
                Ok(ended) => ended,
                Err(_) => {
                    tracing::debug!("connection dropped at the shutdown deadline");
                    Ok(())
                }
            }
        }
    };
    if let Err(e) = ended {
        tracing::trace!(error = %e, "http connection ended with an error");
    }
}

/// The router, with each request carrying its connection's [`Admission`].
#[derive(Debug, Clone)]
struct Admitted {
    router: TowerToHyperService<Router>,
    admission: Admission,
    /// The client's address, as `ConnectInfo` (the connect hook forwards it).
    peer: SocketAddr,
}

impl hyper::service::Service<Request<hyper::body::Incoming>> for Admitted {
    type Response = <TowerToHyperService<Router> as hyper::service::Service<
        Request<hyper::body::Incoming>,
    >>::Response;
    type Error = <TowerToHyperService<Router> as hyper::service::Service<
        Request<hyper::body::Incoming>,
    >>::Error;
    type Future = <TowerToHyperService<Router> as hyper::service::Service<
        Request<hyper::body::Incoming>,
    >>::Future;

    fn call(&self, mut req: Request<hyper::body::Incoming>) -> Self::Future {
        req.extensions_mut().insert(self.admission.clone());
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(self.peer));
        self.router.call(req)
    }
}

/// Refusals that may linger at once (see [`refuse_address`]).
const LINGERING_REFUSALS: usize = 64;

/// Answer a connection from an address past `max_connections_per_address` with a JSON 429
/// and close it. Normally in a task of its own, bounded to a second: the answer is written,
/// and what the client sent meanwhile is read and dropped, so that closing does not reset
/// the connection under the answer. Past [`LINGERING_REFUSALS`] such tasks (a flood), the
/// answer is only offered to the socket and the connection closed at once, so that refusals
/// cannot pile up file descriptors themselves.
fn refuse_address(mut tcp: tokio::net::TcpStream, max: usize) {
    static LINGERING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = serde_json::json!({
        "error": ErrorCode::RateLimited.as_str(),
        "message": format!(
            "too many connections from this address (max_connections_per_address {max})"
        ),
    })
    .to_string();
    let answer = format!(
        "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    if LINGERING.fetch_add(1, Ordering::Relaxed) >= LINGERING_REFUSALS {
        LINGERING.fetch_sub(1, Ordering::Relaxed);
        let _ = tcp.try_write(answer.as_bytes());
        return;
    }
    tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            tcp.write_all(answer.as_bytes()).await?;
            tcp.shutdown().await?;
            let mut sink = [0u8; 1024];
            while tcp.read(&mut sink).await? > 0 {}
            std::io::Result::Ok(())
        })
        .await;
        LINGERING.fetch_sub(1, Ordering::Relaxed);
    });
}

/// What a route reads a request body under: its size limit (and the setting that names
/// it), and the time the whole body may take.
#[derive(Debug, Clone, Copy)]
struct BodyBound {
    limit: usize,
    setting: &'static str,
    timeout: Duration,
}

/// Bound a request's body: a declared `Content-Length` over the limit is answered 413 at
/// once, and a body that has not fully arrived within `body_timeout` (counted from the end
/// of the head) ends the request with 408. The handler's own read still enforces the limit
/// on bodies without a declared length.
///
/// A plain function returning a future, not an `async fn`, which would keep the request in
/// its state beside the future made of it for as long as a long-poll is parked (issue 18).
fn bound_body(
    State(bound): State<BodyBound>,
    req: Request,
    next: Next,
) -> impl Future<Output = Response> {
    if let Some(len) = req.body().size_hint().exact()
        && len > bound.limit as u64
    {
        let refusal = ApiError::too_large(format!(
            "request body of {len} bytes exceeds {} {}",
            bound.setting, bound.limit
        ))
        .into_response();
        return Either::Left(std::future::ready(refusal));
    }
    if req.body().is_end_stream() {
        return Either::Right(Either::Left(next.run(req)));
    }
    let expired = Arc::new(AtomicBool::new(false));
    let deadline = tokio::time::Instant::now() + bound.timeout;
    let (parts, body) = req.into_parts();
    let flag = expired.clone();
    // At the deadline the body fails (it must not just end: a prefix that parses would be
    // taken for the whole body).
    let data = futures_util::stream::unfold(Some(body.into_data_stream()), move |data| {
        let flag = flag.clone();
        async move {
            let mut data = data?;
            match tokio::time::timeout_at(deadline, data.next()).await {
                Ok(Some(chunk)) => Some((chunk, Some(data))),
                Ok(None) => None,
                Err(_) => {
                    flag.store(true, Ordering::Relaxed);
                    let timeout = axum::Error::new("request body timeout (body_timeout)");
                    Some((Err(timeout), None))
                }
            }
        }
    });
    let answer = next.run(Request::from_parts(parts, Body::from_stream(data)));
    Either::Right(Either::Right(async move {
        let res = answer.await;
        if expired.load(Ordering::Relaxed) {
            let mut res = ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                ErrorCode::BadRequest,
                format!(
                    "the request body did not arrive within body_timeout ({} ms)",
                    bound.timeout.as_millis()
                ),
            )
            .into_response();
            res.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
            return res;
        }
        res
    }))
}

/// Resolves once the server is shutting down (or its shutdown sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The `Ref` from `wait_for` is dropped here, not held across the caller's awaits.
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}

/// An accept error. A peer that gave up before we accepted is nothing; anything else (most
/// likely the open-files limit) is logged, and accepting pauses for a second so that a full
/// table does not turn into a busy loop.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accept failed; pausing accepts for 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// A started server.
#[derive(Debug)]
pub struct Running {
    addr: SocketAddr,
    wake_addr: Option<SocketAddr>,
    app: Arc<App>,
    engine: Arc<dyn Engine>,
    /// The open WebSocket connections, driven by one task per tokio worker.
    connections: Arc<transport::ws::Connections>,
    /// The certificate, when serving TLS.
    tls: Option<Arc<Tls>>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Running {
    /// The address actually bound (with the real port when 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The UDP address of the wake listener, if it runs.
    pub fn wake_addr(&self) -> Option<SocketAddr> {
        self.wake_addr
    }

    /// `http://ADDR`, or `https://ADDR` when serving TLS.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Whether the server speaks TLS (`Config::tls`).
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Read the TLS certificate and key again (`livepush serve` does on SIGHUP): new
    /// connections get the new certificate, open ones keep theirs. On error (a missing or
    /// bad file) nothing changes and the error says why. Without TLS, nothing to do.
    pub fn reload_tls(&self) -> Result<(), TlsError> {
        match &self.tls {
            Some(tls) => tls.reload(),
            None => Ok(()),
        }
    }

    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// The open WebSocket connections.
    pub fn connections(&self) -> &Arc<transport::ws::Connections> {
        &self.connections
    }

    /// Stop accepting, close every session with "going away" (WebSocket close 1001, parked
    /// long-polls answered, SSE streams ended), let requests in flight finish, and make
    /// everything the engine was given durable, all within the configured
    /// `shutdown_timeout`: connections get [`Config::shutdown_drain`] of it, and whatever
    /// is still open then is dropped.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        let drain = self.app.config.shutdown_drain();
        let connections = self.connections.clone();
        let task = &mut self.task;
        let drained = tokio::time::timeout(drain, async move {
            let _ = task.await;
            connections.ended().await;
        })
        .await;
        if drained.is_err() {
            tracing::warn!("shutdown deadline reached; dropping the connections still open");
            self.task.abort();
        }
        if let Err(e) = self.engine.flush().await {
            tracing::error!(error = %e, "store flush at shutdown failed");
        }
    }

    /// Run until the server task ends.
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Start a single-node server that keeps everything in memory.
pub async fn start(config: Config) -> Result<Running, ServerError> {
    start_with(config, Arc::new(MemoryStore::default())).await
}

/// Start a single-node server on a given store (the single-node engine over it).
pub async fn start_with(config: Config, store: Arc<dyn Store>) -> Result<Running, ServerError> {
    let engine = Arc::new(
        LocalEngine::new(
            store,
            Retention {
                max_messages: config.history_size,
                ttl: config.history_ttl,
            },
        )
        .with_room_limits(RoomLimits {
            idle: config.room_idle,
            max_rooms: config.max_rooms,
            sweep_rooms: config.store_sweep_rooms,
        }),
    );
    start_with_engine(config, engine).await
}

/// Start a server on an engine: what the nodes of a deployment share (rooms, and terminals'
/// inboxes through the sibling seam). The engine hands this node its events once it runs.
pub async fn start_with_engine<E: Engine + InboxEngine>(
    config: Config,
    engine: Arc<E>,
) -> Result<Running, ServerError> {
    let rooms: Arc<dyn Engine> = engine.clone();
    let inboxes: Arc<dyn InboxEngine> = engine;
    config.validate()?;
    // Before anything listens: a bad certificate fails the start.
    let tls = match &config.tls {
        Some(files) => Some(Arc::new(Tls::load(files.clone())?)),
        None => None,
    };
    let listener = listen(config.listen, config.limits.listen_backlog).map_err(|source| {
        ServerError::Bind {
            addr: config.listen,
            source,
        }
    })?;
    let addr = listener.local_addr().map_err(|source| ServerError::Bind {
        addr: config.listen,
        source,
    })?;
    let wake_bind = match config.wake_listen {
        WakeListen::Off => None,
        WakeListen::SameAsHttp => Some(addr),
        WakeListen::Addr(a) => Some(a),
    };
    let udp = match wake_bind {
        None => None,
        Some(a) => Some(
            UdpSocket::bind(a)
                .await
                .map_err(|source| ServerError::Bind { addr: a, source })?,
        ),
    };
    let wake_addr = udp.as_ref().and_then(|u| u.local_addr().ok());
    let keys = TokenKeys::new(&config.token_secret).with_max_ttl(config.limits.max_token_ttl);
    let wake_keys = WakeKeys::new(&config.token_secret);
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::new(rooms.stats(), rooms.store_commit_seconds()));
    let hub = Hub::new(config.clone(), rooms.clone(), metrics.clone());
    let limiters = Arc::new(Limiters::new(&config.limits));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let terminal_settings = TerminalSettings {
        flap_threshold: config.flap_threshold,
        flap_window: config.flap_window,
        flap_longpoll_for: config.flap_longpoll_for,
        poll_grace: config.poll_grace,
        retention: config.terminal_retention,
    };
    let terminals = Arc::new(if inboxes.shares_terminals() {
        Terminals::shared(terminal_settings)
    } else {
        Terminals::new(terminal_settings)
    });
    let wake_socket = udp.map(|u| {
        Arc::new(WakeSocket::new(
            u,
            wake_keys.clone(),
            config.wake_max_skew.as_millis() as u64,
            config.wake_rate_per_minute,
            config.wake_burst,
            metrics.wake.clone(),
        ))
    });
    let inboxes = Arc::new(Inboxes::new(
        inboxes,
        terminals.clone(),
        wake_socket.clone(),
        InboxSettings {
            max_messages: config.inbox_size,
            ttl: config.inbox_ttl,
            wake_retries: config.wake_retries,
            wake_retry_first: config.wake_retry_first,
            wake_retry_max: config.wake_retry_max,
        },
        metrics.inbox.clone(),
    ));
    match inboxes.load_pending().await {
        Ok(0) => {}
        Ok(n) => tracing::info!(terminals = n, "inboxes with waiting messages loaded"),
        Err(e) => tracing::error!(error = %e, "cannot list inboxes with waiting messages"),
    }
    if let Some(socket) = wake_socket.clone() {
        spawn_keepalives(socket, inboxes.clone(), shutdown_rx.clone());
    }
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    let sweep = crate::reactor::Sweep::new(&[
        config.heartbeat,
        config.heartbeat + config.heartbeat_timeout,
        config.limits.write_timeout,
    ]);
    let connections = Arc::new(
        transport::ws::Connections::start(workers, sweep, shutdown_rx.clone())
            .map_err(|e| ServerError::Reactor(e.to_string()))?,
    );
    let admin = Arc::new(crate::admin::Admin::new(
        config.limits.clone(),
        metrics.clone(),
        hub.clone(),
        terminals.clone(),
        inboxes.clone(),
    ));
    admin.clone().spawn_feed(shutdown_rx.clone());
    let app = Arc::new(App {
        config: config.clone(),
        metrics: metrics.clone(),
        hub: hub.clone(),
        keys,
        limiters: limiters.clone(),
        terminals: terminals.clone(),
        inboxes: inboxes.clone(),
        wake_keys,
        send_hook: config
            .send_hook
            .clone()
            .map(|s| Arc::new(crate::hooks::SendHook::new(s, metrics.hooks.clone()))),
        connect_hook: config.connect_hook.clone().map(|s| {
            Arc::new(crate::hooks::connect::ConnectHook::new(
                s,
                metrics.connect_hooks.clone(),
            ))
        }),
        shutdown: shutdown_rx.clone(),
        admin,
    });
    let node: Arc<dyn Node> = app.clone();
    rooms.attach(Arc::downgrade(&node));

    let addresses = limiters.addresses.clone();
    spawn_upkeep(
        config.limits.online_interval,
        hub,
        limiters,
        terminals,
        inboxes,
        wake_socket,
        shutdown_rx.clone(),
    );

    let header_timeout = config.limits.header_timeout;
    let task = tokio::spawn(serve(
        listener,
        tls.clone(),
        router(app.clone(), connections.clone()),
        addresses,
        header_timeout,
        config.shutdown_drain(),
        shutdown_rx,
    ));
    Ok(Running {
        addr,
        wake_addr,
        app,
        engine: rooms,
        connections,
        tls,
        shutdown: shutdown_tx,
        task,
    })
}

/// Online counts, history age and limiter cleanup, once per `online_interval`.
/// Bind the HTTP listener with an explicit accept backlog: a resume storm (thousands of
/// terminals reconnecting at once) must not find the kernel's queue full.
fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Receive keepalives of sleeping terminals and record where they can be woken.
fn spawn_keepalives(
    socket: Arc<WakeSocket>,
    inboxes: Arc<Inboxes>,
    mut stop: watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                r = socket.next_keepalive() => r,
            };
            match next {
                Ok(reg) => {
                    // A captured keepalive replayed from another address must not redirect
                    // wakes: only a newer one than the last accepted counts.
                    let last = inboxes.last_keepalive_ts(&reg.terminal).await;
                    if last.is_some_and(|t| reg.registration.ts <= t) {
                        socket.stats.keepalive("replayed");
                        continue;
                    }
                    // Several nodes: newer than any accepted anywhere (one atomic check in
                    // Redis). Without an answer it is not accepted: a registration that
                    // cannot be checked must not redirect wakes.
                    match inboxes
                        .accept_keepalive(&reg.terminal, &reg.registration)
                        .await
                    {
                        Ok(true) => {}
                        Ok(false) => {
                            socket.stats.keepalive("replayed");
                            continue;
                        }
                        Err(e) => {
                            socket.stats.keepalive("unavailable");
                            tracing::warn!(error = %e, "a keepalive could not be checked");
                            continue;
                        }
                    }
                    socket.stats.keepalive("accepted");
                    if let Err(e) = inboxes.keepalive(&reg.terminal, reg.registration).await {
                        tracing::error!(error = %e, "cannot record a wake registration");
                    }
                }
                // ICMP errors from earlier sends surface here on some systems: keep going.
                Err(e) => tracing::debug!(error = %e, "wake socket receive error"),
            }
        }
    });
}

fn spawn_upkeep(
    online_interval: Duration,
    hub: Arc<Hub>,
    limiters: Arc<Limiters>,
    terminals: Arc<Terminals>,
    inboxes: Arc<Inboxes>,
    wake: Option<Arc<WakeSocket>>,
    mut stop: watch::Receiver<bool>,
) {
    let every = online_interval;
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n: u64 = 0;
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = ticks.tick() => {}
            }
            hub.tick();
            inboxes.tick().await;
            inboxes.share_presence();
            n += 1;
            if n.is_multiple_of(60) {
                limiters.retain_recent();
                terminals.sweep();
                if let Some(w) = &wake {
                    w.retain_recent();
                }
            }
        }
    });
}

fn router(app: Arc<App>, connections: Arc<transport::ws::Connections>) -> Router {
    let limits = &app.config.limits;
    let bound = |limit, setting| {
        axum::middleware::from_fn_with_state(
            BodyBound {
                limit,
                setting,
                timeout: limits.body_timeout,
            },
            bound_body,
        )
    };
    let publish_bound = bound(limits.max_publish_bytes, "max_publish_bytes");
    let batch_bound = bound(limits.max_batch_bytes, "max_batch_bytes");
    let poll_bound = bound(limits.max_poll_bytes, "max_poll_bytes");
    let api = Router::new()
        .route("/v1/rooms/{room}/messages", post(api::publish))
        .route(
            "/v1/rooms/{room}/history",
            get(api::history).delete(api::reset_history),
        )
        .route("/v1/rooms/{room}", get(api::room_info))
        .route("/v1/terminals", get(api::terminals))
        .route("/v1/terminals/{id}", get(api::terminal))
        .route("/v1/terminals/{id}/messages", post(api::post_inbox))
        .route("/metrics", get(api::metrics))
        .route("/v1/admin/stats", get(api::admin::stats))
        .route("/v1/admin/token", post(api::admin::token))
        .route(
            "/v1/admin/log-level",
            get(api::loglevel::get).put(api::loglevel::put),
        )
        .route_layer(publish_bound)
        .route("/v1/publish", post(api::batch::publish).layer(batch_bound))
        .route_layer(axum::middleware::from_fn_with_state(
            app.clone(),
            api::require_api_key,
        ));
    Router::new()
        .merge(api)
        .route("/healthz", get(api::healthz))
        .route("/v1/openapi.json", api::openapi::route(limits))
        .route("/", get(assets::demo_html))
        .route("/livepush.js", get(assets::client_js))
        .route("/demo/app.js", get(assets::demo_js))
        .route("/demo/style.css", get(assets::demo_css))
        .route("/admin", get(assets::admin_html))
        .route("/admin/app.js", get(assets::admin_js))
        .route("/admin/style.css", get(assets::admin_css))
        .route(
            "/v1/connect",
            // GET (a WebSocket upgrade) and POST (a long-poll); any other method is a 405.
            on(
                MethodFilter::GET.or(MethodFilter::POST),
                move |State(app): State<Arc<App>>, req: Request| {
                    connect(app, connections.clone(), req)
                },
            )
            .layer(poll_bound.clone()),
        )
        .route("/v1/poll", post(poll).layer(poll_bound))
        .route("/v1/sse", get(sse))
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .with_state(app)
        .layer(axum::middleware::from_fn(crate::logctx::request_id))
}

/// `/v1/connect`: the one endpoint. A WebSocket upgrade gets a WebSocket session; a `POST`
/// without one is a long-poll exchange. (Not an `async fn`, which would keep the request in
/// its state for as long as a poll is parked: see `transport::longpoll`.)
fn connect(
    app: Arc<App>,
    connections: Arc<transport::ws::Connections>,
    req: Request,
) -> impl Future<Output = Response> {
    let wants_ws = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if !wants_ws && req.method() == axum::http::Method::POST {
        return Either::Left(transport::longpoll::poll(app, req));
    }
    let answer = if wants_ws {
        transport::ws::upgrade(app, connections, req)
    } else {
        ApiError::bad_request(
            "use a WebSocket upgrade (`Upgrade: websocket`) or POST a long-poll body",
        )
        .into_response()
    };
    Either::Right(std::future::ready(answer))
}

/// `POST /v1/poll`: a long-poll exchange. (Not an `async fn`, which would keep the request
/// in its state for as long as the poll is parked: see `transport::longpoll`.)
fn poll(State(app): State<Arc<App>>, req: Request) -> impl Future<Output = Response> {
    transport::longpoll::poll(app, req)
}

/// `GET /v1/sse`: a Server-Sent Events stream.
async fn sse(State(app): State<Arc<App>>, req: Request) -> Response {
    if let Err(e) = sse_positions(&req) {
        return e.into_response();
    }
    transport::sse::sse(app, req).await
}

/// The resume positions of an SSE request are checked whichever is used, so that a bad one is
/// refused, not ignored: a `Last-Event-ID` that is not visible ASCII, or a bad `since` beside
/// a `Last-Event-ID` (which wins over it).
fn sse_positions(req: &Request) -> Result<(), ApiError> {
    let Some(last_event_id) = req.headers().get("last-event-id") else {
        return Ok(());
    };
    if last_event_id.to_str().is_err() {
        return Err(ApiError::bad_request(
            "`Last-Event-ID` must be ROOM:EPOCH:SEQ positions",
        ));
    }
    let query =
        axum::extract::Query::<std::collections::HashMap<String, String>>::try_from_uri(req.uri());
    if let Ok(axum::extract::Query(q)) = query
        && let Some(since) = q.get("since")
    {
        livepush_proto::Positions::parse(since)
            .map_err(|e| ApiError::bad_request(format!("`since`: {e}")))?;
    }
    Ok(())
}
