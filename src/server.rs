//! Assembles a running byokd from a [`Config`]: KMS, store, keyring, upstream client,
//! listeners. Used by `byokd serve` and by the integration tests (in-process, port 0).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::accept;
use crate::admin::Admin;
use crate::audit::Audit;
use crate::config::{Config, KmsConfig, StoreConfig};
use crate::forward::{ClientBuildError, Upstream};
use crate::keys::kms::{Kms, LocalKek};
use crate::keys::store::{FileStore, KeyStore};
use crate::keys::watch::StoreWatch;
use crate::keys::{CachePolicy, KeyError, Keyring};
use crate::metrics::Metrics;
use crate::pipeline::Proxy;

/// The PostgreSQL store and ledger, or, in a build without the `postgres` feature, a type
/// with no values: config validation refuses `store.postgres` there, so none is ever made.
#[cfg(feature = "postgres")]
type Pg = crate::keys::pg::PgStore;
#[cfg(not(feature = "postgres"))]
#[derive(Debug)]
enum Pg {}

#[cfg(not(feature = "postgres"))]
impl Pg {
    async fn sync_usage(&self, _: &crate::ledger::Ledger) -> Result<(), KeyError> {
        match *self {}
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Transparent: a key error names its file or service itself, and `{:#}` in `main` would
    /// print it twice (as this error and as its source) otherwise.
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("upstream client: {0}")]
    Upstream(#[from] ClientBuildError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot watch the store: {0}")]
    Watch(#[from] notify::Error),
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("usage ledger: {0}")]
    Ledger(#[from] crate::ledger::LedgerError),
}

/// Builds the KMS named by the config. AWS KMS connects lazily, on first use.
pub fn kms(cfg: &Config) -> Result<Arc<dyn Kms>, KeyError> {
    match &cfg.kms {
        KmsConfig::Local { keks, active } => Ok(Arc::new(LocalKek::load(keks, active)?)),
        #[cfg(feature = "aws-kms")]
        KmsConfig::Aws(a) => Ok(Arc::new(crate::keys::aws::AwsKms::new(a.clone()))),
        // Refused by config validation in a build without the feature.
        #[cfg(not(feature = "aws-kms"))]
        KmsConfig::Aws(_) => Err(KeyError::Invalid(
            "this byokd was built without the `aws-kms` feature".into(),
        )),
    }
}

/// Opens the store named by the config (PostgreSQL: connects and migrates the schema).
pub async fn store(cfg: &Config) -> Result<Arc<dyn KeyStore>, KeyError> {
    Ok(open_store(cfg).await?.0)
}

/// The store, and the PostgreSQL handle when that is what it is (it also keeps the ledger).
async fn open_store(cfg: &Config) -> Result<(Arc<dyn KeyStore>, Option<Arc<Pg>>), KeyError> {
    match &cfg.store {
        StoreConfig::File { path, .. } => Ok((Arc::new(FileStore::new(path.clone())), None)),
        #[cfg(feature = "postgres")]
        StoreConfig::Postgres { url } => {
            let pg = Arc::new(Pg::open(&url.0).await?);
            Ok((pg.clone(), Some(pg)))
        }
        #[cfg(not(feature = "postgres"))]
        StoreConfig::Postgres { .. } => Err(KeyError::Invalid(
            "this byokd was built without the `postgres` feature".into(),
        )),
    }
}

/// The audit sink named by the config.
pub fn audit(cfg: &Config) -> Arc<Audit> {
    Arc::new(Audit::new(&cfg.audit.target, cfg.audit.on_error))
}

/// The usage ledger's file with the file store; with PostgreSQL it lives in the database.
pub fn ledger_path(cfg: &Config) -> Option<std::path::PathBuf> {
    match &cfg.store {
        StoreConfig::File { ledger, .. } => Some(ledger.clone()),
        StoreConfig::Postgres { .. } => None,
    }
}

/// A running server.
#[derive(Debug)]
pub struct Running {
    pub data_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub proxy: Arc<Proxy>,
    stop_data: watch::Sender<bool>,
    stop_admin: watch::Sender<bool>,
    data_task: JoinHandle<()>,
    admin_task: JoinHandle<()>,
    sweeper: JoinHandle<()>,
    admin: Arc<Admin>,
    _watch: Watch,
    _tls: Option<crate::tls::ServerTls>,
    pg: Option<Arc<Pg>>,
}

/// What keeps the snapshot fresh: a file watcher or a PostgreSQL listener.
#[derive(Debug)]
enum Watch {
    #[expect(
        dead_code,
        reason = "held for its Drop: dropping it stops the file watcher"
    )]
    File(StoreWatch),
    Postgres(JoinHandle<()>),
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Watch::Postgres(h) = self {
            h.abort();
        }
    }
}

