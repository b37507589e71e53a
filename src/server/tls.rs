//! TLS on a proxy listener: handshakes run concurrently, off the accept
//! path, so a slow or silent client never holds up the others.
//!
//! Accepted TCP connections come from a [`Dealt`] listener; each handshake
//! is a task on the worker's runtime with a deadline; finished ones are
//! handed to `axum::serve`. A failed handshake is logged at debug and dropped.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::handoff::Dealt;
use super::send_timeout::SendTimeout;

/// Longest a client may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A listener that yields connections whose TLS handshake has completed.
/// Each handshake uses the certificate of the configuration running when it
/// starts, so a reload that re-reads rotated certificate files applies to
/// every connection after it.
pub struct TlsListener {
    tcp: Dealt,
    gateway: Arc<crate::app::Gateway>,
    /// The certificate the listener started with, should a configuration
    /// without one be running (a reload refuses to remove `[tls]`).
    started: Arc<rustls::ServerConfig>,
    done_tx: mpsc::UnboundedSender<(TlsStream<SendTimeout<TcpStream>>, SocketAddr)>,
    done: mpsc::UnboundedReceiver<(TlsStream<SendTimeout<TcpStream>>, SocketAddr)>,
}

impl TlsListener {
    pub fn new(tcp: Dealt, gateway: Arc<crate::app::Gateway>, started: Arc<rustls::ServerConfig>) -> Self {
        let (done_tx, done) = mpsc::unbounded_channel();
        TlsListener { tcp, gateway, started, done_tx, done }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<SendTimeout<TcpStream>>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, SocketAddr) {
        loop {
            tokio::select! {
                (tcp, peer) = axum::serve::Listener::accept(&mut self.tcp) => {
                    let config = self.gateway.config().tls.clone().unwrap_or_else(|| self.started.clone());
                    let (acceptor, done) = (TlsAcceptor::from(config), self.done_tx.clone());
                    tokio::spawn(async move {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(tls)) => {
                                let _ = done.send((tls, peer));
                            }
                            Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                        }
                    });
                }
                Some(ready) = self.done.recv() => return ready,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        axum::serve::Listener::local_addr(&self.tcp)
    }
}
