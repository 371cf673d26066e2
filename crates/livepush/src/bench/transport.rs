//! `--transport ws|longpoll|sse`: one subscriber over any of the three, behind the same
//! open / until-ready / step / events / close calls that `fanout` and `connections` use.

use std::time::Duration;

use anyhow::Context as _;

use super::client::{Dialer, Joined, Session, scan_ready};
use super::longpoll::LongPoll;
use super::sse::SseStream;
use super::targets::{Delivery, Event};

/// How subscribers reach the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// WebSocket (every target).
    Ws,
    /// Long-poll: livepush `POST /v1/poll`, nchan `GET /lp/ROOM`; one poll parked per
    /// terminal, the next sent as soon as it is answered.
    Longpoll,
    /// Server-Sent Events: livepush `GET /v1/sse`, nchan `GET /es/ROOM` (EventSource).
    Sse,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Ws => "ws",
            Transport::Longpoll => "longpoll",
            Transport::Sse => "sse",
        }
    }
}

/// One subscriber over its transport.
#[derive(Debug)]
pub enum Sub {
    Ws(Box<Session>),
    Longpoll(Box<LongPoll>),
    Sse(Box<SseStream>),
}

impl Sub {
    /// Connect subscriber `i` to `room` and send what opens its session.
    pub async fn open(
        transport: Transport,
        dialer: &Dialer,
        i: u64,
        room: &str,
        token: Option<String>,
    ) -> anyhow::Result<Sub> {
        Ok(match transport {
            Transport::Ws => Sub::Ws(Box::new(Session::open(dialer, i, room, token, None).await?)),
            Transport::Longpoll => {
                Sub::Longpoll(Box::new(LongPoll::open(dialer, i, room, token).await?))
            }
            Transport::Sse => Sub::Sse(Box::new(SseStream::open(dialer, i, room, token).await?)),
        })
    }

    /// See [`Session::step`]: `Ok(false)` when the connection has ended.
    pub async fn step(&mut self) -> anyhow::Result<bool> {
        match self {
            Sub::Ws(s) => s.step().await,
            Sub::Longpoll(s) => s.step().await,
            Sub::Sse(s) => s.step().await,
        }
    }

    pub fn events(&self) -> &[Event] {
        match self {
            Sub::Ws(s) => s.events(),
            Sub::Longpoll(s) => &s.events.list,
            Sub::Sse(s) => &s.events.list,
        }
    }

    /// Read until the subscriber is in the room; deliveries that came with it are returned.
    pub async fn until_ready(
        &mut self,
        limit: Duration,
    ) -> anyhow::Result<(Joined, Vec<Delivery>)> {
        if let Sub::Ws(s) = self {
            return s.until_ready(limit).await;
        }
        let deadline = tokio::time::Instant::now() + limit;
        let (mut joined, mut early) = (None, Vec::new());
        let mut first = true;
        loop {
            if !first || self.events().is_empty() {
                let more = tokio::time::timeout_at(deadline, self.step())
                    .await
                    .context("no answer to the handshake in time")??;
                anyhow::ensure!(more, "closed during the handshake");
            }
            first = false;
            scan_ready(self.events(), &mut joined, &mut early)?;
            if let Some(j) = joined {
                return Ok((j, early));
            }
        }
    }

    /// End: a WebSocket with a close frame; a parked poll or a stream given up (a reset;
    /// a long-polling livepush terminal stays in the room for the server's poll grace).
    pub async fn close(self) {
        let conn = match self {
            Sub::Ws(s) => return s.close().await,
            Sub::Longpoll(s) => s.conn,
            Sub::Sse(s) => s.conn,
        };
        if let Some(c) = conn {
            c.abort();
        }
    }

    /// Polls or streams opened again after the server ended one (0 for WebSocket).
    pub fn reconnects(&self) -> u64 {
        match self {
            Sub::Ws(_) => 0,
            Sub::Longpoll(s) => s.reconnects,
            Sub::Sse(s) => s.reconnects,
        }
    }
}

#[cfg(test)]
mod tests {
    //! Small real runs against a spawned livepush server: a few terminals per transport, a
    //! few reliable messages, every one delivered once and in order.

    use super::*;
    use crate::bench::client::{Tracker, key_of};
    use crate::bench::targets::{Class, Target, payload};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_transport_delivers_every_reliable_message_once() {
        use livepush_server::auth::{Claims, TokenKeys, now_secs};

        const KEY: &str = "transport-test-key";
        const SECRET: &str = "transport-test-secret-0123456789";
        let server = livepush_server::start(livepush_server::Config::for_tests(KEY, SECRET))
            .await
            .unwrap();
        let (url, addr) = (server.url(), server.addr());
        let dialer = Dialer {
            target: Target::Livepush,
            host: addr.to_string(),
            addr,
            source_ips: 0,
            source_offset: 0,
        };
        let keys = TokenKeys::new(SECRET);
        let room = "transport-test";
        let token = |i: u64| {
            keys.mint(&Claims {
                sub: format!("t-{i}"),
                exp: now_secs() + 600,
                rooms: vec![room.to_owned()],
                send: false,
            })
            .unwrap()
        };
        let mut subs = Vec::new();
        for (i, t) in [Transport::Ws, Transport::Longpoll, Transport::Sse]
            .into_iter()
            .cycle()
            .take(6)
            .enumerate()
        {
            let mut s = Sub::open(t, &dialer, i as u64, room, Some(token(i as u64)))
                .await
                .unwrap();
            let (joined, early) = s.until_ready(Duration::from_secs(10)).await.unwrap();
            assert!(early.is_empty());
            subs.push((t, s, joined.seq));
        }
        const M: u64 = 30;
        let http = reqwest::Client::new();
        for n in 0..M {
            let (path, body) = crate::bench::targets::publish_request(
                Target::Livepush,
                room,
                Class::Reliable,
                &payload(1, n, 64),
            );
            let r = http
                .post(format!("{url}{path}"))
                .bearer_auth(KEY)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success());
        }
        for (t, mut s, base) in subs {
            let mut tr = Tracker::new(M);
            let mut order = Vec::new();
            while !tr.complete() {
                let more = tokio::time::timeout(Duration::from_secs(10), s.step())
                    .await
                    .unwrap_or_else(|_| panic!("{t:?}: timed out at {}", tr.distinct))
                    .unwrap();
                assert!(more, "{t:?}");
                for e in s.events() {
                    if let Event::Msg(d) = e {
                        tr.record(key_of(d, true, base));
                        order.push(d.stamp.n);
                    }
                }
            }
            assert_eq!((tr.duplicates, tr.stray), (0, 0), "{t:?}");
            assert_eq!(order, (0..M).collect::<Vec<_>>(), "{t:?}");
            s.close().await;
        }
        server.shutdown().await;
    }
}
