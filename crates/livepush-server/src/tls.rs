//! TLS (`--tls-cert`, `--tls-key`): `https://` and `wss://` without a proxy in front.
//!
//! Two pieces:
//!
//! - [`Tls`]: the certificate and key, read from their files at start and again on every
//!   [`Tls::reload`] (`livepush serve` calls it on SIGHUP). A handshake uses the
//!   configuration loaded last; connections keep the one they were accepted with (rustls
//!   holds it by `Arc`). A reload that fails changes nothing: the error is returned (and
//!   logged by the caller) and the previous certificate stays.
//! - [`Stream`]: an open `wss://` connection in the [`reactor`](crate::reactor), driven
//!   sans-IO: ciphertext is read from the raw socket into rustls, plaintext read out of it;
//!   plaintext is written into rustls and its ciphertext flushed to the socket, with the
//!   socket's edge-triggered readiness as for plain TCP.
//!
//! Invariant: plain TCP pays nothing. A plain connection's state is the same `Driver` as
//! without TLS ([`transport::ws::Connection`](crate::transport::ws::Connection) keeps a TLS
//! connection behind a box, in the same space); the HTTP side wraps the socket only when a
//! certificate is configured. What a TLS connection adds is rustls's `ServerConnection`
//! (boxed with its driver).

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::Poll;

use parking_lot::RwLock;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::reactor::{Socket, Wire};

/// The certificate chain and private key files (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, leaf first (`CERTIFICATE` blocks).
    pub cert: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the TLS certificate {path}: {message}")]
    Cert { path: PathBuf, message: String },
    #[error("no certificate in {0} (expected PEM `CERTIFICATE` blocks)")]
    NoCert(PathBuf),
    #[error("cannot read the TLS private key {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("unusable TLS certificate or key ({cert}, {key}): {source}")]
    Rustls {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
}

/// The server's TLS configuration, swapped as a whole on reload.
#[derive(Debug)]
pub struct Tls {
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
}

impl Tls {
    /// Read the certificate and key.
    pub fn load(files: TlsFiles) -> Result<Tls, TlsError> {
        let config = server_config(&files)?;
        Ok(Tls {
            files,
            current: RwLock::new(config),
        })
    }

    /// Read the files again. New handshakes use the new certificate; open connections keep
    /// theirs. On error nothing changes.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = server_config(&self.files)?;
        *self.current.write() = config;
        Ok(())
    }

    /// What the next connection's handshake uses.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.read().clone())
    }
}

fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let cert_error = |path: &Path, e: &dyn std::fmt::Display| TlsError::Cert {
        path: path.to_owned(),
        message: e.to_string(),
    };
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| cert_error(&files.cert, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_error(&files.cert, &e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCert(files.cert.clone()));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| TlsError::Key {
        path: files.key.clone(),
        message: e.to_string(),
    })?;
    let rustls_error = |source| TlsError::Rustls {
        cert: files.cert.clone(),
        key: files.key.clone(),
        source,
    };
    // *ring*, not aws-lc-rs (rustls's default, whose C build this project avoids). rustls
    // 0.23.48 deprecated ring's provider for lacking post-quantum key exchange (X25519MLKEM768);
    // classical X25519 and P-256 remain, as with most servers today.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(rustls_error)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(rustls_error)?;
    // livepush speaks HTTP/1.1 only (WebSocket, long-poll and SSE all work over it).
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// An open TLS connection in the reactor: the raw socket and rustls's state. The handshake
/// is over (tokio-rustls did it, before HTTP); this carries on with the same state.
#[derive(Debug)]
pub struct Stream {
    socket: Socket,
    conn: rustls::ServerConnection,
}

impl Stream {
    pub fn new(socket: Socket, conn: rustls::ServerConnection) -> Stream {
        Stream { socket, conn }
    }

    /// rustls holds ciphertext the socket has not taken yet (tests: a write left some
    /// behind).
    #[cfg(test)]
    pub(crate) fn holds_ciphertext(&self) -> bool {
        self.conn.wants_write()
    }
}

/// The socket as `io::Read`/`io::Write` for rustls: "not ready" is `WouldBlock`.
struct Raw<'a>(&'a mut Socket);

fn would_block<T>(polled: Poll<io::Result<T>>) -> io::Result<T> {
    match polled {
        Poll::Ready(r) => r,
        Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
    }
}

impl Read for Raw<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        would_block(self.0.poll_read(buf))
    }
}

impl Write for Raw<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        would_block(self.0.poll_write(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Wire for Stream {
    fn socket(&mut self) -> &mut Socket {
        &mut self.socket
    }

    /// Always: rustls may hold plaintext that a smaller read left behind, while the socket
    /// itself has nothing more. Finding nothing costs no system call.
    fn may_read(&self) -> bool {
        true
    }

    fn poll_read(&mut self, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        loop {
            match self.conn.reader().read(buf) {
                // 0: the peer's close_notify, the end of the stream.
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The socket ended without close_notify: the end as well.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Poll::Ready(Ok(0)),
                Err(e) => return Poll::Ready(Err(e)),
            }
            if !self.socket.may_read() {
                return Poll::Pending;
            }
            match self.conn.read_tls(&mut Raw(&mut self.socket)) {
                Ok(0) => return Poll::Ready(Ok(0)),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
                Err(e) => return Poll::Ready(Err(e)),
            }
            if let Err(e) = self.conn.process_new_packets() {
                // rustls queued an alert saying why: a last try to send it.
                let _ = self.poll_flush();
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
            }
        }
    }

    /// Plaintext is taken only once the previous ciphertext is out, so rustls holds at most
    /// one write's worth.
    fn poll_write(&mut self, buf: &[u8]) -> Poll<io::Result<usize>> {
        if std::task::ready!(self.poll_flush()).is_err() {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let n = match self.conn.writer().write(buf) {
            Ok(n) => n,
            Err(e) => return Poll::Ready(Err(e)),
        };
        // Out now if the socket takes it; otherwise the next flush (on writability) does it.
        if let Poll::Ready(Err(e)) = self.poll_flush() {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(&mut self) -> Poll<io::Result<bool>> {
        let mut flushed = false;
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut Raw(&mut self.socket)) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(_) => flushed = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(flushed))
    }

    fn shutdown_write(&mut self) {
        self.conn.send_close_notify();
        let _ = self.poll_flush();
        self.socket.shutdown_write();
    }

    fn write_now(&mut self, bytes: &[u8]) {
        let _ = self.conn.writer().write_all(bytes);
        let _ = self.poll_flush();
    }
}
