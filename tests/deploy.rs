//! The deployment kit in deploy/ holds together without a container engine or
//! a cluster: every YAML and JSON file parses, every quotagate config a
//! manifest mounts passes the real `quotagate check-config`, and the facts an
//! operator relies on hold (two replicas, both scraped, probes on the admin
//! port, a disruption budget, a hardened systemd unit).

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use quotagate::config::Config;
use quotagate::store::{Backend, OnOutage};
use serde::Deserialize;
use serde_norway::Value;

const BIN: &str = env!("CARGO_BIN_EXE_quotagate");

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Files under `dir` (recursively) whose extension is one of `exts`, sorted.
fn files_under(dir: &Path, exts: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path, exts));
        } else if path.extension().is_some_and(|x| exts.iter().any(|e| x == *e)) {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// Every document of a YAML file.
fn yaml(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .collect()
}

fn yaml_one(path: &Path) -> Value {
    let mut docs = yaml(path);
    assert_eq!(docs.len(), 1, "{}", path.display());
    docs.remove(0)
}

fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str().unwrap_or_else(|| panic!("{what} is not a string: {v:?}"))
}

fn seq<'a>(v: &'a Value, what: &str) -> &'a Vec<Value> {
    v.as_sequence().unwrap_or_else(|| panic!("{what} is not a list: {v:?}"))
}

