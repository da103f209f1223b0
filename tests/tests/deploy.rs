//! Deploy files (no cluster is reachable here): the Kubernetes manifests and the Compose file
//! are parsed as YAML and the fields that make a rollout safe are checked against the config
//! they ship; every shipped `shoal.toml` passes `shoald check` (with only its `secret_file`
//! pointed at a temp secret); the systemd unit validates before start, reloads with HUP, leaves
//! on SIGTERM and is hardened.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use serde_yaml_ng::Value;
use shoal_tests::tls::{KeyKind, TestCa};
use shoal_tests::{TempDir, bins, shoald_check};

type R = anyhow::Result<()>;

fn root() -> PathBuf {
    bins::workspace_root()
}

fn read(rel: &str) -> anyhow::Result<String> {
    let p = root().join(rel);
    std::fs::read_to_string(&p).with_context(|| format!("read {}", p.display()))
}

/// The string value of `key` in `[section]` of a TOML text (a minimal reader: `key = "v"`,
/// comments stripped). Enough for the scalar keys checked here; `shoald check` validates the rest.
fn toml_value(toml: &str, section: &str, key: &str) -> Option<String> {
    let mut current = String::new();
    for line in toml.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            current = line.trim_matches(|c| c == '[' || c == ']').trim().to_string();
            continue;
        }
        if current != section {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else { continue };
        if k.trim() != key {
            continue;
        }
        let v = v.trim();
        let v = if let Some(rest) = v.strip_prefix('"') {
            rest.split('"').next().unwrap_or_default().to_string()
        } else {
            v.split('#').next().unwrap_or_default().trim().to_string()
        };
        return Some(v);
    }
    None
}

/// The quoted strings of an array value (`seeds = ["a", "b"]`).
fn toml_strings(toml: &str, section: &str, key: &str) -> Vec<String> {
    let mut current = String::new();
    for line in toml.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            current = line.trim_matches(|c| c == '[' || c == ']').trim().to_string();
            continue;
        }
        if current == section
            && let Some((k, v)) = line.split_once('=')
            && k.trim() == key
        {
            return v.split('"').skip(1).step_by(2).map(String::from).collect();
        }
    }
    Vec::new()
}

