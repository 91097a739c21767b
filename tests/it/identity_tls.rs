//! Identity and trust through the real server: HTTPS and mTLS on the data listener (tenant
//! from a SPIFFE URI SAN or the subject CN), refusal of untrusted, expired and wrong-usage
//! client certificates at the handshake, identity conflicts, header trust per peer, a
//! certificate rotation during a run, a real `curl --cert` call, and the end user's own key.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

const CHAT: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;

struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// A client or server certificate and its key, as PEM.
struct Leaf {
    cert: String,
    key: String,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        Pki {
            ca: CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    fn server(&self, cn: &str) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        Leaf {
            cert: p.signed_by(&key, &self.ca).unwrap().pem(),
            key: key.serialize_pem(),
        }
    }

    fn client(
        &self,
        cn: &str,
        uri: Option<&str>,
        usage: ExtendedKeyUsagePurpose,
        expired: bool,
    ) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        if let Some(u) = uri {
            p.subject_alt_names = vec![SanType::URI(u.try_into().unwrap())];
        }
        p.extended_key_usages = vec![usage];
        if expired {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        Leaf {
            cert: p.signed_by(&key, &self.ca).unwrap().pem(),
            key: key.serialize_pem(),
        }
    }

    fn ca_pem(&self) -> String {
        self.ca.pem()
    }
}

fn write_tls(dir: &Path, pki: &Pki, server: &Leaf) {
    std::fs::write(dir.join("tls.crt"), &server.cert).unwrap();
    std::fs::write(dir.join("tls.key"), &server.key).unwrap();
    std::fs::write(dir.join("ca.crt"), pki.ca_pem()).unwrap();
}

fn client_tls(ca_pem: &str, leaf: Option<&Leaf>) -> rustls::ClientConfig {
    let mut c = client_tls_no_alpn(ca_pem, leaf);
    c.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    c
}

