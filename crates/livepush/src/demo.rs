//! `livepush demo`: drive rooms the way a live show does, and the demo page's first-run link
//! that `serve` prints.
//!
//! The show goes through the HTTP API (`POST /v1/publish`, one batch per tick): bursts of chat
//! and entry notices (transient), gifts and red envelopes now and then, a quiz with a
//! countdown and its answer, a stream switch, a mute and its unmute (reliable). Simulated
//! viewers are real WebSocket terminals (the Rust SDK) that come and go, so the online count
//! moves.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use livepush_client::{Client, ClientConfig, Event, TransportMode};
use livepush_proto::ErrorCode;
use livepush_server::auth::{Claims, TokenKeys, now_secs};
use rand::Rng;
use rand::seq::IndexedRandom;
use serde_json::{Value, json};

use crate::ServerArg;

// ---- `livepush demo` ---------------------------------------------------------------------------

/// One publish batch per tick.
const TICK: Duration = Duration::from_millis(100);
/// Most messages in one `POST /v1/publish` (the server's default cap is 1000).
const BATCH_MAX: usize = 500;
/// Most chat lines per second per room (`--chat-rate`).
const MAX_CHAT_RATE: f64 = 2000.0;
/// Most rooms one `livepush demo` drives.
const MAX_ROOMS: usize = 20;
/// Most simulated viewers (`--viewers`).
const MAX_VIEWERS: usize = 500;
/// A simulated viewer stays this long at most (and a third of it at least).
const VIEWER_STAY: Duration = Duration::from_secs(90);
/// A simulated viewer's token lives this long (it leaves well before).
const VIEWER_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// Chat comes in waves: this long hyped, at three times the rate ...
const HYPE: Duration = Duration::from_secs(2);
/// ... then this long calm, at half of it (on average, `--chat-rate`).
const CALM: Duration = Duration::from_secs(8);

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 30s, 1h)"))
}

fn rate(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if !v.is_finite() || v < 0.0 {
        return Err("must be a number, 0 or more".into());
    }
    Ok(v)
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    #[command(flatten)]
    server: ServerArg,
    /// The server's API key (the show is published through the HTTP API).
    #[arg(long, env = "LIVEPUSH_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The server's token secret, to mint the simulated viewers' tokens. Without it they
    /// connect without a token, which only `serve --dev` accepts.
    #[arg(long, env = "LIVEPUSH_TOKEN_SECRET", hide_env_values = true)]
    token_secret: Option<String>,
    /// Rooms to drive (comma-separated or repeated).
    #[arg(long, value_delimiter = ',', default_value = "live:demo")]
    rooms: Vec<String>,
    /// Chat lines (danmaku) per second per room, on average: waves of 2 s at three times it
    /// and 8 s calm at half of it. At most 2000.
    #[arg(long, default_value = "30", value_parser = rate)]
    chat_rate: f64,
    /// Entry notices per second per room (besides those of the simulated viewers).
    #[arg(long, default_value = "0.5", value_parser = rate)]
    enter_rate: f64,
    /// Gifts per second per room.
    #[arg(long, default_value = "0.4", value_parser = rate)]
    gift_rate: f64,
    /// Red envelopes per second per room.
    #[arg(long, default_value = "0.05", value_parser = rate)]
    envelope_rate: f64,
    /// Time between two quizzes in a room (the first comes after 3 s).
    #[arg(long, default_value = "40s", value_parser = duration)]
    quiz_every: Duration,
    /// A quiz's countdown; its answer is published when it ends.
    #[arg(long, default_value = "15s", value_parser = duration)]
    quiz_time: Duration,
    /// Time between two control steps in a room: a stream switch, then a mute (undone after
    /// --mute-for), in turn.
    #[arg(long, default_value = "30s", value_parser = duration)]
    control_every: Duration,
    /// How long a mute lasts before its unmute.
    #[arg(long, default_value = "5s", value_parser = duration)]
    mute_for: Duration,
    /// Simulated viewers: WebSocket terminals that join the rooms and come and go, between
    /// half and all of this many at once. At most 500.
    #[arg(long, default_value_t = 12)]
    viewers: usize,
    /// Stop after this long (default: until Ctrl-C).
    #[arg(long, value_parser = duration)]
    duration: Option<Duration>,
}

