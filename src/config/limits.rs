//! Validates the listeners and resource bounds: `listen` (against the identity sources),
//! `admin` (listener and token hash), `limits` (sizes and timeouts), `upstream` (connection
//! settings) and `metrics` (label caps).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::file::{AdminFile, LimitsFile, MetricsFile, UpstreamFile};
use super::{ConfigError, Ctx, HeaderTrust, IdentitySource, Limits, UpstreamConfig};

/// The proxy listener, loopback by default. A tenant header trusted from anyone is refused on
/// a listener others can reach.
pub(super) fn listen(
    ctx: &Ctx,
    file: Option<SocketAddr>,
    identity: &[IdentitySource],
) -> Result<SocketAddr, ConfigError> {
    let listen = file.unwrap_or(([127, 0, 0, 1], 8787).into());
    if !listen.ip().is_loopback()
        && identity.iter().any(|s| {
            matches!(
                s,
                IdentitySource::Header {
                    only_from: HeaderTrust::Any,
                    ..
                }
            )
        })
    {
        return Err(ctx.invalid(
            "identity",
            format!(
                "`only_from: any` trusts the tenant header from anyone, and `listen` is \
                 {listen}, not loopback; use only_from: loopback or mtls, or bearer tokens"
            ),
        ));
    }
    Ok(listen)
}

pub(super) fn admin_listen(file: &AdminFile) -> SocketAddr {
    file.listen.unwrap_or(([127, 0, 0, 1], 9787).into())
}

/// `admin.token_sha256`: the hex SHA-256 of the admin token, never the token.
pub(super) fn admin_token(ctx: &Ctx, file: &AdminFile) -> Result<Option<[u8; 32]>, ConfigError> {
    let Some(h) = &file.token_sha256 else {
        return Ok(None);
    };
    let mut out = [0u8; 32];
    hex::decode_to_slice(h.trim(), &mut out).map_err(|_| {
        ctx.invalid(
            "admin.token_sha256",
            "expected 64 hex characters (sha256sum of the admin token)".into(),
        )
    })?;
    Ok(Some(out))
}

/// `limits`, on top of [`Limits::default`]; the buffer bound must hold one inspected body.
pub(super) fn limits(ctx: &Ctx, l: &LimitsFile) -> Result<Limits, ConfigError> {
    let d = Limits::default();
    let limits = Limits {
        max_header_bytes: l.max_header_bytes.unwrap_or(d.max_header_bytes),
        max_headers: l.max_headers.unwrap_or(d.max_headers),
        max_body_bytes: l.max_body_bytes.unwrap_or(d.max_body_bytes),
        header_timeout: l.header_timeout.map_or(d.header_timeout, |x| x.0),
        first_byte_timeout: l.first_byte_timeout.map_or(d.first_byte_timeout, |x| x.0),
        idle_timeout: l.idle_timeout.map_or(d.idle_timeout, |x| x.0),
        drain_timeout: l.drain_timeout.map_or(d.drain_timeout, |x| x.0),
        body_timeout: l.body_timeout.map_or(d.body_timeout, |x| x.0),
        keepalive_timeout: l.keepalive_timeout.map_or(d.keepalive_timeout, |x| x.0),
        max_buffered_bytes: l.max_buffered_bytes.unwrap_or(d.max_buffered_bytes),
    };
    if limits.max_buffered_bytes < crate::stream_usage::MAX_INSPECTED_BODY as u64 + 65536 {
        return Err(ctx.invalid(
            "limits.max_buffered_bytes",
            format!(
                "must be at least {} (one inspected body)",
                crate::stream_usage::MAX_INSPECTED_BODY + 65536
            ),
        ));
    }
    if limits.max_header_bytes < 1024 || limits.max_headers == 0 {
        return Err(ctx.invalid(
            "limits",
            "max_header_bytes must be at least 1024 and max_headers at least 1".into(),
        ));
    }
    Ok(limits)
}

pub(super) fn upstream(ctx: &Ctx, file: &UpstreamFile) -> UpstreamConfig {
    UpstreamConfig {
        ca_file: file.ca_file.as_deref().map(|p: &Path| ctx.resolve(p)),
        connect_timeout: file
            .connect_timeout
            .map_or(Duration::from_secs(10), |d| d.0),
        pool_idle_timeout: file
            .pool_idle_timeout
            .map_or(Duration::from_secs(90), |d| d.0),
    }
}

pub(super) fn metric_caps(file: &MetricsFile) -> crate::metrics::LabelCaps {
    let d = crate::metrics::LabelCaps::default();
    crate::metrics::LabelCaps {
        max_tenants: file.max_tenants.unwrap_or(d.max_tenants),
        max_models_per_tenant: file
            .max_models_per_tenant
            .unwrap_or(d.max_models_per_tenant),
        max_models: file.max_models.unwrap_or(d.max_models),
    }
}
