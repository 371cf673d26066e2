//! A `wss://` connection's driver over a real loopback TLS connection whose socket fills up:
//! the ciphertext rustls still holds after the last write of a batch goes out once the socket
//! drains, with no new frame queued to trigger a write.

use std::sync::Arc;
use std::task::{Context, Waker};
use std::time::Duration;

use livepush_proto::Transport;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};

use super::*;
use crate::auth::{Grants, Terminal};
use crate::frame::Frame;
use crate::reactor::Sweep;

/// Longest wait for bytes the peer is owed.
const WAIT: Duration = Duration::from_secs(10);

/// Socket buffers far smaller than one batch (the kernel doubles them, and keeps a minimum).
const SMALL_BUFFER: u32 = 4096;

/// A server and a client TLS configuration for a fresh self-signed `localhost` certificate.
fn configs() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert: CertificateDer<'static> = made.cert.der().clone();
    let key = PrivateKeyDer::try_from(made.signing_key.serialize_der()).unwrap();
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (Arc::new(server), Arc::new(client))
}

/// A TLS connection over loopback with small socket buffers: the server's side as the reactor
/// keeps it, and the client.
async fn tls_pair() -> (
    crate::tls::Stream,
    tokio_rustls::client::TlsStream<TcpStream>,
) {
    let (server_config, client_config) = configs();
    let listener = TcpSocket::new_v4().unwrap();
    // Accepted sockets inherit the listener's send buffer.
    listener.set_send_buffer_size(SMALL_BUFFER).unwrap();
    listener.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = listener.listen(1).unwrap();
    let client = TcpSocket::new_v4().unwrap();
    client.set_recv_buffer_size(SMALL_BUFFER).unwrap();
    let (client, accepted) = tokio::join!(
        client.connect(listener.local_addr().unwrap()),
        listener.accept()
    );
    let (client, (server, _)) = (client.unwrap(), accepted.unwrap());
    let name = ServerName::try_from("localhost").unwrap();
    let (server, client) = tokio::join!(
        tokio_rustls::TlsAcceptor::from(server_config).accept(server),
        tokio_rustls::TlsConnector::from(client_config).connect(name, client)
    );
    let (tcp, conn) = server.unwrap().into_inner();
    let stream = crate::tls::Stream::new(Socket::from_tokio(tcp).unwrap(), conn);
    (stream, client.unwrap())
}

/// One batch, bigger than the socket takes and smaller than what rustls takes in one write
/// (64 KiB): the driver's last (only) write of it is all accepted by rustls and only partly by
/// the socket. Once the peer reads, every byte arrives, with nothing new queued.
#[tokio::test]
async fn ciphertext_held_after_a_batch_goes_out_once_the_socket_drains() {
    let running = crate::start(crate::Config::for_tests(
        "test-api-key-0123456789",
        "test-token-secret-0123456789",
    ))
    .await
    .unwrap();
    let app = running.app().clone();
    let (io, mut client) = tls_pair().await;
    let terminal = Terminal {
        id: Arc::from("tls-viewer"),
        grants: Grants::new(vec!["*".into()], false),
    };
    let session = Session::start(&app, terminal, Transport::Ws, app.hub.next_conn_id()).unwrap();
    // No heartbeat during the test: nothing but the socket's writability may wake the driver.
    let signals = session.outbox().signals();
    signals.heard(clock_ms());
    signals.ping_at(clock_ms() + 3_600_000);
    let frames: Vec<Frame> = (0..4u8)
        .map(|n| Frame::transient(Bytes::from(vec![b'a' + n; 12_000])))
        .collect();
    for f in &frames {
        session.outbox().push(f.clone());
    }
    let mut expected = Vec::new();
    wsframe::write_header(&mut expected, OpCode::Text, frame::joined_len(&frames));
    frame::join_into(&frames, b'\n', &mut expected);

    let mut driver = Driver {
        io,
        decoder: Decoder::new(1 << 20),
        session,
        out: Unsent::default(),
        closing: None,
    };
    // The batch is written once; the socket fills and rustls keeps the rest of its ciphertext.
    let mut cx = Context::from_waker(Waker::noop());
    assert!(Conn::poll(&mut driver, &mut cx).is_pending());
    assert!(driver.out.unsent().is_none(), "rustls took the whole batch");
    assert!(
        driver.io.holds_ciphertext(),
        "the socket took all of it: the test needs smaller buffers or a bigger batch"
    );

    // From now on only the socket's writability brings the driver back.
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let connections =
        Connections::start(1, Sweep::new(&[Duration::from_secs(3600)]), stop).unwrap();
    connections.adopt(Connection::Tls(Box::new(driver)));
    let mut got = Vec::new();
    let mut buf = vec![0u8; 16 << 10];
    while got.len() < expected.len() {
        match tokio::time::timeout(WAIT, client.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            other => panic!(
                "{} of {} bytes arrived, then {other:?}",
                got.len(),
                expected.len()
            ),
        }
    }
    assert!(got == expected, "the batch arrives whole, in order");
    stop_tx.send(true).unwrap();
    drop(client);
    running.shutdown().await;
}
