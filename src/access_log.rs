//! The access log's writer: one JSON line per request, in the same shape as every other log
//! line (`timestamp`, `level`, the fields, `target`), without going through `tracing`'s
//! formatter. That formatter builds each line field by field through a visitor and hands it
//! to the background writer alone; at one line per request it cost more than all of byokd's
//! other work on the request.
//!
//! Here a line is formatted straight into a per-thread-shard buffer that is reused, and whole
//! batches (at most [`BATCH`] bytes, or what [`FLUSH_EVERY`] gathered) go to the background
//! writer, which writes each batch in one call. Lines of one worker thread keep their order;
//! lines of different threads may interleave by up to [`FLUSH_EVERY`] (each has its
//! timestamp). Whether the line is written at all is still `tracing`'s filter's decision
//! (`BYOKD_LOG`, target `byokd::access`).
//!
//! Until [`install`] is called (tests running byokd in-process, library use), lines go
//! through `tracing` as before.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// A shard's buffer goes to the writer once it holds this much.
pub const BATCH: usize = 16 * 1024;
/// And at least this often.
pub const FLUSH_EVERY: Duration = Duration::from_millis(200);

type Sink = Box<dyn Fn(&[u8]) + Send + Sync>;

struct AccessLog {
    shards: Box<[Mutex<Vec<u8>>]>,
    sink: Sink,
}

static LOG: OnceLock<AccessLog> = OnceLock::new();

/// Sends access-log lines to `out` (the background log writer) from now on, and starts the
/// thread that flushes partly filled buffers every [`FLUSH_EVERY`].
pub fn install<W: Write + Clone + Send + Sync + 'static>(out: W) {
    let shards = std::thread::available_parallelism().map_or(4, |n| n.get() * 2);
    let sink: Sink = Box::new(move |batch: &[u8]| {
        // The background writer queues it; a failed write of a log line has nowhere to go.
        let _ = out.clone().write_all(batch);
    });
    let installed = LOG.set(AccessLog {
        shards: (0..shards).map(|_| Mutex::new(Vec::new())).collect(),
        sink,
    });
    if installed.is_ok() {
        let _ = std::thread::Builder::new()
            .name("byokd-access-log".into())
            .spawn(|| {
                loop {
                    std::thread::sleep(FLUSH_EVERY);
                    flush();
                }
            });
    }
}

/// Writes out every partly filled buffer. Called at exit, after the last request.
pub fn flush() {
    let Some(log) = LOG.get() else {
        return;
    };
    for shard in log.shards.iter() {
        let batch = {
            let mut buf = shard.lock().unwrap_or_else(|e| e.into_inner());
            if buf.is_empty() {
                continue;
            }
            std::mem::take(&mut *buf)
        };
        (log.sink)(&batch);
    }
}

/// One request's access-log line.
#[derive(Debug)]
pub struct Line<'a> {
    pub request_id: crate::vocab::RequestId,
    pub tenant: &'a str,
    pub end_user: Option<&'a str>,
    pub provider: &'a str,
    pub status: u16,
    pub model: &'a str,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub cache_write_tokens: u64,
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
    pub usage_found: bool,
    pub key_source: &'a str,
    pub cost_usd: Option<f64>,
    pub bytes: u64,
    pub outcome: &'a str,
    pub duration_ms: f64,
}

/// Writes `line` if the filter lets `byokd::access` info lines through.
pub fn write(line: &Line<'_>) {
    if !tracing::enabled!(target: "byokd::access", tracing::Level::INFO) {
        return;
    }
    let Some(log) = LOG.get() else {
        via_tracing(line);
        return;
    };
    thread_local! {
        static SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed);
    }
    static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);
    let i = SHARD.with(|s| *s) % log.shards.len();
    let full = {
        let mut buf = log.shards[i].lock().unwrap_or_else(|e| e.into_inner());
        format_line(&mut buf, line, time::OffsetDateTime::now_utc());
        (buf.len() >= BATCH).then(|| std::mem::replace(&mut *buf, Vec::with_capacity(BATCH + 1024)))
    };
    if let Some(batch) = full {
        (log.sink)(&batch);
    }
}

