//! The policy state shared by replicas in Redis: one Lua script per decision (admit,
//! reserve, finish), so each check-and-take is atomic and uses the server's clock, and a
//! connection that is (re)made in the background.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;

use super::RedisConfig;
use crate::metrics::Metrics;

const ADMIT_LUA: &str = r#"
-- KEYS: per scope: concurrency zset, rpm bucket, tpm bucket. ARGV: member, slot ttl ms,
-- then per scope: concurrency, rpm, tpm limits (0 = none).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = #KEYS / 3
local function level(key, cap)
  local v = redis.call('HMGET', key, 'l', 'ts')
  local l, ts = tonumber(v[1]), tonumber(v[2])
  if l == nil then return cap end
  return math.min(cap, l + (now - ts) * cap / 60000)
end
-- Every scope is checked, and a refusal names the longest wait among them.
local wait = 0
for i = 0, n - 1 do
  local cl, rl, tl = tonumber(ARGV[3 + i*3]), tonumber(ARGV[4 + i*3]), tonumber(ARGV[5 + i*3])
  if cl > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[1 + i*3], '-inf', now)
    if redis.call('ZCARD', KEYS[1 + i*3]) >= cl then wait = math.max(wait, 1) end
  end
  if rl > 0 then
    local l = level(KEYS[2 + i*3], rl)
    if l < 1 then wait = math.max(wait, math.ceil((1 - l) * 60 / rl)) end
  end
  if tl > 0 then
    local l = level(KEYS[3 + i*3], tl)
    if l <= 0 then wait = math.max(wait, math.ceil((1 - l) * 60 / tl)) end
  end
end
if wait > 0 then return {1, wait} end
for i = 0, n - 1 do
  local cl, rl = tonumber(ARGV[3 + i*3]), tonumber(ARGV[4 + i*3])
  if cl > 0 then
    redis.call('ZADD', KEYS[1 + i*3], now + tonumber(ARGV[2]), ARGV[1])
    redis.call('PEXPIRE', KEYS[1 + i*3], ARGV[2])
  end
  if rl > 0 then
    redis.call('HSET', KEYS[2 + i*3], 'l', tostring(level(KEYS[2 + i*3], rl) - 1), 'ts', now)
    redis.call('PEXPIRE', KEYS[2 + i*3], 120000)
  end
end
return {0, 0}
"#;

const RESERVE_LUA: &str = r#"
-- KEYS: reservations zset, spend. ARGV: member (id:estimate), estimate, limit, slot ttl ms,
-- seed (spend so far per the ledger, used when the key is missing), unsynced spend, spend ttl s.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('SET', KEYS[2], ARGV[5], 'EX', ARGV[7])
elseif tonumber(ARGV[6]) > 0 then
  redis.call('INCRBY', KEYS[2], ARGV[6])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local spent = tonumber(redis.call('GET', KEYS[2]))
local reserved = 0
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  reserved = reserved + (tonumber(string.match(m, ':(%d+)$')) or 0)
end
local est, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
if spent >= limit or spent + reserved + est > limit then return {0, spent, reserved} end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {1, spent, reserved}
"#;

const FINISH_LUA: &str = r#"
-- KEYS: n concurrency zsets, n tpm buckets, then (if budget) reservations zset and spend.
-- ARGV: member, n, tokens, then n tpm limits (0 = none), then budget member, cost, seed, ttl.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = tonumber(ARGV[2])
local tokens = tonumber(ARGV[3])
for i = 1, n do
  redis.call('ZREM', KEYS[i], ARGV[1])
  local cap = tonumber(ARGV[3 + i])
  if cap > 0 and tokens > 0 then
    local k = KEYS[n + i]
    local v = redis.call('HMGET', k, 'l', 'ts')
    local l, ts = tonumber(v[1]), tonumber(v[2])
    if l == nil then l = cap else l = math.min(cap, l + (now - ts) * cap / 60000) end
    redis.call('HSET', k, 'l', tostring(l - tokens), 'ts', now)
    redis.call('PEXPIRE', k, 120000)
  end
