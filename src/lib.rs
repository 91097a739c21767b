//! byokd: a bring-your-own-key sidecar for LLM APIs.
//!
//! ```text
//! listener ─► route ─► identify ─► admit ─► credential ─► rewrite ─► forward ─► meter ─► record
//! accept.rs   route/   identify.rs admit.rs keys/        rewrite.rs forward/   meter.rs record.rs
//! ```
//!
//! The modules stack in layers, each importing only its own layer or those below (enforced
//! by `layering.rs`, a test):
//!
//! - vocabulary: [`vocab`] (ids, clock, redaction);
//! - domain: [`provider`], [`pricing`], [`ledger`], [`audit`], [`access_log`], [`metrics`] (the registry and
//!   its label caps), [`usage`] (the scanners), [`tls`], [`timeouts`];
//! - services: [`keys`], [`policy`], [`pool`];
//! - steps: [`accept`], [`route`], [`identify`], [`admit`], [`rewrite`], [`forward`],
//!   [`stream_usage`], [`cut`], [`failover`], [`meter`], [`record`];
//! - composition: [`error`] (every step's error to HTTP in one place), [`config`] (parse and
//!   assemble), [`pipeline`] (the only file that knows the order of the steps);
//! - surfaces: [`admin`], [`admin_api`], [`server`], [`verify`], and `main.rs`.

pub mod accept;
pub mod access_log;
pub mod admin;
pub mod admin_api;
pub mod admit;
pub mod audit;
pub mod config;
pub mod cut;
pub mod error;
pub mod failover;
pub mod forward;
pub mod identify;
pub mod keys;
pub mod ledger;
pub mod meter;
pub mod metrics;
pub mod pipeline;
pub mod policy;
pub mod pool;
pub mod pricing;
pub mod provider;
pub mod record;
pub mod rewrite;
pub mod route;
pub mod server;
pub mod stream_usage;
pub mod timeouts;
pub mod tls;
pub mod usage;
pub mod verify;
pub mod vocab;

#[cfg(test)]
mod layering;
