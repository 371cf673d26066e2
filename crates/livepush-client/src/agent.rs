//! [`WakeAgent`]: a terminal that is offline most of the time and is woken over UDP.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use livepush_proto::wake::{KEEPALIVE_PAD_TO, Keepalive, Wake, WakeError, WakeKey};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, sleep_until};
use tracing::{debug, info, warn};

use crate::{
    Backoff, Client, ClientConfig, ClientError, ErrorCode, Event, Events, InboxMessage,
    TransportMode,
};

/// A wake datagram for messages already acknowledged is ignored if it arrives this soon after
/// a session (it was in flight while the session took the messages).
const STALE_WAKE_WINDOW: Duration = Duration::from_secs(10);

/// Back-off after a failed session: first ceiling, and the cap (never beyond the safety net).
const RETRY_BASE: Duration = Duration::from_secs(5);
const RETRY_MAX: Duration = Duration::from_secs(300);

/// What a terminal needs to send keepalives without connecting first: its id and its wake
/// key (standard base64, as in the `connected` frame). Cache it between runs.
#[derive(Clone, PartialEq, Eq)]
pub struct WakeCredentials {
    pub terminal: String,
    pub wake_key: String,
}

impl std::fmt::Debug for WakeCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WakeCredentials")
            .field("terminal", &self.terminal)
            .field("wake_key", &"..")
            .finish()
    }
}

/// Settings of a [`WakeAgent`]. Build one with struct update syntax from the default.
#[derive(Debug, Clone)]
pub struct WakeAgentConfig {
    /// How each session connects: server URL, token, transport, timeouts, back-off. The
    /// transport may be anything but [`TransportMode::Sse`] (which cannot acknowledge).
    pub client: ClientConfig,
    /// Interval of keepalives while idle (one also goes out right after each session).
    /// Each keepalive is padded to at least [`KEEPALIVE_PAD_TO`] (256) bytes with a `pad`
    /// field the mac does not cover (contract v1.1, decision 1): the server never sends an
    /// address a wake datagram larger than the keepalive that earned it. Default 60 s.
    pub keepalive_interval: Duration,
    /// How long to stay connected after the inbox was taken, handling new messages as they
    /// come. Default 0: disconnect at once.
    pub linger: Duration,
    /// Connect on its own when this long has passed since the last session, in case wake
    /// datagrams were lost. `None` disables it. Default 15 min.
    pub safety_net: Option<Duration>,
    /// The server's UDP wake listener. Default (`None`): the host and port of
    /// [`ClientConfig::server`] (the server binds the HTTP port number on UDP), resolved at
    /// start.
    pub wake_addr: Option<SocketAddr>,
    /// Local address of the UDP socket. Default (`None`): any address of the wake
    /// listener's family, any port.
    pub udp_bind: Option<SocketAddr>,
    /// Credentials cached from an earlier run ([`AgentEvent::Credentials`]). Default `None`.
    pub credentials: Option<WakeCredentials>,
    /// Connect once at start even with cached credentials (takes messages that waited while
    /// the agent was not running). Ignored without credentials: the first connect is then
    /// needed to learn the wake key. Default `true`.
    pub connect_at_start: bool,
    /// Longest wait for the next inbox message while draining, a safety net: the
    /// `connected` frame says how many unacknowledged messages the server keeps
    /// (`pending`) and the newest seq, so the agent knows when it has them all; a message
    /// that expires on the server during the session never comes. Default 3 s.
    pub drain_timeout: Duration,
    /// Longest time a session may take to get `connected` (the client retries with its own
    /// back-off meanwhile); then the attempt fails and the agent goes idle. Default 30 s.
    pub connect_timeout: Duration,
    /// Events held for the application before the agent waits for it to read. Default 256.
    pub event_capacity: usize,
}

impl Default for WakeAgentConfig {
    fn default() -> Self {
        WakeAgentConfig {
            client: ClientConfig::default(),
            keepalive_interval: Duration::from_secs(60),
            linger: Duration::ZERO,
            safety_net: Some(Duration::from_secs(15 * 60)),
            wake_addr: None,
            udp_bind: None,
            credentials: None,
            connect_at_start: true,
            drain_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(30),
            event_capacity: 256,
        }
    }
}

/// Why a session started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnectReason {
    /// The agent started (to learn its wake key, and take what waited).
    Start,
    /// A verified wake datagram announced inbox messages up to `inbox`.
    Wake { inbox: u64 },
    /// The safety-net interval passed without a session.
    SafetyNet,
    /// Retry after a failed session.
    Retry,
    /// [`WakeAgent::wake_now`].
    Requested,
}

/// The agent's state (see the module documentation for the transitions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AgentState {
    /// Reaching the server.
    Connecting(ConnectReason),
    /// Connected, taking the messages the `connected` frame announced.
    Draining,
    /// Connected for the linger period, handling new messages.
    Lingering,
    /// No connection: only the UDP socket.
    Idle,
    /// Shut down (or the application dropped every handle or the event stream).
    Stopped,
}

