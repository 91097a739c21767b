//! The spend ledger: each tenant's tokens, requests and cost for the current UTC calendar
//! month, per provider and model. Served by `GET /byokd/usage` and the admin API, persisted
//! beside the key store so totals survive a restart.
//!
//! Updated once per completed request under a per-tenant lock (never a global one); written to
//! disk by a background task, never on the request path.
//!
//! With the PostgreSQL store the ledger is shared by every replica: requests add to a
//! per-tenant `pending` delta, a background task adds the deltas to the database (additive
//! upserts, so replicas never overwrite each other) and reloads the month's totals of all
//! replicas as the new base. A tenant's month is base + pending.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::vocab::FastDashMap;
use serde::{Deserialize, Serialize};

use crate::usage::Usage;
use crate::vocab::SmallMap;

/// Token and cost totals of one (provider, model) in one month.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub requests: u64,
    pub input: u64,
    pub cached_input: u64,
    pub cache_write: u64,
    pub output: u64,
    pub reasoning: u64,
    /// Exact cost in nano-dollars (USD × 10⁹).
    pub cost_nanos: u64,
    /// Requests whose model had no price (their cost is not in `cost_nanos`).
    pub unpriced_requests: u64,
    /// Units other than tokens; `default` so ledgers written before them still load.
    #[serde(default)]
    pub images: u64,
    #[serde(default)]
    pub characters: u64,
    #[serde(default)]
    pub audio_ms: u64,
}

impl Totals {
    /// Adds another total (merging a delta into a base).
    pub fn merge(&mut self, o: &Totals) {
        self.requests += o.requests;
        self.input += o.input;
        self.cached_input += o.cached_input;
        self.cache_write += o.cache_write;
        self.output += o.output;
        self.reasoning += o.reasoning;
        self.cost_nanos = self.cost_nanos.saturating_add(o.cost_nanos);
        self.unpriced_requests += o.unpriced_requests;
        self.images += o.images;
        self.characters += o.characters;
        self.audio_ms += o.audio_ms;
    }

    fn add(&mut self, u: &Usage, cost: Option<u64>) {
        self.requests += 1;
        self.input += u.input;
        self.cached_input += u.cached_input;
        self.cache_write += u.cache_write;
        self.output += u.output;
        self.reasoning += u.reasoning;
        self.images += u.images;
        self.characters += u.characters;
        self.audio_ms += u.audio_ms;
        match cost {
            Some(c) => self.cost_nanos = self.cost_nanos.saturating_add(c),
            None if u.metered() => self.unpriced_requests += 1,
            None => {}
        }
    }
}

/// One tenant's month: provider => model => totals.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantMonth {
    /// `YYYY-MM`, UTC.
    pub period: String,
    pub providers: SmallMap<SmallMap<Totals>>,
}

impl TenantMonth {
    /// Adds `o` if it is of the same period (a delta from last month is dropped).
    pub fn merge(&mut self, o: &TenantMonth) {
        if o.period != self.period {
            return;
        }
        for (p, models) in &o.providers {
            let mine = self.providers.entry_or_default(p);
            for (m, t) in models {
                mine.entry_or_default(m).merge(t);
            }
        }
    }

