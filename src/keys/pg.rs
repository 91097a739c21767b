//! The PostgreSQL store, shared by every replica: the same records as the file store, one
//! row per key version and per token. Each change is one transaction that also sends
//! `NOTIFY byokd_store`; every replica `LISTEN`s and reloads its snapshot, so a revoke on
//! one replica stops use on all of them within a second or two.
//!
//! Postgres down: the last snapshot and the plaintext cache keep serving, management calls
//! fail with a clear error (nothing half-written: each change is one transaction), and the
//! listener reconnects and reloads by itself.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use tokio::sync::Mutex;
use tokio_postgres::{AsyncMessage, Client, NoTls, Row};

use super::store::{Change, KeyRecord, KeyState, KeyStore, StoreData, StoreFuture, TokenRecord};
use super::{KeyError, Keyring};
use crate::metrics::Metrics;

/// The NOTIFY channel.
pub const CHANNEL: &str = "byokd_store";

/// Schema version this build writes; migrations run under an advisory lock so replicas
/// starting together do not race.
const SCHEMA_VERSION: i32 = 2;
const MIGRATE_LOCK: i64 = 0x6279_6f6b_6400_0001;

const SCHEMA_V1: &str = "
CREATE TABLE IF NOT EXISTS byokd_schema (version integer NOT NULL);
CREATE TABLE IF NOT EXISTS byokd_keys (
    id          text    NOT NULL,
    version     integer NOT NULL,
    tenant      text    NOT NULL,
    provider    text    NOT NULL,
    label       text,
    state       text    NOT NULL CHECK (state IN ('active', 'retired', 'revoked')),
    created_at  bigint  NOT NULL,
    expires_at  bigint,
    masked      text    NOT NULL,
    kek_id      text    NOT NULL,
    wrapped_dek text    NOT NULL,
    nonce       text    NOT NULL,
    ciphertext  text    NOT NULL,
    PRIMARY KEY (id, version)
);
CREATE INDEX IF NOT EXISTS byokd_keys_tenant ON byokd_keys (tenant, provider);
CREATE TABLE IF NOT EXISTS byokd_tokens (
    id         text    PRIMARY KEY,
    tenant     text    NOT NULL,
    sha256     text    NOT NULL UNIQUE,
    created_at bigint  NOT NULL,
    revoked    boolean NOT NULL DEFAULT false
);
";

/// v2: the usage ledger, one row per (tenant, month, provider, model), added to by every
/// replica (never overwritten).
const SCHEMA_V2: &str = "
CREATE TABLE IF NOT EXISTS byokd_usage (
    tenant            text   NOT NULL,
    period            text   NOT NULL,
    provider          text   NOT NULL,
    model             text   NOT NULL,
    requests          bigint NOT NULL DEFAULT 0,
    input             bigint NOT NULL DEFAULT 0,
    cached_input      bigint NOT NULL DEFAULT 0,
    cache_write       bigint NOT NULL DEFAULT 0,
    output            bigint NOT NULL DEFAULT 0,
    reasoning         bigint NOT NULL DEFAULT 0,
    cost_nanos        bigint NOT NULL DEFAULT 0,
    unpriced_requests bigint NOT NULL DEFAULT 0,
    images            bigint NOT NULL DEFAULT 0,
    characters        bigint NOT NULL DEFAULT 0,
    audio_ms          bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, period, provider, model)
);
";

/// When each usage row last changed, so a reload reads only what changed. Additive and
/// without a version bump, so replicas of an older byokd keep running beside newer ones
/// during a rolling upgrade: a trigger stamps every update, theirs included. `now()` (the
/// transaction's start) is stable, so adding the column does not rewrite the table.
const SCHEMA_V2_CHANGED_AT: &str = "
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                   WHERE table_schema = current_schema() AND table_name = 'byokd_usage'
                     AND column_name = 'changed_at') THEN
        ALTER TABLE byokd_usage ADD COLUMN changed_at timestamptz NOT NULL DEFAULT now();
    END IF;
