//! The checks behind the fuzz targets: each takes arbitrary bytes and panics only when an
//! invariant breaks. `fuzz/fuzz_targets/*.rs` (cargo fuzz) and `tests/fuzz_seeds.rs` (every
//! seed in `fuzz/corpus/<target>/`, in plain `cargo test`) include this one file, so a seed
//! that passes in CI passes the very check the fuzzer runs.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

use byokd::config::Config;
use byokd::keys::envelope::{self, Binding};
use byokd::keys::store::{KeyRecord, Snapshot, StoreData};
use byokd::route::{Route, Target, check_method, route};
use byokd::stream_usage::{StripUsage, add_include_usage};
use byokd::usage::{
    Capability, Dialect, MAX_BUFFERED, Scanner, Usage, UsageScanner, scanner_for_capability,
};

/// The repository's `config/` folder, whichever crate includes this file.
fn config_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = if manifest.ends_with("fuzz") {
        manifest.parent().unwrap_or(manifest)
    } else {
        manifest
    };
    root.join("config")
}

// ---------------------------------------------------------------------------------------
// usage_scanner
// ---------------------------------------------------------------------------------------

/// Every registered kind's dialect, and none.
fn dialects() -> Vec<Option<&'static dyn Dialect>> {
    let mut v: Vec<_> = byokd::provider::KINDS.iter().map(|k| k.usage()).collect();
    v.push(None);
    v
}
const SSE: Option<&[u8]> = Some(b"text/event-stream; charset=utf-8");
const NDJSON: Option<&[u8]> = Some(b"application/x-ndjson");
const JSON: Option<&[u8]> = Some(b"application/json");
/// Every distinct scanner `scanner_for_capability` builds (with `Tokens`, it is `scanner_for`).
const KINDS: [(Capability, Option<&[u8]>); 9] = [
    (Capability::Tokens, SSE),
    (Capability::Tokens, NDJSON),
    (Capability::Tokens, JSON),
    (Capability::Tokens, None),
    (Capability::Images, SSE),
    (Capability::Images, JSON),
    (Capability::Transcription, JSON),
    (Capability::Speech, SSE),
    (Capability::Other, JSON),
];

/// Input: `n` (one byte), then `n % 64` frame lengths (one byte each), then the response
/// body. The body is cut into frames of those lengths (the rest is a last frame), so the
/// fuzzer picks the cuts, empty frames included.
///
/// The body goes through the scanner of every dialect × content type × capability, once
/// whole and once in those frames, and through `StripUsage` in the same two ways. Checked: no
/// panic; the scanner never holds more than [`MAX_BUFFERED`]; the usage found does not depend
/// on the cuts; the stripper passes everything through when there is no `"usage"` to strip,
/// never adds a byte, and does not depend on the cuts either. The body is also tried as a request for `add_include_usage`: an edited JSON body
/// is still JSON, asks for usage, and needs no second edit.
pub fn usage_scanner(data: &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 64).min(rest.len());
    let (lens, body) = rest.split_at(n);
    let frames = frames(body, lens);
    for dialect in dialects() {
        for (cap, ct) in KINDS {
            let whole = scan(scanner_for_capability(dialect, cap, ct), &[body]);
            let split = scan(scanner_for_capability(dialect, cap, ct), &frames);
            assert_eq!(
                whole,
                split,
                "{dialect:?} {cap:?} {:?}: usage depends on the frame cuts",
                ct.map(String::from_utf8_lossy)
            );
        }
    }

    let stripped = strip(&[body]);
    assert_eq!(
        strip(&frames),
        stripped,
        "StripUsage output depends on the frame cuts"
    );
    assert!(stripped.len() <= body.len(), "StripUsage added bytes");
    if find(body, b"\"usage\"").is_none() {
        assert_eq!(stripped, body, "StripUsage changed a stream without usage");
    }

    include_usage(body);
}

/// `body` cut into frames of `lens` bytes (an empty frame for 0), then the rest.
fn frames<'a>(body: &'a [u8], lens: &[u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::with_capacity(lens.len() + 1);
    let mut at = 0;
    for &len in lens {
        let end = (at + usize::from(len)).min(body.len());
        out.push(&body[at..end]);
        at = end;
    }
    out.push(&body[at..]);
    out
}

