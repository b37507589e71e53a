//! Bind the listeners and serve until shut down.
//!
//! The gateway runs one single-threaded tokio runtime per core ([`Workers`]),
//! like nginx's worker processes: each worker accepts on its own
//! `SO_REUSEPORT` socket of every proxy listener and keeps its own upstream
//! connection pools, so a request never hops between threads. The quota
//! state ([`Gateway`]) is shared by all workers.
//!
//! [`start`] binds everything first (port 0 works) and returns the bound
//! addresses, so tests (on their own runtime) and `main` drive the same code.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::serve::ListenerExt;
use axum::ServiceExt;
use tokio::net::{TcpListener, TcpSocket};
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::JoinSet;

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
    let gateway = Arc::new(Gateway::new(config.clone(), Arc::new(Metrics::new(workers.len()))));
    let (stop, stopped) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let reuse = workers.len() > 1;

    // Bind everything before serving anything, so a bad address fails startup cleanly.
    let mut proxy_addrs = Vec::new();
    let mut per_worker: Vec<Vec<(TcpListener, Option<usize>)>> = workers.iter().map(|_| Vec::new()).collect();
    for spec in &config.listeners {
        let mut addr = spec.addr;
        for (w, handle) in workers.iter().enumerate() {
            let listener = bind(addr, reuse, handle)?;
            addr = listener.local_addr()?;
            per_worker[w].push((listener, spec.upstream));
        }
        proxy_addrs.push(addr);
    }
    let admin = bind(config.admin_listen, false, first)?;
    let admin_addr = admin.local_addr()?;

    for (index, (listeners, handle)) in per_worker.into_iter().zip(workers).enumerate() {
        let worker = Arc::new(Worker::new(gateway.clone(), index));
        for (listener, upstream) in listeners {
            let service = proxy_service(worker.clone(), upstream).into_make_service();
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
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
    let sweeper = gateway.clone();
    tasks.spawn_on(
        async move {
            let mut every = tokio::time::interval(sweeper.config.idle_sweep);
            let stop = stopping(stopped);
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    _ = every.tick() => { sweeper.limiter.sweep(); }
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

/// Bind a listening socket registered with `handle`'s reactor.
fn bind(addr: SocketAddr, reuse_port: bool, handle: &Handle) -> io::Result<TcpListener> {
    let fail = |e: io::Error| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"));
    let _runtime = handle.enter();
    let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(fail)?;
    socket.set_reuseaddr(true).map_err(fail)?;
    if reuse_port {
        socket.set_reuseport(true).map_err(fail)?;
    }
    socket.bind(addr).map_err(fail)?;
    socket.listen(1024).map_err(fail)
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

/// Single-threaded runtimes on their own threads, one per core by default.
pub struct Workers {
    handles: Vec<Handle>,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Workers {
    pub fn spawn(count: usize) -> io::Result<Workers> {
        let mut workers = Workers { handles: Vec::new(), stops: Vec::new(), threads: Vec::new() };
        for i in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            workers.handles.push(runtime.handle().clone());
            workers.stops.push(stop);
            workers.threads.push(std::thread::Builder::new().name(format!("quotagate-worker-{i}")).spawn(
                move || {
                    let _ = runtime.block_on(stopped);
                },
            )?);
        }
        Ok(workers)
    }

    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }

    /// Stop the runtimes once the server has stopped.
    pub fn join(self) {
        drop(self.stops);
        for t in self.threads {
            let _ = t.join();
        }
    }
}
