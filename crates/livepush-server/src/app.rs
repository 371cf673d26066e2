//! What every request and connection shares: the node's state, built once by
//! [`crate::server`] and handed to the HTTP API, the transports and their sessions.

use std::sync::Arc;

use tokio::sync::watch;

use crate::auth::TokenKeys;
use crate::config::Config;
use crate::engine::{Event, Node};
use crate::hub::Hub;
use crate::inbox::Inboxes;
use crate::metrics::Metrics;
use crate::ratelimit::Limiters;
use crate::terminals::Terminals;
use crate::wake::WakeKeys;

/// State shared by every request and connection.
#[derive(Debug)]
pub struct App {
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    pub hub: Arc<Hub>,
    pub keys: TokenKeys,
    pub limiters: Arc<Limiters>,
    /// The service list: terminals, online state, interruptions.
    pub terminals: Arc<Terminals>,
    /// Per-terminal inboxes and wake-ups.
    pub inboxes: Arc<Inboxes>,
    pub wake_keys: WakeKeys,
    /// The backend's send hook, if one is configured.
    pub send_hook: Option<Arc<crate::hooks::SendHook>>,
    /// The backend's connect hook, if one is configured.
    pub connect_hook: Option<Arc<crate::hooks::connect::ConnectHook>>,
    /// Flips to `true` when the server shuts down; long-lived sessions watch it.
    pub shutdown: watch::Receiver<bool>,
    /// The admin page's figures and live feed.
    pub admin: Arc<crate::admin::Admin>,
}

/// The node the engine hands its events to: room events to the hub, inbox messages to the
/// inboxes.
impl Node for App {
    fn on_event(&self, event: Event<'_>) {
        match event {
            Event::Inbox { terminal, message } => self.inboxes.on_inbox(terminal, message),
            Event::Wake { terminal } => self.inboxes.wake_requested(terminal),
            Event::LinkLost => {
                self.inboxes.relink();
                self.hub.on_event(Event::LinkLost);
            }
            other => self.hub.on_event(other),
        }
    }
}