END $$;
CREATE INDEX IF NOT EXISTS byokd_usage_changed ON byokd_usage (period, changed_at);
CREATE OR REPLACE FUNCTION byokd_usage_touch() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
    NEW.changed_at := now();
    RETURN NEW;
END $f$;
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger
                   WHERE tgname = 'byokd_usage_touch'
                     AND tgrelid = 'byokd_usage'::regclass) THEN
        CREATE TRIGGER byokd_usage_touch BEFORE UPDATE ON byokd_usage
            FOR EACH ROW EXECUTE FUNCTION byokd_usage_touch();
    END IF;
END $$;
";

const USAGE_COLUMNS: [&str; 11] = [
    "requests",
    "input",
    "cached_input",
    "cache_write",
    "output",
    "reasoning",
    "cost_nanos",
    "unpriced_requests",
    "images",
    "characters",
    "audio_ms",
];

fn usage_values(t: &crate::ledger::Totals) -> [i64; 11] {
    let c = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    [
        c(t.requests),
        c(t.input),
        c(t.cached_input),
        c(t.cache_write),
        c(t.output),
        c(t.reasoning),
        c(t.cost_nanos),
        c(t.unpriced_requests),
        c(t.images),
        c(t.characters),
        c(t.audio_ms),
    ]
}

pub struct PgStore {
    url: String,
    /// One connection for management calls and reloads: they are rare, and a transaction
    /// needs the connection to itself.
    client: Mutex<Option<Client>>,
    /// The usage ledger's last reload, from which the next reads only the rows changed since.
    reloaded: std::sync::Mutex<Option<Reloaded>>,
}

/// When the usage ledger was last read from the database, by the database's clock.
#[derive(Debug, Clone)]
struct Reloaded {
    period: String,
    at: std::time::SystemTime,
    /// Reloads of changed rows since the last full one.
    partial: u32,
}

/// What a usage sync read back from the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reload {
    /// Rows read: every row of the month for a full reload, else the changed ones.
    pub rows: usize,
    pub full: bool,
}

/// How far back before the last reload a reload of changed rows looks. A row's
/// `changed_at` is its writing transaction's start, and that transaction may commit (become
/// visible) up to [`CALL_TIMEOUT`] later; rows read twice are set, not added, so the overlap
/// costs reads, never counts.
const RELOAD_OVERLAP: Duration = Duration::from_secs(30);

/// A full reload every so many syncs (about 5 minutes at one sync per 5 s) puts right what
/// reloads of changed rows cannot see: rows deleted by hand, a restored database.
const FULL_RELOAD_EVERY: u32 = 60;

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password.
        f.write_str("PgStore")
    }
}

fn unavailable(e: tokio_postgres::Error) -> KeyError {
    if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) {
        return KeyError::Conflict("that record exists already (a concurrent change)".into());
    }
    // `Display` of a tokio-postgres error never includes the connection string.
    let mut msg = e.to_string();
    if let Some(db) = e.as_db_error() {
        msg = format!("{}: {}", db.code().code(), db.message());
    }
    KeyError::StoreUnavailable(msg)
}

async fn connect(
    url: &str,
) -> Result<
    (
        Client,
        tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>,
    ),
    KeyError,
> {
    tokio::time::timeout(Duration::from_secs(5), tokio_postgres::connect(url, NoTls))
        .await
        .map_err(|_| KeyError::StoreUnavailable("connect timed out after 5s".into()))?
        .map_err(unavailable)
}

impl PgStore {
    /// Connects and creates or migrates the schema. Fails when PostgreSQL is unreachable:
    /// a replica must not start serving with an empty key set.
    pub async fn open(url: &str) -> Result<Self, KeyError> {
        let s = Self {
            url: url.to_string(),
            client: Mutex::new(None),
            reloaded: std::sync::Mutex::new(None),
        };
        let mut g = s.client().await?;
        if let Some(c) = g.as_mut() {
            migrate(c).await.inspect_err(|_| *g = None)?;
        }
        drop(g);
        Ok(s)
    }

