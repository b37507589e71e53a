//! The release gateway binary as the soak runs it: a child process on port 0
//! with its config file, state directory and log in a temporary directory;
//! its RSS read from `/proc/PID/status`, its admin listener scraped, and
//! signals sent with `kill` (the crate forbids `unsafe`, so no `libc`).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::scale::{HOUR, MINUTE};
use crate::traffic::{GRAPH_HUNT, HUNT, INCIDENTS};

/// The incident windows' limits, per scaled minute and hour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub per_minute: u32,
    pub per_hour: u32,
}

/// What the emulator allows, and what the gateway runs with at start.
pub const NORMAL: Limits = Limits { per_minute: 12, per_hour: 60 };
/// What a reload switches the incident windows to and back from. Both
/// limits have as many digits as [`NORMAL`]'s, so the file keeps its length
/// and, with its modification time put back, only a SIGHUP applies it.
pub const TIGHT: Limits = Limits { per_minute: 10, per_hour: 50 };

/// Running time per tenant per scaled hour (10 minutes in 60).
pub const RUNTIME_BUDGET: Duration = Duration::from_secs(2);

/// What the gateway is run with besides its limits: the soak's options.
#[derive(Clone, Debug)]
pub struct Setup {
    /// The emulator, plain HTTP (it plays its faults only there).
    pub upstream: SocketAddr,
    /// `[store] backend = "redis"` at this URL, with this `on_outage`;
    /// `None`: the default SQLite store in the state directory.
    pub redis: Option<(String, String)>,
    /// `[tls]` on the proxy listener: certificate and key files.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// `[forward_proxy]` on a port of its own, its local CA in this directory.
    pub forward_proxy: Option<PathBuf>,
}

/// The Microsoft hosts the upstreams are named by when the forward proxy
/// is on: `CONNECT` to them (on 443) is intercepted.
pub const DEFENDER_HOST: &str = "api.security.microsoft.com";
pub const GRAPH_HOST: &str = "graph.microsoft.com";

/// The gateway's configuration: the emulator as both upstreams, scaled
/// windows, and the store, TLS and forward proxy of `setup`. With the
/// forward proxy the upstreams are named by their Microsoft hosts, on plain
/// HTTP to the emulator's address (`connect_to`): the clients' `CONNECT
/// api.security.microsoft.com:443` is intercepted, and the emulator's
/// faults still reach the gateway.
pub fn config_text(setup: &Setup, incidents: Limits) -> String {
    let ms = |d: Duration| format!("{}ms", d.as_millis());
    let (minute, hour, budget) = (ms(MINUTE), ms(HOUR), ms(RUNTIME_BUDGET));
    let Limits { per_minute, per_hour } = incidents;
    let Limits { per_minute: hunt_minute, per_hour: hunt_hour } = NORMAL;
    let emu = setup.upstream;
    let (defender, graph, connect_to) = match setup.forward_proxy {
        Some(_) => (
            format!("http://{DEFENDER_HOST}"),
            format!("http://{GRAPH_HOST}"),
            format!("connect_to = \"{emu}\"\n"),
        ),
        None => (format!("http://{emu}"), format!("http://{emu}"), String::new()),
    };
    let mut extra = String::new();
    if let Some((url, on_outage)) = &setup.redis {
        extra += &format!("\n[store]\nbackend = \"redis\"\nurl = \"{url}\"\non_outage = \"{on_outage}\"\n");
    }
    if let Some((cert, key)) = &setup.tls {
        extra += &format!("\n[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n", cert.display(), key.display());
    }
    if let Some(ca_dir) = &setup.forward_proxy {
        extra += &format!("\n[forward_proxy]\nlisten = \"127.0.0.1:0\"\nca_dir = \"{}\"\n", ca_dir.display());
    }
    format!(
        r#"# quotagate soak: scaled windows (a "minute" of {minute}, an "hour" of {hour}).
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
guard = "50ms"
idle_sweep = "2s"
drain = "5s"
max_body_bytes = 1048576
{extra}
[[upstream]]
name = "defender"
url = "{defender}"
kind = "defender"
route_prefixes = ["/api/"]
{connect_to}
[[upstream]]
name = "graph"
url = "{graph}"
kind = "graph"
route_prefixes = ["/v1.0/"]
{connect_to}
[hunting]
budgets = [{{ limit = "{budget}", per = "{hour}" }}]
estimate = "100ms"

[policy_defaults]
mode = "queue"
max_wait = "2s"
max_queue = 40
header_timeout = "1s"
total_timeout = "15s"

[[policy]]
name = "hunting"
methods = ["POST"]
paths = ["{HUNT}", "{GRAPH_HUNT}"]
windows = [{{ limit = {hunt_minute}, per = "{minute}" }}, {{ limit = {hunt_hour}, per = "{hour}" }}]
hunting = true

[[policy]]
name = "incidents"
paths = ["{INCIDENTS}", "{INCIDENTS}/**"]
windows = [{{ limit = {per_minute}, per = "{minute}" }}, {{ limit = {per_hour}, per = "{hour}" }}]
"#
    )
}

/// The gateway binary, killed if still running when dropped.
pub struct Gateway {
    child: Child,
    /// The proxy listener's address (`host:port`), HTTP or HTTPS as `setup.tls` says.
    pub proxy: String,
    /// The forward proxy's address, when it is on.
    pub forward: Option<String>,
    pub admin: String,
    pub config: PathBuf,
    pub log: PathBuf,
    /// What its config was written from; a reload keeps it.
    pub setup: Setup,
}