/// The line as `tracing_subscriber`'s JSON formatter writes events (`flatten_event`), so
/// access lines and other lines read alike. Numbers are written digit by digit (`itoa` and
/// fixed-width fields), not through `core::fmt`, whose machinery was most of a line's cost.
pub fn format_line(buf: &mut Vec<u8>, l: &Line<'_>, now: time::OffsetDateTime) {
    // A typical line's length: the pushes below then never grow the buffer.
    buf.reserve(512);
    buf.extend_from_slice(b"{\"timestamp\":\"");
    fixed(buf, u32::try_from(now.year()).unwrap_or(0), 4);
    buf.push(b'-');
    fixed(buf, u32::from(u8::from(now.month())), 2);
    buf.push(b'-');
    fixed(buf, u32::from(now.day()), 2);
    buf.push(b'T');
    fixed(buf, u32::from(now.hour()), 2);
    buf.push(b':');
    fixed(buf, u32::from(now.minute()), 2);
    buf.push(b':');
    fixed(buf, u32::from(now.second()), 2);
    buf.push(b'.');
    fixed(buf, now.microsecond(), 6);
    buf.extend_from_slice(b"Z\",\"level\":\"INFO\",\"request_id\":\"");
    hex16(buf, l.request_id.as_u64());
    buf.extend_from_slice(b"\",\"tenant\":");
    // Tenant and provider names are restricted to safe characters, but the model comes from
    // the request or the upstream: every string goes through the JSON encoder.
    json_str(buf, l.tenant);
    if let Some(u) = l.end_user {
        buf.extend_from_slice(b",\"end_user\":");
        json_str(buf, u);
    }
    buf.extend_from_slice(b",\"provider\":");
    json_str(buf, l.provider);
    buf.extend_from_slice(b",\"status\":");
    int(buf, u64::from(l.status));
    buf.extend_from_slice(b",\"model\":");
    json_str(buf, l.model);
    for (name, n) in [
        (&b",\"input_tokens\":"[..], l.input_tokens),
        (b",\"cached_input_tokens\":", l.cached_input_tokens),
        (b",\"cache_write_tokens\":", l.cache_write_tokens),
        (b",\"output_tokens\":", l.output_tokens),
        (b",\"reasoning_tokens\":", l.reasoning_tokens),
    ] {
        buf.extend_from_slice(name);
        int(buf, n);
    }
    buf.extend_from_slice(if l.usage_found {
        b",\"usage_found\":true,\"key_source\":"
    } else {
        b",\"usage_found\":false,\"key_source\":"
    });
    json_str(buf, l.key_source);
    if let Some(c) = l.cost_usd {
        buf.extend_from_slice(b",\"cost_usd\":");
        json_f64(buf, c);
    }
    buf.extend_from_slice(b",\"bytes\":");
    int(buf, l.bytes);
    buf.extend_from_slice(b",\"outcome\":");
    json_str(buf, l.outcome);
    buf.extend_from_slice(b",\"duration_ms\":");
    millis(buf, l.duration_ms);
    buf.extend_from_slice(b",\"target\":\"byokd::access\"}\n");
}