impl DemoArgs {
    fn check(&self) -> anyhow::Result<()> {
        if self.rooms.is_empty() || self.rooms.len() > MAX_ROOMS {
            bail!("--rooms: give 1 to {MAX_ROOMS} rooms");
        }
        for r in &self.rooms {
            livepush_proto::validate_room(r).map_err(|e| anyhow::anyhow!("--rooms {r:?}: {e}"))?;
        }
        if self.chat_rate > MAX_CHAT_RATE {
            bail!("--chat-rate: at most {MAX_CHAT_RATE} lines per second per room");
        }
        if self.viewers > MAX_VIEWERS {
            bail!("--viewers: at most {MAX_VIEWERS}");
        }
        for (name, d) in [
            ("--quiz-every", self.quiz_every),
            ("--quiz-time", self.quiz_time),
            ("--control-every", self.control_every),
            ("--mute-for", self.mute_for),
        ] {
            if d < TICK {
                bail!("{name}: at least {}", humantime::format_duration(TICK));
            }
        }
        if self.quiz_time >= self.quiz_every {
            bail!("--quiz-time must be shorter than --quiz-every");
        }
        if self.mute_for >= self.control_every {
            bail!("--mute-for must be shorter than --control-every");
        }
        Ok(())
    }
}

const NICKS: &[&str] = &[
    "alice",
    "bob",
    "carol",
    "dave",
    "erin",
    "frank",
    "小明",
    "小红",
    "阿强",
    "さくら",
    "ゆうき",
    "민준",
    "lena",
    "omar",
    "priya",
    "tomás",
    "zoë",
    "kai",
];
const LINES: &[&str] = &[
    "666",
    "hello from Berlin 👋",
    "主播好！",
    "哈哈哈哈",
    "🔥🔥🔥",
    "this song 😍",
    "gg",
    "こんにちは！",
    "안녕하세요",
    "first time here",
    "turn it up 🎶",
    "加油！",
    "wow 🚀",
    "lol",
    "❤️❤️",
    "who else is watching at 3am",
    "太强了",
    "nice one 👏",
];
const GIFTS: &[&str] = &[
    "rose",
    "heart",
    "lollipop",
    "star",
    "cake",
    "rocket",
    "crown",
    "diamond",
    "fireworks",
    "car",
];
const QUIZZES: &[(&str, &[&str], usize)] = &[
    (
        "Which planet has the most moons?",
        &["Jupiter", "Saturn", "Uranus"],
        1,
    ),
    ("How many strings does a violin have?", &["4", "5", "6"], 0),
    ("熊猫主要吃什么？", &["竹子", "鱼", "苹果"], 0),
    (
        "Which is the longest river?",
        &["Amazon", "Nile", "Yangtze"],
        1,
    ),
];
const STREAMS: &[&str] = &["main stage", "camera 2 · backstage", "1080p backup"];

/// Messages owed at a rate: the fraction left over carries to the next tick.
#[derive(Debug, Default)]
struct Owed(f64);

impl Owed {
    /// Add `rate` per second over `dt`; take the whole messages, at most `cap`.
    fn take(&mut self, rate: f64, dt: Duration, cap: usize) -> usize {
        self.0 += rate * dt.as_secs_f64();
        let n = (self.0.floor() as usize).min(cap);
        self.0 -= n as f64;
        // Past the cap, forget the backlog rather than build one.
        self.0 = self.0.min(1.0);
        n
    }
}

/// The chat rate's multiplier at `t` since start: a burst, then calm; 1 on average.
fn wave(t: Duration) -> f64 {
    let period = HYPE + CALM;
    let at = Duration::from_nanos((t.as_nanos() % period.as_nanos()) as u64);
    if at < HYPE { 3.0 } else { 0.5 }
}

/// What one room's show does next.
struct Show {
    room: String,
    chat: Owed,
    enter: Owed,
    gift: Owed,
    envelope: Owed,
    next_quiz: Duration,
    quiz: Option<(Duration, usize, u64)>,
    quizzes: u64,
    next_control: Duration,
    unmute_at: Option<Duration>,
    controls: usize,
}

fn msg(room: &str, ty: &str, data: Value) -> Value {
    json!({"room": room, "type": ty, "data": data})
}

impl Show {
    fn new(room: String, a: &DemoArgs) -> Show {
        Show {
            room,
            chat: Owed::default(),
            enter: Owed::default(),
            gift: Owed::default(),
            envelope: Owed::default(),
            next_quiz: Duration::from_secs(3).min(a.quiz_every),
            quiz: None,
            quizzes: 0,
            next_control: a.control_every,
            unmute_at: None,
            controls: 0,
        }
    }

