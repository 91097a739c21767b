//! byokd: a bring-your-own-key sidecar for LLM APIs.
//!
//! ```text
//! listener ─► route ─► identify ─► admit ─► credential ─► rewrite ─► forward ─► meter ─► record
//! accept.rs   route.rs identify.rs admit.rs keys/        rewrite.rs forward.rs usage.rs metrics.rs
//! ```
//!
//! [`pipeline`] runs the steps in that order over one request; [`error`] maps every step's
//! error to HTTP in one place; [`server`] assembles a running instance from a [`config::Config`];
//! [`admin`] serves metrics and health; [`provider`] knows each provider's wire format;
//! [`failover`] plans and runs a request's upstream attempts over [`pool`]ed keys.

pub mod accept;
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
pub mod metrics;
pub mod pipeline;
pub mod policy;
pub mod pool;
pub mod pricing;
pub mod provider;
pub mod rewrite;
pub mod route;
pub mod server;
pub mod stream_usage;
pub mod timeouts;
pub mod tls;
pub mod usage;
pub mod verify;
pub mod vocab;
