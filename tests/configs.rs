//! Every configuration file shipped in the repository is valid, so the
//! examples and the benchmark config never go stale.

mod support;

use std::path::Path;

use quotagate::config::Config;

fn toml_files(dir: &str) -> Vec<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_shipped_config_is_valid() {
    let files: Vec<_> = [toml_files("config"), toml_files("config/examples"), toml_files("bench")]
        .into_iter()
        .flatten()
        .collect();
    assert!(files.len() >= 5, "{files:?}");
    let tls = tempfile::tempdir().unwrap();
    for file in files {
        // An example with TLS names the operator's files: validate it with minted ones.
        let text = support::with_test_tls(&std::fs::read_to_string(&file).unwrap(), tls.path());
        if let Err(e) = Config::from_toml(&text, &file.display().to_string()) {
            panic!("{e}");
        }
    }
}

#[test]
fn the_benchmark_config_meters_everything_on_the_benchmark_ports() {
    let c = Config::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/overhead.toml")).unwrap();
    assert_eq!(c.listeners[0].addr.to_string(), "127.0.0.1:18004");
    assert_eq!(c.upstreams[0].authority.as_str(), "127.0.0.1:18001");
    let p = c.policies.find(&http::Method::GET, 0, "/api/incidents").expect("metered");
    assert!(p.windows.iter().all(|w| w.limit.get() > 1_000_000_000), "never rejects");
}

#[test]
fn the_rejection_benchmark_config_rejects_one_path_at_once_and_never_the_other() {
    let c = Config::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/rejection.toml")).unwrap();
    assert_eq!(c.listeners[0].addr.to_string(), "127.0.0.1:18103");
    assert_eq!(c.upstreams[0].authority.as_str(), "127.0.0.1:18101");
    let exhausted = c.policies.find(&http::Method::GET, 0, "/api/incidents").expect("metered");
    // One call an hour: once it is spent, every slot lies past the wait, so the answer is at once.
    assert_eq!(exhausted.windows.iter().map(|w| w.limit.get()).min(), Some(1));
    assert!(exhausted.windows.iter().all(|w| w.per > exhausted.max_wait));
    let open = c.policies.find(&http::Method::GET, 0, "/api/alerts").expect("metered");
    assert!(open.windows.iter().all(|w| w.limit.get() > 1_000_000_000), "never rejects");
}

#[test]
fn the_regional_example_gives_the_legacy_and_regional_hosts_their_own_listeners() {
    let c =
        Config::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples/regional-and-legacy.toml"))
            .unwrap();
    let bound: Vec<(String, String)> = c
        .listeners
        .iter()
        .filter_map(|l| l.upstream.map(|u| (l.addr.to_string(), c.upstreams[u].authority.to_string())))
        .collect();
    assert_eq!(
        bound,
        [
            ("127.0.0.1:7482".to_string(), "api.securitycenter.microsoft.com".to_string()),
            ("127.0.0.1:7483".to_string(), "eu.api.security.microsoft.com".to_string()),
        ]
    );
    // The base-URL listener still routes by path, and the quotas are the built-in ones.
    assert_eq!(c.listeners[0].upstream, None);
    let policies = |c: &Config| c.describe().split_once("policies").unwrap().1.to_string();
    assert_eq!(policies(&c), policies(&Config::builtin()));
}

#[test]
fn the_forward_proxy_example_meters_with_the_built_in_policies() {
    let c = Config::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples/forward-proxy.toml"))
        .unwrap();
    assert!(c.forward_proxy.is_some());
    let policies = |c: &Config| c.describe().split_once("policies").unwrap().1.to_string();
    assert_eq!(policies(&c), policies(&Config::builtin()));
}