impl std::fmt::Display for AgentState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentState::Connecting(ConnectReason::Start) => f.write_str("connecting (start)"),
            AgentState::Connecting(ConnectReason::Wake { inbox }) => {
                write!(f, "connecting (woken for inbox {inbox})")
            }
            AgentState::Connecting(ConnectReason::SafetyNet) => {
                f.write_str("connecting (safety net)")
            }
            AgentState::Connecting(ConnectReason::Retry) => f.write_str("connecting (retry)"),
            AgentState::Connecting(ConnectReason::Requested) => {
                f.write_str("connecting (requested)")
            }
            AgentState::Draining => f.write_str("draining"),
            AgentState::Lingering => f.write_str("lingering"),
            AgentState::Idle => f.write_str("idle"),
            AgentState::Stopped => f.write_str("stopped"),
        }
    }
}

impl AgentState {
    /// A short name: `connecting`, `draining`, `lingering`, `idle`, `stopped`.
    pub fn name(&self) -> &'static str {
        match self {
            AgentState::Connecting(_) => "connecting",
            AgentState::Draining => "draining",
            AgentState::Lingering => "lingering",
            AgentState::Idle => "idle",
            AgentState::Stopped => "stopped",
        }
    }
}

/// Why a datagram on the wake socket was ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IgnoreReason {
    /// Not a wake datagram.
    Malformed,
    /// The mac does not verify under the terminal's key (or no key is known yet).
    BadMac,
    /// A valid mac, but for another terminal id.
    WrongTerminal,
    /// Not newer than a wake already seen, and for messages already acknowledged.
    Replayed,
    /// For messages already acknowledged, just after the session that took them.
    AlreadyHandled,
    /// A valid wake that arrived while connected (the messages come over the session).
    WhileConnected,
}

/// What the agent reports to the application, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentEvent {
    /// The agent entered a state.
    State(AgentState),
    /// A direct message for the terminal, each seq once while the agent runs. It is
    /// acknowledged to the server once this event is queued.
    Inbox(InboxMessage),
    /// The server was told that every inbox message up to `seq` is handled.
    Acked { seq: u64 },
    /// The terminal id and wake key, learned at a connect (again when they change): cache
    /// them for the next start ([`WakeAgentConfig::credentials`]).
    Credentials(WakeCredentials),
    /// A datagram on the wake socket was ignored.
    Ignored {
        from: SocketAddr,
        reason: IgnoreReason,
    },
    /// A session failed (the agent goes idle and retries with back-off), or the server
    /// refused something. `code` is the server's error code when there is one.
    Error {
        code: Option<ErrorCode>,
        message: String,
    },
}

/// Counters of an agent ([`WakeAgent::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AgentStats {
    pub keepalives_sent: u64,
    pub keepalive_errors: u64,
    /// Verified wake datagrams that started a session.
    pub wakes: u64,
    /// Datagrams that failed verification: malformed or bad mac.
    pub forged: u64,
    /// Datagrams with a valid mac for another terminal id.
    pub wrong_terminal: u64,
    /// Verified wakes ignored: replays, already handled, or while connected.
    pub wakes_ignored: u64,
    /// Sessions started, and those that failed before `connected`.
    pub sessions: u64,
    pub failed_sessions: u64,
    /// Inbox messages handed to the application.
    pub inbox_messages: u64,
    /// The highest inbox seq acknowledged to the server by this agent.
    pub acked: u64,
}

/// Errors of [`WakeAgent::start`].
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{0}")]
    Config(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug)]
enum AgentCommand {
    WakeNow,
    Shutdown { reply: oneshot::Sender<()> },
}