    pub fn cost_nanos(&self) -> u64 {
        self.providers
            .values()
            .flat_map(|m| m.values())
            .map(|t| t.cost_nanos)
            .fold(0u64, u64::saturating_add)
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LedgerFile {
    format: u32,
    tenants: BTreeMap<String, TenantMonth>,
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
}

/// In-memory ledger with an optional file behind it.
#[derive(Debug)]
pub struct Ledger {
    tenants: FastDashMap<Box<str>, Mutex<TenantMonth>>,
    path: Option<PathBuf>,
    dirty: AtomicBool,
    /// Shared mode: usage not yet added to the database. `None` for a file or memory ledger.
    pending: Option<FastDashMap<Box<str>, Mutex<TenantMonth>>>,
}

use crate::vocab::clock::{month_of, with_month};

/// Nano-dollars as an exact decimal string of USD (`28500` → `"0.0000285"`).
pub fn usd(nanos: u64) -> String {
    let whole = nanos / 1_000_000_000;
    let frac = nanos % 1_000_000_000;
    if frac == 0 {
        return format!("{whole}");
    }
    let f = format!("{frac:09}");
    format!("{whole}.{}", f.trim_end_matches('0'))
}

impl Ledger {
    /// An in-memory ledger (tests, or no place to persist).
    pub fn in_memory() -> Self {
        Self {
            tenants: FastDashMap::default(),
            path: None,
            dirty: AtomicBool::new(false),
            pending: None,
        }
    }

    /// A ledger whose totals live in a shared database (see the module doc).
    pub fn shared() -> Self {
        Self {
            pending: Some(FastDashMap::default()),
            ..Self::in_memory()
        }
    }

    /// Loads the ledger file if it exists. A corrupt file is an error: starting from zero
    /// would silently forgive every tenant's spend.
    pub fn open(path: &Path) -> Result<Self, LedgerError> {
        let err = |message: String| LedgerError::File {
            path: path.display().to_string(),
            message,
        };
        let file: LedgerFile = match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| err(format!("not a valid usage ledger: {e}")))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => LedgerFile::default(),
            Err(e) => return Err(err(e.to_string())),
        };
        let tenants = FastDashMap::default();
        for (t, m) in file.tenants {
            tenants.insert(t.into_boxed_str(), Mutex::new(m));
        }
        Ok(Self {
            tenants,
            path: Some(path.to_path_buf()),
            dirty: AtomicBool::new(false),
            pending: None,
        })
    }

    /// Adds one completed request. A new month starts the tenant from zero.
    pub fn record(
        &self,
        tenant: &str,
        provider: &str,
        model: &str,
        usage: &Usage,
        cost: Option<u64>,
        now: i64,
    ) {
        with_month(now, |period| {
            let add = |m: &mut TenantMonth| {
                if m.period != period {
                    *m = TenantMonth {
                        period: period.to_string(),
                        providers: SmallMap::default(),
                    };
                }
                let models = m.providers.entry_or_default(provider);
                models.entry_or_default(model).add(usage, cost);
            };
            let target = self.pending.as_ref().unwrap_or(&self.tenants);
            match target.get(tenant) {
                Some(m) => {
                    if let Ok(mut g) = m.lock() {
                        add(&mut g);
                    }
                }
                None => {
                    // First request of this tenant since start: `entry` so two racing first
                    // requests both land in the same record.
                    let e = target
                        .entry(tenant.into())
                        .or_insert_with(|| Mutex::new(TenantMonth::default()));
                    if let Ok(mut g) = e.lock() {
                        add(&mut g);
                    }
                }
            }
        });
        // Read first: a store on every request would pull the line from the other core.
        if !self.dirty.load(Ordering::Relaxed) {
            self.dirty.store(true, Ordering::Relaxed);
        }
    }

    /// The tenant's current month (empty if it has no usage this month).
    pub fn month(&self, tenant: &str, now: i64) -> TenantMonth {
        let period = month_of(now);
        let of = |map: &FastDashMap<Box<str>, Mutex<TenantMonth>>| {
            map.get(tenant)
                .and_then(|m| m.lock().ok().map(|g| g.clone()))
                .filter(|m| m.period == period)
        };
        let mut month = of(&self.tenants).unwrap_or(TenantMonth {
            period: period.clone(),
            providers: SmallMap::default(),
        });
        if let Some(delta) = self.pending.as_ref().and_then(of) {
            month.merge(&delta);
        }
        month
    }

    /// Every end user of `tenant` with usage this month, under its id. End users are kept
    /// under `tenant/end_user` beside the tenants (`/` is in no id), so the file and the
    /// database hold them with no format of their own.
    pub fn end_users(&self, tenant: &str, now: i64) -> Vec<(String, TenantMonth)> {
        let prefix = format!("{tenant}/");
        let mut users: Vec<String> = Vec::new();
        for map in std::iter::once(&self.tenants).chain(self.pending.as_ref()) {
            for e in map.iter() {
                if let Some(u) = e.key().strip_prefix(&prefix) {
                    users.push(u.to_string());
                }
            }
        }
        users.sort_unstable();
        users.dedup();
        users
            .into_iter()
            .map(|u| {
                let m = self.month(&format!("{prefix}{u}"), now);
                (u, m)
            })
            .filter(|(_, m)| !m.providers.is_empty())
            .collect()
    }

