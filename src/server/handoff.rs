//! Deal accepted connections to the workers in turn.
//!
//! One task accepts on a listening socket and hands each connection to the
//! next worker, which registers it with its own reactor. Clients such as
//! benchmark tools and connection-pooling scripts open a few long-lived
//! connections; dealing them in turn spreads them evenly, where a kernel
//! hash (`SO_REUSEPORT`) or a race for `accept` can leave one core with most.
//! Every dealt connection's writes are bounded by [`SendTimeout`].

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::send_timeout::SendTimeout;

type Accepted = (std::net::TcpStream, SocketAddr);

/// The accepting side: a socket and one channel per worker.
pub struct Dealer {
    socket: TcpListener,
    workers: Vec<mpsc::UnboundedSender<Accepted>>,
}

/// A worker's side: an `axum::serve` listener fed by the dealer.
pub struct Dealt {
    connections: mpsc::UnboundedReceiver<Accepted>,
    local: SocketAddr,
    send_timeout: Duration,
}

/// Split `socket` into a dealer and `workers` listeners whose connections
/// give up a write that waits `send_timeout`.
pub fn deal(
    socket: TcpListener,
    local: SocketAddr,
    workers: usize,
    send_timeout: Duration,
) -> (Dealer, Vec<Dealt>) {
    let (senders, listeners) = (0..workers.max(1))
        .map(|_| {
            let (tx, rx) = mpsc::unbounded_channel();
            (tx, Dealt { connections: rx, local, send_timeout })
        })
        .unzip();
    (Dealer { socket, workers: senders }, listeners)
}

/// Accept and deal until `stop` resolves.
pub async fn run_until(dealer: Dealer, stop: impl Future<Output = ()>) -> io::Result<()> {
    tokio::pin!(stop);
    let mut next = 0;
    loop {
        let accepted = tokio::select! {
            _ = &mut stop => return Ok(()),
            accepted = dealer.socket.accept() => accepted,
        };
        match accepted.and_then(|(tcp, peer)| {
            tcp.set_nodelay(true)?;
            Ok((tcp.into_std()?, peer))
        }) {
            Ok(connection) => {
                let _ = dealer.workers[next].send(connection);
                next = (next + 1) % dealer.workers.len();
            }
            // Out of file descriptors and the like: back off rather than spin.
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

impl axum::serve::Listener for Dealt {
    type Io = SendTimeout<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, SocketAddr) {
        loop {
            let Some((tcp, peer)) = self.connections.recv().await else {
                // The dealer has stopped: so has serving.
                return std::future::pending().await;
            };
            match TcpStream::from_std(tcp) {
                Ok(tcp) => return (SendTimeout::new(tcp, self.send_timeout), peer),
                Err(e) => tracing::warn!(error = %e, "cannot register a connection"),
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}