/// `quotagate check-config FILE` passes (TLS files, which name the
/// operator's certificate, pointed at minted ones).
fn check_config(path: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(path).unwrap();
    let tested = support::with_test_tls(&text, dir.path());
    let path = if tested == text {
        path.to_path_buf()
    } else {
        let copy = dir.path().join(path.file_name().unwrap());
        std::fs::write(&copy, tested).unwrap();
        copy
    };
    let out = Command::new(BIN).arg("check-config").arg(&path).output().unwrap();
    assert!(
        out.status.success(),
        "check-config {} failed:\n{}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `quotagate check-config` on config text a manifest carries inline.
fn check_config_text(text: &str, origin: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(origin.replace(['/', ' '], "_"));
    std::fs::write(&path, text).unwrap();
    check_config(&path);
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().unwrap().parse().unwrap_or_else(|_| panic!("no port in {addr}"))
}

/// deploy/compose.yaml with its `<<: *gateway` merge keys applied, as compose reads it.
fn compose() -> Value {
    let mut compose = yaml_one(&root().join("deploy/compose.yaml"));
    compose.apply_merge().unwrap();
    compose
}

/// The compose services that run the gateway: those built from this repository.
fn gateway_services(compose: &Value) -> Vec<(String, Value)> {
    let services = compose["services"].as_mapping().expect("services");
    services
        .iter()
        .filter(|(_, s)| s["build"]["dockerfile"].as_str() == Some("Dockerfile"))
        .map(|(name, s)| (str_of(name, "service name").to_string(), s.clone()))
        .collect()
}

/// The config files a compose file gives the gateway: `configs:` entries and
/// bind-mounted `.toml` files.
fn compose_configs(compose: &Value) -> Vec<PathBuf> {
    let dir = root().join("deploy");
    let mut files: Vec<PathBuf> = compose["configs"]
        .as_mapping()
        .into_iter()
        .flatten()
        .filter_map(|(_, c)| c["file"].as_str().map(|f| dir.join(f)))
        .collect();
    for (_, service) in compose["services"].as_mapping().expect("services") {
        for volume in service["volumes"].as_sequence().into_iter().flatten() {
            let source = volume.as_str().and_then(|v| v.split(':').next()).unwrap_or("");
            if source.ends_with(".toml") {
                files.push(dir.join(source));
            }
        }
    }
    files
}

/// Every Kubernetes object in deploy/k8s, by kind.
fn k8s_objects() -> Vec<Value> {
    files_under(&root().join("deploy/k8s"), &["yaml", "yml"])
        .iter()
        .flat_map(|p| yaml(p))
        .filter(|doc| doc["kind"].as_str() != Some("Kustomization"))
        .collect()
}

fn k8s_one<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = objects.iter().filter(|o| o["kind"].as_str() == Some(kind)).collect();
    assert_eq!(found.len(), 1, "one {kind} expected");
    found[0]
}

#[test]
fn every_yaml_and_json_file_in_deploy_parses() {
    let deploy = root().join("deploy");
    let yamls = files_under(&deploy, &["yaml", "yml"]);
    for path in &yamls {
        assert!(!yaml(path).is_empty(), "{} is empty", path.display());
    }
    let jsons = files_under(&deploy, &["json"]);
    for path in &jsons {
        let text = std::fs::read_to_string(path).unwrap();
        serde_json::from_str::<serde_json::Value>(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
    // compose, its Prometheus, Grafana's two provisioning files, the systemd
    // Prometheus, and the kustomization with its seven objects.
    assert!(yamls.len() >= 13, "{yamls:?}");
    assert!(!jsons.is_empty());
}

#[test]
fn every_config_a_manifest_mounts_or_the_repository_ships_passes_check_config() {
    let mounted = compose_configs(&compose());
    assert!(!mounted.is_empty(), "compose.yaml mounts no quotagate config");
    for path in &mounted {
        check_config(path);
    }
    let mut inline = 0;
    for object in k8s_objects().iter().filter(|o| o["kind"].as_str() == Some("ConfigMap")) {
        for (key, text) in object["data"].as_mapping().expect("ConfigMap data") {
            let key = str_of(key, "ConfigMap key");
            if key.ends_with(".toml") {
                check_config_text(str_of(text, key), key);
                inline += 1;
            }
        }
    }
    assert_eq!(inline, 1, "the ConfigMap carries the gateway's config.toml");
    let shipped =
        [files_under(&root().join("config"), &["toml"]), files_under(&root().join("bench"), &["toml"])];
    let shipped: Vec<PathBuf> = shipped.concat();
    assert!(shipped.len() >= 5, "{shipped:?}");
    for path in &shipped {
        check_config(path);
    }
}

#[test]
fn compose_runs_two_gateways_that_prometheus_scrapes_and_grafana_charts() {
    let compose = compose();
    let gateways = gateway_services(&compose);
    let names: Vec<&str> = gateways.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.len(), 2, "two gateway replicas: {names:?}");
    assert!(compose["services"]["redis"].is_mapping(), "a redis service for the shared store");

    // Each gateway runs the mounted config, listening where Prometheus looks.
    let mut admin_ports = BTreeSet::new();
    for (name, service) in &gateways {
        let env = &service["environment"];
        let config_path = str_of(&env["QUOTAGATE_CONFIG"], "QUOTAGATE_CONFIG");
        let targets: Vec<&str> =
            seq(&service["configs"], "configs").iter().map(|c| str_of(&c["target"], "target")).collect();
        assert_eq!(targets, [config_path], "{name} runs the config it mounts");
        let admin = str_of(&env["QUOTAGATE_ADMIN_LISTEN"], "QUOTAGATE_ADMIN_LISTEN");
        assert!(admin.starts_with("0.0.0.0:"), "{name}: {admin} is reachable from Prometheus");
        admin_ports.insert(port_of(admin));
    }
    assert_eq!(admin_ports.len(), 1);
    let admin_port = admin_ports.pop_first().unwrap();

    let prometheus = &compose["services"]["prometheus"];
    let mounts: Vec<&str> =
        seq(&prometheus["volumes"], "volumes").iter().map(|v| str_of(v, "volume")).collect();
    let config =
        mounts.iter().find(|m| m.contains(":/etc/prometheus/prometheus.yml")).expect("prometheus.yml");
    let scrape = yaml_one(&root().join("deploy").join(config.split(':').next().unwrap()));
    let scraped: BTreeSet<&str> = seq(&scrape["scrape_configs"], "scrape_configs")
        .iter()
        .flat_map(|job| seq(&job["static_configs"], "static_configs"))
        .flat_map(|s| seq(&s["targets"], "targets"))
        .map(|t| str_of(t, "target"))
        .collect();
    for name in &names {
        let target = format!("{name}:{admin_port}");
        assert!(scraped.contains(target.as_str()), "Prometheus does not scrape {target}: {scraped:?}");
    }

    // Grafana: provisioning mounted, the dashboard where the provider looks,
    // the data source the Prometheus service.
    let grafana = &compose["services"]["grafana"];
    let mounts: Vec<&str> = seq(&grafana["volumes"], "volumes").iter().map(|v| str_of(v, "volume")).collect();
    assert!(mounts.contains(&"./grafana/provisioning:/etc/grafana/provisioning:ro"), "{mounts:?}");
    let dashboard =
        mounts.iter().find(|m| m.starts_with("./grafana/quotagate-dashboard.json:")).expect("dashboard");
    let dashboard_dir = Path::new(dashboard.split(':').nth(1).unwrap()).parent().unwrap();
    let providers = yaml_one(&root().join("deploy/grafana/provisioning/dashboards/quotagate.yaml"));
    let provider_path = str_of(&providers["providers"][0]["options"]["path"], "provider path");
    assert_eq!(Path::new(provider_path), dashboard_dir);
    let sources = yaml_one(&root().join("deploy/grafana/provisioning/datasources/prometheus.yaml"));
    assert_eq!(sources["datasources"][0]["type"].as_str(), Some("prometheus"));
    assert_eq!(sources["datasources"][0]["url"].as_str(), Some("http://prometheus:9090"));
    assert_eq!(sources["datasources"][0]["isDefault"].as_bool(), Some(true));
}

#[test]
fn kubernetes_runs_two_probed_replicas_with_a_budget_and_a_monitor() {
    // Every manifest is applied by the kustomization.
    let dir = root().join("deploy/k8s");
    let kustomization = yaml_one(&dir.join("kustomization.yaml"));
    let listed: BTreeSet<&str> =
        seq(&kustomization["resources"], "resources").iter().map(|r| str_of(r, "r")).collect();
    let on_disk: Vec<String> = files_under(&dir, &["yaml"])
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .filter(|n| n != "kustomization.yaml")
        .collect();
    assert_eq!(
        listed,
        on_disk.iter().map(String::as_str).collect(),
        "kustomization.yaml lists every manifest"
    );

    let objects = k8s_objects();
    let deployment = k8s_one(&objects, "Deployment");
    assert_eq!(deployment["spec"]["replicas"].as_u64(), Some(2));
    let pod = &deployment["spec"]["template"];
    let pod_labels = &pod["metadata"]["labels"];
    assert_eq!(&deployment["spec"]["selector"]["matchLabels"], pod_labels);
    assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    let containers = seq(&pod["spec"]["containers"], "containers");
    assert_eq!(containers.len(), 1);
    let container = &containers[0];
    assert_eq!(container["securityContext"]["allowPrivilegeEscalation"].as_bool(), Some(false));

    // The config the pod runs: the ConfigMap, mounted where QUOTAGATE_CONFIG points.
    let env = |name: &str| {
        seq(&container["env"], "env")
            .iter()
            .find(|e| e["name"].as_str() == Some(name))
            .map(|e| str_of(&e["value"], name).to_string())
            .unwrap_or_else(|| panic!("no {name} in the container's env"))
    };
    let config_mount = seq(&container["volumeMounts"], "volumeMounts")
        .iter()
        .find(|m| m["mountPath"].as_str() == Some(env("QUOTAGATE_CONFIG").as_str()))
        .expect("QUOTAGATE_CONFIG names a mounted file");
    let volume = seq(&pod["spec"]["volumes"], "volumes")
        .iter()
        .find(|v| v["name"] == config_mount["name"])
        .expect("the config volume");
    let configmap = k8s_one(&objects, "ConfigMap");
    assert_eq!(volume["configMap"]["name"], configmap["metadata"]["name"]);
    let key = str_of(&config_mount["subPath"], "subPath");
    let config = Config::from_toml(str_of(&configmap["data"][key], key), key).unwrap();
    assert_eq!(
        str_of(&configmap["data"][key], key),
        std::fs::read_to_string(root().join("config/examples/replicas-redis.toml")).unwrap(),
        "the ConfigMap is config/examples/replicas-redis.toml word for word"
    );

    // Both probes on the admin port, which is the config's and the env's.
    let admin_port = config.admin_listen.port();
    assert_eq!(port_of(&env("QUOTAGATE_ADMIN_LISTEN")), admin_port);
    let named_port = |name: &str| {
        seq(&container["ports"], "ports")
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("no container port {name}"))
    };
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe}");
        assert_eq!(
            named_port(str_of(&get["port"], probe)),
            u64::from(admin_port),
            "{probe} on the admin port"
        );
    }

    // The Service selects the pods and names the admin port; the
    // ServiceMonitor scrapes that port on that Service.
    let service = k8s_one(&objects, "Service");
    for (k, v) in service["spec"]["selector"].as_mapping().expect("selector") {
        assert_eq!(&pod_labels[str_of(k, "label")], v, "the Service selects the pods");
    }
    let admin = seq(&service["spec"]["ports"], "ports")
        .iter()
        .find(|p| p["port"].as_u64() == Some(u64::from(admin_port)))
        .expect("the Service exposes the admin port");
    assert_eq!(named_port(str_of(&admin["targetPort"], "targetPort")), u64::from(admin_port));
    let monitor = k8s_one(&objects, "ServiceMonitor");
    let endpoints = seq(&monitor["spec"]["endpoints"], "endpoints");
    assert_eq!(endpoints[0]["port"], admin["name"], "the ServiceMonitor scrapes the admin port");
    assert_eq!(endpoints[0]["path"].as_str(), Some("/metrics"));
    for (k, v) in monitor["spec"]["selector"]["matchLabels"].as_mapping().expect("matchLabels") {
        assert_eq!(
            &service["metadata"]["labels"][str_of(k, "label")],
            v,
            "the ServiceMonitor selects the Service"
        );
    }

    // The budget keeps one replica up and covers the pods.
    let pdb = k8s_one(&objects, "PodDisruptionBudget");
    assert_eq!(pdb["spec"]["minAvailable"].as_u64(), Some(1));
    for (k, v) in pdb["spec"]["selector"]["matchLabels"].as_mapping().expect("matchLabels") {
        assert_eq!(&pod_labels[str_of(k, "label")], v, "the budget covers the pods");
    }

    // Client keys: a Secret the pod mounts, optional, and no config key names it.
    let secret = k8s_one(&objects, "Secret");
    let keys_volume = seq(&pod["spec"]["volumes"], "volumes")
        .iter()
        .find(|v| v["secret"]["secretName"] == secret["metadata"]["name"])
        .expect("the client-key Secret is mounted");
    assert_eq!(keys_volume["secret"]["optional"].as_bool(), Some(true));
}