    async fn client(&self) -> Result<tokio::sync::MutexGuard<'_, Option<Client>>, KeyError> {
        let mut g = self.client.lock().await;
        if g.as_ref().is_none_or(|c| c.is_closed()) {
            let (client, conn) = connect(&self.url).await?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::warn!(error = %e, "store connection to PostgreSQL closed");
                }
            });
            *g = Some(client);
        }
        Ok(g)
    }

    async fn load_inner(c: &Client) -> Result<StoreData, KeyError> {
        let keys = c
            .query(
                "SELECT id, version, tenant, provider, label, state, created_at, expires_at, \
                 masked, kek_id, wrapped_dek, nonce, ciphertext FROM byokd_keys \
                 ORDER BY created_at, id, version",
                &[],
            )
            .await
            .map_err(unavailable)?;
        let tokens = c
            .query(
                "SELECT id, tenant, sha256, created_at, revoked FROM byokd_tokens ORDER BY created_at, id",
                &[],
            )
            .await
            .map_err(unavailable)?;
        Ok(StoreData {
            format: 1,
            keys: keys.iter().map(key_from_row).collect::<Result<_, _>>()?,
            tokens: tokens
                .iter()
                .map(|r| TokenRecord {
                    id: r.get(0),
                    tenant: r.get(1),
                    sha256: r.get(2),
                    created_at: r.get(3),
                    revoked: r.get(4),
                })
                .collect(),
        })
    }

    async fn apply_inner(c: &mut Client, change: &Change) -> Result<usize, KeyError> {
        let tx = c.transaction().await.map_err(unavailable)?;
        let n = match change {
            Change::AddKey(r) => insert_key(&tx, r).await?,
            Change::Rotate(r) => {
                // Lock the key's rows so a racing rotation waits, then sees the new version.
                let rows = tx
                    .query(
                        "SELECT version FROM byokd_keys WHERE id = $1 FOR UPDATE",
                        &[&r.id],
                    )
                    .await
                    .map_err(unavailable)?;
                let newest = rows.iter().map(|row| row.get::<_, i32>(0)).max();
                if newest.is_some_and(|v| i64::from(v) + 1 != i64::from(r.version)) {
                    return Err(KeyError::Conflict(format!(
                        "key `{}` was rotated meanwhile; retry the rotation",
                        r.id
                    )));
                }
                let n = tx
                    .execute(
                        "UPDATE byokd_keys SET state = 'retired' WHERE id = $1 AND state = 'active'",
                        &[&r.id],
                    )
                    .await
                    .map_err(unavailable)?;
                if n == 0 {
                    return Err(KeyError::NotFound(format!(
                        "no active key with id `{}`",
                        r.id
                    )));
                }
                n as usize + insert_key(&tx, r).await?
            }
            Change::Revoke { key_id } => {
                let exists = tx
                    .query_opt("SELECT 1 FROM byokd_keys WHERE id = $1 LIMIT 1", &[key_id])
                    .await
                    .map_err(unavailable)?;
                if exists.is_none() {
                    return Err(KeyError::NotFound(format!("no key with id `{key_id}`")));
                }
                tx.execute(
                    "UPDATE byokd_keys SET state = 'revoked' WHERE id = $1 AND state <> 'revoked'",
                    &[key_id],
                )
                .await
                .map_err(unavailable)? as usize
            }
            Change::Rewrap {
                id,
                version,
                from_kek,
                kek_id,
                wrapped_dek,
            } => {
                let v = i32::try_from(*version).unwrap_or(i32::MAX);
                tx.execute(
                    "UPDATE byokd_keys SET kek_id = $4, wrapped_dek = $5 \
                     WHERE id = $1 AND version = $2 AND kek_id = $3",
                    &[id, &v, from_kek, kek_id, wrapped_dek],
                )
                .await
                .map_err(unavailable)? as usize
            }
            Change::AddToken(t) => insert_token(&tx, t).await?,
            Change::Import { keys, tokens } => {
                // Refused as a whole, in the transaction, when any record is already here.
                let ids: Vec<&str> = keys.iter().map(|k| k.id.as_str()).collect();
                let taken = tx
                    .query(
                        "SELECT id, version FROM byokd_keys WHERE id = ANY($1)",
                        &[&ids],
                    )
                    .await
                    .map_err(unavailable)?;
                for row in &taken {
                    let (id, v): (String, i32) = (row.get(0), row.get(1));
                    if keys
                        .iter()
                        .any(|k| k.id == id && i64::from(k.version) == i64::from(v))
                    {
                        return Err(KeyError::Conflict(format!(
                            "key {id} v{v} is already in the store"
                        )));
                    }
                }
                let tids: Vec<&str> = tokens.iter().map(|t| t.id.as_str()).collect();
                let taken = tx
                    .query("SELECT id FROM byokd_tokens WHERE id = ANY($1)", &[&tids])
                    .await
                    .map_err(unavailable)?;
                if let Some(row) = taken.first() {
                    let id: String = row.get(0);
                    return Err(KeyError::Conflict(format!(
                        "token {id} is already in the store"
                    )));
                }
                let mut n = 0;
                for k in keys {
                    n += insert_key(&tx, k).await?;
                }
                for t in tokens {
                    n += insert_token(&tx, t).await?;
                }
                n
            }
            Change::RevokeToken { token_id } => {
                let n = tx
                    .execute(
                        "UPDATE byokd_tokens SET revoked = true WHERE id = $1",
                        &[token_id],
                    )
                    .await
                    .map_err(unavailable)?;
                if n == 0 {
                    return Err(KeyError::NotFound(format!("no token with id `{token_id}`")));
                }
                n as usize
            }
        };
        // Delivered to every listener when (and only if) the transaction commits.
        tx.execute(
            "SELECT pg_notify($1, $2)",
            &[&CHANNEL, &change_kind(change)],
        )
        .await
        .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(n)
    }
}