fn scan(mut s: Scanner, frames: &[&[u8]]) -> Usage {
    for f in frames {
        s.feed(f);
        assert!(
            s.buffered() <= MAX_BUFFERED,
            "scanner holds {} bytes, bound {MAX_BUFFERED}",
            s.buffered()
        );
    }
    let u = s.finish();
    // What the recorder does with every usage: neither may overflow.
    let _ = (u.total(), u.metered());
    u
}

fn strip(frames: &[&[u8]]) -> Vec<u8> {
    let mut s = StripUsage::new();
    let mut out = Vec::new();
    for f in frames {
        out.extend_from_slice(&s.transform(f));
    }
    out.extend_from_slice(&s.finish());
    out
}

fn include_usage(body: &[u8]) {
    let Some(edited) = add_include_usage(body) else {
        return;
    };
    if serde_json::from_slice::<serde_json::Value>(body).is_err() {
        return;
    }
    let v: serde_json::Value = serde_json::from_slice(&edited).unwrap_or_else(|e| {
        panic!(
            "edited request is not JSON ({e}): {}",
            String::from_utf8_lossy(&edited)
        )
    });
    assert_eq!(
        v["stream_options"]["include_usage"],
        serde_json::Value::Bool(true),
        "edited request does not ask for usage: {}",
        String::from_utf8_lossy(&edited)
    );
    assert!(
        add_include_usage(&edited).is_none(),
        "edited request edited again: {}",
        String::from_utf8_lossy(&edited)
    );
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

// ---------------------------------------------------------------------------------------
// config
// ---------------------------------------------------------------------------------------

/// Input: YAML text, parsed as if it were `config/byokd.yaml` (so `pricing: pricing.yaml`
/// loads the real price file), and as a price file. Checked: no panic; a config that
/// validates has unique provider names, each reachable by its own `/{name}/` route, and
/// every provider index it holds points at a provider.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Files the config names are read: keep the fuzzer off devices that never end.
    if ["/dev", "/proc", "/sys"].iter().any(|p| text.contains(p)) {
        return;
    }
    let _ = byokd::pricing::Pricing::from_yaml(text);
    let _ = byokd::config::parse_duration(text);
    let Ok(cfg) = Config::from_yaml(text, &config_dir().join("byokd.yaml")) else {
        return;
    };
    let n = cfg.providers.len();
    for (i, p) in cfg.providers.iter().enumerate() {
        assert_eq!(
            cfg.provider_index(&p.name),
            Some(i),
            "provider `{}`",
            p.name
        );
        let path = format!("/{}/v1/chat/completions", p.name);
        match route(&cfg.providers, &path) {
            Ok(r) => assert_eq!(r.target, Target::Named(i), "{path}"),
            Err(e) => panic!("provider `{}` accepted but not routable: {e}", p.name),
        }
    }
    for policy in std::iter::once(&cfg.defaults).chain(cfg.tenants.values()) {
        assert!(policy.default_provider < n);
        assert!(policy.provider_limits.iter().all(|(i, _)| *i < n));
        for (source, steps) in policy.failover.iter() {
            assert!(*source < n);
            for s in steps.iter() {
                if let byokd::config::FailoverStep::Provider(i) = s {
                    assert!(*i < n);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// key_record
// ---------------------------------------------------------------------------------------

/// Input: a store file (or one key record) as JSON. Checked: no panic; what parses writes
/// back (compact and pretty) to JSON that parses to the same records and writes the same
/// bytes again; the snapshot built from it serves only usable keys of the right tenant and
/// provider, the pool's first key being the one `key_for` picks; no token maps to a
/// reserved tenant; the envelope's associated data decodes back to the record's binding, and
/// the record's base64 fields go through decryption without a panic.
pub fn key_record(data: &[u8]) {
    if let Ok(r) = serde_json::from_slice::<KeyRecord>(data) {
        let again: KeyRecord = serde_json::from_slice(&serde_json::to_vec(&r).unwrap())
            .expect("a written record parses again");
        assert!(again == r, "record changed on a round trip: {r:?}");
        envelope_of(&r);
    }
    let Ok(store) = serde_json::from_slice::<StoreData>(data) else {
        return;
    };
    for pretty in [false, true] {
        let write = |d: &StoreData| {
            if pretty {
                serde_json::to_vec_pretty(d).unwrap()
            } else {
                serde_json::to_vec(d).unwrap()
            }
        };
        let bytes = write(&store);
        let again: StoreData =
            serde_json::from_slice(&bytes).expect("a written store file parses again");
        assert_eq!(again.format, store.format);
        assert!(
            again.keys == store.keys,
            "key records changed on a round trip"
        );
        assert_eq!(again.tokens, store.tokens);
        assert_eq!(write(&again), bytes, "a store file is not written stably");
    }
    let snap = Snapshot::build(store.clone());
    for r in &store.keys {
        envelope_of(r);
        for now in [r.created_at, r.expires_at.unwrap_or(i64::MAX), i64::MIN] {
            let first = snap.key_for(&r.tenant, &r.provider, now);
            let pool: Vec<&Arc<KeyRecord>> = snap.keys_for(&r.tenant, &r.provider, now).collect();
            assert_eq!(
                first.map(Arc::as_ptr),
                pool.first().map(|k| Arc::as_ptr(k)),
                "key_for and keys_for disagree"
            );
            let mut ids = HashSet::new();
            for k in pool {
                assert!(k.usable(now), "an unusable key served: {k:?}");
                assert_eq!((&*k.tenant, &*k.provider), (&*r.tenant, &*r.provider));
                assert!(
                    ids.insert(&k.id),
                    "two versions of one key in a pool: {k:?}"
                );
            }
        }
    }
    for tenant in snap.tokens.values() {
        assert!(
            !tenant.starts_with('_'),
            "a token names reserved tenant {tenant}"
        );
    }
}

fn envelope_of(r: &KeyRecord) {
    let binding = Binding {
        tenant: &r.tenant,
        provider: &r.provider,
        key_id: &r.id,
        version: r.version,
    };
    let aad = binding.aad();
    assert_eq!(
        unpack_aad(&aad),
        Some((
            r.tenant.as_bytes(),
            r.provider.as_bytes(),
            r.id.as_bytes(),
            r.version
        )),
        "associated data does not decode to its binding"
    );
    let decode = |v: &str| B64.decode(v).ok();
    if let (Some(nonce), Some(ct), Some(wrapped)) = (
        decode(&r.nonce),
        decode(&r.ciphertext),
        decode(&r.wrapped_dek),
    ) {
        // No key the fuzzer can know opens a record: this is about parsing lengths safely.
        assert!(envelope::open(&[7; 32], &nonce, &ct, &aad).is_err());
        if wrapped.len() >= envelope::NONCE_LEN {
            let (n, c) = wrapped.split_at(envelope::NONCE_LEN);
            assert!(envelope::open(&[7; 32], n, c, &aad).is_err());
        }
    }
}

/// Tenant, provider, key id and version, as `Binding::aad` encodes them.
type Fields<'a> = (&'a [u8], &'a [u8], &'a [u8], u32);

/// The binding back out of `Binding::aad`, or `None` if it is not exactly one encoding.
fn unpack_aad(aad: &[u8]) -> Option<Fields<'_>> {
    let mut rest = aad.strip_prefix(b"byokd-key-v1")?;
    let mut field = || {
        let (len, tail) = rest.split_first_chunk::<4>()?;
        let len = u32::from_be_bytes(*len) as usize;
        let (f, tail) = (tail.get(..len)?, tail.get(len..)?);
        rest = tail;
        Some(f)
    };
    let (t, p, k) = (field()?, field()?, field()?);
    let version: [u8; 4] = rest.try_into().ok()?;
    Some((t, p, k, u32::from_be_bytes(version)))
}

// ---------------------------------------------------------------------------------------
// router
// ---------------------------------------------------------------------------------------

/// Providers with base paths, beside the built-ins, so escaping a base path shows.
const ROUTER_CONFIG: &str = r#"
providers:
  corp: { kind: openai, base_url: "https://gateway.example/openai/v1/" }
  local: { kind: ollama, base_url: "http://127.0.0.1:11434/x" }
  azure: { kind: azure, base_url: "https://acme.openai.azure.com/openai" }
"#;

fn router_config() -> &'static Config {
    static CFG: OnceLock<Config> = OnceLock::new();
    CFG.get_or_init(|| {
        Config::from_yaml(ROUTER_CONFIG, &config_dir().join("byokd.yaml"))
            .expect("the router's config is valid")
    })
}

const ALLOWED_METHODS: [&str; 7] = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"];

/// Input: a request line, `METHOD TARGET`. Checked: no panic; only the seven methods a
/// provider API uses pass; the target (parsed as hyper parses it) either is refused or goes
/// to a provider with a path that cannot leave the provider's base path once the upstream
/// normalises or decodes it, and the upstream URI keeps the provider's scheme, host and base
/// path with the forwarded path appended unchanged.
pub fn router(data: &[u8]) {
    let cfg = router_config();
    let (method, target) = match data.iter().position(|&b| b == b' ') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b""[..], data),
    };
    if let Ok(m) = http::Method::from_bytes(method) {
        assert_eq!(
            check_method(&m).is_ok(),
            ALLOWED_METHODS.contains(&m.as_str()),
            "method {m}"
        );
    }
    // Raw text straight into the router (no URI parser in front): what it accepts still
    // cannot escape.
    if let Ok(s) = std::str::from_utf8(target)
        && let Ok(r) = route(&cfg.providers, s)
        && let Some(why) = escape(r.upstream_path(s))
    {
        panic!("{s:?} accepted: {why}");
    }
    // As a request target reaches it: through the URI parser.
    let Ok(uri) = http::Uri::try_from(target) else {
        return;
    };
    let path = uri.path();
    if let Ok(r) = route(&cfg.providers, path) {
        check_route(cfg, path, uri.query(), r);
    }
}

