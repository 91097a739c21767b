//! Built without the `redis` feature: no shared state. The config refuses
//! `shared_state.redis`, so a `Shared` never exists and every path through it is dead.

use std::sync::Arc;

use super::RedisConfig;
use crate::metrics::Metrics;

/// No call is ever made.
#[derive(Debug)]
pub(super) enum CallError {}

impl std::fmt::Display for CallError {
    fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {}
    }
}

#[derive(Debug, Clone, Copy)]
pub(super) enum Script {
    Admit,
    Reserve,
    Finish,
}

#[derive(Debug)]
pub(super) enum Shared {}

impl Shared {
    pub(super) fn start(_: &RedisConfig, _: Arc<Metrics>) -> Option<Arc<Self>> {
        None
    }

    pub(super) fn prefix(&self) -> &str {
        match *self {}
    }

    pub(super) fn connected(&self) -> bool {
        match *self {}
    }

    pub(super) fn set_down(&self, _: bool) -> bool {
        match *self {}
    }

    pub(super) async fn run<T>(
        &self,
        _: Script,
        _: &[String],
        _: &[String],
    ) -> Result<T, CallError> {
        match *self {}
    }
}