fn client_tls_no_alpn(ca_pem: &str, leaf: Option<&Leaf>) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    match leaf {
        Some(l) => b
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(l.cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(l.key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => b.with_no_client_auth(),
    }
}

type HttpsClient = Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

fn https_client(ca_pem: &str, leaf: Option<&Leaf>) -> HttpsClient {
    let conn = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(client_tls_no_alpn(ca_pem, leaf))
        .https_only()
        .enable_http1()
        .enable_http2()
        .build();
    Client::builder(TokioExecutor::new()).build(conn)
}

/// Sends a chat request; `Err` when the connection or handshake failed.
async fn chat(
    c: &HttpsClient,
    port: u16,
    headers: &[(&str, &str)],
) -> Result<(Got, http::Version), String> {
    let mut b = http::Request::builder()
        .method("POST")
        .uri(format!("https://localhost:{port}/v1/chat/completions"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = c
        .request(b.body(Full::new(Bytes::from(CHAT))).unwrap())
        .await
        .map_err(|e| format!("{e:?}"))?;
    let version = resp.version();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((
        Got {
            status: parts.status,
            headers: parts.headers,
            body,
        },
        version,
    ))
}

/// The CN of the certificate the server presents on a new connection.
async fn server_cn(port: u16, ca_pem: &str, leaf: &Leaf) -> String {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_tls(ca_pem, Some(leaf))));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let der = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
    cert.subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_string()
}

fn mtls_yaml(upstream: &str, identity: &str, extra: &str) -> String {
    let base = config_yaml(upstream, extra);
    let start = base.find("identity:").unwrap();
    let end = base.find("kms:").unwrap();
    format!(
        "tls: {{ cert: tls.crt, key: tls.key, client_ca: ca.crt }}\n{}identity:\n{identity}{}",
        &base[..start],
        &base[end..]
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_names_the_tenant_and_refuses_bad_certificates() {
    let up = fake_upstream().await;
    let pki = Pki::new("tenants CA");
    let env = Env::new(&mtls_yaml(
        &up.url(),
        "  - mtls: { uri_san_prefix: \"spiffe://example.org/tenant/\" }\n  - header: { name: x-tenant-id, only_from: mtls }\n",
        "",
    ));
    write_tls(env.dir.path(), &pki, &pki.server("byokd-1"));
    env.add_key("acme", "openai", CANARY_OPENAI).await;
    env.add_key("beta", "openai", "sk-beta-0123456789abcdefghij")
        .await;
    let b = byokd::server::start(env.config()).await.unwrap();
    let port = b.data_addr.port();
    let ca = pki.ca_pem();
    use ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};

    // The SPIFFE ID names the tenant; HTTP/2 by ALPN.
    let acme = pki.client(
        "workload",
        Some("spiffe://example.org/tenant/acme"),
        ClientAuth,
        false,
    );
    let c = https_client(&ca, Some(&acme));
    let (got, version) = chat(&c, port, &[]).await.unwrap();
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(version, http::Version::HTTP_2);
    assert_eq!(
        up.last().headers["authorization"],
        format!("Bearer {CANARY_OPENAI}").as_str()
    );
    // The header agrees: fine. It disagrees: refused, never resolved silently.
    let (got, _) = chat(&c, port, &[("x-tenant-id", "acme")]).await.unwrap();
    assert_eq!(got.status, 200);
    let before = up.seen().len();
    let (got, _) = chat(&c, port, &[("x-tenant-id", "beta")]).await.unwrap();
    assert_eq!(
        (got.status.as_u16(), got.code()),
        (401, "identity_conflict")
    );
    assert_eq!(
        up.seen().len(),
        before,
        "a conflict must not reach the provider"
    );

    // Refused at the handshake: no certificate, another CA, expired, server-only usage.
    let other = Pki::new("someone else");
    let cases = [
        ("no certificate", None),
        (
            "untrusted CA",
            Some(other.client(
                "x",
                Some("spiffe://example.org/tenant/acme"),
                ClientAuth,
                false,
            )),
        ),
        (
            "expired",
            Some(pki.client(
                "x",
                Some("spiffe://example.org/tenant/acme"),
                ClientAuth,
                true,
            )),
        ),
        (
            "wrong usage",
            Some(pki.client(
                "x",
                Some("spiffe://example.org/tenant/acme"),
                ServerAuth,
                false,
            )),
        ),
    ];
    for (what, leaf) in &cases {
        let c = https_client(&ca, leaf.as_ref());
        let r = chat(&c, port, &[]).await;
        assert!(
            r.is_err(),
            "{what}: the handshake must fail, got {:?}",
            r.map(|g| g.0.status)
        );
    }
    assert_eq!(up.seen().len(), before);

    // A verified certificate of an unknown tenant, or with no matching SAN.
    let ghost = pki.client(
        "x",
        Some("spiffe://example.org/tenant/ghost"),
        ClientAuth,
        false,
    );
    let (got, _) = chat(&https_client(&ca, Some(&ghost)), port, &[])
        .await
        .unwrap();
    assert_eq!(got.code(), "unknown_tenant");
    let plain = pki.client("acme", None, ClientAuth, false);
    let (got, _) = chat(&https_client(&ca, Some(&plain)), port, &[])
        .await
        .unwrap();
    assert_eq!(
        got.code(),
        "unknown_tenant",
        "CN is not used in uri_san_prefix mode"
    );

    // Rotation of the server certificate: new handshakes get it, an open connection lives on.
    assert_eq!(server_cn(port, &ca, &acme).await, "byokd-1");
    let tmp = env.dir.path().join("tls.crt.new");
    let next = pki.server("byokd-2");
    std::fs::write(env.dir.path().join("tls.key.new"), &next.key).unwrap();
    std::fs::write(&tmp, &next.cert).unwrap();
    std::fs::rename(
        env.dir.path().join("tls.key.new"),
        env.dir.path().join("tls.key"),
    )
    .unwrap();
    std::fs::rename(&tmp, env.dir.path().join("tls.crt")).unwrap();
    let mut rotated = false;
    for _ in 0..60 {
        if server_cn(port, &ca, &acme).await == "byokd-2" {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(rotated, "the new certificate was not picked up");
    // `c` still holds its HTTP/2 connection from before the rotation.
    let (got, version) = chat(&c, port, &[]).await.unwrap();
    assert_eq!((got.status.as_u16(), version), (200, http::Version::HTTP_2));

    // A real `curl --cert` call.
    let dir = env.dir.path();
    std::fs::write(dir.join("client.crt"), &acme.cert).unwrap();
    std::fs::write(dir.join("client.key"), &acme.key).unwrap();
    let curl = |args: Vec<String>| {
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new("curl")
                .args(args)
                .current_dir(dir)
                .output()
                .unwrap()
        })
    };
    let url = format!("https://localhost:{port}/v1/chat/completions");
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let out = curl(args(&[
        "-sS",
        "--cacert",
        "ca.crt",
        "--cert",
        "client.crt",
        "--key",
        "client.key",
        "-H",
        "content-type: application/json",
        "-d",
        CHAT,
        &url,
    ]))
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("chat.completion"),
        "curl: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = curl(args(&["-sS", "--cacert", "ca.crt", "-d", CHAT, &url]))
        .await
        .unwrap();
    assert!(
        !out.status.success(),
        "curl without a certificate must fail"
    );
    b.shutdown().await;
}

#[tokio::test]
async fn subject_cn_mode_and_https_without_client_certificates() {
    let up = fake_upstream().await;
    let pki = Pki::new("CA");
    let env = Env::new(&mtls_yaml(
        &up.url(),
        "  - mtls: { subject_cn: true }\n",
        "",
    ));
    write_tls(env.dir.path(), &pki, &pki.server("byokd"));
    env.add_key("beta", "openai", "sk-beta-0123456789abcdefghij")
        .await;
    let b = byokd::server::start(env.config()).await.unwrap();
    let beta = pki.client("beta", None, ExtendedKeyUsagePurpose::ClientAuth, false);
    let (got, _) = chat(
        &https_client(&pki.ca_pem(), Some(&beta)),
        b.data_addr.port(),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(
        up.last().headers["authorization"],
        "Bearer sk-beta-0123456789abcdefghij"
    );
    b.shutdown().await;

    // TLS without client_ca: plain HTTPS, tenant by header from loopback.
    let yaml = config_yaml(&up.url(), "tls: { cert: tls.crt, key: tls.key }\n");
    let env = Env::new(&yaml);
    write_tls(env.dir.path(), &pki, &pki.server("byokd"));
    env.add_key("beta", "openai", "sk-beta-0123456789abcdefghij")
        .await;
    let b = byokd::server::start(env.config()).await.unwrap();
    let (got, version) = chat(
        &https_client(&pki.ca_pem(), None),
        b.data_addr.port(),
        &[("x-tenant-id", "beta")],
    )
    .await
    .unwrap();
    assert_eq!((got.status.as_u16(), version), (200, http::Version::HTTP_2));
    b.shutdown().await;
}

/// A local address that is not loopback (the machine's own interface), to be a remote peer.
fn non_loopback_ip() -> std::net::IpAddr {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    s.connect("192.0.2.1:9")
        .or_else(|_| s.connect("10.255.255.1:9"))
        .expect("this test needs a non-loopback interface with a route");
    let ip = s.local_addr().unwrap().ip();
    assert!(!ip.is_loopback());
    ip
}

#[tokio::test]
async fn the_tenant_header_is_believed_only_from_loopback_peers_by_default() {
    let up = fake_upstream().await;
    let ip = non_loopback_ip();
    // Reachable from the network, but the header source keeps its default `loopback` trust.
    let yaml = config_yaml(&up.url(), "").replace("listen: 127.0.0.1:0\n", "listen: 0.0.0.0:0\n");
    let env = Env::new(&yaml);
    env.add_key("acme", "openai", CANARY_OPENAI).await;
    let b = byokd::server::start(env.config()).await.unwrap();
    let port = b.data_addr.port();
    let call = |host: String| async move {
        send(
            &client(),
            request(
                "POST",
                &format!("http://{host}:{port}/v1/chat/completions"),
                &[("x-tenant-id", "acme")],
                CHAT,
            ),
        )
        .await
    };
    assert_eq!(call("127.0.0.1".into()).await.status, 200);
    let before = up.seen().len();
    let remote = call(ip.to_string()).await;
    assert_eq!(
        (remote.status.as_u16(), remote.code()),
        (401, "unknown_tenant"),
        "a remote peer's tenant header must be ignored"
    );
    assert_eq!(up.seen().len(), before);
    b.shutdown().await;
    // The config refuses `only_from: any` on a listener others can reach.
    let err = byokd::config::Config::from_yaml(
        "listen: 0.0.0.0:8787\nidentity: [ { header: { only_from: any } } ]\n",
        Path::new("/x/byokd.yaml"),
    )
    .unwrap_err();
    assert!(err.to_string().contains("loopback"), "{err}");
}

#[tokio::test]
async fn the_end_users_own_key_is_used_once_and_kept_nowhere() {
    let up = fake_upstream().await;
    let extra = format!(
        "pricing: {}/config/pricing.yaml\ntenants:\n  acme: {{ passthrough: true }}\n  other: {{}}\n",
        env!("CARGO_MANIFEST_DIR")
    );
    let yaml = config_yaml(&up.url(), &extra).replace(
        "  - bearer: {}\n",
        "  - bearer: {}\n  - passthrough: { key_header: x-user-api-key, provider_header: x-user-provider }\n",
    );
    let env = Env::new(&yaml);
    env.add_key("acme", "openai", CANARY_OPENAI).await;
    let store_before = std::fs::read(env.store_path()).unwrap();
    let b = byokd::server::start(env.config()).await.unwrap();
    let url = format!("http://{}/v1/chat/completions", b.data_addr);
    const USER_KEY: &str = "sk-user-canary-4c2d9e7f1a3b5c6d";
    let user = |tenant: &'static str, provider: &'static str, key: &'static str| {
        vec![
            ("x-tenant-id", tenant),
            ("x-user-api-key", key),
            ("x-user-provider", provider),
        ]
    };

    let got = send(
        &client(),
        request("POST", &url, &user("acme", "openai", USER_KEY), CHAT),
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.text());
    let seen = up.last();
    assert_eq!(
        seen.headers["authorization"],
        format!("Bearer {USER_KEY}").as_str()
    );
    assert!(!seen.headers.contains_key("x-user-api-key"));
    assert!(!seen.headers.contains_key("x-user-provider"));
    // Not cached: the next request without the header uses the tenant's stored key.
    let got = send(
        &client(),
        request("POST", &url, &[("x-tenant-id", "acme")], CHAT),
    )
    .await;
    assert_eq!(got.status, 200);
    assert_eq!(
        up.last().headers["authorization"],
        format!("Bearer {CANARY_OPENAI}").as_str()
    );

    // Refusals, none of which reach the provider.
    let before = up.seen().len();
    for (headers, status, code) in [
        (
            user("other", "openai", USER_KEY),
            403,
            "passthrough_not_allowed",
        ),
        (user("acme", "anthropic", USER_KEY), 400, "invalid_user_key"),
        (
            user("acme", "openai", "pk-not-an-openai-key-123"),
            400,
            "invalid_user_key",
        ),
    ] {
        let got = send(&client(), request("POST", &url, &headers, CHAT)).await;
        assert_eq!(
            (got.status.as_u16(), got.code()),
            (status, code),
            "{}",
            got.text()
        );
        assert!(!got.text().contains("sk-user") && !got.text().contains("pk-not"));
    }
    assert_eq!(up.seen().len(), before);

    // Attributed to the tenant with key_source="user"; the key itself is nowhere.
    let m = metrics(b.admin_addr).await;
    assert!(
        m.lines().any(|l| l.starts_with("byokd_cost_usd_total")
            && l.contains("tenant=\"acme\"")
            && l.contains("key_source=\"user\"")),
        "{m}"
    );
    assert!(!m.contains("sk-user"));
    assert_eq!(std::fs::read(env.store_path()).unwrap(), store_before);
    assert_eq!(b.proxy.keyring.cached(), 1, "only the stored key is cached");
    b.shutdown().await;
}

/// One HTTP/1.1 request over a fresh TLS connection made with `config` (shared between calls,
/// so a session ticket from an earlier call would be offered for resumption). The status, or
/// `None` when the handshake or the request failed.
async fn raw_status(port: u16, config: Arc<rustls::ClientConfig>) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .ok()?;
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{CHAT}",
        CHAT.len()
    );
    tls.write_all(req.as_bytes()).await.ok()?;
    let mut out = Vec::new();
    tls.read_to_end(&mut out).await.ok()?;
    let text = String::from_utf8_lossy(&out);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_client_ca_applies_to_new_connections_and_sessions_do_not_resume_past_it() {
    let up = fake_upstream().await;
    let old = Pki::new("old tenants CA");
    let new = Pki::new("new tenants CA");
    let env = Env::new(&mtls_yaml(
        &up.url(),
        "  - mtls: { subject_cn: true }\n",
        "",
    ));
    write_tls(env.dir.path(), &old, &old.server("byokd"));
    env.add_key("acme", "openai", CANARY_OPENAI).await;
    let b = byokd::server::start(env.config()).await.unwrap();
    let port = b.data_addr.port();
    use ExtendedKeyUsagePurpose::ClientAuth;
    let acme_old = old.client("acme", None, ClientAuth, false);
    let acme_new = new.client("acme", None, ClientAuth, false);
    // Server certificates are verified against the old CA throughout; only the client CA moves.
    let server_ca = old.ca_pem();

    // A shared client config remembers sessions, as a long-lived app's would.
    let shared = Arc::new(client_tls_no_alpn(&server_ca, Some(&acme_old)));
    assert_eq!(raw_status(port, shared.clone()).await, Some(200));
    assert_eq!(raw_status(port, shared.clone()).await, Some(200));
    // An HTTP/2 connection opened now stays open across the change.
    let kept = https_client(&server_ca, Some(&acme_old));
    assert_eq!(chat(&kept, port, &[]).await.unwrap().0.status, 200);

    // cert-manager rotates the CA bundle: the old CA is gone, a new one trusted.
    let tmp = env.dir.path().join("ca.crt.new");
    std::fs::write(&tmp, new.ca_pem()).unwrap();
    std::fs::rename(&tmp, env.dir.path().join("ca.crt")).unwrap();
    let fresh_new = Arc::new(client_tls_no_alpn(&server_ca, Some(&acme_new)));
    let mut switched = false;
    for _ in 0..60 {
        if raw_status(port, fresh_new.clone()).await == Some(200) {
            switched = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(switched, "the new client CA was not picked up");
    // The old CA's certificate is refused, also for a client holding a session from before.
    assert_eq!(
        raw_status(port, shared.clone()).await,
        None,
        "resumed past the CA change"
    );
    let fresh_old = Arc::new(client_tls_no_alpn(&server_ca, Some(&acme_old)));
    assert_eq!(raw_status(port, fresh_old).await, None);
    // The connection opened before the change keeps working.
    assert_eq!(chat(&kept, port, &[]).await.unwrap().0.status, 200);
    b.shutdown().await;
}

#[tokio::test]
async fn two_answers_to_who_is_calling_are_a_conflict_never_the_first_one() {
    let up = fake_upstream().await;
    let env = Env::new(&config_yaml(&up.url(), ""));
    env.add_key("acme", "openai", CANARY_OPENAI).await;
    env.add_key("beta", "openai", "sk-beta-0123456789abcdefghij")
        .await;
    let acme_token = env.new_token("acme").await;
    let beta_token = env.new_token("beta").await;
    let b = byokd::server::start(env.config()).await.unwrap();
    let url = format!("http://{}/v1/chat/completions", b.data_addr);
    let bearer_acme = format!("Bearer {acme_token}");
    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        (
            "the tenant header twice",
            vec![("x-tenant-id", "acme"), ("x-tenant-id", "beta")],
        ),
        (
            "tokens of two tenants",
            vec![("authorization", &bearer_acme), ("x-api-key", &beta_token)],
        ),
        (
            "a token and a header that disagree",
            vec![("authorization", &bearer_acme), ("x-tenant-id", "beta")],
        ),
    ];
    for (what, headers) in cases {
        let got = send(&client(), request("POST", &url, &headers, CHAT)).await;
        assert_eq!(
            (got.status.as_u16(), got.code()),
            (401, "identity_conflict"),
            "{what}"
        );
    }
    assert!(up.seen().is_empty());
    // The same token in two headers (an SDK sending both) is one answer.
    let got = send(
        &client(),
        request(
            "POST",
            &url,
            &[("authorization", &bearer_acme), ("x-api-key", &acme_token)],
            CHAT,
        ),
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.text());
    b.shutdown().await;
}

#[tokio::test]
async fn a_certificate_and_a_token_that_disagree_or_two_tenant_sans_are_refused() {
    let up = fake_upstream().await;
    let pki = Pki::new("CA");
    let env = Env::new(&mtls_yaml(
        &up.url(),
        "  - mtls: { uri_san_prefix: \"spiffe://example.org/tenant/\" }\n  - bearer: {}\n",
        "",
    ));
    write_tls(env.dir.path(), &pki, &pki.server("byokd"));
    env.add_key("acme", "openai", CANARY_OPENAI).await;
    env.add_key("beta", "openai", "sk-beta-0123456789abcdefghij")
        .await;
    let beta_token = env.new_token("beta").await;
    let b = byokd::server::start(env.config()).await.unwrap();
    let port = b.data_addr.port();
    let acme = pki.client(
        "x",
        Some("spiffe://example.org/tenant/acme"),
        ExtendedKeyUsagePurpose::ClientAuth,
        false,
    );
    let c = https_client(&pki.ca_pem(), Some(&acme));
    let bearer = format!("Bearer {beta_token}");
    let (got, _) = chat(&c, port, &[("authorization", &bearer)]).await.unwrap();
    assert_eq!(
        (got.status.as_u16(), got.code()),
        (401, "identity_conflict")
    );
    // A certificate naming two tenants under the prefix.
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = vec![
        SanType::URI("spiffe://example.org/tenant/acme".try_into().unwrap()),
        SanType::URI("spiffe://example.org/tenant/beta".try_into().unwrap()),
    ];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let two = Leaf {
        cert: p.signed_by(&key, &pki.ca).unwrap().pem(),
        key: key.serialize_pem(),
    };
    let (got, _) = chat(&https_client(&pki.ca_pem(), Some(&two)), port, &[])
        .await
        .unwrap();
    assert_eq!(
        (got.status.as_u16(), got.code()),
        (401, "identity_conflict")
    );
    assert!(up.seen().is_empty());
    b.shutdown().await;
}

#[tokio::test]
async fn the_end_users_key_never_reaches_byokds_logs() {
    use common::bin::serve_env;
    let up = fake_upstream().await;
    let yaml = config_yaml(&up.url(), "tenants:\n  acme: { passthrough: true }\n")
        .replace("  - bearer: {}\n", "  - bearer: {}\n  - passthrough: {}\n");
    let env = Env::new(&yaml);
    env.add_key("acme", "openai", CANARY_OPENAI).await;
    // Logs at trace level, the most byokd writes.
    let s = serve_env(&env, "serve", &[]).await;
    const USER_KEY: &str = "sk-user-logcanary-9e8d7c6b5a4f3e2d";
    let url = format!("{}/v1/chat/completions", s.data);
    for (key, status) in [(USER_KEY, 200), ("pk-user-logcanary-badformat", 400)] {
        let got = send(
            &client(),
            request(
                "POST",
                &url,
                &[
                    ("x-tenant-id", "acme"),
                    ("x-user-api-key", key),
                    ("x-user-provider", "openai"),
                ],
                CHAT,
            ),
        )
        .await;
        assert_eq!(got.status.as_u16(), status, "{}", got.text());
    }
    assert_eq!(
        up.last().headers["authorization"],
        format!("Bearer {USER_KEY}").as_str()
    );
    // The background log writer has caught up once both access lines are out; then read
    // everything byokd printed.
    eventually(
        "both access log lines",
        Duration::from_secs(5),
        async || s.logs().matches("byokd::access").count() >= 2,
    )
    .await;
    let logs = s.logs();
    assert!(
        !logs.contains("logcanary"),
        "the user key leaked into the logs"
    );
}