/// Check `pair` against the built-in limits for `replicas` replicas: each
/// call window and running-time budget at the full limit when the replicas
/// share them (Redis), else at most 1/replicas of it (a call window: and no
/// less).
fn check_split(pair: &Config, replicas: u32, shared: bool, origin: &str) {
    let builtin = Config::builtin();
    assert_eq!(pair.policies.0.len(), builtin.policies.0.len(), "{origin}");
    for (mine, theirs) in pair.policies.0.iter().zip(&builtin.policies.0) {
        assert_eq!(
            (&mine.name, mine.paths.len(), mine.methods.len()),
            (&theirs.name, theirs.paths.len(), theirs.methods.len())
        );
        assert_eq!(mine.windows.len(), theirs.windows.len(), "{}", mine.name);
        assert_eq!(mine.budgets.len(), theirs.budgets.len(), "{}", mine.name);
        for (b, full) in mine.budgets.iter().zip(&theirs.budgets) {
            assert_eq!(b.per, full.per, "{}", mine.name);
            if shared {
                assert_eq!(b.limit, full.limit, "{origin}: {} shares the full running time", mine.name);
            } else {
                assert!(
                    b.limit * replicas <= full.limit,
                    "{}: running time {:?} x {replicas}",
                    mine.name,
                    b.limit
                );
            }
        }
        for (w, full) in mine.windows.iter().zip(&theirs.windows) {
            assert_eq!(w.per, full.per, "{}", mine.name);
            if shared {
                assert_eq!(w.limit, full.limit, "{origin}: {} shares the full limit", mine.name);
                continue;
            }
            assert!(
                w.limit.get() * replicas <= full.limit.get(),
                "{}: {} x {replicas} > {}",
                mine.name,
                w.limit,
                full.limit
            );
            assert!(
                (w.limit.get() + 1) * replicas > full.limit.get(),
                "{}: {} wastes quota",
                mine.name,
                w.limit
            );
        }
    }
}

