//! The audit trail: one JSON line per key decryption, registration, rotation, revocation,
//! rewrap, token change and admin call (allowed or denied). Never key material, never
//! ciphertext: only who, what, which key id and version, and why.
//!
//! Written only off the hot path (a key-cache miss, a management call), so one mutex around
//! the sink is fine. When the sink fails, `on_error: fail_closed` (the default) makes the
//! operation that needed the record fail too: a decryption nobody can account for is refused.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::{Map, Value};

/// What to do when an audit record cannot be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// Refuse the operation that needed the record (decryption, key change).
    FailClosed,
    /// Log the failure and go on.
    FailOpen,
}

/// Where audit lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditTarget {
    /// The process log (stderr), as `target: byokd::audit` lines: the default.
    Log,
    /// An append-only JSON-lines file.
    File(PathBuf),
    Stdout,
    Stderr,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot write the audit record to {target}: {source}")]
pub struct AuditError {
    target: String,
    #[source]
    source: std::io::Error,
}

enum Sink {
    Log,
    File {
        path: PathBuf,
        file: Mutex<Option<std::fs::File>>,
    },
    Stdout,
    Stderr,
}

/// The audit sink shared by the server, the admin API and the CLI.
pub struct Audit {
    sink: Sink,
    on_error: OnError,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let target = match &self.sink {
            Sink::Log => "log".to_string(),
            Sink::File { path, .. } => path.display().to_string(),
            Sink::Stdout => "stdout".into(),
            Sink::Stderr => "stderr".into(),
        };
        f.debug_struct("Audit")
            .field("target", &target)
            .field("on_error", &self.on_error)
            .finish()
    }
}

impl Audit {
    pub fn new(target: &AuditTarget, on_error: OnError) -> Self {
        let sink = match target {
            AuditTarget::Log => Sink::Log,
            AuditTarget::File(p) => Sink::File {
                path: p.clone(),
                file: Mutex::new(None),
            },
            AuditTarget::Stdout => Sink::Stdout,
            AuditTarget::Stderr => Sink::Stderr,
        };
        Self { sink, on_error }
    }

    /// Audit lines to the process log, failing open: for tests and tools without config.
    pub fn log_only() -> Self {
        Self::new(&AuditTarget::Log, OnError::FailOpen)
    }

    pub fn on_error(&self) -> OnError {
        self.on_error
    }

    /// Writes one record. `Err` only when the sink failed *and* the policy is fail-closed;
    /// a fail-open failure is logged and swallowed.
    pub fn record(&self, event: &str, fields: Value) -> Result<(), AuditError> {
        match self.write(event, fields) {
            Ok(()) => Ok(()),
            Err(e) if self.on_error == OnError::FailOpen => {
                tracing::error!(error = %e, event, "audit record lost (audit.on_error: fail_open)");
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, event, "audit record failed; refusing (audit.on_error: fail_closed)");
                Err(e)
            }
        }
    }

    fn write(&self, event: &str, fields: Value) -> Result<(), AuditError> {
        let mut obj = match fields {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        if let Sink::Log = self.sink {
            // The log line carries its own timestamp and target.
            let fields = Value::Object(obj);
            tracing::info!(target: "byokd::audit", event, fields = %fields);
            return Ok(());
        }
        obj.insert(
            "ts".into(),
            Value::String(crate::vocab::clock::rfc3339_now()),
        );
        obj.insert("event".into(), Value::String(event.to_string()));
        let mut line = serde_json::to_vec(&Value::Object(obj)).unwrap_or_default();
        line.push(b'\n');
        match &self.sink {
            Sink::Log => Ok(()),
            Sink::Stdout => write_all(&mut std::io::stdout().lock(), &line, "stdout"),
            Sink::Stderr => write_all(&mut std::io::stderr().lock(), &line, "stderr"),
            Sink::File { path, file } => {
                let mut guard = file.lock().unwrap_or_else(|p| p.into_inner());
                if guard.is_none() {
                    *guard = Some(open_append(path)?);
                }
                let Some(f) = guard.as_mut() else {
                    return Ok(());
                };
                // One write per line: with O_APPEND, lines from the CLI and `serve` never
                // interleave. A failed file is reopened next time (rotated away, disk full).
                let r = write_all(f, &line, &path.display().to_string());
                if r.is_err() {
                    *guard = None;
                }
                r
            }
        }
    }
}

fn write_all(w: &mut dyn Write, line: &[u8], target: &str) -> Result<(), AuditError> {
    w.write_all(line)
        .and_then(|()| w.flush())
        .map_err(|source| AuditError {
            target: target.to_string(),
            source,
        })
}

fn open_append(path: &Path) -> Result<std::fs::File, AuditError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| AuditError {
        target: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(err)
}

#[derive(Debug, Clone)]
pub struct AuditConfig {
    pub target: AuditTarget,
    pub on_error: OnError,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_sink_writes_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/audit.jsonl");
        let a = Audit::new(&AuditTarget::File(path.clone()), OnError::FailClosed);
        a.record("key_revoke", serde_json::json!({"key_id": "key_1"}))
            .unwrap();
        a.record("key_revoke", serde_json::json!({"key_id": "key_2"}))
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["key_id"], "key_2");
        assert_eq!(lines[0]["event"], "key_revoke");
        assert!(lines[0]["ts"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn failing_sink_fails_closed_or_open() {
        let full = AuditTarget::File(PathBuf::from("/dev/full"));
        let closed = Audit::new(&full, OnError::FailClosed);
        assert!(closed.record("key_decrypt", Value::Null).is_err());
        let open = Audit::new(&full, OnError::FailOpen);
        assert!(open.record("key_decrypt", Value::Null).is_ok());
    }
}