    /// Shared mode: takes every tenant's pending delta, leaving empty ones in place.
    pub fn take_pending(&self) -> Vec<(String, TenantMonth)> {
        let Some(pending) = &self.pending else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in pending.iter() {
            if let Ok(mut g) = e.value().lock()
                && !g.providers.is_empty()
            {
                let period = g.period.clone();
                let delta = std::mem::replace(
                    &mut *g,
                    TenantMonth {
                        period,
                        providers: SmallMap::default(),
                    },
                );
                out.push((e.key().to_string(), delta));
            }
        }
        out
    }

    /// Shared mode: a delta that was written goes into the base until the next reload; one
    /// that could not be written goes back to pending. Either way nothing is lost or counted
    /// twice.
    pub fn settle(&self, tenant: &str, delta: &TenantMonth, written: bool) {
        let map = match (&self.pending, written) {
            (Some(p), false) => p,
            _ => &self.tenants,
        };
        let e = map
            .entry(tenant.into())
            .or_insert_with(|| Mutex::new(TenantMonth::default()));
        if let Ok(mut g) = e.lock() {
            if g.period != delta.period {
                *g = TenantMonth {
                    period: delta.period.clone(),
                    providers: SmallMap::default(),
                };
            }
            g.merge(delta);
        }
    }

    /// Shared mode: replaces the base with the database's totals of every replica.
    pub fn replace_base(&self, months: Vec<(String, TenantMonth)>) {
        let fresh: std::collections::HashSet<String> =
            months.iter().map(|(t, _)| t.clone()).collect();
        for (t, m) in months {
            self.tenants.insert(t.into_boxed_str(), Mutex::new(m));
        }
        self.tenants.retain(|t, _| fresh.contains(&**t));
    }

    /// Shared mode: sets the rows the database changed since the last reload (each row's
    /// totals are the database's, of every replica), leaving the others as they are. A row of
    /// another month replaces the tenant's month.
    pub fn update_base(&self, rows: Vec<(String, TenantMonth)>) {
        for (t, m) in rows {
            let e = self
                .tenants
                .entry(t.into_boxed_str())
                .or_insert_with(|| Mutex::new(TenantMonth::default()));
            let Ok(mut g) = e.lock() else { continue };
            if g.period != m.period {
                *g = m;
                continue;
            }
            for (provider, models) in m.providers.iter() {
                let slot = g.providers.entry_or_default(provider);
                for (model, totals) in models.iter() {
                    slot.insert(model, totals.clone());
                }
            }
        }
    }

    /// Writes the file (atomically) if anything changed since the last flush.
    pub fn flush(&self) -> Result<(), LedgerError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        let mut file = LedgerFile {
            format: 1,
            tenants: BTreeMap::new(),
        };
        for e in self.tenants.iter() {
            if let Ok(g) = e.value().lock() {
                file.tenants.insert(e.key().to_string(), g.clone());
            }
        }
        let err = |message: String| LedgerError::File {
            path: path.display().to_string(),
            message,
        };
        let bytes = serde_json::to_vec(&file).map_err(|e| err(e.to_string()))?;
        let tmp = path.with_extension("tmp");
        write_owner_only(&tmp, &bytes).map_err(|e| err(e.to_string()))?;
        std::fs::rename(&tmp, path).map_err(|e| {
            self.dirty.store(true, Ordering::Relaxed);
            err(e.to_string())
        })
    }
}

/// The JSON answer of the usage endpoints.
/// Writes `bytes` to a file only its owner can read or write (0600, whatever the umask, also
/// over a leftover file): `serve` refuses a ledger that group or others can write.
fn write_owner_only(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(bytes)
}