/// The replicas the manifests run share one exact quota through Redis: the
/// config they mount uses the Redis store, with `replicas` (the share each
/// takes alone while Redis is down) equal to the number of replicas, and
/// every call window at its full limit.
#[test]
fn the_replicas_share_one_quota_through_redis() {
    let replicas = gateway_services(&compose()).len() as u32;
    let objects = k8s_objects();
    assert_eq!(k8s_one(&objects, "Deployment")["spec"]["replicas"].as_u64(), Some(u64::from(replicas)));
    let configs = compose_configs(&compose());
    assert!(!configs.is_empty());
    for path in configs {
        let config = Config::load(&path).unwrap();
        let origin = path.display().to_string();
        assert!(
            matches!(config.store.backend, Backend::Redis { .. }),
            "{origin}: {:?}",
            config.store.backend
        );
        assert_eq!(config.store.replicas.get(), replicas, "{origin}");
        assert_eq!(config.store.on_outage, OnOutage::Local, "{origin}");
        check_split(&config, replicas, true, &origin);
    }
}

/// Replicas that each count in memory (no Redis) must split the tenant's
/// quota: container-pair.toml gives each of two at most half of every limit.
#[test]
fn the_pair_without_redis_never_admits_more_than_one_quota() {
    let path = root().join("config/examples/container-pair.toml");
    let pair = Config::load(&path).unwrap();
    assert_ne!(pair.store.backend, Backend::Memory, "state survives a restart");
    check_split(&pair, 2, false, &path.display().to_string());
}

