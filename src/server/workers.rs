//! Single-threaded tokio runtimes on their own threads.

use std::io;

use tokio::runtime::Handle;

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