impl Gateway {
    /// Run `bin --config dir/quotagate.toml` (written from `setup` with the
    /// [`NORMAL`] limits) with `STATE_DIRECTORY=dir`, its log
    /// (`RUST_LOG=info`, the access log included) in `dir/gateway.log`.
    pub fn start(bin: &Path, dir: &Path, setup: Setup) -> Result<Gateway, String> {
        let path = dir.join("quotagate.toml");
        let log = dir.join("gateway.log");
        std::fs::write(&path, config_text(&setup, NORMAL)).map_err(|e| format!("write config: {e}"))?;
        let stderr = std::fs::File::create(&log).map_err(|e| format!("create log: {e}"))?;
        let mut child = Command::new(bin)
            .arg("--config")
            .arg(&path)
            .current_dir(dir)
            .env("STATE_DIRECTORY", dir)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("{}: {e} (build it with cargo build --release)", bin.display()))?;
        let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let (mut proxy, mut forward) = (None, None);
        for line in lines.by_ref() {
            let line = line.map_err(|e| e.to_string())?;
            // `... listening on http://ADDR`, `https://ADDR`, or `http://ADDR (HTTPS_PROXY)`.
            let after = line.rsplit("://").next().unwrap_or_default();
            let addr = after.split(' ').next().unwrap_or_default().to_string();
            if line.contains("forward proxy listening") {
                forward = Some(addr);
            } else if line.contains("proxy listening") {
                proxy = Some(addr);
            } else if line.contains("admin listening") {
                // Keep reading stdout, so a full pipe never blocks the gateway.
                std::thread::spawn(move || lines.for_each(drop));
                let proxy = proxy.ok_or("admin announced before the proxy")?;
                if setup.forward_proxy.is_some() && forward.is_none() {
                    return Err("the forward proxy was not announced".into());
                }
                return Ok(Gateway { child, proxy, forward, admin: addr, config: path, log, setup });
            }
        }
        let status = child.wait().map_err(|e| e.to_string())?;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        Err(format!("the gateway stopped before listening ({status}): {text}"))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident set size now, in bytes (`VmRSS`); `None` once it has exited.
    pub fn rss(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let kb = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
        kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok().map(|kb| kb * 1024)
    }

    /// Send `signal` (`HUP`, `TERM`) with `kill`.
    pub fn signal(&self, signal: &str) -> bool {
        let sent = Command::new("kill").arg(format!("-{signal}")).arg(self.pid().to_string()).status();
        sent.is_ok_and(|s| s.success())
    }

    /// SIGTERM, then wait up to `within` for the process to exit.
    pub fn stop(&mut self, within: Duration) -> Option<ExitStatus> {
        self.signal("TERM");
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The admin listener's views the soak reads.
pub struct Admin {
    http: reqwest::Client,
    base: String,
}

impl Admin {
    pub fn new(addr: &str) -> Admin {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().expect("client");
        Admin { http, base: format!("http://{addr}") }
    }

    async fn get(&self, path: &str) -> Option<String> {
        let r = self.http.get(format!("{}{path}", self.base)).send().await.ok()?;
        r.text().await.ok()
    }

    pub async fn metrics(&self) -> Option<Metrics> {
        self.get("/metrics").await.map(Metrics)
    }

    pub async fn quota(&self) -> Option<Value> {
        serde_json::from_str(&self.get("/quota").await?).ok()
    }

    /// The running configuration's generation (`/readyz`).
    pub async fn generation(&self) -> Option<u64> {
        let v: Value = serde_json::from_str(&self.get("/readyz").await?).ok()?;
        v["config"]["generation"].as_u64()
    }

    /// `/readyz`: its status, and the quota store's part of its body
    /// (`reachable`; for Redis `mode`: `shared`, `local` or `fail-closed`).
    pub async fn store(&self) -> Option<(u16, Value)> {
        let r = self.http.get(format!("{}/readyz", self.base)).send().await.ok()?;
        let status = r.status().as_u16();
        let v: Value = serde_json::from_str(&r.text().await.ok()?).ok()?;
        Some((status, v["store"].clone()))
    }
}

/// A `/metrics` page.
pub struct Metrics(String);

impl Metrics {
    /// The sum of every series whose name and labels start with `prefix`
    /// (a bare name, or a name with its first labels, such as
    /// `quotagate_config_reloads_total{result="applied"`).
    pub fn sum(&self, prefix: &str) -> f64 {
        self.0
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| {
                l.strip_prefix(prefix).is_some_and(|rest| {
                    prefix.contains('{') || rest.starts_with('{') || rest.starts_with(' ')
                })
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
            + 0.0 // an empty sum is -0.0
    }
}

/// Requests queued and running time reserved or in flight, as `/quota`
/// reports them: `(queued for a call slot, queued for running time,
/// queries in flight, seconds reserved)`.
pub fn quota_residue(quota: &Value) -> (u64, u64, u64, f64) {
    let list = |v: &Value| v.as_array().cloned().unwrap_or_default();
    let mut queued = 0;
    for tenant in list(&quota["tenants"]) {
        for key in list(&tenant["keys"]) {
            queued += key["queued"].as_u64().unwrap_or(0);
        }
    }
    let (mut runtime_queued, mut in_flight, mut reserved) = (0, 0, 0.0);
    for ledger in list(&quota["running_time"]) {
        runtime_queued += ledger["queued"].as_u64().unwrap_or(0);
        in_flight += ledger["in_flight"].as_u64().unwrap_or(0);
        for budget in list(&ledger["budgets"]) {
            reserved += budget["reserved_seconds"].as_f64().unwrap_or(0.0);
        }
    }
    (queued, runtime_queued, in_flight, reserved)
}