fn check_route(cfg: &Config, path: &str, query: Option<&str>, r: Route) {
    let forwarded = r.upstream_path(path);
    let providers: Vec<usize> = match r.target {
        Target::Usage => {
            assert_eq!(path, "/byokd/usage");
            return;
        }
        Target::Default => {
            assert!(
                path == "/v1" || path.starts_with("/v1/"),
                "default route {path}"
            );
            assert_eq!(forwarded, path);
            (0..cfg.providers.len()).collect()
        }
        Target::Named(i) => {
            let name = &cfg.providers[i].name;
            assert_eq!(
                path.strip_prefix('/')
                    .and_then(|p| p.strip_prefix(&**name))
                    .map(|p| p.is_empty() || p.starts_with('/')),
                Some(true),
                "{path} routed to `{name}`"
            );
            vec![i]
        }
    };
    assert!(forwarded.starts_with('/'), "forwarded {forwarded:?}");
    if let Some(why) = escape(forwarded) {
        panic!("{path:?} accepted, forwards {forwarded:?}: {why}");
    }
    for i in providers {
        let p = &cfg.providers[i];
        if p.base_url.is_empty() {
            continue;
        }
        let base: http::Uri = p.base_url.parse().expect("a configured base URL parses");
        let Ok(uri) = p.upstream_uri(forwarded, query) else {
            continue;
        };
        assert_eq!(uri.scheme(), base.scheme(), "{path} -> {uri}");
        assert_eq!(uri.authority(), base.authority(), "{path} -> {uri}");
        let want = format!("{}{forwarded}", base.path().trim_end_matches('/'));
        assert_eq!(uri.path(), want, "{path} -> {uri}");
        assert_eq!(uri.query(), query, "{path} -> {uri}");
    }
}

/// Why `path` could leave its base path at an upstream that normalises dot segments, merges
/// slashes, treats `\` as `/`, or decodes `%2e`, `%2f` and `%5c` before routing.
fn escape(path: &str) -> Option<&'static str> {
    if path.contains("//") {
        return Some("empty segment");
    }
    if path.contains('\\') {
        return Some("backslash");
    }
    let lower = path.to_ascii_lowercase();
    if ["%2e", "%2f", "%5c"].iter().any(|e| lower.contains(e)) {
        return Some("encoded dot, slash or backslash");
    }
    if path.split('/').any(|s| s == "." || s == "..") {
        return Some("dot segment");
    }
    None
}