fn change_kind(c: &Change) -> &'static str {
    match c {
        Change::AddKey(_) => "key_add",
        Change::Rotate(_) => "key_rotate",
        Change::Revoke { .. } => "key_revoke",
        Change::Rewrap { .. } => "key_rewrap",
        Change::AddToken(_) => "token_add",
        Change::RevokeToken { .. } => "token_revoke",
        Change::Import { .. } => "import",
    }
}

async fn insert_token(
    tx: &tokio_postgres::Transaction<'_>,
    t: &TokenRecord,
) -> Result<usize, KeyError> {
    tx.execute(
        "INSERT INTO byokd_tokens (id, tenant, sha256, created_at, revoked) \
         VALUES ($1, $2, $3, $4, $5)",
        &[&t.id, &t.tenant, &t.sha256, &t.created_at, &t.revoked],
    )
    .await
    .map(|n| n as usize)
    .map_err(unavailable)
}

async fn insert_key(
    tx: &tokio_postgres::Transaction<'_>,
    r: &KeyRecord,
) -> Result<usize, KeyError> {
    let version = i32::try_from(r.version)
        .map_err(|_| KeyError::Invalid(format!("key {} has too many versions", r.id)))?;
    tx.execute(
        "INSERT INTO byokd_keys (id, version, tenant, provider, label, state, created_at, \
         expires_at, masked, kek_id, wrapped_dek, nonce, ciphertext) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        &[
            &r.id,
            &version,
            &r.tenant,
            &r.provider,
            &r.label,
            &state_str(r.state),
            &r.created_at,
            &r.expires_at,
            &r.masked,
            &r.kek_id,
            &r.wrapped_dek,
            &r.nonce,
            &r.ciphertext,
        ],
    )
    .await
    .map(|n| n as usize)
    .map_err(unavailable)
}