    /// The messages of the tick at `t` (since start), `dt` after the previous one.
    fn tick<R: Rng>(&mut self, a: &DemoArgs, t: Duration, dt: Duration, rng: &mut R) -> Vec<Value> {
        let room = self.room.as_str();
        let nick = |rng: &mut R| *NICKS.choose(rng).unwrap_or(&"fan");
        let mut out = Vec::new();
        for _ in 0..self.chat.take(a.chat_rate * wave(t), dt, BATCH_MAX) {
            let text = *LINES.choose(rng).unwrap_or(&"hi");
            out.push(msg(room, "chat", json!({"from": nick(rng), "text": text})));
        }
        for _ in 0..self.enter.take(a.enter_rate, dt, 10) {
            out.push(msg(room, "enter", json!({"from": nick(rng)})));
        }
        for _ in 0..self.gift.take(a.gift_rate, dt, 10) {
            let gift = *GIFTS.choose(rng).unwrap_or(&"rose");
            let count = if rng.random_bool(0.2) {
                rng.random_range(2..=10)
            } else {
                1
            };
            out.push(msg(
                room,
                "gift",
                json!({"from": nick(rng), "gift": gift, "count": count}),
            ));
        }
        for _ in 0..self.envelope.take(a.envelope_rate, dt, 5) {
            let amount = format!(
                "¥{}.{:02}",
                rng.random_range(1..200),
                rng.random_range(0..100)
            );
            out.push(msg(
                room,
                "red_envelope",
                json!({"from": nick(rng), "amount": amount, "count": rng.random_range(5..50)}),
            ));
        }
        if let Some((ends, which, id)) = self.quiz
            && t >= ends
        {
            let (q, options, answer) = QUIZZES[which];
            out.push(msg(
                room,
                "quiz",
                json!({"id": id, "q": q, "options": options, "answer": options[answer]}),
            ));
            self.quiz = None;
        }
        if t >= self.next_quiz {
            self.quizzes += 1;
            let which = rng.random_range(0..QUIZZES.len());
            let (q, options, _) = QUIZZES[which];
            out.push(msg(
                room,
                "quiz",
                json!({"id": self.quizzes, "q": q, "options": options, "seconds": a.quiz_time.as_secs_f64()}),
            ));
            self.quiz = Some((t + a.quiz_time, which, self.quizzes));
            self.next_quiz = t + a.quiz_every;
        }
        if self.unmute_at.is_some_and(|u| t >= u) {
            out.push(msg(room, "control", json!({"action": "unmute"})));
            self.unmute_at = None;
        }
        if t >= self.next_control {
            self.controls += 1;
            if self.controls % 2 == 1 {
                let stream = STREAMS[(self.controls / 2) % STREAMS.len()];
                out.push(msg(
                    room,
                    "control",
                    json!({"action": "stream_switch", "stream": stream}),
                ));
            } else {
                out.push(msg(room, "control", json!({"action": "mute"})));
                self.unmute_at = Some(t + a.mute_for);
            }
            self.next_control = t + a.control_every;
        }
        out
    }
}

/// Entry notices of simulated viewers, waiting for the next batch.
type Entries = Arc<Mutex<Vec<Value>>>;

/// `POST /v1/publish` in batches of at most [`BATCH_MAX`]; a refused message is an error.
async fn publish(http: &reqwest::Client, a: &DemoArgs, messages: Vec<Value>) -> anyhow::Result<()> {
    let url = format!("{}/v1/publish", a.server.server.trim_end_matches('/'));
    for chunk in messages.chunks(BATCH_MAX) {
        let mut req = http.post(&url).json(&json!({"messages": chunk}));
        if let Some(k) = &a.api_key {
            req = req.bearer_auth(k);
        }
        let resp = req.send().await.with_context(|| {
            format!(
                "cannot reach the server at {url}: is `livepush serve` running there (--server)?"
            )
        })?;
        let status = resp.status();
        if status == reqwest::StatusCode::UNAUTHORIZED {
            bail!(
                "the server refused the API key (HTTP 401): pass the key `livepush serve` printed \
                 at start-up, or the one it was given (--api-key or LIVEPUSH_API_KEY)"
            );
        }
        let body: Value = resp
            .json()
            .await
            .with_context(|| format!("POST {url}: HTTP {status}, not a JSON answer"))?;
        if !status.is_success() {
            bail!("POST {url}: HTTP {status}: {body}");
        }
        let results = body["results"].as_array().cloned().unwrap_or_default();
        if let Some(e) = results.iter().find(|r| r.get("error").is_some()) {
            bail!("the server refused a message: {e}");
        }
    }
    Ok(())
}

/// One simulated viewer.
struct Viewer {
    client: Client,
    leaves_at: Instant,
}

