//! The `quotagate` binary: defaults, config checking, and a real run.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_quotagate");

#[test]
fn printed_defaults_load_back_and_check_config_lists_the_policies() {
    let printed = Command::new(BIN).arg("--print-default-config").output().unwrap();
    assert!(printed.status.success());
    let text = String::from_utf8(printed.stdout).unwrap();
    assert!(text.starts_with("# quotagate built-in defaults."), "a commented TOML file");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("default.toml");
    std::fs::write(&path, &text).unwrap();
    let checked = Command::new(BIN).arg("check-config").arg(&path).output().unwrap();
    assert!(checked.status.success());
    let out = String::from_utf8(checked.stdout).unwrap();
    for needle in [
        "hunting",
        "45/1m, 1500/1h",
        "incidents",
        "50/1m, 1500/1h",
        "live-response",
        "10/1m",
        "indicator-import",
        "30/1m",
        "mde-entities",
        "100/1m, 1500/1h",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
}

#[test]
fn check_config_lists_every_problem_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "listen = \"127.0.0.1:1\"\nadmin_listen = \"nope\"\n[[upstream]]\nname = \"d\"\nurl = \"https://x\"\nkind = \"defender\"\n[[policy]]\nname = \"p\"\npaths = [\"/api/x\"]\nwindows = [{ limit = 0, per = \"1 fortnight\" }]\n",
    )
    .unwrap();
    let out = Command::new(BIN).arg("check-config").arg(&path).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("3 problem(s)"), "{err}");
    assert!(err.contains("admin_listen"), "{err}");
    assert!(err.contains("policy[0] (p).windows[0].limit"), "{err}");
    assert!(err.contains("policy[0] (p).windows[0].per"), "{err}");
}

/// The gateway binary, run until dropped, with the addresses it announced.
struct Running {
    child: std::process::Child,
    proxies: Vec<String>,
    admin: String,
    /// The working directory, where the default state file is made.
    _state: tempfile::TempDir,
}

impl Running {
    fn start(command: &mut Command) -> Running {
        let state = tempfile::tempdir().unwrap();
        let mut child = command
            .env("RUST_LOG", "warn")
            .env_remove("STATE_DIRECTORY")
            .current_dir(state.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut proxies = Vec::new();
        for line in BufReader::new(child.stdout.take().unwrap()).lines() {
            let line = line.unwrap();
            let addr = line.rsplit("http://").next().unwrap().to_string();
            if line.contains("proxy listening") {
                proxies.push(addr);
            } else {
                assert!(line.contains("admin listening"), "{line}");
                return Running { child, proxies, admin: addr, _state: state };
            }
        }
        panic!("the gateway exited before listening: {:?}", child.wait());
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_binary_serves_on_its_defaults_with_overridden_addresses() {
    let gw =
        Running::start(Command::new(BIN).args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]));
    let (proxy, admin) = (&gw.proxies[0], &gw.admin);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let health = reqwest::get(format!("http://{admin}/healthz")).await.unwrap();
        assert_eq!(health.status(), 200);
        let metrics = reqwest::get(format!("http://{admin}/metrics")).await.unwrap().text().await.unwrap();
        assert!(metrics.contains("quotagate_build_info"));
        // The proxy listener does not serve admin routes, and a metered call without a token stays local.
        let r = reqwest::Client::new().get(format!("http://{proxy}/api/incidents")).send().await.unwrap();
        assert_eq!(r.status(), 401);
    });
}

#[test]
fn environment_variables_set_the_config_file_and_both_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.toml");
    // Fixed ports in the file: only the environment can move them to port 0.
    // The extra listener (port 0 itself) shows that this file, not the
    // built-in defaults, is running.
    std::fs::write(
        &path,
        "listen = \"127.0.0.1:9\"\nadmin_listen = \"127.0.0.1:7\"\n[[listener]]\nlisten = \"127.0.0.1:0\"\nupstream = \"d\"\n[[upstream]]\nname = \"d\"\nurl = \"https://api.security.microsoft.com\"\nkind = \"defender\"\n",
    )
    .unwrap();
    let gw = Running::start(
        Command::new(BIN)
            .env("QUOTAGATE_CONFIG", &path)
            .env("QUOTAGATE_LISTEN", "127.0.0.1:0")
            .env("QUOTAGATE_ADMIN_LISTEN", "127.0.0.1:0"),
    );
    assert_eq!(gw.proxies.len(), 2, "{:?}", gw.proxies);
    assert!(gw
        .proxies
        .iter()
        .chain([&gw.admin])
        .all(|a| a.starts_with("127.0.0.1:") && !a.ends_with(":9") && !a.ends_with(":7")));

    // A flag beats the environment.
    let flag = Command::new(BIN)
        .env("QUOTAGATE_CONFIG", dir.path().join("missing.toml"))
        .args(["--config", path.to_str().unwrap(), "--listen", "nowhere"])
        .output()
        .unwrap();
    let err = String::from_utf8(flag.stderr).unwrap();
    assert!(!flag.status.success() && err.contains("--listen") && !err.contains("missing.toml"), "{err}");
}

