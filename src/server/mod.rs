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
use std::time::Duration;

use axum::ServiceExt;
use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::JoinSet;

mod handoff;
mod reload;
mod send_timeout;
mod tls;
mod workers;

pub use reload::Reloader;
pub use workers::Workers;

use crate::app::{proxy_service, Gateway, Worker};
use crate::config::Config;
use crate::forward_proxy::ForwardProxy;
use crate::metrics::Metrics;

/// A running gateway.
pub struct Running {
    /// Bound proxy addresses, in configured order (the base-URL listener first).
    pub proxy_addrs: Vec<SocketAddr>,
    pub admin_addr: SocketAddr,
    /// The forward-proxy listener's address, when one is configured.
    pub forward_proxy_addr: Option<SocketAddr>,
    pub gateway: Arc<Gateway>,
    /// Applies a new configuration (SIGHUP, a changed file).
    pub reloader: Reloader,
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
    // The forward proxy's CA is loaded (or created) now, so a bad CA directory fails startup.
    let forward = match &config.forward_proxy {
        Some(spec) => {
            let socket = bind(spec.listen, first)?;
            let addr = socket.local_addr()?;
            let proxy = ForwardProxy::new(&config).map_err(io::Error::other)?.expect("configured");
            Some((socket, addr, Arc::new(proxy)))
        }
        None => None,
    };
    let forward_proxy_addr = forward.as_ref().map(|(_, addr, _)| *addr);

    let worker_states: Vec<Arc<Worker>> =
        (0..workers.len()).map(|i| Arc::new(Worker::new(gateway.clone(), i))).collect();
    for ((socket, upstream), addr) in sockets.into_iter().zip(&proxy_addrs) {
        let (dealer, listeners) = handoff::deal(socket, *addr, workers.len(), config.send_timeout);
        tasks.spawn_on(handoff::run_until(dealer, stopping(stopped.clone())), first);
        for ((listener, worker), handle) in listeners.into_iter().zip(&worker_states).zip(workers) {
            let service = proxy_service(worker.clone(), upstream).into_make_service();
            let stopped = stopped.clone();
            match config.tls.clone() {
                Some(tls) => tasks.spawn_on(
                    {
                        let gateway = gateway.clone();
                        async move {
                            let listener = tls::TlsListener::new(listener, gateway, tls);
                            axum::serve(listener, service).with_graceful_shutdown(stopping(stopped)).await
                        }
                    },
                    handle,
                ),
                None => {
                    tasks.spawn_on(
                        async move {
                            axum::serve(listener, service).with_graceful_shutdown(stopping(stopped)).await
                        },
                        handle,
                    )
                }
            };
        }
    }
    if let Some((socket, addr, proxy)) = forward {
        let (dealer, listeners) = handoff::deal(socket, addr, workers.len(), config.send_timeout);
        tasks.spawn_on(handoff::run_until(dealer, stopping(stopped.clone())), first);
        for ((listener, worker), handle) in listeners.into_iter().zip(&worker_states).zip(workers) {
            let service = crate::forward_proxy::service(worker.clone(), proxy.clone(), stopped.clone())
                .into_make_service();
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
                    let policy_of = |id: u16| gw.config().policies.0.iter().find(|p| p.key_id == id).cloned();
                    redis.watch(&gw.limiter, &gw.runtime, policy_of, stopping(stopped)).await;
                    Ok(())
                }
            },
            first,
        );
        tasks.spawn_on(
            {
                let (redis, stopped) = (redis.clone(), stopped.clone());
                async move {
                    redis.listen(stopping(stopped)).await;
                    Ok(())
                }
            },
            first,
        );
    }
    let sweeper = gateway.clone();
    tasks.spawn_on(
        async move {
            let mut every = tokio::time::interval(sweeper.config().idle_sweep);
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
    gateway.metrics.config_loaded(1);
    let reloader = Reloader::new(gateway.clone(), worker_states);
    Ok(Running { proxy_addrs, admin_addr, forward_proxy_addr, gateway, reloader, stop, tasks })
}

/// Beyond the drain time, for answers already on their way out.
const DRAIN_GRACE: Duration = Duration::from_millis(500);

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
    /// Serve until `shutdown` resolves, then drain (see [`Running::stop`]).
    pub async fn serve_until(mut self, shutdown: impl Future<Output = ()>) -> io::Result<()> {
        tokio::select! {
            _ = shutdown => self.stop().await,
            // Every task serves until the stop: one that ends first is a fault.
            Some(result) = self.tasks.join_next() => {
                let why = match result {
                    Ok(Ok(())) => "it returned".to_string(),
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => e.to_string(),
                };
                tracing::error!(error = %why, "a listener or housekeeping task ended before shutdown: stopping");
                self.stop().await?;
                Err(io::Error::other(format!("a listener or housekeeping task ended before shutdown: {why}")))
            }
        }
    }

    /// Stop gracefully within the configured drain time: stop accepting;
    /// turn away at once, with a 503 and `Retry-After`, every queued or new
    /// call whose slot comes after the drain time; let requests in flight and
    /// the other queued ones finish; cut what is still running when the
    /// drain time is over.
    pub async fn stop(self) -> io::Result<()> {
        let drain = self.gateway.config().drain;
        self.stop_within(drain).await
    }

    /// [`Running::stop`] with its own drain time.
    pub async fn stop_within(mut self, drain: Duration) -> io::Result<()> {
        tracing::info!(drain_s = drain.as_secs_f64(), "stopping: draining requests in flight");
        self.gateway.limiter.drain(drain);
        self.gateway.runtime.drain(drain);
        self.gateway.store.drain(drain);
        let _ = self.stop.send(true);
        let cut = tokio::time::sleep(drain + DRAIN_GRACE);
        tokio::pin!(cut);
        let result = loop {
            tokio::select! {
                next = self.tasks.join_next() => match next {
                    Some(Ok(Ok(()))) => {}
                    Some(Ok(Err(e))) => break Err(e),
                    Some(Err(e)) => break Err(io::Error::other(e)),
                    None => {
                        // The forward proxy's tunnels run apart from their
                        // listener's connections: they get the drain too.
                        tokio::select! {
                            _ = self.gateway.tunnels.idle() => {}
                            _ = &mut cut => tracing::warn!(tunnels = self.gateway.tunnels.count(),
                                "drain time over: cutting the forward proxy's tunnels still open"),
                        }
                        break Ok(());
                    }
                },
                _ = &mut cut => {
                    tracing::warn!(tasks = self.tasks.len(), "drain time over: cutting what is still running");
                    self.tasks.abort_all();
                    while self.tasks.join_next().await.is_some() {}
                    break Ok(());
                }
            }
        };
        // Every admission and charge made is in the state file before exit.
        self.gateway.store.flush().await;
        result
    }
}