#[derive(Debug, Default)]
struct Counters {
    keepalives_sent: AtomicU64,
    keepalive_errors: AtomicU64,
    wakes: AtomicU64,
    forged: AtomicU64,
    wrong_terminal: AtomicU64,
    wakes_ignored: AtomicU64,
    sessions: AtomicU64,
    failed_sessions: AtomicU64,
    inbox_messages: AtomicU64,
    acked: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

#[derive(Debug)]
struct AgentShared {
    counters: Counters,
    credentials: Mutex<Option<WakeCredentials>>,
    local_addr: SocketAddr,
    wake_addr: SocketAddr,
}

/// A terminal that is offline most of the time and is woken over UDP.
///
/// While idle the agent holds no TCP connection at all, only one UDP socket. From it, it sends
/// a signed keepalive to the server's wake listener every
/// [`keepalive_interval`](WakeAgentConfig::keepalive_interval) (and once right after each
/// session ends), so that the server knows where to wake it (and a NAT mapping stays open).
/// When a direct message arrives for it, the server sends a wake datagram to that address;
/// the agent verifies it (HMAC under the terminal's wake key), connects with a [`Client`],
/// takes its inbox (the server sends the unacknowledged messages right after `connected`),
/// hands every message to the application as [`AgentEvent::Inbox`], acknowledges them, and
/// disconnects at once or after [`linger`](WakeAgentConfig::linger).
///
/// ```text
///              start (no cached key, or connect_at_start)
///                 │
///                 ▼                 connected                 announced messages taken
///   ┌────────► Connecting ───────────────────────► Draining ─────────────┐ (or drain_timeout)
///   │             │  ▲ connection lost                 │                 ▼
///   │   failed /  │  └─────────────────────────────────┘         linger > 0 ? Lingering
///   │   timeout   ▼                                                      │ linger over,
///   │           Idle ◄───────────────────────────────────────────────────┘ or connection lost
///   │   (UDP only: keepalives, wake datagrams)
///   └── verified wake │ safety net │ retry after a failure │ WakeAgent::wake_now
/// ```
///
/// - [`AgentState::Connecting`]: a [`Client`] is trying to reach the server (it retries with
///   its own back-off) for at most [`connect_timeout`](WakeAgentConfig::connect_timeout).
/// - [`AgentState::Draining`]: connected; the `connected` frame announced the newest inbox
///   seq and how many unacknowledged messages the server still keeps (`pending`, contract
///   v1.1, decision 6). With `pending: 0` there is nothing to take (even when the newest seq
///   is above the acknowledged one: those messages expired) and the agent moves on at once;
///   otherwise it hands over and acknowledges messages until it has the newest one (the
///   server drops and expires the oldest first, so the newest is among those kept). Should
///   no message come for [`drain_timeout`](WakeAgentConfig::drain_timeout) (one expired
///   during the session), it moves on too.
/// - [`AgentState::Lingering`]: still connected for [`linger`](WakeAgentConfig::linger);
///   messages posted meanwhile arrive over the session (no wake needed) and are handled the
///   same way. A connection lost while lingering ends the session.
/// - [`AgentState::Idle`]: no TCP connection; the next session starts on a verified wake
///   datagram, when the [`safety_net`](WakeAgentConfig::safety_net) interval has passed
///   since the last session (in case wakes were lost), after a failed session (with
///   back-off), or on [`WakeAgent::wake_now`].
///
/// Datagrams that do not verify (bad mac, malformed, for another terminal), replays of a wake
/// already seen, and wakes for messages the agent has already acknowledged that arrive just
/// after its session are ignored, counted in [`AgentStats`] and reported as
/// [`AgentEvent::Ignored`].
///
/// The terminal's wake key comes in the server's `connected` frame, so an agent without a
/// cached [`WakeCredentials`] connects once at start. The key is reported as
/// [`AgentEvent::Credentials`]; pass it back in [`WakeAgentConfig::credentials`] at the next
/// start to skip that first connect (with
/// [`connect_at_start`](WakeAgentConfig::connect_at_start) `false`).
///
/// Delivery is at least once: a message is acknowledged only after its event was queued for
/// the application, so a session that breaks before the acknowledgement brings the message
/// again (the agent suppresses such repeats while it runs; a new process sees them again).
///
/// Over long-polling each session ends with a `bye` poll (see [`Client::close`]), so the
/// server shows the terminal offline, and can wake it, at once. Server-Sent Events cannot
/// acknowledge and are refused.
///
/// ```no_run
/// use livepush_client::{AgentEvent, ClientConfig, WakeAgent, WakeAgentConfig};
///
/// # async fn demo() -> Result<(), livepush_client::AgentError> {
/// let (agent, mut events) = WakeAgent::start(WakeAgentConfig {
///     client: ClientConfig {
///         server: "http://127.0.0.1:8080".into(),
///         token: Some("eyJhbGciOi...".into()),
///         ..ClientConfig::default()
///     },
///     ..WakeAgentConfig::default()
/// })
/// .await?;
/// while let Some(event) = events.recv().await {
///     match event {
///         AgentEvent::Inbox(m) => println!("#{} {}: {}", m.seq, m.ty, m.data),
///         AgentEvent::State(s) => eprintln!("{s}"),
///         _ => {}
///     }
/// }
/// # drop(agent);
/// # Ok(())
/// # }
/// ```
///
/// This is a handle to a running agent. Cheap to clone. The agent runs until
/// [`shutdown`](WakeAgent::shutdown), until every handle is dropped, or until the
/// [`AgentEvents`] stream is dropped.
#[derive(Debug, Clone)]
pub struct WakeAgent {
    cmds: mpsc::Sender<AgentCommand>,
    shared: Arc<AgentShared>,
    state: watch::Receiver<AgentState>,
}

/// The stream of [`AgentEvent`]s. Read it promptly: when
/// [`event_capacity`](WakeAgentConfig::event_capacity) events are waiting, the agent waits
/// (and does not acknowledge further messages). Also a [`futures_util::Stream`].
pub type AgentEvents = crate::EventStream<AgentEvent>;

impl WakeAgent {
    /// Validate `config`, resolve the wake listener, bind the UDP socket and start the agent.
    /// Must be called inside a Tokio runtime. The first session (if any) starts at once.
    pub async fn start(config: WakeAgentConfig) -> Result<(WakeAgent, AgentEvents), AgentError> {
        if config.client.transport == TransportMode::Sse {
            return Err(ClientError::Unsupported(
                "a wake agent acknowledges its inbox, which Server-Sent Events cannot".into(),
            )
            .into());
        }
        if config.keepalive_interval.is_zero() {
            return Err(AgentError::Config(
                "the keepalive interval must be greater than 0".into(),
            ));
        }
        let ws = config.client.ws_url()?;
        config.client.poll_url()?;
        if let Some(c) = &config.credentials {
            WakeKey::from_base64(&c.wake_key)
                .map_err(|e| AgentError::Config(format!("cached wake key: {e}")))?;
        }
        tokio::runtime::Handle::try_current().map_err(|_| ClientError::NoRuntime)?;
        let wake_addr = match config.wake_addr {
            Some(a) => a,
            None => {
                let host = ws
                    .host_str()
                    .ok_or_else(|| AgentError::Config("the server URL has no host".into()))?
                    .trim_matches(['[', ']'])
                    .to_owned();
                let port = ws.port_or_known_default().unwrap_or(80);
                tokio::net::lookup_host((host.as_str(), port))
                    .await
                    .map_err(|source| AgentError::Io {
                        what: format!("resolving {host}"),
                        source,
                    })?
                    .next()
                    .ok_or_else(|| AgentError::Config(format!("{host} has no address")))?
            }
        };
        let bind = config.udp_bind.unwrap_or(match wake_addr {
            SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
        });
        let udp = UdpSocket::bind(bind)
            .await
            .map_err(|source| AgentError::Io {
                what: format!("binding UDP {bind}"),
                source,
            })?;
        let local_addr = udp.local_addr().map_err(|source| AgentError::Io {
            what: "UDP local address".into(),
            source,
        })?;
        let shared = Arc::new(AgentShared {
            counters: Counters::default(),
            credentials: Mutex::new(config.credentials.clone()),
            local_addr,
            wake_addr,
        });
        let (cmd_tx, cmd_rx) = mpsc::channel(8);
        let (ev_tx, ev_rx) = mpsc::channel(config.event_capacity.max(1));
        let (state_tx, state_rx) = watch::channel(AgentState::Idle);
        let key = config
            .credentials
            .as_ref()
            .and_then(|c| WakeKey::from_base64(&c.wake_key).ok());
        let task = Task {
            key,
            credentials: config.credentials.clone(),
            config,
            udp,
            shared: shared.clone(),
            cmds: cmd_rx,
            events: ev_tx,
            state: state_tx,
            handed: 0,
            acked: 0,
            last_keepalive_ts: 0,
            newest_wake_ts: 0,
            last_session_end: None,
            retry: Backoff::new(RETRY_BASE, RETRY_MAX),
            retry_at: None,
            rng: StdRng::from_os_rng(),
            shutdown: None,
        };
        tokio::spawn(task.run());
        Ok((
            WakeAgent {
                cmds: cmd_tx,
                shared,
                state: state_rx,
            },
            crate::EventStream::new(ev_rx),
        ))
    }

