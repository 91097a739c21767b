//! The Kubernetes manifests (`deploy/k8s`) checked by the tools a platform team would use:
//! kustomize renders every overlay, kubernetes-validate checks the built-in kinds against the
//! API schemas of the oldest Kubernetes with native sidecars and the newest, the published
//! schemas check cert-manager's and the Prometheus Operator's kinds, checkov scans for
//! security findings; then the rendered pods are read for what no schema knows: the config
//! byokd itself accepts, the drain fitting the grace period, mounts and ports agreeing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine;
use serde_json::Value;

const KUSTOMIZATIONS: [&str; 3] = ["overlays/local-kek", "overlays/aws-kms", "shared-mtls"];
/// Native sidecars (`restartPolicy: Always` on an init container) are on by default from 1.29.
const KUBERNETES: [&str; 2] = ["1.29.0", "1.37.0"];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command, what: &str) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what} is required ({e}); .ci/deps installs it"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `kubectl kustomize DIR`: the manifests as they would be applied.
fn render(dir: &str) -> String {
    let (ok, out) = run(
        Command::new("kubectl")
            .arg("kustomize")
            .arg(repo().join("deploy/k8s").join(dir)),
        "kubectl (with its built-in kustomize, on every machine of this kind)",
    );
    assert!(ok, "kustomize {dir}:\n{out}");
    out
}

fn docs(rendered: &str) -> Vec<Value> {
    rendered
        .split("\n---\n")
        .map(|d| serde_saphyr::from_str::<Value>(d).unwrap())
        .collect()
}

/// Every overlay rendered into a folder of its own, one file per kustomization.
fn rendered_files() -> (tempfile::TempDir, Vec<PathBuf>) {
    let dir = tempfile::tempdir().unwrap();
    let files = KUSTOMIZATIONS
        .iter()
        .map(|k| {
            let f = dir.path().join(format!("{}.yaml", k.replace('/', "-")));
            std::fs::write(&f, render(k)).unwrap();
            f
        })
        .collect();
    (dir, files)
}

fn venv(tool: &str) -> PathBuf {
    repo().join(".ci/venv/bin").join(tool)
}

fn kubernetes_validate(files: &[PathBuf], version: &str) -> (bool, String) {
    run(
        Command::new(venv("kubernetes-validate"))
            .args(["--strict", "--quiet", "--no-warn", "-k", version])
            .args(files),
        "kubernetes-validate (.ci/venv)",
    )
}

fn crds(files: &[PathBuf]) -> (bool, String) {
    run(
        Command::new("node")
            .arg(repo().join("tests/k8s/crds.mjs"))
            .args(files),
        "node with tests/k8s's packages",
    )
}

#[test]
fn every_manifest_passes_the_kubernetes_and_custom_resource_schemas() {
    let (dir, files) = rendered_files();
    for v in KUBERNETES {
        let (ok, out) = kubernetes_validate(&files, v);
        assert!(ok, "kubernetes-validate {v}:\n{out}");
    }
    let (ok, out) = crds(&files);
    assert!(ok, "custom resources:\n{out}");
    assert!(out.contains("7 custom resources valid"), "{out}");

    // The validators are strict: a misspelt field or a wrong type is caught.
    let bad = dir.path().join("bad.yaml");
    let sidecar = std::fs::read_to_string(&files[0]).unwrap();
    std::fs::write(
        &bad,
        sidecar.replace("restartPolicy: Always", "restartPolicyy: Always"),
    )
    .unwrap();
    let (ok, out) = kubernetes_validate(std::slice::from_ref(&bad), KUBERNETES[0]);
    assert!(!ok && out.contains("restartPolicyy"), "{out}");
    let shared = std::fs::read_to_string(&files[2]).unwrap();
    std::fs::write(
        &bad,
        shared.replace("\n  secretName: byokd-server-tls\n", "\n"),
    )
    .unwrap();
    let (ok, out) = crds(std::slice::from_ref(&bad));
    assert!(!ok && out.contains("secretName"), "{out}");
}

#[test]
fn checkov_finds_nothing_left_unjustified() {
    let (_dir, files) = rendered_files();
    let mut cmd = Command::new(venv("checkov"));
    cmd.args(["--skip-download", "--quiet", "--compact"])
        .args(["--framework", "kubernetes", "dockerfile"])
        .arg("-f")
        .arg(repo().join("deploy/Dockerfile"));
    for f in &files {
        cmd.arg("-f").arg(f);
    }
    let (ok, out) = run(&mut cmd, "checkov (.ci/venv)");
    assert!(ok, "checkov:\n{out}");
    assert!(out.contains("Failed checks: 0"), "{out}");
    // A finding is only ever skipped with its reason beside it.
    for f in files.iter().map(|f| std::fs::read_to_string(f).unwrap()) {
        for line in f.lines().filter(|l| l.contains("checkov.io/skip")) {
            let reason = line.split_once('=').map_or("", |(_, r)| r.trim());
            assert!(reason.len() > 30, "a skip without a reason: {line}");
        }
    }
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let all = find(docs, kind);
    assert_eq!(all.len(), 1, "one {kind}");
    all[0]
}