fn state_str(s: KeyState) -> &'static str {
    match s {
        KeyState::Active => "active",
        KeyState::Retired => "retired",
        KeyState::Revoked => "revoked",
    }
}

fn key_from_row(r: &Row) -> Result<KeyRecord, KeyError> {
    let state: String = r.get(5);
    let state = match state.as_str() {
        "active" => KeyState::Active,
        "retired" => KeyState::Retired,
        "revoked" => KeyState::Revoked,
        other => return Err(KeyError::Corrupt(format!("unknown key state `{other}`"))),
    };
    let version: i32 = r.get(1);
    Ok(KeyRecord {
        id: r.get(0),
        version: u32::try_from(version)
            .map_err(|_| KeyError::Corrupt("negative version".into()))?,
        tenant: r.get(2),
        provider: r.get(3),
        label: r.get(4),
        state,
        created_at: r.get(6),
        expires_at: r.get(7),
        masked: r.get(8),
        kek_id: r.get(9),
        wrapped_dek: r.get(10),
        nonce: r.get(11),
        ciphertext: r.get(12),
    })
}

async fn migrate(c: &mut Client) -> Result<(), KeyError> {
    let tx = c.transaction().await.map_err(unavailable)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])
        .await
        .map_err(unavailable)?;
    tx.batch_execute(SCHEMA_V1).await.map_err(unavailable)?;
    tx.batch_execute(SCHEMA_V2).await.map_err(unavailable)?;
    tx.batch_execute(SCHEMA_V2_CHANGED_AT)
        .await
        .map_err(unavailable)?;
    let v: Option<i32> = tx
        .query_opt("SELECT max(version) FROM byokd_schema", &[])
        .await
        .map_err(unavailable)?
        .and_then(|r| r.get(0));
    match v {
        None => {
            tx.execute(
                "INSERT INTO byokd_schema (version) VALUES ($1)",
                &[&SCHEMA_VERSION],
            )
            .await
            .map_err(unavailable)?;
        }
        Some(v) if v > SCHEMA_VERSION => {
            return Err(KeyError::Corrupt(format!(
                "the database schema is version {v}, newer than this byokd ({SCHEMA_VERSION}); upgrade byokd"
            )));
        }
        Some(v) if v < SCHEMA_VERSION => {
            tx.execute("UPDATE byokd_schema SET version = $1", &[&SCHEMA_VERSION])
                .await
                .map_err(unavailable)?;
        }
        Some(_) => {}
    }
    tx.commit().await.map_err(unavailable)
}

impl PgStore {
    /// Adds this replica's pending usage to the database, then reloads the month's totals
    /// of all replicas into the ledger's base: the rows changed since the last reload, or the
    /// whole month at the first sync, a new month, and every [`FULL_RELOAD_EVERY`] syncs. A
    /// failed write keeps the delta pending.
    pub async fn sync_usage(&self, ledger: &crate::ledger::Ledger) -> Result<Reload, KeyError> {
        let deltas = ledger.take_pending();
        let written = std::sync::Mutex::new(vec![false; deltas.len()]);
        let r = self
            .bounded(self.sync_usage_now(ledger, &deltas, &written))
            .await;
        // Whatever was not written (an error, or the time bound cut the sync short) is
        // pending again: nothing is lost.
        let written = written.into_inner().unwrap_or_else(|p| p.into_inner());
        for ((t, d), done) in deltas.iter().zip(written) {
            if !done {
                ledger.settle(t, d, false);
            }
        }
        r
    }

