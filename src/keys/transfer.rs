//! Sealed export and import: a store's records move between stores (a backup, the file store
//! into PostgreSQL) and between KMSs (a local KEK into AWS KMS) without a provider key ever
//! being decrypted. Only data keys are unwrapped, by the source, and wrapped again, by the
//! target; the ciphertext is bound to (tenant, provider, key id, version), which does not
//! change, so it moves as it is.
//!
//! The format is JSON lines: a header, then one line per key version and per token hash.

use std::io::{BufRead, Write};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

use super::KeyError;
use super::envelope::Binding;
use super::kms::{Kms, WrappedKey};
use super::store::{Change, KeyRecord, KeyState, KeyStore, TokenRecord};
use crate::audit::Audit;

const FORMAT: u32 = 1;

/// One line of an export.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum Line {
    Export {
        format: u32,
        exported_at: i64,
        keys: usize,
        tokens: usize,
    },
    Key(KeyRecord),
    Token(TokenRecord),
}

fn audited(audit: &Audit, event: &str, fields: serde_json::Value) -> Result<(), KeyError> {
    audit.record(event, fields).map_err(KeyError::Audit)
}

fn io(e: std::io::Error) -> KeyError {
    KeyError::Invalid(format!("export stream: {e}"))
}

/// Writes every record of `store` to `out`; the numbers of key versions and tokens written.
pub async fn export(
    store: &dyn KeyStore,
    audit: &Audit,
    out: &mut dyn Write,
    now: i64,
) -> Result<(usize, usize), KeyError> {
    let d = store.load().await?;
    let (keys, tokens) = (d.keys.len(), d.tokens.len());
    // Audited before a byte leaves: the export carries every tenant's sealed keys.
    audited(
        audit,
        "keys_export",
        serde_json::json!({"keys": keys, "tokens": tokens}),
    )?;
    let header = Line::Export {
        format: FORMAT,
        exported_at: now,
        keys,
        tokens,
    };
    let lines = std::iter::once(header)
        .chain(d.keys.into_iter().map(Line::Key))
        .chain(d.tokens.into_iter().map(Line::Token));
    for line in lines {
        serde_json::to_writer(&mut *out, &line)
            .map_err(|e| KeyError::Invalid(format!("export: {e}")))?;
        out.write_all(b"\n").map_err(io)?;
    }
    out.flush().map_err(io)?;
    Ok((keys, tokens))
}

/// What to do with a record the target store already holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Duplicates {
    /// Refuse the whole import before writing anything.
    Refuse,
    Skip,
}

/// What `keys import` did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Imported {
    pub keys: usize,
    pub tokens: usize,
    /// Data keys unwrapped by the source and wrapped by the target.
    pub rewrapped: usize,
    pub skipped: usize,
}

/// Reads an export. Every line is parsed before anything is written, so a truncated or
/// altered file imports nothing. Parse errors name the line, never its content.
fn read(input: &mut dyn BufRead) -> Result<(Vec<KeyRecord>, Vec<TokenRecord>), KeyError> {
    let (mut keys, mut tokens) = (Vec::new(), Vec::new());
    let mut expected = None;
    for (n, line) in input.lines().enumerate() {
        let line = line.map_err(io)?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |what: String| KeyError::Invalid(format!("export line {}: {what}", n + 1));
        let parsed: Line = serde_json::from_str(&line).map_err(|e| {
            // The column only: serde's message may quote a value, which could be a secret
            // pasted into the wrong place.
            bad(format!("not a byokd export record (column {})", e.column()))
        })?;
        match parsed {
            Line::Export {
                format,
                keys: k,
                tokens: t,
                ..
            } if n == 0 => {
                if format != FORMAT {
                    return Err(bad(format!("format {format}; this byokd reads {FORMAT}")));
                }
                expected = Some((k, t));
            }
            Line::Export { .. } => return Err(bad("a second header".into())),
            Line::Key(r) => keys.push(r),
            Line::Token(t) => tokens.push(t),
        }
    }
    match expected {
        None => Err(KeyError::Invalid(
            "not a byokd export: the header line is missing".into(),
        )),
        Some(want) if want != (keys.len(), tokens.len()) => Err(KeyError::Invalid(format!(
            "the export is incomplete: its header promises {} keys and {} tokens, it holds {} and {}",
            want.0,
            want.1,
            keys.len(),
            tokens.len()
        ))),
        Some(_) => Ok((keys, tokens)),
    }
}

fn binding(r: &KeyRecord) -> Binding<'_> {
    Binding {
        tenant: &r.tenant,
        provider: &r.provider,
        key_id: &r.id,
        version: r.version,
    }
}