impl Running {
    /// Stops accepting, drains in-flight requests (bounded by `limits.drain_timeout`), returns.
    /// The admin listener stays up (answering `/readyz` 503) until the data plane drained, so
    /// probes see the drain and the last scrape counts every request.
    pub async fn shutdown(self) {
        self.admin.ready.store(false, Ordering::Release);
        let _ = self.stop_data.send(true);
        let _ = self.data_task.await;
        let _ = self.stop_admin.send(true);
        let _ = self.admin_task.await;
        self.sweeper.abort();
        flush_ledger(&self.admin.metrics, self.pg.as_deref()).await;
    }
}

/// Writes the usage ledger off the async workers (file) or adds it to PostgreSQL; a failure
/// is logged and retried next tick, nothing is dropped.
async fn flush_ledger(metrics: &Arc<Metrics>, pg: Option<&Pg>) {
    if let Some(pg) = pg {
        if let Err(e) = pg.sync_usage(&metrics.ledger).await {
            tracing::error!(error = %e, "cannot write the usage ledger to PostgreSQL; will retry");
        }
        return;
    }
    let m = metrics.clone();
    match tokio::task::spawn_blocking(move || m.ledger.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "cannot write the usage ledger; will retry"),
        Err(e) => tracing::error!(error = %e, "usage ledger flush task failed"),
    }
}

