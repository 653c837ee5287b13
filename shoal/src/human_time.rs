//! Times for people: `2026-12-07 14:02 UTC` instead of unix seconds. The time zone is
//! always written out; it is UTC because reading the local zone needs a time-zone
//! database this binary does not carry.

/// (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `YYYY-MM-DD HH:MM UTC` of a unix time in seconds.
pub fn human_time(unix_secs: u64) -> String {
    let secs = i64::try_from(unix_secs).unwrap_or(i64::MAX);
    let (y, mo, d) = civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{mo:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        (rem / 60) % 60
    )
}

/// `YYYY-MM-DD HH:MM:SS UTC` of a unix time in milliseconds.
pub fn human_time_ms(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let minute = human_time(secs);
    // Insert the seconds before " UTC".
    let base = minute.trim_end_matches(" UTC");
    format!("{base}:{:02} UTC", secs % 60)
}

/// `YYYY-MM-DD` (UTC) of a unix time in seconds, for narrow columns.
pub fn human_date(unix_secs: u64) -> String {
    human_time(unix_secs)[..10].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_instants() {
        assert_eq!(human_time(0), "1970-01-01 00:00 UTC");
        assert_eq!(human_time(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(human_time(1_700_000_000), "2023-11-14 22:13 UTC");
        assert_eq!(human_time_ms(1_700_000_000_500), "2023-11-14 22:13:20 UTC");
        assert_eq!(human_date(4_102_444_800), "2100-01-01");
        // Never panics, even far out.
        assert!(human_time(u64::MAX).ends_with(" UTC"));
    }
}