end
local spent = 0
if #KEYS > 2 * n then
  local res, spend = KEYS[2*n + 1], KEYS[2*n + 2]
  local b = 4 + n
  redis.call('ZREM', res, ARGV[b])
  if redis.call('EXISTS', spend) == 0 then
    redis.call('SET', spend, ARGV[b + 2], 'EX', ARGV[b + 3])
  elseif tonumber(ARGV[b + 1]) > 0 then
    redis.call('INCRBY', spend, ARGV[b + 1])
    redis.call('EXPIRE', spend, ARGV[b + 3])
  end
  spent = tonumber(redis.call('GET', spend))
end
return spent
"#;

/// A call to Redis that failed (or timed out).
pub(super) type CallError = redis::RedisError;

/// The three scripts.
#[derive(Debug, Clone, Copy)]
pub(super) enum Script {
    Admit,
    Reserve,
    Finish,
}

pub(super) struct Shared {
    cfg: RedisConfig,
    conn: ArcSwapOption<redis::aio::ConnectionManager>,
    admit: redis::Script,
    reserve: redis::Script,
    finish: redis::Script,
    /// Last call failed: decisions follow `on_shared_state_error` until one succeeds.
    down: AtomicBool,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("prefix", &self.cfg.prefix)
            .field("down", &self.down)
            .finish()
    }
}

impl Shared {
    /// The shared state of `cfg`, connecting in the background.
    pub(super) fn start(cfg: &RedisConfig, metrics: Arc<Metrics>) -> Option<Arc<Self>> {
        let s = Arc::new(Self {
            cfg: cfg.clone(),
            conn: ArcSwapOption::empty(),
            admit: redis::Script::new(ADMIT_LUA),
            reserve: redis::Script::new(RESERVE_LUA),
            finish: redis::Script::new(FINISH_LUA),
            down: AtomicBool::new(true),
        });
        tokio::spawn(connect_loop(s.clone(), metrics));
        Some(s)
    }

    pub(super) fn prefix(&self) -> &str {
        &self.cfg.prefix
    }

    /// Whether a connection exists (it may still fail a call).
    pub(super) fn connected(&self) -> bool {
        self.conn.load().is_some()
    }

    /// Records whether the last call failed; returns whether that changed.
    pub(super) fn set_down(&self, down: bool) -> bool {
        self.down.swap(down, Ordering::AcqRel) != down
    }

    /// Runs `script` with `keys` and `args` within the configured timeout.
    pub(super) async fn run<T: redis::FromRedisValue>(
        &self,
        script: Script,
        keys: &[String],
        args: &[String],
    ) -> Result<T, CallError> {
        let Some(conn) = self.conn.load_full() else {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "shared state not connected",
            )));
        };
        let mut conn = (*conn).clone();
        let script = match script {
            Script::Admit => &self.admit,
            Script::Reserve => &self.reserve,
            Script::Finish => &self.finish,
        };
        let mut inv = script.prepare_invoke();
        for k in keys {
            inv.key(k);
        }
        for a in args {
            inv.arg(a);
        }
        tokio::time::timeout(self.cfg.timeout, inv.invoke_async::<T>(&mut conn))
            .await
            .unwrap_or_else(|_| {
                Err(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "shared state call timed out",
                )))
            })
    }
}

async fn connect_loop(s: Arc<Shared>, metrics: Arc<Metrics>) {
    let mut wait = Duration::from_millis(200);
    loop {
        let r = async {
            let client = redis::Client::open(s.cfg.url.0.as_str())?;
            let cfg = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(s.cfg.timeout))
                .set_response_timeout(Some(s.cfg.timeout))
                .set_number_of_retries(1);
            redis::aio::ConnectionManager::new_with_config(client, cfg).await
        }
        .await;
        match r {
            Ok(c) => {
                s.conn.store(Some(Arc::new(c)));
                s.down.store(false, Ordering::Release);
                metrics.shared_state_up(true);
                tracing::info!("shared state: connected to Redis");
                return;
            }
            Err(e) => {
                metrics.shared_state_up(false);
                tracing::error!(error = %e, retry_in = ?wait,
                    "shared state: cannot connect to Redis; policies follow on_shared_state_error");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
}