/// Starts both listeners. A corrupt store or a missing KEK is an error here, at start.
pub async fn start(cfg: Config) -> Result<Running, StartError> {
    let cfg = Arc::new(cfg);
    let names: Vec<&str> = cfg.providers.iter().map(|p| &*p.name).collect();
    let ledger = match ledger_path(&cfg) {
        Some(p) => {
            crate::keys::perms::check_path(crate::keys::perms::KeyFile::Ledger, &p)?;
            crate::ledger::Ledger::open(&p)?
        }
        None => crate::ledger::Ledger::shared(),
    };
    let metrics = Arc::new(Metrics::new(
        cfg.metric_caps,
        &names,
        cfg.pricing.clone(),
        ledger,
    )?);
    let kms = kms(&cfg)?;
    let (store, pg) = open_store(&cfg).await?;
    if let Some(pg) = &pg {
        // Start from the month's totals so far, before the first request is counted.
        pg.sync_usage(&metrics.ledger).await?;
    }
    // The keyring starts empty and the store is loaded once, after the watcher started: a
    // change landing meanwhile is seen by this load or by the watcher. (Loading before and
    // again after held a large store twice at start.)
    let keyring = Arc::new(Keyring::new(
        kms,
        store.clone(),
        audit(&cfg),
        crate::keys::store::StoreData::default(),
        CachePolicy {
            ttl: cfg.key_cache.ttl,
            stale_ttl: cfg.key_cache.stale_ttl,
            max_entries: cfg.key_cache.max_entries,
        },
    ));
    let watch = match &cfg.store {
        StoreConfig::File { path, .. } => {
            let fs = FileStore::new(path.clone());
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| KeyError::io(dir, e))?;
            }
            Watch::File(crate::keys::watch::watch(
                fs,
                keyring.clone(),
                metrics.clone(),
            )?)
        }
        #[cfg(feature = "postgres")]
        StoreConfig::Postgres { url } => Watch::Postgres(crate::keys::pg::listen(
            url.0.clone(),
            keyring.clone(),
            metrics.clone(),
        )),
        // open_store refused it above.
        #[cfg(not(feature = "postgres"))]
        StoreConfig::Postgres { .. } => Watch::Postgres(tokio::spawn(async {})),
    };
    keyring.reload().await?;
    let key_count: usize = keyring
        .snapshot()
        .tenants
        .values()
        .map(|t| t.keys.len())
        .sum();
    metrics.key_expiry(keyring.snapshot().expiring_soon(crate::vocab::unix_now()));
    let policy = crate::policy::Policy::new(cfg.shared_state.as_ref(), metrics.clone());
    let upstream = Upstream::new(&cfg.upstream, &cfg.limits)?;
    let sweeper = {
        let upstream = upstream.clone();
        let keyring = keyring.clone();
        let metrics = metrics.clone();
        let policy = policy.clone();
        let pg = pg.clone();
        let every = (cfg.key_cache.ttl / 4).max(std::time::Duration::from_secs(1));
        tokio::spawn(async move {
            let mut sweep = tokio::time::interval(every);
            let mut flush = tokio::time::interval(std::time::Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = sweep.tick() => {
                        keyring.sweep();
                        metrics.key_expiry(keyring.snapshot().expiring_soon(crate::vocab::unix_now()));
                    }
                    _ = flush.tick() => {
                        policy.sweep();
                        upstream.sweep();
                        flush_ledger(&metrics, pg.as_deref()).await;
                    }
                }
            }
        })
    };
    let proxy = Arc::new(Proxy::new(
        cfg.clone(),
        keyring,
        metrics.clone(),
        upstream,
        policy,
    ));

    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })
    };
    let data_listener = bind(cfg.listen).await?;
    let admin_listener = bind(cfg.admin_listen).await?;
    let data_addr = data_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: cfg.admin_listen,
            source,
        })?;

    let (stop_data, data_rx) = watch::channel(false);
    let (stop_admin, admin_rx) = watch::channel(false);
    let admin = Arc::new(Admin {
        metrics: metrics.clone(),
        proxy: proxy.clone(),
        ready: false.into(),
    });
    let p = proxy.clone();
    let tls = match &cfg.tls {
        Some(files) => {
            let m = metrics.clone();
            Some(crate::tls::server(files, move |ok| {
                m.config_reloads
                    .with_label_values(&[if ok { "ok" } else { "error" }])
                    .inc();
            })?)
        }
        None => None,
    };
    let data_task = tokio::spawn(accept::serve(
        data_listener,
        accept::data_builder(&cfg.limits),
        tls.as_ref()
            .map(|t| (t.acceptor.clone(), cfg.limits.header_timeout)),
        move |req, peer| p.clone().handle(req, peer),
        data_rx,
        accept::ConnLimits {
            keepalive_timeout: cfg.limits.keepalive_timeout,
            header_timeout: cfg.limits.header_timeout,
            drain: cfg.limits.drain_timeout,
        },
    ));
    let a = admin.clone();
    let admin_task = tokio::spawn(accept::serve(
        admin_listener,
        accept::admin_builder(),
        None,
        move |req, _peer| {
            let a = a.clone();
            async move { a.handle(req).await }
        },
        admin_rx,
        accept::ConnLimits {
            keepalive_timeout: cfg.limits.keepalive_timeout,
            header_timeout: cfg.limits.header_timeout,
            drain: std::time::Duration::from_secs(1),
        },
    ));
    admin.ready.store(true, Ordering::Release);
    tracing::info!(
        listen = %data_addr, admin = %admin_addr,
        keys = key_count, providers = cfg.providers.len(),
        prices_taken = crate::pricing::BUILTIN_TAKEN,
        "byokd serving"
    );
    Ok(Running {
        data_addr,
        admin_addr,
        proxy,
        stop_data,
        stop_admin,
        data_task,
        admin_task,
        sweeper,
        admin,
        _watch: watch,
        _tls: tls,
        pg,
    })
}