fn int(buf: &mut Vec<u8>, n: u64) {
    buf.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Milliseconds to the microsecond (`0.672`, not `0.6721630000000001`), as a JSON number.
fn millis(buf: &mut Vec<u8>, ms: f64) {
    if !(ms.is_finite() && ms >= 0.0) {
        json_f64(buf, ms);
        return;
    }
    // Saturates for absurd values; a request lasts far less than u64::MAX microseconds.
    let us = (ms * 1000.0).round() as u64;
    int(buf, us / 1000);
    buf.push(b'.');
    fixed(buf, (us % 1000) as u32, 3);
}

/// `n` zero-padded to `width` digits (its lowest `width` digits if it has more).
fn fixed(buf: &mut Vec<u8>, mut n: u32, width: usize) {
    let at = buf.len();
    buf.resize(at + width, b'0');
    for d in buf[at..].iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// The request id as its `Display` writes it: 16 lowercase hex digits.
fn hex16(buf: &mut Vec<u8>, n: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for shift in (0..16).rev() {
        buf.push(HEX[(n >> (shift * 4)) as usize & 0xf]);
    }
}

fn json_str(buf: &mut Vec<u8>, s: &str) {
    // What serde_json escapes: control characters, `"` and `\`. Tenant, provider and most
    // model names have none and are written as they are; the rest go through the encoder.
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        buf.push(b'"');
        buf.extend_from_slice(s.as_bytes());
        buf.push(b'"');
    } else {
        let _ = serde_json::to_writer(&mut *buf, s);
    }
}

fn json_f64(buf: &mut Vec<u8>, f: f64) {
    // JSON has no NaN or infinity: such a value is written as null, as serde_json does.
    let _ = serde_json::to_writer(&mut *buf, &f);
}

/// The same line through `tracing`, for when no writer was installed.
pub fn via_tracing(l: &Line<'_>) {
    tracing::info!(
        target: "byokd::access",
        request_id = %l.request_id,
        tenant = l.tenant,
        end_user = l.end_user,
        provider = l.provider,
        status = l.status,
        model = l.model,
        input_tokens = l.input_tokens,
        cached_input_tokens = l.cached_input_tokens,
        cache_write_tokens = l.cache_write_tokens,
        output_tokens = l.output_tokens,
        reasoning_tokens = l.reasoning_tokens,
        usage_found = l.usage_found,
        key_source = l.key_source,
        cost_usd = l.cost_usd,
        bytes = l.bytes,
        outcome = l.outcome,
        duration_ms = l.duration_ms,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_json_with_every_field_and_escapes_the_model() {
        let now =
            time::OffsetDateTime::from_unix_timestamp_nanos(1_796_077_843_211_302_000).unwrap();
        let mut buf = Vec::new();
        let line = Line {
            request_id: crate::vocab::RequestId::new(),
            tenant: "acme",
            end_user: Some("user-42"),
            provider: "openai",
            status: 200,
            model: "m\"\n\\x",
            input_tokens: 1,
            cached_input_tokens: 2,
            cache_write_tokens: 3,
            output_tokens: 4,
            reasoning_tokens: 5,
            usage_found: true,
            key_source: "tenant",
            cost_usd: Some(0.000_012_5),
            bytes: 99,
            outcome: "complete",
            duration_ms: 1.5,
        };
        format_line(&mut buf, &line, now);
        assert!(buf.ends_with(b"}\n"));
        let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        assert_eq!(v["timestamp"], "2026-11-30T22:30:43.211302Z");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["target"], "byokd::access");
        assert_eq!(v["model"], "m\"\n\\x");
        assert_eq!(v["request_id"], line.request_id.to_string());
        assert_eq!(v["cost_usd"], 0.000_012_5);
        assert_eq!(v["reasoning_tokens"], 5);
        assert_eq!(v["usage_found"], true);
        assert_eq!(v["duration_ms"], 1.5);
        assert_eq!(v["end_user"], "user-42");
        let mut without = Vec::new();
        format_line(
            &mut without,
            &Line {
                cost_usd: None,
                end_user: None,
                ..line
            },
            now,
        );
        let v: serde_json::Value = serde_json::from_slice(&without).unwrap();
        assert!(v.get("cost_usd").is_none(), "absent when unpriced");
        assert!(v.get("end_user").is_none(), "absent without an end user");
        assert_eq!(v["usage_found"], true);
        assert_eq!(v["status"], 200);
    }

    #[test]
    fn strings_are_written_as_serde_json_writes_them() {
        for s in [
            "acme",
            "gpt-4o-mini",
            "m\"q",
            "back\\slash",
            "tab\there",
            "\u{7f}\u{1f}",
            "ünï",
            "",
        ] {
            let mut ours = Vec::new();
            json_str(&mut ours, s);
            assert_eq!(ours, serde_json::to_vec(s).unwrap(), "{s:?}");
        }
    }

    #[test]
    fn small_fields_are_zero_padded_and_the_request_id_matches_its_display() {
        // 2027-01-02T03:04:05.000006Z
        let now =
            time::OffsetDateTime::from_unix_timestamp_nanos(1_798_859_045_000_006_000).unwrap();
        let id = crate::vocab::RequestId::new();
        let mut buf = Vec::new();
        let line = Line {
            request_id: id,
            tenant: "t",
            end_user: None,
            provider: "p",
            status: 429,
            model: "",
            input_tokens: 0,
            cached_input_tokens: 0,
            cache_write_tokens: 0,
            output_tokens: u64::MAX,
            reasoning_tokens: 0,
            usage_found: false,
            key_source: "none",
            cost_usd: Some(f64::NAN),
            bytes: 0,
            outcome: "rejected",
            duration_ms: 0.0,
        };
        format_line(&mut buf, &line, now);
        let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        assert_eq!(v["timestamp"], "2027-01-02T03:04:05.000006Z");
        assert_eq!(v["request_id"], id.to_string());
        assert_eq!(v["output_tokens"], u64::MAX);
        assert_eq!(v["usage_found"], false);
        assert_eq!(v["status"], 429);
        assert!(v["cost_usd"].is_null(), "NaN is written as null");
        assert_eq!(v["duration_ms"], 0.0);
        for (ms, text) in [
            (0.672_163_000_000_000_1, "0.672"),
            (1234.5678, "1234.568"),
            (0.0004, "0.000"),
        ] {
            let mut b = Vec::new();
            millis(&mut b, ms);
            assert_eq!(String::from_utf8(b).unwrap(), text);
        }
    }
}