    async fn sync_usage_now(
        &self,
        ledger: &crate::ledger::Ledger,
        deltas: &[(String, crate::ledger::TenantMonth)],
        written: &std::sync::Mutex<Vec<bool>>,
    ) -> Result<Reload, KeyError> {
        let mut g = self.client().await?;
        let Some(c) = g.as_mut() else {
            return Err(KeyError::StoreUnavailable("no connection".into()));
        };
        let sets: Vec<String> = USAGE_COLUMNS
            .iter()
            .map(|col| format!("{col} = byokd_usage.{col} + EXCLUDED.{col}"))
            .collect();
        let upsert = format!(
            "INSERT INTO byokd_usage (tenant, period, provider, model, {}) \
             VALUES ($1, $2, $3, $4, {}) \
             ON CONFLICT (tenant, period, provider, model) DO UPDATE SET {}",
            USAGE_COLUMNS.join(", "),
            (5..5 + USAGE_COLUMNS.len())
                .map(|i| format!("${i}"))
                .collect::<Vec<_>>()
                .join(", "),
            sets.join(", ")
        );
        let mut failed = None;
        for (i, (tenant, delta)) in deltas.iter().enumerate() {
            // One transaction per tenant: its delta is written whole or not at all.
            let r = async {
                let tx = c.transaction().await.map_err(unavailable)?;
                for (provider, models) in &delta.providers {
                    for (model, t) in models {
                        let v = usage_values(t);
                        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                            vec![tenant, &delta.period, &provider, &model];
                        params.extend(
                            v.iter()
                                .map(|x| x as &(dyn tokio_postgres::types::ToSql + Sync)),
                        );
                        tx.execute(upsert.as_str(), &params)
                            .await
                            .map_err(unavailable)?;
                    }
                }
                tx.commit().await.map_err(unavailable)
            }
            .await;
            if r.is_ok() {
                ledger.settle(tenant, delta, true);
                if let Some(w) = written.lock().unwrap_or_else(|p| p.into_inner()).get_mut(i) {
                    *w = true;
                }
            }
            if let Err(e) = r {
                failed = Some(e);
            }
        }
        if let Some(e) = failed {
            *g = None;
            return Err(e);
        }
        let period = crate::vocab::clock::month_of(crate::vocab::unix_now());
        // Taken before the read: a row changed after it is read again next time.
        let at: std::time::SystemTime = c
            .query_one("SELECT now()", &[])
            .await
            .map_err(unavailable)?
            .get(0);
        let last = self
            .reloaded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .filter(|r| r.period == period && r.partial < FULL_RELOAD_EVERY);
        let select = format!(
            "SELECT tenant, provider, model, {} FROM byokd_usage WHERE period = $1",
            USAGE_COLUMNS.join(", ")
        );
        let rows = match &last {
            Some(r) => {
                let since = r.at.checked_sub(RELOAD_OVERLAP).unwrap_or(r.at);
                c.query(&format!("{select} AND changed_at > $2"), &[&period, &since])
                    .await
            }
            None => c.query(&select, &[&period]).await,
        }
        .map_err(unavailable)?;
        let mut months: std::collections::HashMap<String, crate::ledger::TenantMonth> =
            Default::default();
        for r in &rows {
            let n = |i: usize| u64::try_from(r.get::<_, i64>(i)).unwrap_or(0);
            let totals = crate::ledger::Totals {
                requests: n(3),
                input: n(4),
                cached_input: n(5),
                cache_write: n(6),
                output: n(7),
                reasoning: n(8),
                cost_nanos: n(9),
                unpriced_requests: n(10),
                images: n(11),
                characters: n(12),
                audio_ms: n(13),
            };
            months
                .entry(r.get(0))
                .or_insert_with(|| crate::ledger::TenantMonth {
                    period: period.clone(),
                    providers: Default::default(),
                })
                .providers
                .entry_or_default(r.get(1))
                .insert(r.get(2), totals);
        }
        let reload = Reload {
            rows: rows.len(),
            full: last.is_none(),
        };
        if reload.full {
            ledger.replace_base(months.into_iter().collect());
        } else {
            ledger.update_base(months.into_iter().collect());
        }
        *self.reloaded.lock().unwrap_or_else(|p| p.into_inner()) = Some(Reloaded {
            period,
            at,
            partial: last.map_or(0, |r| r.partial + 1),
        });
        Ok(reload)
    }
}