/// Keeps between half and all of `--viewers` terminals in the rooms, coming and going.
struct Audience {
    server: String,
    keys: Option<TokenKeys>,
    rooms: Vec<String>,
    max: usize,
    viewers: Vec<Viewer>,
    target: usize,
    joined: u64,
    entries: Entries,
    refused: tokio::sync::mpsc::Sender<String>,
}

impl Audience {
    /// Once a second: viewers whose stay is over leave, the target wanders, newcomers arrive.
    async fn step<R: Rng>(&mut self, rng: &mut R) -> anyhow::Result<()> {
        let now = Instant::now();
        let (stay, gone): (Vec<Viewer>, Vec<Viewer>) = std::mem::take(&mut self.viewers)
            .into_iter()
            .partition(|v| v.leaves_at > now);
        self.viewers = stay;
        for v in gone {
            v.client.close().await;
        }
        let step = (self.max / 10).max(1);
        let low = self.max.div_ceil(2);
        self.target = (self.target + rng.random_range(0..=2 * step))
            .saturating_sub(step)
            .clamp(low, self.max);
        while self.viewers.len() > self.target {
            let v = self
                .viewers
                .swap_remove(rng.random_range(0..self.viewers.len()));
            v.client.close().await;
        }
        for _ in 0..step {
            if self.viewers.len() >= self.target {
                break;
            }
            self.arrive(rng).await?;
        }
        Ok(())
    }

    async fn arrive<R: Rng>(&mut self, rng: &mut R) -> anyhow::Result<()> {
        self.joined += 1;
        let room = &self.rooms[(self.joined as usize) % self.rooms.len()];
        let name = format!("{}-{}", NICKS.choose(rng).unwrap_or(&"viewer"), self.joined);
        let token = match &self.keys {
            Some(keys) => Some(
                keys.mint(&Claims {
                    sub: format!("demo-{}", self.joined),
                    exp: now_secs() + VIEWER_TOKEN_TTL.as_secs(),
                    rooms: vec![room.clone()],
                    send: false,
                })
                .context("minting a viewer token")?,
            ),
            None => None,
        };
        let (client, mut events) = Client::connect(ClientConfig {
            server: self.server.clone(),
            token,
            client_name: format!("livepush-demo/{}", env!("CARGO_PKG_VERSION")),
            transport: TransportMode::WebSocket,
            ..ClientConfig::default()
        })?;
        client.join(room, None).await?;
        let refused = self.refused.clone();
        tokio::spawn(async move {
            while let Some(e) = events.recv().await {
                if let Event::Error { code, message, .. } = e
                    && matches!(code, ErrorCode::Unauthorized | ErrorCode::Forbidden)
                {
                    let _ = refused.try_send(message);
                }
            }
        });
        if let Ok(mut entries) = self.entries.lock() {
            entries.push(msg(room, "enter", json!({"from": name})));
        }
        let stay = rng.random_range(VIEWER_STAY / 3..=VIEWER_STAY);
        self.viewers.push(Viewer {
            client,
            leaves_at: Instant::now() + stay,
        });
        Ok(())
    }

    async fn close(self) {
        for v in self.viewers {
            v.client.close().await;
        }
    }
}

