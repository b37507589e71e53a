//! The soak's own `redis-server` (`--store redis`): a child process on a
//! free loopback port, without persistence (`--save ""`, no AOF), its
//! working directory and log in the soak's temporary directory. Killed with
//! SIGKILL for an outage, started again empty on the same port, and killed
//! when dropped. Never the machine's Redis on 6379.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
}

impl RedisServer {
    /// Start on a free port with `dir` as its directory, and wait until it
    /// answers `PING`.
    pub async fn start(dir: &Path) -> Result<RedisServer, String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("a free port for Redis: {e}"))?
            .port();
        let mut r = RedisServer { child: None, port, dir: dir.to_path_buf() };
        r.restart().await?;
        Ok(r)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Start (again) on the same port, empty, and wait up to 10 s until it
    /// answers `PING`.
    pub async fn restart(&mut self) -> Result<(), String> {
        let port = self.port.to_string();
        let log = self.dir.join("redis.log");
        let child = Command::new("redis-server")
            .args(["--port", &port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("redis-server: {e} (is it installed?)"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.ping().await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(format!("redis-server on port {} did not answer within 10 s", self.port))
    }

    async fn ping(&self) -> bool {
        let attempt = async {
            let mut s = TcpStream::connect(("127.0.0.1", self.port)).await.ok()?;
            s.write_all(b"PING\r\n").await.ok()?;
            let mut buf = [0u8; 7];
            s.read_exact(&mut buf).await.ok()?;
            Some(&buf == b"+PONG\r\n")
        };
        tokio::time::timeout(Duration::from_secs(1), attempt).await.ok().flatten().unwrap_or(false)
    }

    /// SIGKILL the server: an outage, and the loss of everything it held.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