/// `"20s"`, `"500ms"`, `"2m"`, `"1h"` as a duration.
fn dur(s: &str) -> anyhow::Result<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().with_context(|| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => bail!("bad duration unit in {s:?}"),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// `[node] drain_timeout + leave_grace` of a config: how long a graceful leave may take.
fn leave_budget(toml: &str) -> anyhow::Result<Duration> {
    let drain = toml_value(toml, "node", "drain_timeout").context("[node] drain_timeout missing")?;
    let grace = toml_value(toml, "node", "leave_grace").context("[node] leave_grace missing")?;
    Ok(dur(&drain)? + dur(&grace)?)
}

/// Port of a `host:port` address.
fn port_of(addr: &str) -> anyhow::Result<u16> {
    addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).with_context(|| format!("no port in {addr:?}"))
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

fn seq(v: &Value) -> &[Value] {
    v.as_sequence().map(Vec::as_slice).unwrap_or_default()
}

/// Runs `shoald check` on `toml` with its `secret_file = ...` line pointed at a temp secret
/// (the only change); asserts success and returns stdout.
fn check_with_temp_secret(label: &str, toml: &str) -> anyhow::Result<String> {
    let dir = TempDir::new(&format!("deploy-{label}"))?;
    let secret = dir.write("cluster.key", "c2hvYWwtdGVzdC1zZWNyZXQtMzItYnl0ZXMtbG9uZyEh\n")?;
    let mut replaced = 0;
    let rewritten: Vec<String> = toml
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("secret_file") && l.contains('=') {
                replaced += 1;
                format!("secret_file = \"{}\"", secret.display())
            } else {
                l.to_string()
            }
        })
        .collect();
    ensure!(replaced == 1, "{label}: expected exactly one secret_file line, found {replaced}");
    // Certificate entries (`{ cert = "...", key = "..." }`) point at a certificate of a test CA.
    let ca = TestCa::new("deploy test CA")?;
    let leaf = tokio::runtime::Runtime::new()?.block_on(ca.leaf(
        "www.example.com",
        &["www.example.com"],
        KeyKind::EcdsaP256,
    ))?;
    let cert = dir.write("www.pem", &leaf.cert_pem)?;
    let key = dir.write("www.key", &leaf.key_pem)?;
    let mut certs = 0;
    let rewritten: Vec<String> = rewritten
        .into_iter()
        .map(|l| match (l.find("cert = \""), l.find("key = \"")) {
            (Some(_), Some(_)) => {
                certs += 1;
                let open = if l.trim_start().starts_with("certificates") { "certificates = [" } else { "" };
                let close = if l.trim_end().ends_with(']') { "]" } else { "," };
                format!("{open}{{ cert = \"{}\", key = \"{}\" }}{close}", cert.display(), key.display())
            }
            _ => l,
        })
        .collect();
    ensure!(
        toml.contains("[tls]") == (certs > 0),
        "{label}: [tls] present: {}, certificate entries: {certs}",
        toml.contains("[tls]")
    );
    let (out, path) = shoald_check(&dir, "shoal.toml", &(rewritten.join("\n") + "\n"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    ensure!(
        out.status.success(),
        "shoald check --config {} ({label}) failed ({}):\nstdout: {stdout}\nstderr: {stderr}",
        path.display(),
        out.status
    );
    ensure!(stdout.contains(": ok ("), "{label}: unexpected check output {stdout:?}");
    let backends = toml.lines().filter(|l| l.trim() == "[[upstream.backend]]").count();
    ensure!(stdout.contains(&format!("({backends} backends")), "{label}: {backends} backends expected in {stdout:?}");
    Ok(stdout)
}

// ---------------------------------------------------------------------------------------------
// Kubernetes

struct K8s {
    docs: Vec<Value>,
}

impl K8s {
    fn load() -> anyhow::Result<Self> {
        let text = read("deploy/kubernetes/shoal.yaml")?;
        let mut docs = Vec::new();
        // Documents are separated by `---` lines (serde is not a dependency here, so each
        // document is parsed on its own rather than through the multi-document Deserializer).
        let mut chunks = vec![String::new()];
        for line in text.lines() {
            if line.trim_end() == "---" {
                chunks.push(String::new());
            } else {
                let last = chunks.last_mut().unwrap();
                last.push_str(line);
                last.push('\n');
            }
        }
        for (i, chunk) in chunks.iter().enumerate() {
            let v: Value = serde_yaml_ng::from_str(chunk)
                .with_context(|| format!("deploy/kubernetes/shoal.yaml document {i} is not YAML"))?;
            if !v.is_null() {
                docs.push(v);
            }
        }
        Ok(K8s { docs })
    }

    fn all(&self, kind: &str) -> Vec<&Value> {
        self.docs.iter().filter(|d| s(&d["kind"]) == kind).collect()
    }

    fn one(&self, kind: &str) -> anyhow::Result<&Value> {
        let v = self.all(kind);
        ensure!(v.len() == 1, "expected one {kind}, found {}", v.len());
        Ok(v[0])
    }

    fn config_toml(&self) -> anyhow::Result<String> {
        let cm = self.one("ConfigMap")?;
        Ok(cm["data"]["shoal.toml"].as_str().context("ConfigMap has no data.shoal.toml")?.to_string())
    }
}

/// Whether a `matchLabels`/`selector` mapping selects pods with `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let Some(sel) = selector.as_mapping() else { return false };
    !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn container_port(container: &Value, name_or_number: &Value) -> Option<u64> {
    if let Some(n) = name_or_number.as_u64() {
        return Some(n);
    }
    seq(&container["ports"]).iter().find(|p| p["name"] == *name_or_number).and_then(|p| p["containerPort"].as_u64())
}

#[test]
fn kubernetes_manifests_parse_with_the_expected_objects() -> R {
    let k = K8s::load()?;
    let kinds: BTreeSet<&str> = k.docs.iter().map(|d| s(&d["kind"])).collect();
    for kind in ["ConfigMap", "Service", "StatefulSet", "PodDisruptionBudget"] {
        ensure!(kinds.contains(kind), "no {kind} in deploy/kubernetes/shoal.yaml (kinds: {kinds:?})");
    }
    for d in &k.docs {
        ensure!(!s(&d["apiVersion"]).is_empty() && !s(&d["metadata"]["name"]).is_empty(), "incomplete object: {d:?}");
    }
    Ok(())
}

#[test]
fn kubernetes_statefulset_probes_prestop_and_grace() -> R {
    let k = K8s::load()?;
    let toml = k.config_toml()?;
    let sts = k.one("StatefulSet")?;
    let pod = &sts["spec"]["template"]["spec"];
    let containers = seq(&pod["containers"]);
    ensure!(containers.len() == 1, "one shoald container expected, found {}", containers.len());
    let c = &containers[0];
    let admin_port = port_of(&toml_value(&toml, "node", "admin").context("[node] admin missing")?)? as u64;
    let control_port = port_of(&toml_value(&toml, "node", "control").context("[node] control missing")?)?;

    // Probes: readiness on /ready, liveness on /live, both on the admin listener.
    for (probe, path) in [("readinessProbe", "/ready"), ("livenessProbe", "/live")] {
        let get = &c[probe]["httpGet"];
        ensure!(s(&get["path"]) == path, "{probe} path is {:?}, want {path}", get["path"]);
        let port =
            container_port(c, &get["port"]).with_context(|| format!("{probe} port {:?} unknown", get["port"]))?;
        ensure!(port == admin_port, "{probe} on port {port}, but the admin listener is on {admin_port}");
    }
    // A readiness probe that reacts within the leave grace: /ready turns 503 on `draining`.
    let grace = dur(&toml_value(&toml, "node", "leave_grace").context("leave_grace")?)?;
    let period = c["readinessProbe"]["periodSeconds"].as_u64().unwrap_or(10);
    let failures = c["readinessProbe"]["failureThreshold"].as_u64().unwrap_or(3);
    ensure!(
        Duration::from_secs(period * failures) <= grace,
        "readiness needs {}s to notice draining but leave_grace is {grace:?}",
        period * failures
    );

    // preStop: `shoal ... leave` against this pod's control port, with the cluster secret.
    let cmd: Vec<&str> = seq(&c["lifecycle"]["preStop"]["exec"]["command"]).iter().map(s).collect();
    ensure!(!cmd.is_empty(), "no preStop exec command");
    ensure!(cmd[0].rsplit('/').next() == Some("shoal"), "preStop runs {:?}, not shoal", cmd[0]);
    ensure!(cmd.contains(&"leave"), "preStop does not run `leave`: {cmd:?}");
    let arg_after = |flag: &str| {
        cmd.iter()
            .position(|a| *a == flag)
            .and_then(|i| cmd.get(i + 1))
            .copied()
            .or_else(|| cmd.iter().find_map(|a| a.strip_prefix(flag).and_then(|r| r.strip_prefix('='))))
    };
    let node = arg_after("--node").context("preStop has no --node")?;
    ensure!(port_of(node)? == control_port, "preStop talks to {node}, control is on {control_port}");
    let secret_file = toml_value(&toml, "cluster", "secret_file").context("[cluster] secret_file missing")?;
    ensure!(
        arg_after("--secret-file") == Some(secret_file.as_str()),
        "preStop --secret-file {:?} is not the config's secret_file {secret_file}",
        arg_after("--secret-file")
    );
    let prestop_drain = match arg_after("--drain-timeout") {
        Some(d) => dur(d)?,
        None => Duration::from_secs(30), // the CLI's default
    };

    // Graceful termination must outlast a full leave (preStop's drain + the config's).
    let budget = leave_budget(&toml)?;
    let tgps =
        Duration::from_secs(pod["terminationGracePeriodSeconds"].as_u64().context("no terminationGracePeriodSeconds")?);
    ensure!(tgps > budget, "terminationGracePeriodSeconds {tgps:?} <= drain_timeout + leave_grace {budget:?}");
    ensure!(
        tgps > prestop_drain + grace,
        "terminationGracePeriodSeconds {tgps:?} <= preStop drain {prestop_drain:?} + grace"
    );
    Ok(())
}

#[test]
fn kubernetes_secret_config_and_data_volumes() -> R {
    let k = K8s::load()?;
    let toml = k.config_toml()?;
    let cm_name = s(&k.one("ConfigMap")?["metadata"]["name"]).to_string();
    let sts = k.one("StatefulSet")?;
    let pod = &sts["spec"]["template"]["spec"];
    let c = &seq(&pod["containers"])[0];
    let mounts = seq(&c["volumeMounts"]);
    let volumes = seq(&pod["volumes"]);
    let mount_for = |path: &str| -> Option<(&Value, &str)> {
        // The mount whose mountPath is `path` or a parent directory of it.
        mounts
            .iter()
            .filter(|m| {
                let mp = s(&m["mountPath"]).trim_end_matches('/');
                path == mp || path.starts_with(&format!("{mp}/"))
            })
            .max_by_key(|m| s(&m["mountPath"]).len())
            .map(|m| (m, s(&m["name"])))
    };

    // The secret file lives on a volume backed by a Secret.
    let secret_file = toml_value(&toml, "cluster", "secret_file").context("[cluster] secret_file missing")?;
    let (_, vol) =
        mount_for(&secret_file).with_context(|| format!("secret_file {secret_file} is on no volume mount"))?;
    let v = volumes.iter().find(|v| s(&v["name"]) == vol).with_context(|| format!("volume {vol} not declared"))?;
    ensure!(!s(&v["secret"]["secretName"]).is_empty(), "secret_file's volume {vol} is not a Secret: {v:?}");

    // The certificate files live on a volume backed by a Secret (cert-manager renews it; the
    // kubelet swaps the files and the node re-reads them).
    for path in toml.split('"').filter(|w| w.starts_with("/etc/shoal/tls/")) {
        let (_, vol) = mount_for(path).with_context(|| format!("certificate file {path} is on no volume mount"))?;
        let v = volumes.iter().find(|v| s(&v["name"]) == vol).with_context(|| format!("volume {vol} not declared"))?;
        ensure!(!s(&v["secret"]["secretName"]).is_empty(), "certificate {path}'s volume {vol} is not a Secret: {v:?}");
    }
    ensure!(toml.contains("/etc/shoal/tls/tls.crt"), "the example serves the Secret's tls.crt");

    // The config file comes from the ConfigMap, at the path given to --config.
    let args: Vec<&str> = seq(&c["args"]).iter().map(s).collect();
    ensure!(args.first() == Some(&"run"), "container args do not start with `run`: {args:?}");
    let config_path = args
        .iter()
        .find_map(|a| a.strip_prefix("--config="))
        .or_else(|| args.iter().position(|a| *a == "--config").and_then(|i| args.get(i + 1).copied()))
        .context("no --config in the container args")?;
    let (m, vol) = mount_for(config_path).with_context(|| format!("{config_path} is on no volume mount"))?;
    let v = volumes.iter().find(|v| s(&v["name"]) == vol).with_context(|| format!("volume {vol} not declared"))?;
    ensure!(s(&v["configMap"]["name"]) == cm_name, "{config_path} is not from ConfigMap {cm_name}: {v:?}");
    if s(&m["mountPath"]) == config_path {
        ensure!(s(&m["subPath"]) == "shoal.toml", "config mounted without subPath shoal.toml: {m:?}");
    }
    ensure!(args.iter().any(|a| a.starts_with("--node-id")), "no --node-id: pods would all use the hostname default");

    // data_dir is on a volumeClaimTemplate (persisted run-time backend changes survive restarts).
    let data_dir = toml_value(&toml, "node", "data_dir").context("[node] data_dir missing")?;
    let (_, vol) = mount_for(&data_dir).with_context(|| format!("data_dir {data_dir} is on no volume mount"))?;
    let templates = seq(&sts["spec"]["volumeClaimTemplates"]);
    ensure!(
        templates.iter().any(|t| s(&t["metadata"]["name"]) == vol),
        "data_dir {data_dir} is on volume {vol}, which is not a volumeClaimTemplate"
    );
    Ok(())
}

#[test]
fn kubernetes_headless_service_seeds_and_pdb() -> R {
    let k = K8s::load()?;
    let toml = k.config_toml()?;
    let sts = k.one("StatefulSet")?;
    let sts_name = s(&sts["metadata"]["name"]);
    let labels = &sts["spec"]["template"]["metadata"]["labels"];
    ensure!(selects(&sts["spec"]["selector"]["matchLabels"], labels), "StatefulSet selector does not match its pods");

    // serviceName names a headless Service selecting these pods, publishing not-ready pods
    // (seeds must resolve while every pod is still starting).
    let service_name = s(&sts["spec"]["serviceName"]);
    let services = k.all("Service");
    let headless = services
        .iter()
        .find(|svc| s(&svc["metadata"]["name"]) == service_name)
        .with_context(|| format!("no Service named {service_name:?} (the StatefulSet's serviceName)"))?;
    ensure!(s(&headless["spec"]["clusterIP"]) == "None", "Service {service_name} is not headless (clusterIP None)");
    ensure!(selects(&headless["spec"]["selector"], labels), "Service {service_name} does not select the pods");
    ensure!(
        headless["spec"]["publishNotReadyAddresses"].as_bool() == Some(true),
        "{service_name}: publishNotReadyAddresses"
    );
    let gossip_port = port_of(&toml_value(&toml, "node", "gossip").context("[node] gossip")?)?;
    ensure!(
        seq(&headless["spec"]["ports"])
            .iter()
            .any(|p| p["port"].as_u64() == Some(gossip_port as u64) && s(&p["protocol"]) == "UDP"),
        "headless Service does not expose gossip {gossip_port}/UDP"
    );

    // Seeds are the pods' stable names through that Service.
    let replicas = sts["spec"]["replicas"].as_u64().context("replicas")?;
    let seeds = toml_strings(&toml, "cluster", "seeds");
    ensure!(!seeds.is_empty(), "no seeds in the ConfigMap's shoal.toml");
    let valid: BTreeSet<String> =
        (0..replicas).map(|i| format!("{sts_name}-{i}.{service_name}:{gossip_port}")).collect();
    for seed in &seeds {
        ensure!(valid.contains(seed), "seed {seed:?} is not one of the StatefulSet's pods ({valid:?})");
    }

    // A Service for traffic targets the proxy port.
    let proxy_port = port_of(&toml_value(&toml, "node", "listen").context("[node] listen")?)?;
    ensure!(
        services.iter().any(|svc| s(&svc["spec"]["clusterIP"]) != "None"
            && selects(&svc["spec"]["selector"], labels)
            && seq(&svc["spec"]["ports"]).iter().any(|p| p["targetPort"].as_u64() == Some(proxy_port as u64))),
        "no traffic Service targeting the proxy port {proxy_port}"
    );

    // A PodDisruptionBudget keeps at most one node away at a time.
    let pdb = k.one("PodDisruptionBudget")?;
    ensure!(selects(&pdb["spec"]["selector"]["matchLabels"], labels), "PDB does not select the pods");
    let max_unavailable = pdb["spec"]["maxUnavailable"].as_u64();
    let min_available = pdb["spec"]["minAvailable"].as_u64();
    ensure!(
        max_unavailable == Some(1) || min_available.is_some_and(|m| m >= 1 && m < replicas),
        "PDB should allow one pod down at a time: {pdb:?}"
    );
    Ok(())
}

#[test]
fn kubernetes_configmap_passes_shoald_check() -> R {
    let toml = K8s::load()?.config_toml()?;
    let out = check_with_temp_secret("kubernetes", &toml)?;
    ensure!(out.contains("cluster prod"), "{out}");
    Ok(())
}

/// The preStop command line is one the CLI accepts: against a closed port it fails as
/// "unreachable", not with a usage error.
#[test]
fn kubernetes_prestop_command_is_valid_cli() -> R {
    let k = K8s::load()?;
    let sts = k.one("StatefulSet")?;
    let c = &seq(&sts["spec"]["template"]["spec"]["containers"])[0];
    let cmd: Vec<String> =
        seq(&c["lifecycle"]["preStop"]["exec"]["command"]).iter().map(|v| s(v).to_string()).collect();
    ensure!(cmd.len() > 1, "preStop command: {cmd:?}");
    let dir = TempDir::new("deploy-prestop")?;
    let secret = dir.write("cluster.key", "c2hvYWwtdGVzdC1zZWNyZXQtMzItYnl0ZXMtbG9uZyEh\n")?;
    let closed = shoal_tests::free_addr().to_string();
    let mut args: Vec<String> = cmd[1..].to_vec();
    for i in 0..args.len() {
        if i > 0 && args[i - 1] == "--node" {
            args[i] = closed.clone();
        }
        if i > 0 && args[i - 1] == "--secret-file" {
            args[i] = secret.display().to_string();
        }
    }
    let out = Command::new(bins::shoal()).args(&args).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.code() == Some(2) && stderr.contains("unreachable"), "shoal {args:?}: {} {stderr}", out.status);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Docker Compose

fn compose() -> anyhow::Result<Value> {
    let text = read("deploy/docker/compose.yaml")?;
    let mut v: Value = serde_yaml_ng::from_str(&text).context("deploy/docker/compose.yaml is not YAML")?;
    v.apply_merge().context("merge keys in compose.yaml")?;
    Ok(v)
}

fn is_shoal_service(svc: &Value) -> bool {
    s(&svc["image"]).starts_with("shoal") || !svc["build"].is_null()
}

#[test]
fn compose_has_three_nodes_three_backends_and_a_shared_secret() -> R {
    let c = compose()?;
    let toml = read("deploy/docker/shoal.toml")?;
    let services = c["services"].as_mapping().context("no services")?;
    let nodes: Vec<(&str, &Value)> =
        services.iter().filter(|(_, v)| is_shoal_service(v)).map(|(k, v)| (s(k), v)).collect();
    let backends: Vec<(&str, &Value)> =
        services.iter().filter(|(_, v)| !is_shoal_service(v)).map(|(k, v)| (s(k), v)).collect();
    ensure!(nodes.len() == 3, "3 shoal services expected: {:?}", nodes.iter().map(|n| n.0).collect::<Vec<_>>());
    ensure!(backends.len() == 3, "3 backends expected: {:?}", backends.iter().map(|n| n.0).collect::<Vec<_>>());

    // One secret, declared at the top level from a file, given to every node, and the
    // config's secret_file is where Compose mounts it.
    let secrets = c["secrets"].as_mapping().context("no top-level secrets")?;
    ensure!(secrets.len() == 1, "one shared secret expected: {secrets:?}");
    let (secret_name, secret_def) = secrets.iter().next().unwrap();
    let secret_name = s(secret_name);
    ensure!(!s(&secret_def["file"]).is_empty(), "secret {secret_name} has no file");
    let secret_file = toml_value(&toml, "cluster", "secret_file").context("[cluster] secret_file")?;
    ensure!(
        secret_file == format!("/run/secrets/{secret_name}"),
        "secret_file {secret_file} is not /run/secrets/{secret_name}"
    );

    let admin_port = port_of(&toml_value(&toml, "node", "admin").context("[node] admin")?)?;
    let gossip_port = port_of(&toml_value(&toml, "node", "gossip").context("[node] gossip")?)?;
    let mut ids = BTreeSet::new();
    for (name, svc) in &nodes {
        ensure!(seq(&svc["secrets"]).iter().any(|x| s(x) == secret_name), "{name} does not get secret {secret_name}");
        // Health check: /ready on the admin port.
        let test: Vec<&str> = seq(&svc["healthcheck"]["test"]).iter().map(s).collect();
        let joined = test.join(" ");
        ensure!(
            joined.contains(&format!(":{admin_port}/ready")),
            "{name}: healthcheck {test:?} does not hit /ready on the admin port {admin_port}"
        );
        // Config file mounted where --config points.
        let cmd: Vec<&str> = seq(&svc["command"]).iter().map(s).collect();
        ensure!(cmd.first() == Some(&"run"), "{name}: command {cmd:?}");
        let config = cmd.iter().position(|a| *a == "--config").and_then(|i| cmd.get(i + 1)).context("no --config")?;
        ensure!(
            seq(&svc["volumes"]).iter().any(|v| s(v).split(':').nth(1) == Some(*config)),
            "{name}: {config} is not mounted"
        );
        let id = cmd.iter().position(|a| *a == "--node-id").and_then(|i| cmd.get(i + 1)).context("no --node-id")?;
        ids.insert(id.to_string());
        // Stopping waits for a full graceful leave.
        let stop = dur(s(&svc["stop_grace_period"]))?;
        let budget = leave_budget(&toml)?;
        ensure!(stop > budget, "{name}: stop_grace_period {stop:?} <= drain_timeout + leave_grace {budget:?}");
    }
    ensure!(ids.len() == 3, "node ids must differ: {ids:?}");

    // Seeds name the node services; upstream backends are the backend services' addresses.
    let node_names: BTreeSet<&str> = nodes.iter().map(|n| n.0).collect();
    for seed in toml_strings(&toml, "cluster", "seeds") {
        let (host, port) = seed.rsplit_once(':').context("seed without port")?;
        ensure!(node_names.contains(host) && port == gossip_port.to_string(), "seed {seed} is not a node service");
    }
    let backend_ips: BTreeSet<&str> = backends
        .iter()
        .flat_map(|(_, svc)| svc["networks"].as_mapping().into_iter().flat_map(|m| m.values()))
        .map(|n| s(&n["ipv4_address"]))
        .collect();
    let upstream: Vec<String> = toml
        .lines()
        .filter_map(|l| l.trim().strip_prefix("addr = \"").map(|r| r.trim_end_matches('"').to_string()))
        .collect();
    ensure!(upstream.len() == 3, "3 upstream backends expected in deploy/docker/shoal.toml: {upstream:?}");
    for a in &upstream {
        let ip = a.rsplit_once(':').map(|x| x.0).unwrap_or_default();
        ensure!(backend_ips.contains(ip), "upstream {a} is not a backend service ({backend_ips:?})");
    }
    Ok(())
}

/// The image the compose nodes run has `curl` (the health check) and `shoal` (for `leave`),
/// and its entrypoint is shoald (compose and Kubernetes pass `run ...` as arguments).
#[test]
fn dockerfile_matches_compose_and_kubernetes() -> R {
    let df = read("deploy/docker/Dockerfile")?;
    ensure!(df.contains("install") && df.contains("curl"), "the runtime image lacks curl for the health check");
    ensure!(
        df.lines().any(|l| l.starts_with("COPY") && l.contains("release/shoal ") && l.contains("/usr/local/bin")),
        "the image has no /usr/local/bin/shoal (used by the Kubernetes preStop)"
    );
    ensure!(df.contains("ENTRYPOINT [\"/usr/local/bin/shoald\"]"), "entrypoint is not shoald");
    ensure!(df.lines().any(|l| l.starts_with("USER") && l.trim() != "USER root"), "image runs as root");
    Ok(())
}

#[test]
fn docker_and_systemd_configs_pass_shoald_check() -> R {
    let out = check_with_temp_secret("docker", &read("deploy/docker/shoal.toml")?)?;
    ensure!(out.contains("cluster compose"), "{out}");
    let out = check_with_temp_secret("systemd", &read("deploy/systemd/shoal.toml")?)?;
    ensure!(out.contains("node lb-1") && out.contains("cluster prod"), "{out}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// systemd

/// Values of `key=` in the `[Service]` section (repeatable keys give several).
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    let mut section = "";
    let mut out = Vec::new();
    for line in unit.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            section = line;
            continue;
        }
        if section == "[Service]"
            && let Some((k, v)) = line.split_once('=')
            && k.trim() == key
        {
            out.push(v.trim().to_string());
        }
    }
    out
}