/// The byokd config the pod mounts, through byokd's own parser.
fn mounted_config(docs: &[Value]) -> byokd::config::Config {
    let text = if let Some(cm) = find(docs, "ConfigMap").first() {
        cm["data"]["byokd.yaml"].as_str().unwrap().to_owned()
    } else {
        let s = one(docs, "Secret")["data"]["byokd.yaml"].as_str().unwrap();
        let s: String = s.split_whitespace().collect();
        String::from_utf8(base64::engine::general_purpose::STANDARD.decode(s).unwrap()).unwrap()
    };
    byokd::config::Config::from_yaml(&text, Path::new("/etc/byokd/byokd.yaml"))
        .unwrap_or_else(|e| panic!("the overlay's byokd.yaml: {e}"))
}

/// The folder a container mounts `path` from, and the volume behind it.
fn volume_of<'a>(pod: &'a Value, container: &Value, path: &Path) -> (&'a Value, bool) {
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| path.starts_with(m["mountPath"].as_str().unwrap()))
        .max_by_key(|m| m["mountPath"].as_str().unwrap().len())
        .unwrap_or_else(|| panic!("nothing mounted at {}", path.display()));
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    (volume, mount["readOnly"] == true)
}

fn assert_locked_down(c: &Value) {
    let s = &c["securityContext"];
    let name = &c["name"];
    assert_eq!(s["allowPrivilegeEscalation"], false, "{name}");
    assert_eq!(s["readOnlyRootFilesystem"], true, "{name}");
    assert_eq!(s["runAsNonRoot"], true, "{name}");
    assert_eq!(s["capabilities"]["drop"][0], "ALL", "{name}");
    assert!(c["resources"]["requests"]["memory"].is_string(), "{name}");
    assert!(c["resources"]["limits"]["memory"].is_string(), "{name}");
}

