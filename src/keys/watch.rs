//! Live reload of the file store: a change made by the CLI (or another writer) reaches the
//! serving snapshot within well under a second, without a restart. A store that fails to
//! parse is logged and ignored: the last good state keeps serving.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::Keyring;
use super::store::FileStore;
use crate::metrics::Metrics;

/// Keeps the OS watcher alive; dropping it stops reloads.
pub struct StoreWatch {
    _watcher: Box<dyn Watcher + Send>,
}

impl std::fmt::Debug for StoreWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreWatch")
    }
}

pub fn watch(
    store: FileStore,
    keyring: Arc<Keyring>,
    metrics: Arc<Metrics>,
) -> Result<StoreWatch, notify::Error> {
    let path = store.path().to_path_buf();
    let dir = path
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    let name = path.file_name().map(|n| n.to_os_string());
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let handler = move |res: notify::Result<notify::Event>| {
        // Only writes matter: our own reads of the file raise access events, and reacting to
        // those would reload in a loop.
        if let Ok(ev) = res
            && matches!(
                ev.kind,
                notify::EventKind::Create(_)
                    | notify::EventKind::Modify(_)
                    | notify::EventKind::Remove(_)
            )
            && ev.paths.iter().any(|p| {
                // A Kubernetes Secret volume replaces its files by swapping the `..data`
                // symlink (through `..data_tmp`): the store's own name sees no event then.
                let f = p.file_name();
                f == name.as_deref() || f.is_some_and(|f| f.as_encoded_bytes().starts_with(b".."))
            })
        {
            let _ = tx.send(());
        }
    };
    let mut watcher: Box<dyn Watcher + Send> = match notify::recommended_watcher(handler.clone()) {
        Ok(w) => Box::new(w),
        Err(e) => {
            tracing::warn!(error = %e, "file events unavailable; polling the store every second");
            let cfg = notify::Config::default().with_poll_interval(Duration::from_secs(1));
            Box::new(notify::PollWatcher::new(handler, cfg)?)
        }
    };
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;

    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            // Coalesce the burst of events one atomic rename produces.
            tokio::time::sleep(Duration::from_millis(50)).await;
            while rx.try_recv().is_ok() {}
            let s = store.clone();
            let _serial = keyring.reload_guard().await;
            match tokio::task::spawn_blocking(move || s.load_existing()).await {
                Ok(Ok(data)) => {
                    let (keys, tokens) = (data.keys.len(), data.tokens.len());
                    keyring.replace(data);
                    metrics.key_expiry(keyring.snapshot().expiring_soon(crate::vocab::unix_now()));
                    metrics.config_reloads.with_label_values(&["ok"]).inc();
                    tracing::info!(keys, tokens, "store reloaded");
                }
                Ok(Err(e)) => {
                    metrics.config_reloads.with_label_values(&["error"]).inc();
                    tracing::error!(error = %e, "store reload failed; keeping the last good state");
                }
                Err(e) => tracing::error!(error = %e, "store reload task failed"),
            }
        }
    });
    Ok(StoreWatch { _watcher: watcher })
}