#[test]
fn systemd_unit_checks_reloads_leaves_and_is_hardened() -> R {
    check_systemd_unit(&read("deploy/systemd/shoald.service")?, &read("deploy/systemd/shoal.toml")?)
}

fn check_systemd_unit(unit: &str, config: &str) -> R {
    let one = |k: &str| -> anyhow::Result<String> {
        let v = unit_values(unit, k);
        ensure!(v.len() == 1, "{k}= expected once in [Service], found {v:?}");
        Ok(v[0].clone())
    };

    let pre = unit_values(unit, "ExecStartPre");
    ensure!(pre.iter().any(|p| p.contains("shoald check --config")), "no ExecStartPre with `shoald check`: {pre:?}");
    let start = one("ExecStart")?;
    ensure!(start.contains("shoald run --config"), "ExecStart {start:?}");
    let cfg_of = |cmd: &str| cmd.split_whitespace().skip_while(|w| *w != "--config").nth(1).map(String::from);
    ensure!(pre.iter().any(|p| cfg_of(p) == cfg_of(&start)), "ExecStartPre checks another file than ExecStart runs");
    let reload = unit_values(unit, "ExecReload");
    ensure!(
        reload.iter().any(|r| r.contains("kill") && r.contains("-HUP") && r.contains("$MAINPID")),
        "no ExecReload sending HUP to $MAINPID: {reload:?}"
    );
    ensure!(one("KillSignal")? == "SIGTERM", "KillSignal must be SIGTERM (graceful leave)");
    let stop = dur(&one("TimeoutStopSec")?)?;
    let budget = leave_budget(config)?;
    ensure!(stop > budget, "TimeoutStopSec {stop:?} <= drain_timeout + leave_grace {budget:?}");

    ensure!(one("NoNewPrivileges")? == "yes", "NoNewPrivileges");
    let ps = one("ProtectSystem")?;
    ensure!(["strict", "full", "yes", "true"].contains(&ps.as_str()), "ProtectSystem={ps}");
    for k in ["ProtectHome", "PrivateTmp"] {
        ensure!(one(k)? == "yes", "{k}=yes expected");
    }
    ensure!(one("User")? != "root", "runs as root");

    // Every file the config reads from the credentials directory is a LoadCredential= of the
    // unit (else it does not exist at start and `shoald check` fails the unit).
    let creds: Vec<String> = unit_values(unit, "LoadCredential")
        .iter()
        .filter_map(|v| v.split_once(':').map(|(id, _)| id.to_string()))
        .collect();
    for name in config.split('"').filter_map(|w| w.strip_prefix("/run/credentials/shoald.service/")) {
        ensure!(creds.iter().any(|c| c == name), "the config reads credential {name}, the unit loads only {creds:?}");
    }

    // With ProtectSystem=strict the whole file system is read-only: everything the config
    // writes (data_dir, access log) must be a writable path, and each ReadWritePaths entry
    // must exist at start (or be "-"-prefixed), else the unit fails with 226/NAMESPACE.
    if ps == "strict" {
        let state_dirs: Vec<String> = unit_values(unit, "StateDirectory")
            .iter()
            .flat_map(|v| v.split_whitespace().map(|d| format!("/var/lib/{d}")).collect::<Vec<_>>())
            .collect();
        let logs_dirs: Vec<String> = unit_values(unit, "LogsDirectory")
            .iter()
            .flat_map(|v| v.split_whitespace().map(|d| format!("/var/log/{d}")).collect::<Vec<_>>())
            .collect();
        let rw: Vec<String> = unit_values(unit, "ReadWritePaths")
            .iter()
            .flat_map(|v| v.split_whitespace().map(String::from).collect::<Vec<_>>())
            .collect();
        let created: Vec<&String> = state_dirs.iter().chain(&logs_dirs).collect();
        // What the config writes must be in a directory the unit creates for User= (the
        // process is not root: nothing else makes a fresh host's directory writable for it).
        let mut wanted = vec![toml_value(config, "node", "data_dir").context("data_dir")?];
        if let Some(log) = toml_value(config, "access_log", "path") {
            wanted.push(log);
        }
        for p in &wanted {
            ensure!(
                created.iter().any(|d| p == d.as_str() || p.starts_with(&format!("{d}/"))),
                "{p} (written by shoald) is not under a directory the unit creates for User={} \
                 (StateDirectory= gives {state_dirs:?}, LogsDirectory= gives {logs_dirs:?})",
                one("User")?
            );
        }
        // ReadWritePaths entries that systemd does not create itself must be optional ("-")
        // or created by StateDirectory=/LogsDirectory=; a missing one aborts the start.
        for d in &rw {
            let bare = d.trim_start_matches(['-', '+']);
            let made = created.iter().any(|c| c.as_str() == bare);
            ensure!(
                d.starts_with('-') || made,
                "ReadWritePaths={bare} is neither created by the unit (StateDirectory=/LogsDirectory=) nor \
                 optional (\"-{bare}\"): on a host without it, the unit fails to start (226/NAMESPACE), \
                 and nothing makes it writable by User={}",
                one("User")?
            );
        }
    }
    Ok(())
}
