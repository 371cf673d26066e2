//! A sleeping terminal's UDP side, without the SDK: keepalives out, wakes in.

use std::net::SocketAddr;
use std::time::Duration;

use livepush_proto::wake::{KEEPALIVE_PAD_TO, Keepalive, Wake, WakeKey};
use livepush_server::auth::now_ms;
use tokio::net::UdpSocket;
use tokio::time::{Instant, timeout_at};

/// A UDP socket on 127.0.0.1 holding a terminal's wake key, to probe the server's wakes
/// directly (what it sends, when, and after a restart).
pub struct WakeSocket {
    udp: UdpSocket,
    key: WakeKey,
}

impl WakeSocket {
    /// A socket for the terminal whose wake key is `key` (from its `connected` frame).
    pub async fn bind(key: WakeKey) -> WakeSocket {
        let udp = UdpSocket::bind("127.0.0.1:0").await.expect("udp");
        WakeSocket { udp, key }
    }

    /// Sends `terminal`'s keepalive, signed now and padded as the agent pads it, to the
    /// server's wake listener at `to`: the server then knows where to wake it. Returns the
    /// datagram (what an eavesdropper could capture and replay).
    pub async fn keepalive(&self, to: SocketAddr, terminal: &str) -> Vec<u8> {
        let datagram = Keepalive::encode(terminal, now_ms(), &self.key, KEEPALIVE_PAD_TO);
        self.udp.send_to(&datagram, to).await.expect("keepalive");
        datagram
    }

    /// The next wake signed with the key (other datagrams are skipped), or `None` when none
    /// comes `within`.
    pub async fn wake(&self, within: Duration) -> Option<Wake> {
        self.wake_from(within).await.map(|(w, _)| w)
    }

    /// The next wake signed with the key and the address it came from (the node that sent
    /// it), or `None` when none comes `within`.
    pub async fn wake_from(&self, within: Duration) -> Option<(Wake, SocketAddr)> {
        let mut buf = [0u8; 512];
        let deadline = Instant::now() + within;
        loop {
            let (n, from) = timeout_at(deadline, self.udp.recv_from(&mut buf))
                .await
                .ok()?
                .expect("recv");
            if let Ok(w) = Wake::verify(&buf[..n], &self.key) {
                return Some((w, from));
            }
        }
    }
}
