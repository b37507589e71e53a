//! The real `quotagate` binary as a child process (SIGKILL when dropped),
//! and a real `redis-server` on a free loopback port.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The gateway binary: the one Cargo built for the integration tests; in a
/// benchmark that includes this file (Cargo names no binary to an example),
/// `$QUOTAGATE_BIN`, by default the release build.
fn bin() -> std::path::PathBuf {
    match option_env!("CARGO_BIN_EXE_quotagate") {
        Some(path) => path.into(),
        None => {
            let path: std::path::PathBuf = std::env::var_os("QUOTAGATE_BIN")
                .map_or_else(|| "target/release/quotagate".into(), Into::into);
            // Absolute: the gateway runs in a directory of its own.
            std::path::absolute(&path).unwrap_or(path)
        }
    }
}

/// The gateway binary, killed (SIGKILL) when dropped.
pub struct GatewayProcess {
    child: Child,
    pub proxy: String,
    pub admin: String,
}

impl GatewayProcess {
    /// Run `--config config` in `dir`; `Err` carries the exit status and stderr
    /// when it stops before listening.
    pub fn start(config: &Path, dir: &Path) -> Result<GatewayProcess, String> {
        let mut child = Command::new(bin())
            .args(["--config", config.to_str().unwrap(), "--workers", "1"])
            .current_dir(dir)
            .env("RUST_LOG", "warn")
            .env_remove("STATE_DIRECTORY")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Drain the log, so a full pipe never blocks the gateway.
        let mut stderr = child.stderr.take().unwrap();
        let log = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        let mut proxy = None;
        for line in BufReader::new(child.stdout.take().unwrap()).lines() {
            let line = line.unwrap();
            let addr = line.rsplit("http://").next().unwrap().to_string();
            if line.contains("proxy listening") {
                proxy = Some(addr);
            } else if line.contains("admin listening") {
                return Ok(GatewayProcess { child, proxy: proxy.unwrap(), admin: addr });
            }
        }
        let status = child.wait().unwrap();
        Err(format!("{status}: {}", log.join().unwrap()))
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// SIGHUP: reload the config file.
    pub fn reload(&self) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    }

    /// Wait until the admin API reports config generation `want` (the first
    /// config is 1; each applied reload adds one).
    pub async fn until_generation(&self, want: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ready: serde_json::Value = match reqwest::get(self.admin_url("/readyz")).await {
                Ok(r) => r.json().await.unwrap_or_default(),
                Err(_) => serde_json::Value::Null,
            };
            if ready["config"]["generation"].as_u64() == Some(want) {
                return;
            }
            assert!(Instant::now() < deadline, "config generation {want} never came: {ready}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: no shutdown, no flush, no checkpoint.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `redis-server` without persistence on a free loopback port (or with
/// snapshots on demand only, [`Redis::start_in`]).
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    password: Option<String>,
    /// Where [`Redis::save`] writes its snapshot, which a restart loads.
    dir: Option<std::path::PathBuf>,
}

impl Redis {
    pub fn start() -> Redis {
        Self::start_with(None)
    }

    /// A server that requires `password` (`requirepass`), if given.
    ///
    /// The port is picked free and then handed to the server, so another
    /// process can take it in between; the server then exits, and another
    /// port is tried.
    pub fn start_with(password: Option<&str>) -> Redis {
        Self::launch(password, None)
    }

    /// A server that writes a snapshot into `dir` when told to
    /// ([`Redis::save`]) and loads it when it starts again.
    pub fn start_in(dir: &std::path::Path) -> Redis {
        Self::launch(None, Some(dir))
    }

    fn launch(password: Option<&str>, dir: Option<&std::path::Path>) -> Redis {
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let mut r =
                Redis { child: None, port, password: password.map(Into::into), dir: dir.map(Into::into) };
            if r.spawn() {
                return r;
            }
        }
        panic!("redis-server did not start on any of 5 free ports");
    }

    /// Write a snapshot now (`SAVE`), as a periodic save would.
    pub fn save(&self) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut ok = [0u8; 5];
        s.write_all(b"SAVE\r\n").unwrap();
        s.read_exact(&mut ok).unwrap();
        assert_eq!(&ok, b"+OK\r\n", "SAVE answered {:?}", String::from_utf8_lossy(&ok));
    }

    /// The URL, with the password when there is one.
    pub fn url(&self) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// Start (again) on the same port, and wait until it answers PING.
    pub fn restart(&mut self) {
        assert!(self.spawn(), "redis-server did not start again on port {}", self.port);
    }

    /// Start on `self.port` and wait until it answers PING: false if the
    /// server exited first (its port was taken).
    fn spawn(&mut self) -> bool {
        let port = self.port.to_string();
        let mut args = vec!["--port", &port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"];
        if let Some(p) = &self.password {
            args.extend(["--requirepass", p]);
        }
        let dir = self.dir.as_ref().map(|d| d.to_string_lossy().into_owned());
        if let Some(d) = &dir {
            args.extend(["--dir", d]);
        }
        let child = Command::new("redis-server")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (.ci/run installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(Some(_)))) {
                self.child = None;
                return false;
            }
            if self.ping() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {} did not answer", self.port);
    }

    fn ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        if let Some(p) = &self.password {
            let mut ok = [0u8; 5];
            if s.write_all(format!("AUTH {p}\r\n").as_bytes()).is_err() || s.read_exact(&mut ok).is_err() {
                return false;
            }
        }
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    /// SIGKILL the server.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}
