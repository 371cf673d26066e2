//! Wiring: build the hub, the routes and the background upkeep, and run them on a listener.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api;
use crate::app::App;
use crate::assets;
use crate::auth::TokenKeys;
use crate::config::Config;
use crate::config::WakeListen;
use crate::engine::local::LocalEngine;
use crate::engine::{Engine, InboxEngine, Node, Retention};
use crate::error::ApiError;
use crate::hub::Hub;
use crate::inbox::{InboxSettings, Inboxes};
use crate::metrics::Metrics;
use crate::ratelimit::Limiters;
use crate::store::{MemoryStore, Store};
use crate::terminals::{TerminalSettings, Terminals};
use crate::transport;
use crate::wake::{WakeKeys, WakeSocket};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("invalid configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot create the WebSocket reactor's epoll set: {0}")]
    Reactor(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Accept connections and serve HTTP/1.1 on them until `stop`, then wait for the requests in
/// flight.
///
/// This is `axum::serve` without one layer. axum serves through hyper-util's automatic
/// HTTP/1-or-2 connection, which wraps the socket in a private type, so a WebSocket upgrade
/// comes out as a boxed socket behind two indirections (~180 bytes per connection for the
/// box and the wrapper). Serving HTTP/1.1 with hyper directly lets the WebSocket transport
/// take the `TcpStream` itself back ([`transport::ws`] downcasts the upgrade). livepush
/// speaks HTTP/1.1 only (WebSocket, long-poll and SSE all work over it).
async fn serve(
    listener: TcpListener,
    router: Router,
    header_timeout: Duration,
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
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => break,
        };
        // Nagle would only delay pushes: the outbox already coalesces them into few writes.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let service = TowerToHyperService::new(router.clone());
        let conn = http
            .serve_connection(TokioIo::new(tcp), service)
            .with_upgrades();
        let mut stop = stop.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let ended = tokio::select! {
                ended = conn.as_mut() => ended,
                () = stopped(&mut stop) => {
                    // Finish the request in flight, then close (long-polls answer at once on
                    // shutdown; upgraded connections are no longer hyper's).
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = ended {
                tracing::trace!(error = %e, "http connection ended with an error");
            }
            drop(done);
        });
    }
    drop(listener);
    drop(done);
    all_done.closed().await;
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

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// The open WebSocket connections.
    pub fn connections(&self) -> &Arc<transport::ws::Connections> {
        &self.connections
    }

    /// Stop accepting, close every session with "going away", wait for the server task, and
    /// make everything the engine was given durable.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
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
    let engine = Arc::new(LocalEngine::new(
        store,
        Retention {
            max_messages: config.history_size,
            ttl: config.history_ttl,
        },
    ));
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
    let metrics = Arc::new(Metrics::new());
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
    let app = Arc::new(App {
        config: config.clone(),
        metrics: metrics.clone(),
        hub: hub.clone(),
        keys,
        limiters: limiters.clone(),
        terminals: terminals.clone(),
        inboxes: inboxes.clone(),
        wake_keys,
        shutdown: shutdown_rx.clone(),
    });
    let node: Arc<dyn Node> = app.clone();
    rooms.attach(Arc::downgrade(&node));

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
        router(app.clone(), connections.clone()),
        header_timeout,
        shutdown_rx,
    ));
    Ok(Running {
        addr,
        wake_addr,
        app,
        engine: rooms,
        connections,
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
        .route_layer(axum::middleware::from_fn_with_state(
            app.clone(),
            api::require_api_key,
        ));
    Router::new()
        .merge(api)
        .route("/healthz", get(api::healthz))
        .route("/", get(assets::demo_html))
        .route("/livepush.js", get(assets::client_js))
        .route("/demo/app.js", get(assets::demo_js))
        .route("/demo/style.css", get(assets::demo_css))
        .route(
            "/v1/connect",
            any(move |State(app): State<Arc<App>>, req: Request| {
                let connections = connections.clone();
                async move { connect(app, connections, req).await }
            }),
        )
        .route("/v1/poll", post(poll))
        .route("/v1/sse", get(sse))
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .with_state(app)
}

/// `/v1/connect`: the one endpoint. A WebSocket upgrade gets a WebSocket session; a `POST`
/// without one is a long-poll exchange.
async fn connect(
    app: Arc<App>,
    connections: Arc<transport::ws::Connections>,
    req: Request,
) -> Response {
    let wants_ws = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if !wants_ws {
        if req.method() == axum::http::Method::POST {
            return transport::longpoll::poll(app, req).await;
        }
        return ApiError::bad_request(
            "use a WebSocket upgrade (`Upgrade: websocket`) or POST a long-poll body",
        )
        .into_response();
    }
    transport::ws::upgrade(app, connections, req)
}

/// `POST /v1/poll`: a long-poll exchange.
async fn poll(State(app): State<Arc<App>>, req: Request) -> Response {
    transport::longpoll::poll(app, req).await
}

/// `GET /v1/sse`: a Server-Sent Events stream.
async fn sse(State(app): State<Arc<App>>, req: Request) -> Response {
    transport::sse::sse(app, req).await
}
