//! The per-request path inside byokd before the upstream request leaves: route, identify,
//! credential from a warm cache, rewrite. Later work measures against these numbers.
//!
//! Run: `cargo bench --bench hot_path`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use criterion::{Criterion, criterion_group, criterion_main};

use byokd::config::Config;
use byokd::identify::identify;
use byokd::keys::manage::{self, NewKey};
use byokd::keys::{Keyring, PlainKey};
use byokd::rewrite::rewrite;
use byokd::route::route;
use byokd::vocab::RequestId;

/// Polls a future that must complete without waiting (a warm-cache lookup).
fn ready<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("expected a warm, synchronous path"),
    }
}

fn setup() -> (
    tempfile::TempDir,
    Arc<Config>,
    Keyring,
    String,
    tokio::runtime::Runtime,
) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("byokd.yaml");
    std::fs::write(&path, "defaults: { default_provider: openai }\n").unwrap();
    let cfg = Config::load(&path).unwrap();
    let kms = byokd::server::kms(&cfg).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = rt.block_on(byokd::server::store(&cfg)).unwrap();
    let audit = byokd::server::audit(&cfg);
    let openai = cfg.providers[cfg.provider_index("openai").unwrap()].clone();
    // 1,000 tenants with a key each, so lookups hit a realistically sized map.
    for i in 0..1000 {
        let secret = PlainKey::new(format!("sk-bench-{i:06}-abcdefghijklmnop"));
        rt.block_on(manage::add_key(
            store.as_ref(),
            kms.as_ref(),
            &audit,
            NewKey {
                tenant: &format!("tenant-{i}"),
                provider: &openai,
                secret: &secret,
                label: None,
                expires_in: None,
            },
        ))
        .unwrap();
    }
    // tenant-7 holds a pool of two keys.
    rt.block_on(manage::add_key(
        store.as_ref(),
        kms.as_ref(),
        &audit,
        NewKey {
            tenant: "tenant-7",
            provider: &openai,
            secret: &PlainKey::new("sk-bench-second-abcdefghijklmnop".into()),
            label: None,
            expires_in: None,
        },
    ))
    .unwrap();
    let (token, _) = rt
        .block_on(manage::new_token(store.as_ref(), &audit, "tenant-500"))
        .unwrap();
    let data = rt.block_on(store.load()).unwrap();
    let keyring = Keyring::new(
        kms,
        store,
        audit,
        data,
        byokd::keys::CachePolicy {
            ttl: cfg.key_cache.ttl,
            stale_ttl: cfg.key_cache.stale_ttl,
            max_entries: cfg.key_cache.max_entries,
        },
    );
    (dir, Arc::new(cfg), keyring, token.to_string(), rt)
}

fn request(headers: &[(&str, &str)]) -> http::request::Parts {
    let mut b = http::Request::builder()
        .method("POST")
        .uri("/v1/chat/completions")
        .header("host", "127.0.0.1:8787")
        .header("content-type", "application/json")
        .header("accept", "application/json")
        .header("user-agent", "OpenAI/Python 1.99.0")
        .header("x-stainless-lang", "python")
        .header("x-stainless-package-version", "1.99.0")
        .header("content-length", "120");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap().into_parts().0
}

