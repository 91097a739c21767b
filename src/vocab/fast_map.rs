//! The sharded maps the request path reads on every request (the key cache, the ledger, the
//! metric series, the key pool, the local limits), keyed by tenant and key ids.
//!
//! They hash with foldhash rather than the standard library's SipHash: `DashMap` hashes a key
//! twice per lookup (for the shard, then inside it), and SipHash on a short id costs several
//! times foldhash's. The seed is random per map, so colliding ids cannot be chosen ahead of
//! time; the ids themselves come from the configuration, the key store, or an identity the
//! app had to present.

pub type FastDashMap<K, V> = dashmap::DashMap<K, V, foldhash::fast::RandomState>;

/// The same hasher for the read-only maps a request looks up by tenant (the configured
/// tenants, the key store's index), built at start or on reload.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