/// A partition that neither answers nor resets the connection must not hang management
/// calls, reloads or the listener's resync: every call is bounded, and a timed-out
/// connection is dropped so the next call connects afresh.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

impl PgStore {
    async fn bounded<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, KeyError>>,
    ) -> Result<T, KeyError> {
        match tokio::time::timeout(CALL_TIMEOUT, f).await {
            Ok(r) => r,
            Err(_) => {
                *self.client.lock().await = None;
                Err(KeyError::StoreUnavailable(format!(
                    "PostgreSQL did not answer within {CALL_TIMEOUT:?}"
                )))
            }
        }
    }
}

impl KeyStore for PgStore {
    fn load(&self) -> StoreFuture<'_, StoreData> {
        Box::pin(self.bounded(async move {
            let mut g = self.client().await?;
            let Some(c) = g.as_ref() else {
                return Err(KeyError::StoreUnavailable("no connection".into()));
            };
            let r = Self::load_inner(c).await;
            if r.is_err() {
                *g = None;
            }
            r
        }))
    }

    fn apply(&self, change: Change) -> StoreFuture<'_, usize> {
        Box::pin(self.bounded(async move {
            let mut g = self.client().await?;
            let Some(c) = g.as_mut() else {
                return Err(KeyError::StoreUnavailable("no connection".into()));
            };
            let r = Self::apply_inner(c, &change).await;
            if matches!(r, Err(KeyError::StoreUnavailable(_))) {
                *g = None;
            }
            r
        }))
    }
}

/// Keeps a `LISTEN` connection and reloads the keyring on every notification; reconnects
/// with backoff when PostgreSQL goes away, and reloads after reconnecting (notifications
/// sent meanwhile are lost, the reload catches them). A periodic resync covers the rest.
pub fn listen(
    url: String,
    keyring: Arc<Keyring>,
    metrics: Arc<Metrics>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(250);
        loop {
            // Once listening, `listen_once` resets `backoff`: a connection lost after a good
            // one is retried after 250 ms again, not after what earlier losses grew it to.
            match listen_once(&url, &keyring, &metrics, &mut backoff).await {
                Ok(()) => backoff = Duration::from_millis(250),
                Err(e) => {
                    metrics.config_reloads.with_label_values(&["error"]).inc();
                    tracing::error!(error = %e, retry_in = ?backoff,
                        "store listener: PostgreSQL unavailable; serving the last good state");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    })
}

async fn reload(keyring: &Keyring, metrics: &Metrics) -> Result<(), KeyError> {
    keyring.reload().await?;
    metrics.key_expiry(keyring.snapshot().expiring_soon(crate::vocab::unix_now()));
    metrics.config_reloads.with_label_values(&["ok"]).inc();
    Ok(())
}

async fn listen_once(
    url: &str,
    keyring: &Keyring,
    metrics: &Metrics,
    backoff: &mut Duration,
) -> Result<(), KeyError> {
    let (client, mut conn) = connect(url).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let pump = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(m) = messages.next().await {
            match m {
                Ok(AsyncMessage::Notification(_)) => {
                    if tx.send(()).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "store listener connection lost");
                    return;
                }
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {CHANNEL}"))
        .await
        .map_err(unavailable)?;
    reload(keyring, metrics).await?;
    *backoff = Duration::from_millis(250);
    tracing::info!("store listener: listening for changes in PostgreSQL");
    let mut resync = tokio::time::interval(Duration::from_secs(30));
    resync.tick().await;
    loop {
        tokio::select! {
            got = rx.recv() => {
                if got.is_none() {
                    pump.abort();
                    return Err(KeyError::StoreUnavailable("listener connection closed".into()));
                }
                // Coalesce a burst (a rewrap of many records) into one reload.
                tokio::time::sleep(Duration::from_millis(20)).await;
                while rx.try_recv().is_ok() {}
                reload(keyring, metrics).await?;
            }
            _ = resync.tick() => reload(keyring, metrics).await?,
        }
    }
}