#[test]
fn the_sidecar_is_native_locked_down_and_drains_within_the_grace_period() {
    for overlay in ["overlays/local-kek", "overlays/aws-kms"] {
        let docs = docs(&render(overlay));
        let deploy = one(&docs, "Deployment");
        let pod = &deploy["spec"]["template"]["spec"];
        let inits = pod["initContainers"].as_array().unwrap();
        // The config check runs first, then byokd as a native sidecar, then the app.
        assert_eq!(
            inits[0]["args"].as_array().unwrap()[2..],
            ["config", "check"],
            "{overlay}"
        );
        let sidecar = &inits[1];
        assert_eq!(sidecar["restartPolicy"], "Always", "{overlay}");
        for c in inits.iter().chain(pod["containers"].as_array().unwrap()) {
            assert_locked_down(c);
        }
        assert!(pod["securityContext"]["runAsUser"].as_u64().unwrap() >= 10000);
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );

        let cfg = mounted_config(&docs);
        assert!(
            cfg.listen.ip().is_loopback(),
            "{overlay}: data plane off loopback"
        );
        let admin = cfg.admin_listen.port();
        assert_eq!(sidecar["ports"][0]["containerPort"], admin);
        for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
            assert_eq!(
                sidecar[probe]["httpGet"]["port"],
                sidecar["ports"][0]["name"]
            );
        }
        assert_eq!(sidecar["readinessProbe"]["httpGet"]["path"], "/readyz");
        let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
        assert!(
            grace > cfg.limits.drain_timeout.as_secs() + 10,
            "{overlay}: {grace} s of grace for a {:?} drain and the app's own shutdown",
            cfg.limits.drain_timeout
        );
        // Every Secret is owner-read only (fsGroup adds group read, which byokd accepts).
        for v in pod["volumes"].as_array().unwrap() {
            if v["secret"].is_object() {
                assert_eq!(v["secret"]["defaultMode"], 0o400, "{overlay}: {v}");
            }
        }

        match (&cfg.kms, &cfg.store) {
            (
                byokd::keys::KmsConfig::Local { keks, .. },
                byokd::keys::StoreConfig::File { path, ledger },
            ) => {
                assert_eq!(overlay, "overlays/local-kek");
                for kek in keks.iter().map(|(_, p)| p) {
                    let (v, ro) = volume_of(pod, sidecar, kek);
                    assert!(v["secret"].is_object() && ro, "the KEK from a Secret: {v}");
                }
                let (v, ro) = volume_of(pod, sidecar, path);
                assert!(
                    v["secret"].is_object() && ro,
                    "the store from a Secret: {v}"
                );
                let (v, ro) = volume_of(pod, sidecar, ledger);
                assert!(v["emptyDir"].is_object() && !ro, "a writable ledger: {v}");
            }
            (byokd::keys::KmsConfig::Aws(_), byokd::keys::StoreConfig::Postgres { .. }) => {
                assert_eq!(overlay, "overlays/aws-kms");
                assert!(cfg.shared_state.is_some(), "Redis for shared budgets");
                let sa = one(&docs, "ServiceAccount");
                assert_eq!(pod["serviceAccountName"], sa["metadata"]["name"]);
                let role = sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
                    .as_str()
                    .unwrap();
                assert!(role.starts_with("arn:aws:iam::"), "IRSA: {role}");
                // No static AWS credentials anywhere, and the config is not in a ConfigMap.
                let all = render(overlay);
                assert!(
                    !all.contains("AWS_SECRET_ACCESS_KEY") && !all.contains("AWS_ACCESS_KEY_ID")
                );
                assert!(find(&docs, "ConfigMap").is_empty());
            }
            _ => panic!("{overlay}: an unexpected kms/store pair"),
        }

        // Prometheus finds the admin port: the ServiceMonitor's port is the Service's, whose
        // selector picks this pod and whose target is the sidecar's admin port.
        let svc = one(&docs, "Service");
        let labels = &deploy["spec"]["template"]["metadata"]["labels"];
        for (k, v) in svc["spec"]["selector"].as_object().unwrap() {
            assert_eq!(&labels[k], v);
        }
        let port = &svc["spec"]["ports"][0];
        assert_eq!(port["targetPort"], sidecar["ports"][0]["name"]);
        let sm = one(&docs, "ServiceMonitor");
        assert_eq!(sm["spec"]["endpoints"][0]["port"], port["name"]);
        assert_eq!(sm["spec"]["endpoints"][0]["path"], "/metrics");
        for (k, v) in sm["spec"]["selector"]["matchLabels"].as_object().unwrap() {
            assert_eq!(&svc["metadata"]["labels"][k], v);
        }
        let pdb = one(&docs, "PodDisruptionBudget");
        for (k, v) in pdb["spec"]["selector"]["matchLabels"].as_object().unwrap() {
            assert_eq!(&labels[k], v);
        }
    }
}

#[test]
fn the_shared_service_trusts_spiffe_certificates_from_cert_manager() {
    let docs = docs(&render("shared-mtls"));
    let certs = find(&docs, "Certificate");
    let client = certs
        .iter()
        .find(|c| {
            c["spec"]["usages"]
                .as_array()
                .is_some_and(|u| u.contains(&"client auth".into()))
        })
        .unwrap();
    let uri = client["spec"]["uris"][0].as_str().unwrap();
    let cfg = mounted_config_from_secret_string_data(&docs);
    let prefix = cfg
        .identity
        .iter()
        .find_map(|s| match s {
            byokd::identify::IdentitySource::Mtls(byokd::identify::CertTenant::UriSanPrefix(p)) => {
                Some(p.clone())
            }
            _ => None,
        })
        .expect("byokd reads the tenant from a URI SAN");
    assert_eq!(
        uri.strip_prefix(&prefix),
        Some("acme"),
        "{uri} under {prefix}"
    );
    // byokd's server certificate, with the CA byokd trusts for clients in the same secret.
    let tls = cfg.tls.as_ref().expect("TLS on the data listener");
    assert!(tls.client_ca.is_some(), "client certificates required");
    let server = certs
        .iter()
        .find(|c| {
            c["spec"]["usages"]
                .as_array()
                .is_some_and(|u| u.contains(&"server auth".into()))
        })
        .unwrap();
    assert_eq!(server["spec"]["issuerRef"], client["spec"]["issuerRef"]);
}

/// The shared service's config is a hand-written Secret (`stringData`).
fn mounted_config_from_secret_string_data(docs: &[Value]) -> byokd::config::Config {
    let secret = find(docs, "Secret")
        .into_iter()
        .find(|s| s["stringData"]["byokd.yaml"].is_string())
        .unwrap();
    let text = secret["stringData"]["byokd.yaml"].as_str().unwrap();
    byokd::config::Config::from_yaml(text, Path::new("/etc/byokd/config/byokd.yaml")).unwrap()
}