#[test]
fn the_systemd_unit_is_hardened_and_checks_its_config_first() {
    let unit = std::fs::read_to_string(root().join("deploy/systemd/quotagate.service")).unwrap();
    let settings: Vec<(&str, &str)> = unit
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect();
    let get = |key: &str| settings.iter().filter(|(k, _)| *k == key).map(|(_, v)| *v).collect::<Vec<_>>();
    for (key, value) in [
        ("DynamicUser", "yes"),
        ("ProtectSystem", "strict"),
        ("StateDirectory", "quotagate"),
        ("CapabilityBoundingSet", ""),
        ("AmbientCapabilities", ""),
        ("NoNewPrivileges", "yes"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
    ] {
        assert_eq!(get(key), [value], "{key}");
    }
    let start = get("ExecStart")[0];
    let config = start.split("--config ").nth(1).expect("ExecStart --config FILE").split(' ').next().unwrap();
    assert_eq!(get("ExecStartPre"), [format!("/usr/local/bin/quotagate check-config {config}").as_str()]);

    // Its Prometheus scrape config looks at the default admin address.
    let scrape = yaml_one(&root().join("deploy/prometheus/prometheus.yml"));
    let target = str_of(&scrape["scrape_configs"][0]["static_configs"][0]["targets"][0], "target");
    assert_eq!(target, Config::builtin().admin_listen.to_string());
}