fn wrapped(r: &KeyRecord) -> Result<WrappedKey, KeyError> {
    Ok(WrappedKey {
        kek_id: r.kek_id.clone(),
        blob: B64
            .decode(&r.wrapped_dek)
            .map_err(|_| KeyError::Corrupt(format!("key {} has a malformed wrapped_dek", r.id)))?,
    })
}

/// Imports an export into `store`. With `source` (the KMS of the config that sealed the
/// records), every data key still in use is unwrapped by it and wrapped by `target`, each
/// step audited. Without, every such record must already unwrap under `target` (a backup
/// restored where it was taken). Revoked records move as they are: they are never
/// decrypted again, so their data keys are not unwrapped for the move either.
pub async fn import(
    store: &dyn KeyStore,
    target: &dyn Kms,
    source: Option<&dyn Kms>,
    audit: &Audit,
    input: &mut dyn BufRead,
    duplicates: Duplicates,
) -> Result<Imported, KeyError> {
    let (mut keys, mut tokens) = read(input)?;
    let here = store.load().await?;
    let before = keys.len() + tokens.len();
    let key_here = |r: &KeyRecord| {
        here.keys
            .iter()
            .any(|k| k.id == r.id && k.version == r.version)
    };
    let token_here = |t: &TokenRecord| here.tokens.iter().any(|h| h.id == t.id);
    if duplicates == Duplicates::Refuse {
        let taken: Vec<String> = keys
            .iter()
            .filter(|r| key_here(r))
            .map(|r| format!("key {} v{}", r.id, r.version))
            .chain(
                tokens
                    .iter()
                    .filter(|t| token_here(t))
                    .map(|t| format!("token {}", t.id)),
            )
            .collect();
        if !taken.is_empty() {
            return Err(KeyError::Conflict(format!(
                "{} record(s) are already in the target store ({}); nothing was imported: pass --skip-existing to import the rest",
                taken.len(),
                taken.join(", ")
            )));
        }
    }
    keys.retain(|r| !key_here(r));
    tokens.retain(|t| !token_here(t));
    let mut out = Imported {
        skipped: before - keys.len() - tokens.len(),
        ..Imported::default()
    };

    for r in keys.iter_mut().filter(|r| r.state != KeyState::Revoked) {
        let old = wrapped(r)?;
        let Some(source) = source else {
            // Proves the target can serve the record before it is written; the data key is
            // dropped (zeroized) at once.
            target.decrypt(&old, binding(r)).await.map_err(|e| {
                KeyError::Invalid(format!(
                    "key {} v{} is wrapped by `{}`, which this config's KMS cannot unwrap ({e}); \
                     pass --from-config with the config that sealed it",
                    r.id, r.version, r.kek_id
                ))
            })?;
            continue;
        };
        let fields = serde_json::json!({
            "tenant": r.tenant, "provider": r.provider, "key_id": r.id, "version": r.version,
        });
        let dek = source.decrypt(&old, binding(r)).await?;
        let mut f = fields.clone();
        f["kek_id"] = r.kek_id.clone().into();
        audited(audit, "key_import_unwrap", f)?;
        let new = target.wrap(&dek, binding(r)).await?;
        drop(dek);
        let mut f = fields;
        f["from_kek"] = r.kek_id.clone().into();
        f["kek_id"] = new.kek_id.clone().into();
        audited(audit, "key_import_rewrap", f)?;
        r.kek_id = new.kek_id;
        r.wrapped_dek = B64.encode(&new.blob);
        out.rewrapped += 1;
    }
    out.keys = keys.len();
    out.tokens = tokens.len();
    if keys.is_empty() && tokens.is_empty() {
        return Ok(out);
    }
    store.apply(Change::Import { keys, tokens }).await?;
    audited(
        audit,
        "keys_import",
        serde_json::json!({
            "keys": out.keys, "tokens": out.tokens, "rewrapped": out.rewrapped,
            "skipped": out.skipped,
        }),
    )?;
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_truncated_or_altered_export_is_refused_whole() {
        let header = r#"{"export":{"format":1,"exported_at":0,"keys":1,"tokens":0}}"#;
        let token =
            r#"{"token":{"id":"t1","tenant":"acme","sha256":"00","created_at":0,"revoked":false}}"#;
        let read = |s: &str| read(&mut s.as_bytes()).map_err(|e| e.to_string());
        let e = read(&format!("{header}\n")).unwrap_err();
        assert!(e.contains("incomplete"), "{e}");
        let e = read(token).unwrap_err();
        assert!(e.contains("header"), "{e}");
        let e = read(&format!(
            "{header}\n{{\"key\":{{\"id\":\"sk-canary-secret\"}}}}\n"
        ))
        .unwrap_err();
        assert!(e.contains("line 2") && !e.contains("canary"), "{e}");
        let e = read(&header.replace("\"format\":1", "\"format\":9")).unwrap_err();
        assert!(e.contains("format 9"), "{e}");
    }
}
