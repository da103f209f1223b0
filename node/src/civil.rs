//! Calendar dates of Unix times (UTC), for logs and certificate expiry, without a date crate.

/// Year, month (1-12) and day (1-31) of a Unix time (Howard Hinnant's civil_from_days).
pub fn ymd(unix: i64) -> (i64, i64, i64) {
    let z = unix.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// `YYYY-MM-DD HH:MM` (UTC).
pub fn date_time(unix: i64) -> String {
    let (y, m, d) = ymd(unix);
    let secs = unix.rem_euclid(86_400);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}", secs / 3600, secs / 60 % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(ymd(0), (1970, 1, 1));
        assert_eq!(ymd(951_782_400), (2000, 2, 29));
        assert_eq!(date_time(1_609_459_200 + 3_660), "2021-01-01 01:01");
        assert_eq!(ymd(-1), (1969, 12, 31));
    }
}
