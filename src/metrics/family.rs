//! The counter families with a `tenant` label, kept as plain atomics and written straight to
//! the text exposition. With 10,000 tenants these are about 50,000 series: as `prometheus`
//! counters each carried its own label-pair strings and protobuf fields (about 1.5 KiB), and
//! every scrape rebuilt all of them as protobuf messages before encoding. Here a series is
//! its rendered label set and one atomic.

use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::vocab::FastDashMap;

/// One counter: shared by the family (for the scrape) and the handles cached per label slot.
pub(super) type Counter = Arc<AtomicU64>;

/// A counter family with `N` labels.
#[derive(Debug)]
pub(super) struct Counters<const N: usize> {
    name: &'static str,
    help: &'static str,
    /// Label names in the order written: sorted, as the `prometheus` crate wrote them.
    labels: [&'static str; N],
    /// The stored integer is divided by this when written (cost: nano-dollars shown as USD).
    divisor: u64,
    /// Keyed by the rendered label set (`a="x",b="y"`), which is also what the scrape writes.
    series: FastDashMap<Box<str>, Counter>,
}

impl<const N: usize> Counters<N> {
    pub(super) fn new(name: &'static str, help: &'static str, labels: [&'static str; N]) -> Self {
        debug_assert!(labels.is_sorted(), "{name}: label names must be sorted");
        Self {
            name,
            help,
            labels,
            divisor: 1,
            series: FastDashMap::default(),
        }
    }

    /// A family whose integer counts are shown divided by `divisor`, as a float.
    pub(super) fn scaled(mut self, divisor: u64) -> Self {
        self.divisor = divisor;
        self
    }

    /// The counter for `values` (in label-name order), created at zero on first use.
    pub(super) fn get(&self, values: [&str; N]) -> Counter {
        let mut key = String::with_capacity(64);
        for (i, (name, value)) in self.labels.iter().zip(values).enumerate() {
            if i > 0 {
                key.push(',');
            }
            key.push_str(name);
            key.push_str("=\"");
            escape(&mut key, value);
            key.push('"');
        }
        if let Some(c) = self.series.get(key.as_str()) {
            return c.clone();
        }
        self.series.entry(key.into()).or_default().clone()
    }

    pub(super) fn inc_by(&self, values: [&str; N], n: u64) {
        self.get(values).fetch_add(n, Ordering::Relaxed);
    }

    /// Appends the family in the text exposition format, series sorted by label set.
    pub(super) fn render(&self, out: &mut Vec<u8>) {
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} counter", self.name);
        let mut rows: Vec<(Box<str>, u64)> = self
            .series
            .iter()
            .map(|e| (e.key().clone(), e.value().load(Ordering::Relaxed)))
            .collect();
        rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (labels, v) in rows {
            let _ = if self.divisor == 1 {
                writeln!(out, "{}{{{labels}}} {v}", self.name)
            } else {
                writeln!(
                    out,
                    "{}{{{labels}}} {}",
                    self.name,
                    v as f64 / self.divisor as f64
                )
            };
        }
    }
}

/// Label-value escaping of the text format: backslash, double quote and line feed.
fn escape(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_sorted_escaped_and_scaled() {
        let f = Counters::new("t_total", "Help.", ["a", "b"]);
        f.inc_by(["z", "1"], 2);
        f.inc_by(["y", "q\"u\\o\nte"], 1);
        f.inc_by(["z", "1"], 3);
        let mut out = Vec::new();
        f.render(&mut out);
        let out = String::from_utf8(out).unwrap();
        assert_eq!(
            out,
            "# HELP t_total Help.\n# TYPE t_total counter\nt_total{a=\"y\",b=\"q\\\"u\\\\o\\nte\"} 1\nt_total{a=\"z\",b=\"1\"} 5\n"
        );
        let cost = Counters::new("c_total", "Cost.", ["t"]).scaled(1_000_000_000);
        cost.inc_by(["x"], 114);
        let mut out = Vec::new();
        cost.render(&mut out);
        let out = String::from_utf8(out).unwrap();
        assert!(out.ends_with("c_total{t=\"x\"} 0.000000114\n"), "{out}");
    }

    #[test]
    fn handles_share_the_series() {
        let f = Counters::new("t_total", "Help.", ["a"]);
        let h = f.get(["x"]);
        h.fetch_add(4, Ordering::Relaxed);
        f.inc_by(["x"], 1);
        assert_eq!(h.load(Ordering::Relaxed), 5);
        assert_eq!(f.series.len(), 1);
    }
}
