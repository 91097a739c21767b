//! The integration tests: one binary, a module per area, one shared harness (`common`: the
//! fake provider, byokd in-process or as the real binary, moto, PostgreSQL and Redis helpers).
//! One binary links the dependency tree once, not once per area.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../common/mod.rs"]
mod common;

mod admin_api;
mod bedrock;
mod cli;
mod deploy;
mod drain;
mod end_users;
mod failover;
mod faults;
mod fuzz_seeds;
mod hardening;
mod identity_tls;
mod k8s;
mod kms_aws;
mod metering;
mod policy;
mod prometheus;
mod proxy;
mod route_by_model;
mod sdk;
mod soak;
mod store_postgres;
mod transfer;
mod upstream_tls;
mod usage_api;
mod usage_scanner;
mod vertex;
