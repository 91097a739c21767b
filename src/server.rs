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
use crate::config::{Config, KmsConfig, StoreConfig};
use crate::forward::{ClientBuildError, Upstream};
use crate::keys::kms::{Kms, LocalKek};
use crate::keys::store::FileStore;
use crate::keys::watch::StoreWatch;
use crate::keys::{KeyError, Keyring};
use crate::metrics::Metrics;
use crate::pipeline::Proxy;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("keys: {0}")]
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
}

/// Builds the KMS named by the config.
pub fn kms(cfg: &Config) -> Result<Arc<dyn Kms>, KeyError> {
    match &cfg.kms {
        KmsConfig::Local { keks, active } => Ok(Arc::new(LocalKek::load(keks, active)?)),
    }
}

pub fn store(cfg: &Config) -> FileStore {
    match &cfg.store {
        StoreConfig::File { path } => FileStore::new(path.clone()),
    }
}

/// A running server.
#[derive(Debug)]
pub struct Running {
    pub data_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub proxy: Arc<Proxy>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    admin: Arc<Admin>,
    _watch: StoreWatch,
}

impl Running {
    /// Stops accepting, drains in-flight requests (bounded by `limits.drain_timeout`), returns.
    pub async fn shutdown(self) {
        self.admin.ready.store(false, Ordering::Release);
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Starts both listeners. A corrupt store or a missing KEK is an error here, at start.
pub async fn start(cfg: Config) -> Result<Running, StartError> {
    let cfg = Arc::new(cfg);
    let metrics = Arc::new(Metrics::new(cfg.max_metric_tenants)?);
    let kms = kms(&cfg)?;
    let store = store(&cfg);
    let data = store.load()?;
    if let Some(dir) = store.path().parent() {
        std::fs::create_dir_all(dir).map_err(|e| KeyError::io(dir, e))?;
    }
    let keyring = Arc::new(Keyring::new(
        kms,
        &data,
        cfg.key_cache.ttl,
        cfg.key_cache.max_entries,
    ));
    let watch = crate::keys::watch::watch(store, keyring.clone(), metrics.clone())?;
    let upstream = Upstream::new(&cfg.upstream, &cfg.limits)?;
    let proxy = Arc::new(Proxy::new(cfg.clone(), keyring, metrics.clone(), upstream));

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

    let (tx, rx) = watch::channel(false);
    let admin = Arc::new(Admin {
        metrics,
        ready: false.into(),
    });
    let p = proxy.clone();
    let data_task = tokio::spawn(accept::serve(
        data_listener,
        accept::data_builder(&cfg.limits),
        move |req| {
            let p = p.clone();
            async move { p.handle(req).await }
        },
        rx.clone(),
        cfg.limits.drain_timeout,
    ));
    let a = admin.clone();
    let admin_task = tokio::spawn(accept::serve(
        admin_listener,
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new()),
        move |req| {
            let a = a.clone();
            async move { a.handle(req).await }
        },
        rx,
        cfg.limits.drain_timeout,
    ));
    admin.ready.store(true, Ordering::Release);
    tracing::info!(
        listen = %data_addr, admin = %admin_addr,
        keys = data.keys.len(), providers = cfg.providers.len(),
        "byokd serving"
    );
    Ok(Running {
        data_addr,
        admin_addr,
        proxy,
        shutdown: tx,
        tasks: vec![data_task, admin_task],
        admin,
        _watch: watch,
    })
}
