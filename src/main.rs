//! The `quotagate` command: parse the command line, load the config, start
//! logging, run the server until a shutdown signal.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use quotagate::config::{Config, DEFAULT_TOML};

/// mimalloc keeps per-thread heaps, which suits one runtime per core: the
/// request path allocates and frees small buffers on the same thread.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A rate-limiting reverse proxy for the Microsoft Defender XDR, Defender for
/// Endpoint and Graph security APIs. With no arguments it runs on its
/// built-in defaults (see --print-default-config).
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Run from this TOML configuration file instead of the built-in defaults.
    #[arg(long, env = "QUOTAGATE_CONFIG", value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// Override the address of the base-URL proxy listener (`listen` in the
    /// file); extra [[listener]] entries keep their own addresses.
    #[arg(long, env = "QUOTAGATE_LISTEN", value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Override the address of the admin listener (`admin_listen`: status
    /// page, /healthz, /readyz, /quota, /metrics).
    #[arg(long, env = "QUOTAGATE_ADMIN_LISTEN", value_name = "ADDR")]
    admin_listen: Option<SocketAddr>,
    /// Print the built-in defaults as a commented TOML file and exit.
    #[arg(long)]
    print_default_config: bool,
    /// Worker threads, each a single-threaded runtime accepting on every
    /// proxy listener (default: one per CPU).
    #[arg(long, env = "QUOTAGATE_WORKERS", value_name = "N")]
    workers: Option<usize>,
    /// Log format. The level comes from RUST_LOG (default: info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a configuration file and print the effective policies; on
    /// failure list every problem as FILE:LINE: field: message and exit 2.
    CheckConfig {
        /// The TOML file to check.
        file: PathBuf,
    },
    /// Probe a running gateway's admin listener: exit 0 when URL answers
    /// 2xx, 1 otherwise. For container health checks in images without curl.
    Healthcheck {
        /// The liveness URL (plain http).
        #[arg(default_value = "http://127.0.0.1:7481/healthz")]
        url: String,
        /// Give up after this long per step (connect, send, read), e.g. "3s".
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// The forward proxy's local certificate authority.
    Ca {
        #[command(subcommand)]
        action: CaCommand,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Print the CA certificate (PEM) that clients must trust, creating the
    /// CA first if it does not exist. The private key is never printed.
    Export {
        /// The CA directory (default: `[forward_proxy].ca_dir` of the config,
        /// else $STATE_DIRECTORY/ca, else ./quotagate-ca).
        #[arg(long, value_name = "DIR")]
        ca_dir: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.print_default_config {
        print!("{DEFAULT_TOML}");
        return ExitCode::SUCCESS;
    }
    match &cli.command {
        Some(Command::CheckConfig { file }) => return check_config(file),
        Some(Command::Healthcheck { url, timeout }) => {
            return match quotagate::admin::probe::probe(url, *timeout) {
                Ok(status) => {
                    println!("{url}: {status}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("quotagate healthcheck: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Command::Ca { action: CaCommand::Export { ca_dir } }) => {
            return ca_export(cli.config.as_deref(), ca_dir.as_deref());
        }
        None => {}
    }
    init_logging(cli.log_format);
    let config = match &cli.config {
        Some(path) => Config::load(path),
        None => Ok(Config::builtin()),
    };
    let mut config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if let Some(addr) = cli.listen {
        config.listeners[0].addr = addr;
    }
    if let Some(addr) = cli.admin_listen {
        config.admin_listen = addr;
    }
    if let Some(problem) = config.exposure_problem() {
        eprintln!("quotagate: {problem}");
        return ExitCode::from(2);
    }
    let workers = cli.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let workers = match quotagate::server::Workers::spawn(workers) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("quotagate: cannot start worker threads: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    let source =
        cli.config.clone().map(|path| Source { path, listen: cli.listen, admin_listen: cli.admin_listen });
    let result = runtime.block_on(run(config, &workers, source));
    workers.join();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "quotagate stopped");
            eprintln!("quotagate: {e}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(file: &std::path::Path) -> ExitCode {
    match Config::load(file) {
        Ok(config) => {
            print!("{} is valid.\n{}", file.display(), config.describe());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}

fn ca_export(config: Option<&std::path::Path>, ca_dir: Option<&std::path::Path>) -> ExitCode {
    let dir = match ca_dir {
        Some(dir) => dir.to_path_buf(),
        None => {
            let config = match config.map_or_else(|| Ok(Config::builtin()), Config::load) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            config.forward_proxy.map_or_else(quotagate::forward_proxy::ca::default_dir, |fp| fp.ca_dir)
        }
    };
    match quotagate::forward_proxy::LocalCa::load_or_create(&dir) {
        Ok(ca) => {
            print!("{}", ca.cert_pem());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("quotagate ca export: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(
    config: Config,
    workers: &quotagate::server::Workers,
    source: Option<Source>,
) -> std::io::Result<()> {
    // Watch from before the listeners are announced: a SIGHUP or a change
    // right after startup is not missed (nor does a SIGHUP kill the process).
    let watch = source.map(Watch::new);
    let running = quotagate::server::start_on(config, workers.handles()).await?;
    if let Some(watch) = watch {
        tokio::spawn(watch_config(watch, running.reloader.clone()));
    }
    let config = running.gateway.config();
    for (addr, spec) in running.proxy_addrs.iter().zip(&config.listeners) {
        let upstream = spec.upstream.map(|u| config.upstreams[u].name.as_str());
        tracing::info!(%addr, upstream = upstream.unwrap_or("routed by host and path"), "proxy listening");
        let scheme = if config.tls.is_some() { "https" } else { "http" };
        announce(format_args!("quotagate: proxy listening on {scheme}://{addr}"));
    }
    if let Some(addr) = running.forward_proxy_addr {
        tracing::info!(%addr, "forward proxy listening");
        announce(format_args!("quotagate: forward proxy listening on http://{addr} (HTTPS_PROXY)"));
    }
    tracing::info!(addr = %running.admin_addr, "admin listening");
    announce(format_args!("quotagate: admin listening on http://{}", running.admin_addr));
    running.serve_until(shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

/// Where the running configuration came from, to load it again.
struct Source {
    path: std::path::PathBuf,
    listen: Option<std::net::SocketAddr>,
    admin_listen: Option<std::net::SocketAddr>,
}

impl Source {
    /// The file, validated, with the command line's overrides applied.
    fn load(&self) -> Result<Config, String> {
        let mut config = Config::load(&self.path).map_err(|e| e.to_string())?;
        if let Some(addr) = self.listen {
            config.listeners[0].addr = addr;
        }
        if let Some(addr) = self.admin_listen {
            config.admin_listen = addr;
        }
        match config.exposure_problem() {
            Some(problem) => Err(format!("{}: {problem}", self.path.display())),
            None => Ok(config),
        }
    }

    /// What tells that the file changed: its modification time and length.
    fn stamp(&self) -> Option<(std::time::SystemTime, u64)> {
        let meta = std::fs::metadata(&self.path).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    }
}

/// The config file and what tells of its changes, set up at startup.
struct Watch {
    source: Source,
    /// The file's stamp when the watch began.
    seen: Option<(std::time::SystemTime, u64)>,
    #[cfg(unix)]
    hangup: Option<tokio::signal::unix::Signal>,
}

impl Watch {
    fn new(source: Source) -> Self {
        Watch {
            seen: source.stamp(),
            #[cfg(unix)]
            hangup: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok(),
            source,
        }
    }
}

/// How long a changed config file must stay unchanged before it is read.
const SETTLE: std::time::Duration = std::time::Duration::from_millis(300);

/// Reload on SIGHUP, and when the file changes (checked every second, read
/// once it has been still for [`SETTLE`]). A file that does not load, or
/// changes what needs a restart, is refused with every problem logged; the
/// running configuration stays.
async fn watch_config(watch: Watch, reloader: quotagate::server::Reloader) {
    let Watch { source, mut seen, .. } = watch;
    #[cfg(unix)]
    let mut hangup = watch.hangup;
    let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        #[cfg(unix)]
        let hup = async {
            match hangup.as_mut() {
                Some(s) => s.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hup = std::future::pending::<Option<()>>();
        let why = tokio::select! {
            _ = hup => "SIGHUP",
            _ = every.tick() => {
                let now = source.stamp();
                if now == seen {
                    continue;
                }
                // Read it only once it has stopped changing: a file written
                // in place may be caught half written, and a half that
                // parses would apply.
                tokio::time::sleep(SETTLE).await;
                if source.stamp() != now {
                    continue;
                }
                seen = now;
                "the file changed"
            }
        };
        let refused = |problems: &str| {
            tracing::error!(trigger = why, problems, "configuration refused; the running one stays");
        };
        match source.load() {
            Err(problems) => {
                reloader.refused();
                refused(&problems);
            }
            Ok(config) => match reloader.apply(config) {
                Ok(loaded) => {
                    tracing::info!(trigger = why, generation = loaded.generation, hash = %loaded.hash,
                    "configuration loaded")
                }
                Err(problems) => refused(&problems.join("\n")),
            },
        }
    }
}

/// A line on stdout for whoever started the gateway; a closed stdout is not an error.
fn announce(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal, never in a file or a journal.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
