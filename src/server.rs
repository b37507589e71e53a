//! Bind the listeners and serve until shut down.
//!
//! [`start`] binds everything first (port 0 works) and returns the bound
//! addresses, so tests and `main` drive the same code.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::app::{proxy_router, Gateway};
use crate::config::Config;
use crate::metrics::Metrics;

/// A running gateway.
pub struct Running {
    /// Bound proxy addresses, in configured order (the base-URL listener first).
    pub proxy_addrs: Vec<SocketAddr>,
    pub admin_addr: SocketAddr,
    pub gateway: Arc<Gateway>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<io::Result<()>>,
}

/// Bind every listener and start serving.
pub async fn start(config: Config) -> io::Result<Running> {
    let config = Arc::new(config);
    let gateway = Arc::new(Gateway::new(config.clone(), Arc::new(Metrics::new())));
    let (stop, stopped) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut proxy_addrs = Vec::new();
    let mut bound = Vec::new();
    for spec in &config.listeners {
        let listener = bind(spec.addr).await?;
        proxy_addrs.push(listener.local_addr()?);
        bound.push((listener, spec.upstream));
    }
    let admin = bind(config.admin_listen).await?;
    let admin_addr = admin.local_addr()?;
    for (listener, upstream) in bound {
        let router = proxy_router(gateway.clone(), upstream);
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let mut stopped = stopped.clone();
        tasks.spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await
        });
    }
    let mut admin_stopped = stopped.clone();
    let admin_router = crate::admin::router(gateway.clone());
    tasks.spawn(async move {
        axum::serve(admin, admin_router)
            .with_graceful_shutdown(async move {
                let _ = admin_stopped.wait_for(|s| *s).await;
            })
            .await
    });
    let sweeper = gateway.clone();
    let mut sweep_stopped = stopped;
    tasks.spawn(async move {
        let mut every = tokio::time::interval(sweeper.config.idle_sweep);
        loop {
            tokio::select! {
                _ = every.tick() => { sweeper.limiter.sweep(); }
                _ = sweep_stopped.wait_for(|s| *s) => return Ok(()),
            }
        }
    });
    Ok(Running { proxy_addrs, admin_addr, gateway, stop, tasks })
}

async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}

impl Running {
    /// Serve until `shutdown` resolves, then stop accepting and let
    /// in-flight requests finish.
    pub async fn serve_until(mut self, shutdown: impl Future<Output = ()>) -> io::Result<()> {
        tokio::select! {
            _ = shutdown => {}
            Some(result) = self.tasks.join_next() => {
                result.map_err(io::Error::other)??;
            }
        }
        self.stop().await
    }

    /// Stop accepting, finish in-flight requests and wait for every task.
    pub async fn stop(mut self) -> io::Result<()> {
        let _ = self.stop.send(true);
        while let Some(result) = self.tasks.join_next().await {
            result.map_err(io::Error::other)??;
        }
        Ok(())
    }
}
