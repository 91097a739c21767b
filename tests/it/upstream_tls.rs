//! Upstream TLS: provider certificates are verified (webpki roots plus `upstream.ca_file`),
//! HTTP/2 is negotiated by ALPN, and a provider whose certificate does not verify is
//! `upstream_unreachable`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

const CHAT: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;

/// A private CA and a `localhost` server certificate it signed: (ca_pem, cert_pem, key_pem).
fn private_pki() -> (String, String, String) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&server_key, &ca)
        .unwrap();
    (ca.pem(), cert.pem(), server_key.serialize_pem())
}

async fn call(env: &Env) -> Got {
    let b = byokd::server::start(env.config()).await.unwrap();
    let got = send(
        &client(),
        request(
            "POST",
            &format!("http://{}/v1/chat/completions", b.data_addr),
            &[("x-tenant-id", "acme")],
            CHAT,
        ),
    )
    .await;
    b.shutdown().await;
    got
}

#[tokio::test]
async fn https_provider_with_extra_ca_speaks_http2_and_unknown_ca_is_refused() {
    let (ca, cert, key) = private_pki();
    let up = fake_upstream_tls(&cert, &key).await;
    let url = format!("https://localhost:{}", up.addr.port());

    // Trusted through the extra CA bundle: served over HTTP/2 with the key injected.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), &ca).unwrap();
    let yaml = config_yaml(
        &url,
        &format!(
            "upstream: {{ ca_file: {} }}\n",
            dir.path().join("ca.pem").display()
        ),
    );
    let env = Env::new(&yaml);
    env.add_key("acme", "openai", CANARY_OPENAI).await;
    let got = call(&env).await;
    assert_eq!(got.status, 200, "{}", got.text());
    let seen = up.last();
    assert_eq!(seen.version, http::Version::HTTP_2, "ALPN should pick h2");
    assert_eq!(
        seen.headers["authorization"],
        format!("Bearer {CANARY_OPENAI}").as_str()
    );

    // Without the CA the certificate does not verify: 502, nothing sent.
    let before = up.seen().len();
    let env = Env::new(&config_yaml(&url, ""));
    env.add_key("acme", "openai", CANARY_OPENAI).await;
    let got = call(&env).await;
    assert_eq!(
        (got.status.as_u16(), got.code()),
        (502, "upstream_unreachable")
    );
    assert_eq!(up.seen().len(), before);
}
