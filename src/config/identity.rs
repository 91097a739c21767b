//! Validates `identity` (the tenant sources, in order, and what each needs from `tls`) and
//! `tls` (certificate paths, resolved against the config's folder).

use super::file::{EndUserFile, IdentityFile, TlsFile};
use super::{CertTenant, ConfigError, Ctx, HeaderTrust, IdentitySource};

pub(super) fn tls(ctx: &Ctx, file: Option<&TlsFile>) -> Option<crate::tls::TlsFiles> {
    file.map(|t| crate::tls::TlsFiles {
        cert: ctx.resolve(&t.cert),
        key: ctx.resolve(&t.key),
        client_ca: t.client_ca.as_deref().map(|p| ctx.resolve(p)),
    })
}

/// `end_user`: the header naming the end user (default `x-end-user-id`), whether an
/// OpenAI-wire body's `user` / `safety_identifier` may name it, and whether the header goes on
/// to the provider.
pub(super) fn end_user(
    ctx: &Ctx,
    f: &EndUserFile,
    sources: &[IdentitySource],
) -> Result<crate::identify::EndUserConfig, ConfigError> {
    let name = f.header.as_deref().unwrap_or("x-end-user-id");
    let header = http::HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| ctx.invalid("end_user.header", format!("`{name}` is not a header name")))?;
    let taken = sources.iter().any(|s| match s {
        IdentitySource::Header { name, .. } => *name == header,
        IdentitySource::Passthrough {
            key_header,
            provider_header,
        } => *key_header == header || *provider_header == header,
        _ => false,
    });
    if taken || header == http::header::AUTHORIZATION {
        return Err(ctx.invalid(
            "end_user.header",
            format!("`{name}` already names the tenant or carries a key"),
        ));
    }
    Ok(crate::identify::EndUserConfig {
        header,
        from_body: f.from_body.unwrap_or(false),
        forward: f.forward.unwrap_or(false),
    })
}

/// The identity sources; none configured is the tenant header from loopback, then bearer
/// tokens.
pub(super) fn identity(
    ctx: &Ctx,
    file: Option<&[IdentityFile]>,
    tls: Option<&TlsFile>,
) -> Result<Vec<IdentitySource>, ConfigError> {
    let Some(list) = file else {
        return Ok(vec![
            IdentitySource::Header {
                name: http::HeaderName::from_static("x-tenant-id"),
                only_from: HeaderTrust::Loopback,
            },
            IdentitySource::Bearer,
        ]);
    };
    let client_certs = tls.is_some_and(|t| t.client_ca.is_some());
    let mut out = Vec::new();
    for (i, src) in list.iter().enumerate() {
        out.push(source(ctx, &format!("identity[{i}]"), src, client_certs)?);
    }
    if !out
        .iter()
        .any(|s| !matches!(s, IdentitySource::Passthrough { .. }))
    {
        return Err(ctx.invalid(
            "identity",
            "list at least one source that names the tenant (header, bearer, mtls)".into(),
        ));
    }
    Ok(out)
}

/// One source at `field`; `client_certs` says whether `tls.client_ca` is set.
fn source(
    ctx: &Ctx,
    field: &str,
    src: &IdentityFile,
    client_certs: bool,
) -> Result<IdentitySource, ConfigError> {
    Ok(match src {
        IdentityFile::Header(h) => {
            let only_from = match h.only_from.as_deref() {
                None | Some("loopback") => HeaderTrust::Loopback,
                Some("mtls") => HeaderTrust::Mtls,
                Some("any") => HeaderTrust::Any,
                Some(o) => {
                    return Err(ctx.invalid(
                        &format!("{field}.header.only_from"),
                        format!("`{o}`: use loopback, mtls or any"),
                    ));
                }
            };
            if only_from == HeaderTrust::Mtls && !client_certs {
                return Err(ctx.invalid(
                    &format!("{field}.header.only_from"),
                    "`mtls` needs tls.client_ca (client certificates)".into(),
                ));
            }
            IdentitySource::Header {
                name: header_name(ctx, field, &h.name)?,
                only_from,
            }
        }
        IdentityFile::Bearer(_) => IdentitySource::Bearer,
        IdentityFile::Mtls(m) => {
            if !client_certs {
                return Err(ctx.invalid(
                    &format!("{field}.mtls"),
                    "the mtls source needs tls.cert, tls.key and tls.client_ca".into(),
                ));
            }
            match (&m.uri_san_prefix, m.subject_cn) {
                (Some(p), None | Some(false)) if !p.is_empty() => {
                    IdentitySource::Mtls(CertTenant::UriSanPrefix(p.clone()))
                }
                (None, Some(true)) => IdentitySource::Mtls(CertTenant::SubjectCn),
                _ => {
                    return Err(ctx.invalid(
                        &format!("{field}.mtls"),
                        "set exactly one of uri_san_prefix (e.g. \
                         \"spiffe://example.org/tenant/\") or subject_cn: true"
                            .into(),
                    ));
                }
            }
        }
        IdentityFile::Passthrough(p) => IdentitySource::Passthrough {
            key_header: header_name(
                ctx,
                field,
                p.key_header.as_deref().unwrap_or("x-user-api-key"),
            )?,
            provider_header: header_name(
                ctx,
                field,
                p.provider_header.as_deref().unwrap_or("x-user-provider"),
            )?,
        },
    })
}

fn header_name(ctx: &Ctx, field: &str, n: &str) -> Result<http::HeaderName, ConfigError> {
    http::HeaderName::from_bytes(n.to_ascii_lowercase().as_bytes())
        .map_err(|_| ctx.invalid(field, format!("`{n}` is not a header name")))
}

#[cfg(test)]
mod tests {
    use crate::config::{CertTenant, IdentitySource, test_parse as parse};

    #[test]
    fn header_identity_trusted_from_anyone_needs_a_loopback_listener() {
        // The default header source believes loopback peers only, checked per request.
        assert!(parse("listen: 0.0.0.0:8787\n").is_ok());
        let any = "identity: [ { header: { name: x-tenant-id, only_from: any } } ]\n";
        let err = parse(&format!("listen: 0.0.0.0:8787\n{any}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("loopback"), "{err}");
        assert!(parse(any).is_ok());
        let err = parse("identity: [ { header: { only_from: mtls } } ]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("client_ca"), "{err}");
        let err = parse("identity: [ { mtls: { subject_cn: true } } ]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("client_ca"), "{err}");
        let mtls = "tls: { cert: c, key: k, client_ca: ca }\n";
        let err = parse(&format!("{mtls}identity: [ {{ mtls: {{}} }} ]\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("exactly one"), "{err}");
        let c = parse(&format!(
            "{mtls}identity: [ {{ mtls: {{ uri_san_prefix: \"spiffe://x/t/\" }} }}, {{ passthrough: {{}} }} ]\n"
        ))
        .unwrap();
        assert!(
            matches!(&c.identity[0], IdentitySource::Mtls(CertTenant::UriSanPrefix(p)) if p == "spiffe://x/t/")
        );
        let err = parse("identity: [ { passthrough: {} } ]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("names the tenant"), "{err}");
        assert!(parse("listen: 0.0.0.0:8787\nidentity: [ { bearer: {} } ]\n").is_ok());
        let err = parse("tenants:\n  _platform: {}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("reserved"), "{err}");
    }
}