    /// The current state.
    pub fn state(&self) -> AgentState {
        *self.state.borrow()
    }

    /// A receiver of state changes (the latest state only; every change also comes as
    /// [`AgentEvent::State`]).
    pub fn watch_state(&self) -> watch::Receiver<AgentState> {
        self.state.clone()
    }

    /// The local address of the UDP socket (where wake datagrams arrive).
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// The server's wake listener the keepalives go to.
    pub fn wake_addr(&self) -> SocketAddr {
        self.shared.wake_addr
    }

    /// The terminal id and wake key, once known.
    pub fn credentials(&self) -> Option<WakeCredentials> {
        self.shared
            .credentials
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The counters so far.
    pub fn stats(&self) -> AgentStats {
        let c = &self.shared.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        AgentStats {
            keepalives_sent: g(&c.keepalives_sent),
            keepalive_errors: g(&c.keepalive_errors),
            wakes: g(&c.wakes),
            forged: g(&c.forged),
            wrong_terminal: g(&c.wrong_terminal),
            wakes_ignored: g(&c.wakes_ignored),
            sessions: g(&c.sessions),
            failed_sessions: g(&c.failed_sessions),
            inbox_messages: g(&c.inbox_messages),
            acked: g(&c.acked),
        }
    }

    /// Start a session now if idle (as if woken). Does nothing while connected.
    pub async fn wake_now(&self) -> Result<(), ClientError> {
        self.cmds
            .send(AgentCommand::WakeNow)
            .await
            .map_err(|_| ClientError::Closed)
    }

    /// Stop: a session in progress is closed cleanly (unacknowledged messages stay on the
    /// server), then the event stream ends. Returns once stopped.
    pub async fn shutdown(self) {
        let (reply, done) = oneshot::channel();
        if self
            .cmds
            .send(AgentCommand::Shutdown { reply })
            .await
            .is_ok()
        {
            let _ = done.await;
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What to do after a state.
enum Next {
    Connect(ConnectReason),
    Idle,
    Stop,
}

/// The phase of a session.
#[derive(Debug, Clone, Copy)]
enum Phase {
    Connecting { until: Instant },
    Draining { target: u64, quiet_until: Instant },
    Lingering { until: Instant },
}

/// A classified datagram.
enum Datagram {
    Wake(Wake),
    Ignored(IgnoreReason),
}

struct Task {
    config: WakeAgentConfig,
    udp: UdpSocket,
    shared: Arc<AgentShared>,
    cmds: mpsc::Receiver<AgentCommand>,
    events: mpsc::Sender<AgentEvent>,
    state: watch::Sender<AgentState>,
    credentials: Option<WakeCredentials>,
    key: Option<WakeKey>,
    /// Highest inbox seq handed to the application.
    handed: u64,
    /// Highest inbox seq the server is known to have acknowledged.
    acked: u64,
    last_keepalive_ts: u64,
    /// Newest `ts` of a verified wake.
    newest_wake_ts: u64,
    last_session_end: Option<Instant>,
    retry: Backoff,
    /// After a failed session: when to try again.
    retry_at: Option<Instant>,
    rng: StdRng,
    /// A shutdown request, answered once stopped.
    shutdown: Option<oneshot::Sender<()>>,
}

/// Stop now: the application is gone (event stream or every handle dropped), or asked to
/// shut down (the reply is then in [`Task::shutdown`]).
struct Halt;

/// How a session ended: the next step, or a failure before `connected` (the server's error
/// code if it refused, and why).
type SessionEnd = Result<Next, (Option<ErrorCode>, String)>;

impl Task {
    async fn run(mut self) {
        let mut next = if self.key.is_none() || self.config.connect_at_start {
            Next::Connect(ConnectReason::Start)
        } else {
            Next::Idle
        };
        loop {
            let result = match next {
                Next::Connect(reason) => self.session(reason).await,
                Next::Idle => self.idle().await,
                Next::Stop => break,
            };
            next = result.unwrap_or(Next::Stop);
        }
        self.state.send_replace(AgentState::Stopped);
        let _ = self.events.try_send(AgentEvent::State(AgentState::Stopped));
        if let Some(reply) = self.shutdown.take() {
            let _ = reply.send(());
        }
    }

    /// Queue an event for the application, waiting while its queue is full; a shutdown
    /// request meanwhile is honoured.
    async fn emit(&mut self, e: AgentEvent) -> Result<(), Halt> {
        let Task { events, cmds, .. } = self;
        let send = events.send(e);
        tokio::pin!(send);
        loop {
            tokio::select! {
                r = &mut send => return r.map_err(|_| Halt),
                cmd = cmds.recv() => match cmd {
                    Some(AgentCommand::WakeNow) => {}
                    Some(AgentCommand::Shutdown { reply }) => {
                        self.shutdown = Some(reply);
                        return Err(Halt);
                    }
                    None => return Err(Halt),
                },
            }
        }
    }

    /// A command arrived: `Some(next)` when it ends the current state.
    fn command(&mut self, cmd: Option<AgentCommand>, idle: bool) -> Option<Next> {
        match cmd {
            Some(AgentCommand::WakeNow) if idle => Some(Next::Connect(ConnectReason::Requested)),
            Some(AgentCommand::WakeNow) => None,
            Some(AgentCommand::Shutdown { reply }) => {
                self.shutdown = Some(reply);
                Some(Next::Stop)
            }
            None => Some(Next::Stop),
        }
    }

    async fn set_state(&mut self, s: AgentState) -> Result<(), Halt> {
        debug!(state = %s, "wake agent");
        self.state.send_replace(s);
        self.emit(AgentEvent::State(s)).await
    }

    fn terminal(&self) -> Option<&str> {
        self.credentials.as_ref().map(|c| c.terminal.as_str())
    }

    /// Send a keepalive now (no-op without credentials).
    async fn keepalive(&mut self) {
        let (Some(key), Some(terminal)) = (&self.key, self.terminal()) else {
            return;
        };
        // Strictly increasing: the server refuses a keepalive not newer than the last one.
        let ts = now_ms().max(self.last_keepalive_ts + 1);
        let d = Keepalive::encode(terminal, ts, key, KEEPALIVE_PAD_TO);
        match self.udp.send_to(&d, self.shared.wake_addr).await {
            Ok(_) => {
                self.last_keepalive_ts = ts;
                bump(&self.shared.counters.keepalives_sent);
            }
            Err(e) => {
                debug!(error = %e, "wake agent: keepalive not sent");
                bump(&self.shared.counters.keepalive_errors);
            }
        }
    }

    /// Verify a datagram and decide whether it is a wake to act on (`idle`).
    fn classify(&mut self, d: &[u8], idle: bool) -> Datagram {
        let c = &self.shared.counters;
        let Some(key) = &self.key else {
            bump(&c.forged);
            return Datagram::Ignored(IgnoreReason::BadMac);
        };
        let w = match Wake::verify(d, key) {
            Ok(w) => w,
            Err(e) => {
                bump(&c.forged);
                return Datagram::Ignored(match e {
                    WakeError::Malformed(_) => IgnoreReason::Malformed,
                    _ => IgnoreReason::BadMac,
                });
            }
        };
        if Some(w.terminal.as_str()) != self.terminal() {
            bump(&c.wrong_terminal);
            return Datagram::Ignored(IgnoreReason::WrongTerminal);
        }
        let newest = self.newest_wake_ts;
        self.newest_wake_ts = newest.max(w.ts);
        if !idle {
            bump(&c.wakes_ignored);
            return Datagram::Ignored(IgnoreReason::WhileConnected);
        }
        let handled = w.inbox <= self.handed.max(self.acked);
        if handled && w.ts <= newest {
            bump(&c.wakes_ignored);
            return Datagram::Ignored(IgnoreReason::Replayed);
        }
        if handled
            && self
                .last_session_end
                .is_some_and(|t| t.elapsed() < STALE_WAKE_WINDOW)
        {
            bump(&c.wakes_ignored);
            return Datagram::Ignored(IgnoreReason::AlreadyHandled);
        }
        bump(&c.wakes);
        Datagram::Wake(w)
    }

    /// Report an ignored datagram without ever blocking on the application (a flood of
    /// forgeries must not stall the agent).
    fn ignored(&self, from: SocketAddr, reason: IgnoreReason) {
        debug!(%from, ?reason, "wake agent: datagram ignored");
        let _ = self.events.try_send(AgentEvent::Ignored { from, reason });
    }

    fn next_connect(&self) -> Option<(Instant, ConnectReason)> {
        let safety = self.config.safety_net.map(|d| {
            (
                self.last_session_end.unwrap_or_else(Instant::now) + d,
                ConnectReason::SafetyNet,
            )
        });
        let retry = self.retry_at.map(|t| (t, ConnectReason::Retry));
        match (safety, retry) {
            (Some(s), Some(r)) => Some(if r.0 < s.0 { r } else { s }),
            (s, r) => s.or(r),
        }
    }

    async fn idle(&mut self) -> Result<Next, Halt> {
        // The keepalive right after a session goes out before `Idle` is reported.
        self.keepalive().await;
        self.set_state(AgentState::Idle).await?;
        let interval = self.config.keepalive_interval;
        let mut next_keepalive = Instant::now() + interval;
        let next_connect = self.next_connect();
        let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);
        let mut buf = [0u8; 2048];
        loop {
            tokio::select! {
                r = self.udp.recv_from(&mut buf) => match r {
                    Ok((n, from)) => match self.classify(&buf[..n], true) {
                        Datagram::Wake(w) => {
                            info!(inbox = w.inbox, "wake agent woken");
                            return Ok(Next::Connect(ConnectReason::Wake { inbox: w.inbox }));
                        }
                        Datagram::Ignored(reason) => self.ignored(from, reason),
                    },
                    // ICMP errors of earlier sends surface here on some systems.
                    Err(e) => debug!(error = %e, "wake agent: UDP receive error"),
                },
                _ = sleep_until(next_keepalive) => {
                    self.keepalive().await;
                    next_keepalive = Instant::now() + interval;
                }
                _ = sleep_until(next_connect.map_or(far, |(t, _)| t)) => {
                    if let Some((_, reason)) = next_connect {
                        return Ok(Next::Connect(reason));
                    }
                }
                cmd = self.cmds.recv() => {
                    if let Some(next) = self.command(cmd, true) {
                        return Ok(next);
                    }
                }
            }
        }
    }

    /// One session: connect, drain, linger, close. Always closes the client.
    async fn session(&mut self, reason: ConnectReason) -> Result<Next, Halt> {
        self.retry_at = None;
        bump(&self.shared.counters.sessions);
        self.set_state(AgentState::Connecting(reason)).await?;
        let (client, mut events) = match Client::connect(self.config.client.clone()) {
            Ok(c) => c,
            Err(e) => return self.failed(None, e.to_string()).await,
        };
        let outcome = self.session_loop(reason, &client, &mut events).await;
        client.close().await;
        self.last_session_end = Some(Instant::now());
        match outcome? {
            Ok(next) => {
                self.retry.reset();
                Ok(next)
            }
            Err((code, message)) => self.failed(code, message).await,
        }
    }

    async fn failed(&mut self, code: Option<ErrorCode>, message: String) -> Result<Next, Halt> {
        bump(&self.shared.counters.failed_sessions);
        let mut delay = self
            .retry
            .next_delay(&mut self.rng)
            .max(Duration::from_secs(1));
        if let Some(s) = self.config.safety_net {
            delay = delay.min(s);
        }
        warn!(%message, retry_in = ?delay, "wake agent: session failed");
        self.retry_at = Some(Instant::now() + delay);
        self.emit(AgentEvent::Error { code, message }).await?;
        Ok(Next::Idle)
    }

    /// The body of a session. `Ok(Ok(next))`: done; `Ok(Err(..))`: failed before
    /// `connected`; `Err(Halt)`: stop now.
    async fn session_loop(
        &mut self,
        reason: ConnectReason,
        client: &Client,
        events: &mut Events,
    ) -> Result<SessionEnd, Halt> {
        let connect_timeout = self.config.connect_timeout;
        let mut phase = Phase::Connecting {
            until: Instant::now() + connect_timeout,
        };
        let mut ever_connected = false;
        let mut buf = [0u8; 2048];
        loop {
            // Transitions that need no input.
            if let Phase::Draining { target, .. } = phase
                && self.handed.max(self.acked) >= target
            {
                phase = self.after_drain().await?;
            }
            if let Phase::Lingering { until } = phase
                && until <= Instant::now()
            {
                return Ok(Ok(Next::Idle));
            }
            let deadline = match phase {
                Phase::Connecting { until } => until,
                Phase::Draining { quiet_until, .. } => quiet_until,
                Phase::Lingering { until } => until,
            };
            tokio::select! {
                ev = events.recv() => {
                    let Some(ev) = ev else {
                        return Ok(Err((None, "the client stopped".into())));
                    };
                    match ev {
                        Event::Connected { .. } => {
                            let Some(info) = client.session() else { continue };
                            ever_connected = true;
                            if info.inbox.seq < self.handed {
                                // The server's inbox restarted: follow it.
                                self.handed = info.inbox.acked;
                            }
                            self.acked = info.inbox.acked;
                            self.learn(&info.terminal, &info.wake_key).await?;
                            if self.handed > self.acked {
                                // Handed over in an earlier connection, not acknowledged.
                                self.ack(client).await?;
                            }
                            // Nothing kept unacknowledged: drained already, whatever
                            // the newest seq says (the rest expired or was dropped).
                            let target = if info.inbox.pending == 0 { 0 } else { info.inbox.seq };
                            phase = Phase::Draining {
                                target,
                                quiet_until: Instant::now() + self.config.drain_timeout,
                            };
                            self.set_state(AgentState::Draining).await?;
                        }
                        Event::Inbox(m) => {
                            let seq = m.seq;
                            if seq > self.handed {
                                self.emit(AgentEvent::Inbox(m)).await?;
                                self.handed = seq;
                                bump(&self.shared.counters.inbox_messages);
                            }
                            if self.handed > self.acked {
                                self.ack(client).await?;
                            }
                            if let Phase::Draining { target, .. } = phase {
                                phase = Phase::Draining {
                                    target,
                                    quiet_until: Instant::now() + self.config.drain_timeout,
                                };
                            }
                        }
                        Event::Disconnected { reason: why, retry_in } => {
                            debug!(%why, ?retry_in, "wake agent: connection lost");
                            match phase {
                                // Still waiting for announced messages: reconnect.
                                Phase::Draining { .. } => {
                                    phase = Phase::Connecting {
                                        until: Instant::now() + connect_timeout,
                                    };
                                    self.set_state(AgentState::Connecting(reason)).await?;
                                }
                                // Lingering only waits for news: leave it to a wake.
                                Phase::Lingering { .. } => return Ok(Ok(Next::Idle)),
                                Phase::Connecting { .. } => {}
                            }
                        }
                        Event::Error { code, message, .. } => {
                            if !ever_connected
                                && matches!(code, ErrorCode::Unauthorized | ErrorCode::Forbidden)
                            {
                                return Ok(Err((Some(code), message)));
                            }
                            self.emit(AgentEvent::Error { code: Some(code), message }).await?;
                        }
                        _ => {}
                    }
                }
                _ = sleep_until(deadline) => match phase {
                    Phase::Connecting { .. } if ever_connected => {
                        // Lost while draining and not back in time: what is unacknowledged
                        // stays on the server and wakes the terminal again.
                        return Ok(Ok(Next::Idle));
                    }
                    Phase::Connecting { .. } => {
                        return Ok(Err((
                            None,
                            format!("not connected within {connect_timeout:?}"),
                        )));
                    }
                    Phase::Draining { target, .. } => {
                        debug!(
                            target,
                            have = self.handed.max(self.acked),
                            "wake agent: announced inbox messages did not all come (expired?)"
                        );
                        phase = self.after_drain().await?;
                    }
                    Phase::Lingering { .. } => return Ok(Ok(Next::Idle)),
                },
                r = self.udp.recv_from(&mut buf) => match r {
                    Ok((n, from)) => {
                        if let Datagram::Ignored(reason) = self.classify(&buf[..n], false) {
                            self.ignored(from, reason);
                        }
                    }
                    Err(e) => debug!(error = %e, "wake agent: UDP receive error"),
                },
                cmd = self.cmds.recv() => {
                    if let Some(next) = self.command(cmd, false) {
                        return Ok(Ok(next));
                    }
                }
            }
        }
    }

    /// Leaving `Draining`: linger, or end the session (signalled by a lingering phase that
    /// is already over).
    async fn after_drain(&mut self) -> Result<Phase, Halt> {
        let linger = self.config.linger;
        if !linger.is_zero() {
            self.set_state(AgentState::Lingering).await?;
        }
        Ok(Phase::Lingering {
            until: Instant::now() + linger,
        })
    }

    /// Acknowledge everything handed over.
    async fn ack(&mut self, client: &Client) -> Result<(), Halt> {
        let seq = self.handed;
        match client.ack_inbox(seq).await {
            Ok(()) => {
                self.acked = seq;
                self.shared.counters.acked.fetch_max(seq, Ordering::Relaxed);
                self.emit(AgentEvent::Acked { seq }).await
            }
            // Not connected: acknowledged after the reconnect (see `Connected`).
            Err(e) => {
                debug!(error = %e, seq, "wake agent: ack not sent");
                Ok(())
            }
        }
    }

    /// Keep the credentials of a `connected` frame.
    async fn learn(&mut self, terminal: &str, wake_key: &str) -> Result<(), Halt> {
        let key = match WakeKey::from_base64(wake_key) {
            Ok(k) => k,
            Err(e) => {
                return self
                    .emit(AgentEvent::Error {
                        code: None,
                        message: format!(
                            "the server sent no usable wake key ({e}): this terminal cannot be woken"
                        ),
                    })
                    .await;
            }
        };
        let creds = WakeCredentials {
            terminal: terminal.to_owned(),
            wake_key: wake_key.to_owned(),
        };
        if self.credentials.as_ref() == Some(&creds) {
            return Ok(());
        }
        self.key = Some(key);
        self.credentials = Some(creds.clone());
        *self
            .shared
            .credentials
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(creds.clone());
        self.emit(AgentEvent::Credentials(creds)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use livepush_proto::wake::MAX_WAKE_BYTES;

    /// Contract v1.1, decision 1: a keepalive is at least as large as any wake datagram (the
    /// server never answers with more bytes than it received), padded with a `pad` field that
    /// the mac does not cover.
    #[tokio::test]
    async fn keepalives_are_padded_to_the_largest_wake() {
        let server = UdpSocket::bind("127.0.0.1:0").await.expect("udp");
        let key = WakeKey::from_bytes(b"0123456789abcdef0123456789abcdef".to_vec());
        let (agent, _events) = WakeAgent::start(WakeAgentConfig {
            wake_addr: Some(server.local_addr().expect("addr")),
            udp_bind: Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))),
            credentials: Some(WakeCredentials {
                terminal: "t1".into(),
                wake_key: key.to_base64(),
            }),
            connect_at_start: false,
            safety_net: None,
            ..WakeAgentConfig::default()
        })
        .await
        .expect("agent");
        let mut buf = [0u8; 2048];
        let (n, from) = tokio::time::timeout(Duration::from_secs(5), server.recv_from(&mut buf))
            .await
            .expect("a keepalive as the agent goes idle")
            .expect("recv");
        assert_eq!(from, agent.local_addr());
        let datagram = &buf[..n];
        assert!(
            n >= MAX_WAKE_BYTES,
            "a keepalive of {n} bytes earns no wake"
        );
        let mut v: serde_json::Value = serde_json::from_slice(datagram).expect("JSON");
        assert!(
            v["pad"].as_str().is_some_and(|p| !p.is_empty()),
            "padded with `pad`: {v}"
        );
        let keepalive = Keepalive::parse(datagram).expect("a keepalive");
        assert_eq!(keepalive.terminal, "t1");
        keepalive.verify(&key, now_ms(), 60_000).expect("mac");
        // The mac covers `T|MS` only: the server checks it whatever the padding.
        v["pad"] = serde_json::json!("");
        Keepalive::parse(&serde_json::to_vec(&v).expect("JSON"))
            .expect("a keepalive")
            .verify(&key, now_ms(), 60_000)
            .expect("mac without the pad");
        agent.shutdown().await;
    }
}