#[test]
fn healthcheck_passes_on_a_live_admin_listener_and_fails_without_one() {
    let gw =
        Running::start(Command::new(BIN).args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]));
    let url = format!("http://{}/healthz", gw.admin);
    let ok = Command::new(BIN).args(["healthcheck", &url]).output().unwrap();
    assert!(ok.status.success(), "{ok:?}");
    assert_eq!(String::from_utf8(ok.stdout).unwrap(), format!("{url}: 200\n"));
    let not_found =
        Command::new(BIN).args(["healthcheck", &format!("http://{}/nothing", gw.admin)]).output().unwrap();
    assert_eq!(not_found.status.code(), Some(1));
    assert!(String::from_utf8(not_found.stderr).unwrap().contains("answered 404"));
    drop(gw);
    let gone = Command::new(BIN).args(["healthcheck", "--timeout", "2s", &url]).output().unwrap();
    assert_eq!(gone.status.code(), Some(1));
    let err = String::from_utf8(gone.stderr).unwrap();
    assert!(err.contains("cannot reach"), "{err}");
}

#[test]
fn help_documents_every_flag_subcommand_and_environment_variable() {
    let help = |args: &[&str]| {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let top = help(&["--help"]);
    for needle in [
        "--config <FILE>",
        "--listen <ADDR>",
        "--admin-listen <ADDR>",
        "--print-default-config",
        "--workers <N>",
        "--log-format",
        "--version",
        "check-config",
        "healthcheck",
        "QUOTAGATE_CONFIG",
        "QUOTAGATE_LISTEN",
        "QUOTAGATE_ADMIN_LISTEN",
        "QUOTAGATE_WORKERS",
        "RUST_LOG",
    ] {
        assert!(top.contains(needle), "--help lacks {needle:?}:\n{top}");
    }
    // Every line that names a flag or subcommand also says what it does.
    for line in
        top.lines().filter(|l| l.trim_start().starts_with('-') || l.starts_with("  ") && !l.contains("  -"))
    {
        assert!(line.split("  ").filter(|w| !w.trim().is_empty()).count() >= 2, "undocumented: {line:?}");
    }
    assert!(help(&["check-config", "--help"]).contains("FILE:LINE"));
    assert!(help(&["healthcheck", "--help"]).contains("http://127.0.0.1:7481/healthz"));
}

/// `check-config` on `text`: its exit status and stderr, with the file's path written as `FILE`.
fn check(text: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(BIN).arg("check-config").arg(&path).output().unwrap();
    let err = String::from_utf8(out.stderr).unwrap().replace(path.to_str().unwrap(), "FILE");
    (out.status.code(), err)
}

#[test]
fn check_config_names_the_file_line_and_field_of_every_problem() {
    let (code, err) = check(
        r#"listen = "127.0.0.1:1"
admin_listen = "nope"
[[upstream]]
name = "d"
url = "https://x/path"
kind = "defender"
[[policy]]
name = "p"
paths = ["/api/x"]
windows = [{ limit = 0, per = "1 fortnight" }]
mode = "later"
"#,
    );
    assert_eq!(code, Some(2));
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines[0], "FILE: 5 problem(s):");
    for (line, needle) in lines[1..].iter().zip([
        "FILE:2: admin_listen: `nope` is not an address",
        "FILE:5: upstream[0] (d).url: `https://x/path` must be",
        "FILE:10: policy[0] (p).windows[0].per: `1 fortnight` is not a duration",
        "FILE:10: policy[0] (p).windows[0].limit: must be between 1 and",
        "FILE:11: policy[0] (p).mode: `later` is not queue or reject",
    ]) {
        assert!(line.starts_with(needle), "{line:?} should start with {needle:?}");
    }
    assert_eq!(lines.len(), 6, "{err}");
}

#[test]
fn check_config_names_the_line_of_syntax_type_and_unknown_field_errors() {
    let head = "listen = \"127.0.0.1:1\"\nadmin_listen = \"127.0.0.1:2\"\n[[upstream]]\nname = \"d\"\nurl = \"https://x\"\nkind = \"defender\"\n";
    for (body, expected) in [
        // An unterminated string: not TOML at all.
        ("[[policy]]\nname = \"p\n", "FILE:8: invalid basic string"),
        // A string where a number belongs, in a multi-line array.
        (
            "[[policy]]\nname = \"p\"\npaths = [\"/x\"]\nwindows = [\n  { limit = 1, per = \"1m\" },\n  { limit = \"five\", per = \"1h\" },\n]\n",
            "FILE:12: policy[0].windows[1].limit: invalid type: string \"five\", expected u64",
        ),
        // A misspelt field.
        ("weight = 3\n", "FILE:7: upstream[0].weight: unknown field `weight`"),
        // A required field left out: the line of the table that lacks it.
        ("[[policy]]\nname = \"p\"\npaths = [\"/x\"]\n", "FILE:7: policy[0]: missing field `windows`"),
    ] {
        let (code, err) = check(&format!("{head}{body}"));
        assert_eq!(code, Some(2), "{err}");
        assert!(err.starts_with(expected), "{err:?} should start with {expected:?}");
    }
}
