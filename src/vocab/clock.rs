//! Time as byokd records it: unix seconds, UTC calendar months (budgets reset on the 1st,
//! 00:00 UTC) and RFC 3339 timestamps, with the `time` crate doing the calendar.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn utc(unix_secs: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(unix_secs).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// `YYYY-MM` of a unix time, UTC.
pub fn month_of(unix_secs: i64) -> String {
    let t = utc(unix_secs);
    format!("{:04}-{:02}", t.year(), u8::from(t.month()))
}

/// Runs `f` with `month_of(unix_secs)`, formatted once per thread per month rather than on
/// every call: the ledger asks for it on every request.
pub fn with_month<R>(unix_secs: i64, f: impl FnOnce(&str) -> R) -> R {
    thread_local! {
        /// [start, end) of the month last asked for, and its `YYYY-MM`.
        static LAST: std::cell::RefCell<(i64, i64, String)> =
            const { std::cell::RefCell::new((0, 0, String::new())) };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        if !(last.0 <= unix_secs && unix_secs < last.1) {
            let t = utc(unix_secs);
            let start = t
                .replace_day(1)
                .map(|d| d.replace_time(time::Time::MIDNIGHT).unix_timestamp());
            let end = next_month_start(&month_of(unix_secs))
                .and_then(|s| OffsetDateTime::parse(&s, &Rfc3339).ok())
                .map(|d| d.unix_timestamp());
            *last = match (start, end) {
                (Ok(start), Some(end)) => (start, end, month_of(unix_secs)),
                // Out of the calendar's range: not cached, recomputed next time.
                _ => (0, 0, month_of(unix_secs)),
            };
        }
        f(&last.2)
    })
}

/// The first instant of the month after `period` (`YYYY-MM`), RFC 3339 UTC: when a
/// monthly budget resets.
pub fn next_month_start(period: &str) -> Option<String> {
    let (y, m) = period.split_once('-')?;
    let month = time::Month::try_from(m.parse::<u8>().ok()?).ok()?;
    let year: i32 = y.parse().ok()?;
    let (year, month) = match month {
        time::Month::December => (year.checked_add(1)?, time::Month::January),
        m => (year, m.next()),
    };
    let first = time::Date::from_calendar_date(year, month, 1).ok()?;
    first.midnight().assume_utc().format(&Rfc3339).ok()
}

/// UTC now as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn rfc3339_now() -> String {
    rfc3339_millis(OffsetDateTime::now_utc())
}

/// Always three fractional digits, so records sort and align as text.
fn rfc3339_millis(t: OffsetDateTime) -> String {
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_month_matches_month_of_across_boundaries() {
        // 2024-02-29 23:59:59, then 2024-03-01 00:00:00, then back, then 2023-12 → 2024-01.
        for t in [
            1_709_251_199,
            1_709_251_200,
            1_709_251_199,
            1_704_067_199,
            1_704_067_200,
            0,
            -1,
            1_700_000_000,
        ] {
            assert_eq!(with_month(t, str::to_string), month_of(t), "{t}");
        }
    }

    #[test]
    fn months_and_their_ends() {
        assert_eq!(month_of(0), "1970-01");
        assert_eq!(month_of(20_454 * 86_400), "2026-01");
        assert_eq!(month_of(19_782 * 86_400), "2024-02");
        assert_eq!(
            next_month_start("2026-12").as_deref(),
            Some("2027-01-01T00:00:00Z")
        );
        assert_eq!(
            next_month_start("2024-02").as_deref(),
            Some("2024-03-01T00:00:00Z")
        );
        assert_eq!(next_month_start("2024-13"), None);
    }

    #[test]
    fn timestamps_are_rfc3339_with_three_digit_milliseconds() {
        let t = utc(1_709_251_199).replace_millisecond(500).unwrap();
        assert_eq!(rfc3339_millis(t), "2024-02-29T23:59:59.500Z");
        assert_eq!(rfc3339_millis(utc(0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_now().len(), 24);
    }
}
