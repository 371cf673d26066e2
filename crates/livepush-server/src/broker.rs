//! Cross-node fan-out.
//!
//! On one node the hub delivers every message to its local subscribers itself. With several
//! nodes, each published message must also reach the subscribers connected to the other nodes:
//! a [`Broker`] carries it there, and the receiving node delivers it to its own members.
//! [`LocalBroker`] is the single-node broker: there is nobody
//! else to tell. A Redis broker implements the same trait.

use std::sync::Arc;

use bytes::Bytes;

/// A message as it crosses nodes: the room, and either a reliable message (with its seq and
/// encoded frame) or a transient frame.
#[derive(Debug, Clone)]
pub enum Envelope {
    Reliable {
        room: Arc<str>,
        seq: u64,
        ts: u64,
        frame: Bytes,
    },
    Transient {
        room: Arc<str>,
        frame: Bytes,
    },
}

/// Carries published messages to the other nodes.
pub trait Broker: Send + Sync + std::fmt::Debug + 'static {
    /// Announce a message this node published and delivered locally.
    fn announce(&self, envelope: &Envelope);
}

/// The single-node broker.
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalBroker;

impl Broker for LocalBroker {
    fn announce(&self, _envelope: &Envelope) {}
}