fn bench(c: &mut Criterion) {
    // The app in the same pod: a loopback peer, no client certificate.
    let peer = byokd::accept::Peer {
        addr: ([127, 0, 0, 1], 50000).into(),
        client_cert: None,
    };
    let (_dir, cfg, keyring, token, rt) = setup();
    // A cold key decrypts in a task of its own: warming needs the runtime.
    let _rt = rt.enter();
    let openai = cfg.providers[cfg.provider_index("openai").unwrap()].clone();
    let by_header = request(&[
        ("x-tenant-id", "tenant-500"),
        ("authorization", "Bearer unused"),
    ]);
    let bearer = format!("Bearer {token}");
    let by_token = request(&[("authorization", bearer.as_str())]);
    // Warm the cache.
    rt.block_on(keyring.credential("tenant-500", &openai, false, RequestId::new()))
        .unwrap();

    c.bench_function("route", |b| {
        b.iter(|| route(&cfg.providers, black_box("/v1/chat/completions")).unwrap())
    });
    // Routing by model parses the body's top level: its cost grows with the conversation.
    let small = br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello"}]}"#;
    let turn = r#"{"role":"user","content":"Summarise the quarterly report, keeping every figure."},{"role":"assistant","content":"Revenue rose 12% to $4.1M; costs fell 3%."},"#;
    let long = format!(
        r#"{{"model":"gpt-4o-mini","stream":true,"messages":[{}{{"role":"user","content":"and?"}}]}}"#,
        turn.repeat(32 * 1024 / turn.len())
    );
    let document = format!(
        r#"{{"messages":[{{"role":"user","content":"{}"}}],"model":"gpt-4o-mini"}}"#,
        "Quarterly revenue rose 12% while costs fell. ".repeat(32 * 1024 / 46)
    );
    for (name, body) in [
        ("route/body_head/small", &small[..]),
        ("route/body_head/32KiB_conversation", long.as_bytes()),
        ("route/body_head/32KiB_document", document.as_bytes()),
    ] {
        c.bench_function(name, |b| {
            b.iter(|| byokd::route::body_head(black_box(body)))
        });
    }
    // Every OpenAI chat body is read for whether it streams, and a stream without
    // `include_usage` is edited to get it.
    let small_stream =
        br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello"}],"stream":true}"#;
    for (name, body) in [
        ("stream_usage/add_include_usage/small", &small_stream[..]),
        (
            "stream_usage/add_include_usage/32KiB_conversation",
            long.as_bytes(),
        ),
        (
            "stream_usage/add_include_usage/32KiB_document",
            document.as_bytes(),
        ),
    ] {
        c.bench_function(name, |b| {
            b.iter(|| byokd::stream_usage::add_include_usage(black_box(body)))
        });
    }
    // A budgeted tenant's request: its model and output cap, for the reservation.
    for (name, body) in [
        ("budget/model_and_output_cap/small", &small[..]),
        (
            "budget/model_and_output_cap/32KiB_conversation",
            long.as_bytes(),
        ),
    ] {
        c.bench_function(name, |b| {
            b.iter(|| {
                byokd::route::head::with_members(Some(black_box(body)), |m| {
                    openai.model_and_output_cap(m, "/v1/chat/completions")
                })
            })
        });
    }
    c.bench_function("identify/header", |b| {
        b.iter(|| {
            identify(
                &cfg.identity,
                &cfg.tenants,
                &keyring.snapshot(),
                black_box(&by_header.headers),
                &peer,
                false,
            )
            .unwrap()
        })
    });
    c.bench_function("identify/bearer_sha256", |b| {
        b.iter(|| {
            identify(
                &cfg.identity,
                &cfg.tenants,
                &keyring.snapshot(),
                black_box(&by_token.headers),
                &peer,
                false,
            )
            .unwrap()
        })
    });
    c.bench_function("credential/warm_cache", |b| {
        b.iter(|| {
            ready(keyring.credential(black_box("tenant-500"), &openai, false, RequestId::new()))
                .unwrap()
        })
    });
    // The credential step as the pipeline runs it: plan the attempts (key pool, failover
    // chain), then the chosen key's plaintext from the warm cache.
    for (name, tenant) in [
        ("credential/plan+resolve, one key", "tenant-500"),
        ("credential/plan+resolve, pool of two keys", "tenant-7"),
    ] {
        let idx = cfg.provider_index("openai").unwrap();
        // Warm the key the plan picks first (the least loaded: the same one every time here).
        let plan = byokd::failover::plan(&keyring, &cfg.providers, cfg.policy(tenant), tenant, idx)
            .unwrap();
        rt.block_on(keyring.resolve(
            plan.first_record().unwrap().clone(),
            byokd::keys::KeySource::Tenant,
            &openai,
            RequestId::new(),
        ))
        .unwrap();
        c.bench_function(name, |b| {
            b.iter(|| {
                let plan = byokd::failover::plan(
                    &keyring,
                    &cfg.providers,
                    cfg.policy(tenant),
                    black_box(tenant),
                    idx,
                )
                .unwrap();
                let first = plan.first_record().unwrap().clone();
                ready(keyring.resolve(
                    first,
                    byokd::keys::KeySource::Tenant,
                    &openai,
                    RequestId::new(),
                ))
                .unwrap()
            })
        });
    }
    c.bench_function("request_parts_clone (baseline for rewrite)", |b| {
        b.iter(|| black_box(by_header.clone()))
    });
    let cred = ready(keyring.credential("tenant-500", &openai, false, RequestId::new())).unwrap();
    let r = route(&cfg.providers, "/v1/chat/completions").unwrap();
    let strip = byokd::rewrite::HeaderSet::request(&[http::HeaderName::from_static("x-tenant-id")]);
    c.bench_function("rewrite (incl. parts clone)", |b| {
        b.iter(|| {
            let mut p = by_header.clone();
            rewrite(&mut p, &openai, &r, cred.as_ref(), &strip).unwrap();
            p
        })
    });
    c.bench_function(
        "hot_path/route+identify+credential+rewrite (incl. parts clone)",
        |b| {
            b.iter(|| {
                let mut p = by_header.clone();
                let r = route(&cfg.providers, p.uri.path()).unwrap();
                let tenant = identify(
                    &cfg.identity,
                    &cfg.tenants,
                    &keyring.snapshot(),
                    &p.headers,
                    &peer,
                    false,
                )
                .unwrap();
                let policy = cfg.policy(&tenant);
                let provider = &cfg.providers[policy.default_provider];
                let cred =
                    ready(keyring.credential(&tenant, provider, false, RequestId::new())).unwrap();
                rewrite(&mut p, provider, &r, cred.as_ref(), &strip).unwrap();
                p
            })
        },
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
