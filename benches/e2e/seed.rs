//! Seeds a file store with one key per tenant for the tenant-scale bench, sealed exactly as
//! `byokd keys add` seals them (same KEK, same records, same audit events) but written in one
//! store update: adding 10,000 keys one command at a time rewrites the file 10,000 times.
//!
//!   seed CONFIG PROVIDER TENANTS KEY_PREFIX     # tenants t-0 .. t-(TENANTS-1)
//!
//! Built by `cargo build --release --example seed`; `benches/e2e/tenants.sh` runs it.

use std::sync::Mutex;

use byokd::config::{Config, StoreConfig};
use byokd::keys::PlainKey;
use byokd::keys::manage::{NewKey, add_key};
use byokd::keys::store::{Change, FileStore, KeyStore, StoreData, StoreFuture};

/// Collects the changes `add_key` makes, to apply them in one file update.
#[derive(Debug, Default)]
struct Collect(Mutex<Vec<Change>>);

impl KeyStore for Collect {
    fn load(&self) -> StoreFuture<'_, StoreData> {
        Box::pin(async { Ok(StoreData::default()) })
    }

    fn apply(&self, change: Change) -> StoreFuture<'_, usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(change);
        Box::pin(async { Ok(1) })
    }
}

fn fail(msg: String) -> ! {
    eprintln!("seed: {msg}");
    std::process::exit(1)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [config, provider, tenants, prefix] = args.as_slice() else {
        fail("usage: seed CONFIG PROVIDER TENANTS KEY_PREFIX".into())
    };
    let tenants: usize = tenants
        .parse()
        .unwrap_or_else(|e| fail(format!("TENANTS: {e}")));
    let cfg = Config::load(std::path::Path::new(config)).unwrap_or_else(|e| fail(e.to_string()));
    let StoreConfig::File { path, .. } = &cfg.store else {
        fail("the seed writes a file store only".into())
    };
    let p = cfg
        .provider_index(provider)
        .map(|i| cfg.providers[i].clone())
        .unwrap_or_else(|| fail(format!("unknown provider {provider}")));
    let kms = byokd::server::kms(&cfg).unwrap_or_else(|e| fail(e.to_string()));
    let audit = byokd::server::audit(&cfg);
    let collect = Collect::default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(e.to_string()));
    rt.block_on(async {
        for i in 0..tenants {
            let secret = PlainKey::new(format!("{prefix}{i:08}"));
            let tenant = format!("t-{i}");
            add_key(
                &collect,
                kms.as_ref(),
                &audit,
                NewKey {
                    tenant: &tenant,
                    provider: &p,
                    secret: &secret,
                    label: None,
                    expires_in: None,
                },
            )
            .await
            .unwrap_or_else(|e| fail(e.to_string()));
        }
    });
    let changes = collect.0.into_inner().unwrap_or_else(|e| e.into_inner());
    FileStore::new(path.clone())
        .update(|d| {
            for c in &changes {
                d.apply(c)?;
            }
            Ok(())
        })
        .unwrap_or_else(|e| fail(e.to_string()));
    println!("sealed {tenants} keys into {}", path.display());
}