pub async fn run(a: DemoArgs) -> anyhow::Result<()> {
    a.check()?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let entries: Entries = Arc::default();
    let (refused_tx, mut refused) = tokio::sync::mpsc::channel(1);
    let mut audience = Audience {
        server: a.server.server.clone(),
        keys: a.token_secret.as_deref().map(TokenKeys::new),
        rooms: a.rooms.clone(),
        max: a.viewers,
        viewers: Vec::new(),
        target: a.viewers,
        joined: 0,
        entries: Arc::clone(&entries),
        refused: refused_tx,
    };
    let mut shows: Vec<Show> = a.rooms.iter().map(|r| Show::new(r.clone(), &a)).collect();
    let mut rng = rand::rng();
    eprintln!(
        "livepush demo: driving {} on {} ({} chat lines/s per room, up to {} viewers){}",
        a.rooms.join(", "),
        a.server.server,
        a.chat_rate,
        a.viewers,
        a.duration
            .map(|d| format!(" for {}", humantime::format_duration(d)))
            .unwrap_or_default()
    );
    let start = Instant::now();
    let end = a.duration.map(|d| tokio::time::Instant::now() + d);
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut viewer_ticks = tokio::time::interval(Duration::from_secs(1));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut last = start;
    let mut published: u64 = 0;
    let result = loop {
        let deadline = async {
            match end {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = deadline => break Ok(()),
            _ = tokio::signal::ctrl_c() => break Ok(()),
            _ = term.recv() => break Ok(()),
            Some(why) = refused.recv() => break Err(anyhow::anyhow!(
                "the server refused a simulated viewer ({why}): pass --token-secret (or \
                 LIVEPUSH_TOKEN_SECRET: the secret `livepush serve` printed or was given), run \
                 against `livepush serve --dev`, or use --viewers 0"
            )),
            _ = viewer_ticks.tick(), if a.viewers > 0 => {
                if let Err(e) = audience.step(&mut rng).await {
                    break Err(e);
                }
            }
            _ = ticks.tick() => {
                let now = Instant::now();
                let (t, dt) = (now - start, now - last);
                last = now;
                let mut batch: Vec<Value> = entries
                    .lock()
                    .map(|mut e| std::mem::take(&mut *e))
                    .unwrap_or_default();
                for show in &mut shows {
                    batch.extend(show.tick(&a, t, dt, &mut rng));
                }
                if batch.is_empty() {
                    continue;
                }
                let n = batch.len() as u64;
                if let Err(e) = publish(&http, &a, batch).await {
                    break Err(e);
                }
                published += n;
            }
        }
    };
    audience.close().await;
    eprintln!(
        "livepush demo: {published} messages published in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        demo: DemoArgs,
    }

    fn args(extra: &[&str]) -> Result<DemoArgs, clap::Error> {
        let mut argv = vec!["demo"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).map(|c| c.demo)
    }

    #[test]
    fn demo_owed_keeps_the_rate_and_its_cap() {
        let mut o = Owed::default();
        let n: usize = (0..100)
            .map(|_| o.take(30.0, Duration::from_millis(100), 1000))
            .sum();
        assert_eq!(n, 300, "30 per second over 10 s");
        let mut o = Owed::default();
        assert_eq!(o.take(1e6, Duration::from_secs(1), 7), 7);
        assert!(o.0 <= 1.0, "no backlog past the cap");
    }

    #[test]
    fn demo_wave_averages_to_the_rate() {
        let step = Duration::from_millis(100);
        let n = (CALM + HYPE).as_millis() / step.as_millis();
        let mean: f64 = (0..n).map(|i| wave(step * i as u32)).sum::<f64>() / n as f64;
        assert!((mean - 1.0).abs() < 1e-9, "{mean}");
    }

    #[test]
    fn demo_show_runs_every_kind_of_message() {
        let a = args(&[
            "--chat-rate",
            "100",
            "--gift-rate",
            "2",
            "--envelope-rate",
            "1",
            "--quiz-every",
            "4s",
            "--quiz-time",
            "2s",
            "--control-every",
            "3s",
            "--mute-for",
            "1s",
        ])
        .unwrap();
        a.check().unwrap();
        let mut show = Show::new("live:demo".into(), &a);
        let mut rng = rand::rng();
        let mut all = Vec::new();
        for i in 1..=100u32 {
            all.extend(show.tick(&a, TICK * i, TICK, &mut rng));
        }
        let of = |ty: &str| all.iter().filter(|m| m["type"] == ty).count();
        assert!(of("chat") > 500, "{}", of("chat"));
        assert!(of("gift") >= 15 && of("red_envelope") >= 5);
        assert!(
            all.iter()
                .any(|m| m["type"] == "quiz" && m["data"]["seconds"] == 2.0)
        );
        assert!(
            all.iter()
                .any(|m| m["type"] == "quiz" && m["data"]["answer"].is_string())
        );
        for action in ["stream_switch", "mute", "unmute"] {
            assert!(
                all.iter().any(|m| m["data"]["action"] == action),
                "{action}"
            );
        }
        // Every control message is one the server accepts.
        for m in all.iter().filter(|m| m["type"] == "control") {
            let raw = serde_json::value::to_raw_value(&m["data"]).unwrap();
            livepush_server::control::Action::parse(&raw).unwrap();
        }
        assert!(all.iter().all(|m| m["room"] == "live:demo"));
    }

    #[test]
    fn demo_refuses_bad_settings() {
        for bad in [
            &["--chat-rate", "-1"][..],
            &["--chat-rate", "NaN"],
            &["--quiz-every", "soon"],
        ] {
            assert!(args(bad).is_err(), "{bad:?}");
        }
        for bad in [
            &["--chat-rate", "100000"][..],
            &["--viewers", "100000"],
            &["--rooms", "no room!"],
            &["--quiz-every", "5s", "--quiz-time", "5s"],
            &["--control-every", "0s"],
        ] {
            let err = args(bad).unwrap().check().unwrap_err().to_string();
            assert!(err.starts_with("--"), "{bad:?}: {err}");
        }
    }
}