pub fn usage_json(tenant: &str, m: &TenantMonth, limits: serde_json::Value) -> serde_json::Value {
    let providers: serde_json::Map<String, serde_json::Value> = m
        .providers
        .iter()
        .map(|(p, models)| {
            let models: serde_json::Map<String, serde_json::Value> = models
                .iter()
                .map(|(model, t)| {
                    (
                        model.to_string(),
                        serde_json::json!({
                            "requests": t.requests,
                            "tokens": {
                                "input": t.input, "cached_input": t.cached_input,
                                "cache_write": t.cache_write, "output": t.output,
                                "reasoning": t.reasoning,
                            },
                            "units": {
                                "images": t.images, "characters": t.characters,
                                "audio_seconds": t.audio_ms as f64 / 1000.0,
                            },
                            "cost_usd": usd(t.cost_nanos),
                            "unpriced_requests": t.unpriced_requests,
                        }),
                    )
                })
                .collect();
            (p.to_string(), serde_json::Value::Object(models))
        })
        .collect();
    serde_json::json!({
        "tenant": tenant,
        "period": m.period,
        "cost_usd": usd(m.cost_nanos()),
        "providers": providers,
        "limits": limits,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_and_money() {
        assert_eq!(month_of(0), "1970-01");
        assert_eq!(month_of(1_700_000_000), "2023-11");
        assert_eq!(month_of(951_782_400), "2000-02"); // 2000-02-29
        assert_eq!(month_of(1_709_251_199), "2024-02"); // 2024-02-29 23:59:59
        assert_eq!(month_of(1_709_251_200), "2024-03");
        assert_eq!(usd(28_500), "0.0000285");
        assert_eq!(usd(2_000_000_000), "2");
        assert_eq!(usd(1_500_000_001), "1.500000001");
    }

    /// A reload of changed rows sets those rows and leaves the rest; a row of a new month
    /// replaces the tenant's month.
    #[test]
    fn update_base_sets_changed_rows_only() {
        let l = Ledger::shared();
        let row = |period: &str, model: &str, requests| {
            let mut m = TenantMonth {
                period: period.into(),
                providers: SmallMap::default(),
            };
            m.providers.entry_or_default("openai").insert(
                model,
                Totals {
                    requests,
                    ..Default::default()
                },
            );
            m
        };
        let mut both = row("2026-12", "a", 1);
        both.merge(&row("2026-12", "b", 2));
        l.replace_base(vec![("t".into(), both)]);
        l.update_base(vec![("t".into(), row("2026-12", "b", 5))]);
        let base = |l: &Ledger| {
            l.tenants
                .get("t")
                .map(|m| m.lock().unwrap().clone())
                .unwrap()
        };
        let m = base(&l);
        assert_eq!(m.providers["openai"]["a"].requests, 1);
        assert_eq!(m.providers["openai"]["b"].requests, 5);
        l.update_base(vec![("t".into(), row("2027-01", "c", 3))]);
        let m = base(&l);
        assert_eq!(m.period, "2027-01");
        assert!(m.providers["openai"].get("a").is_none());
        assert_eq!(m.providers["openai"]["c"].requests, 3);
    }

    #[test]
    fn records_per_model_resets_monthly_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.json");
        let l = Ledger::open(&path).unwrap();
        let u = Usage {
            input: 10,
            output: 5,
            ..Usage::default()
        };
        let nov = 1_700_000_000;
        l.record("acme", "openai", "gpt-4o", &u, Some(100), nov);
        l.record("acme", "openai", "gpt-4o", &u, Some(100), nov);
        l.record("acme", "openai", "mystery", &u, None, nov);
        l.flush().unwrap();
        let again = Ledger::open(&path).unwrap();
        let m = again.month("acme", nov);
        let t = &m.providers["openai"]["gpt-4o"];
        assert_eq!(
            (t.requests, t.input, t.output, t.cost_nanos),
            (2, 20, 10, 200)
        );
        assert_eq!(m.providers["openai"]["mystery"].unpriced_requests, 1);
        // Next month starts from zero.
        let dec = nov + 40 * 86_400;
        assert!(again.month("acme", dec).providers.is_empty());
        again.record("acme", "openai", "gpt-4o", &u, Some(7), dec);
        assert_eq!(again.month("acme", dec).cost_nanos(), 7);
        std::fs::write(&path, b"{oops").unwrap();
        assert!(Ledger::open(&path).is_err());
    }

    #[test]
    fn the_file_is_written_0600_even_over_a_loose_leftover_temp_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.json");
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, b"left over").unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o666)).unwrap();
        let l = Ledger::open(&path).unwrap();
        l.record("acme", "openai", "gpt-4o", &Usage::default(), Some(1), 0);
        l.flush().unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            Ledger::open(&path).unwrap().month("acme", 0).cost_nanos(),
            1
        );
    }
}
