//! Bind the listeners and serve until shut down.
//!
//! The gateway runs one single-threaded tokio runtime per core ([`Workers`]),
//! like nginx's worker processes. Connections are dealt to the workers in
//! turn ([`handoff`]); each worker keeps its own upstream connection pools,
//! so a request never hops between threads. The quota
//! state ([`Gateway`]) is shared by all workers.
//!
//! [`start`] binds everything first (port 0 works) and returns the bound
//! addresses, so tests (on their own runtime) and `main` drive the same code.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::ServiceExt;
use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::JoinSet;

mod handoff;
mod workers;

pub use workers::Workers;

use crate::app::{proxy_service, Gateway, Worker};
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

/// Bind every listener and serve on the current runtime.
pub async fn start(config: Config) -> io::Result<Running> {
    start_on(config, &[Handle::current()]).await
}

/// Bind every listener and serve on the given runtimes: every proxy
/// listener is accepted on each of them; admin and housekeeping run on the first.
pub async fn start_on(config: Config, workers: &[Handle]) -> io::Result<Running> {
    let first = workers.first().expect("at least one worker");
    let config = Arc::new(config);
    let gateway = Gateway::open(config.clone(), Arc::new(Metrics::new(workers.len())))
        .map_err(|e| io::Error::other(e.to_string()))?;
    let gateway = Arc::new(gateway);
    let (stop, stopped) = watch::channel(false);
    let mut tasks = JoinSet::new();

    // Bind everything before serving anything, so a bad address fails startup cleanly.
    let mut proxy_addrs = Vec::new();
    let mut sockets = Vec::new();
    for spec in &config.listeners {
        let socket = bind(spec.addr, first)?;
        proxy_addrs.push(socket.local_addr()?);
        sockets.push((socket, spec.upstream));
    }
    let admin = bind(config.admin_listen, first)?;
    let admin_addr = admin.local_addr()?;

    let worker_states: Vec<Arc<Worker>> =
        (0..workers.len()).map(|i| Arc::new(Worker::new(gateway.clone(), i))).collect();
    for ((socket, upstream), addr) in sockets.into_iter().zip(&proxy_addrs) {
        let (dealer, listeners) = handoff::deal(socket, *addr, workers.len());
        tasks.spawn_on(handoff::run_until(dealer, stopping(stopped.clone())), first);
        for ((listener, worker), handle) in listeners.into_iter().zip(&worker_states).zip(workers) {
            let service = proxy_service(worker.clone(), upstream).into_make_service();
            let stopped = stopped.clone();
            tasks.spawn_on(
                async move { axum::serve(listener, service).with_graceful_shutdown(stopping(stopped)).await },
                handle,
            );
        }
    }
    let admin_router = crate::admin::router(gateway.clone());
    let admin_stopped = stopped.clone();
    tasks.spawn_on(
        async move { axum::serve(admin, admin_router).with_graceful_shutdown(stopping(admin_stopped)).await },
        first,
    );
    if let Some(redis) = gateway.store.redis() {
        tasks.spawn_on(
            {
                let (redis, stopped, gw) = (redis.clone(), stopped.clone(), gateway.clone());
                async move {
                    redis.watch(&gw.limiter, &gw.config.policies.0, stopping(stopped)).await;
                    Ok(())
                }
            },
            first,
        );
    }
    let sweeper = gateway.clone();
    tasks.spawn_on(
        async move {
            let mut every = tokio::time::interval(sweeper.config.idle_sweep);
            let stop = stopping(stopped);
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    _ = every.tick() => { sweeper.limiter.sweep(); sweeper.runtime.sweep(); sweeper.store.sweep(); }
                    _ = &mut stop => return Ok(()),
                }
            }
        },
        first,
    );
    Ok(Running { proxy_addrs, admin_addr, gateway, stop, tasks })
}

async fn stopping(mut stopped: watch::Receiver<bool>) {
    let _ = stopped.wait_for(|s| *s).await;
}

/// Bind a listening socket, registered with `handle`'s reactor.
fn bind(addr: SocketAddr, handle: &Handle) -> io::Result<TcpListener> {
    let fail = |e: io::Error| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"));
    let socket = std::net::TcpListener::bind(addr).map_err(fail)?;
    socket.set_nonblocking(true).map_err(fail)?;
    let _runtime = handle.enter();
    TcpListener::from_std(socket).map_err(fail)
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
