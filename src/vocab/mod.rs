//! The shared vocabulary at the bottom of the layers: small types and rules every other
//! module may use and none of which imports anything of byokd's own.
//!
//! - [`ids`]: tenant id rules and the per-request id.
//! - [`clock`]: unix time and the UTC calendar (months for budgets, RFC 3339 for records).
//! - [`fast_map`]: the sharded map type of the request path's per-tenant state.
//! - [`text`]: values hidden from `Debug`, and an error displayed with its causes.
//! - [`secret`]: key material: hidden from `Debug`, never serializable, zeroized on drop.

pub mod clock;
pub mod fast_map;
pub mod ids;
pub mod secret;
pub mod small_map;
pub mod text;

pub use clock::unix_now;
pub use fast_map::{FastDashMap, FastMap};
pub use ids::{KeySource, RequestId, reserved_tenant_id, valid_tenant_id};
pub use secret::{AuthValue, PlainKey};
pub use small_map::SmallMap;
pub use text::{ErrorChain, Redacted};
