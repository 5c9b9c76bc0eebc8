//! Figures for people and for JSON: sizes, rates, times, CPU seconds.

use bytesize::ByteSize;

/// CPU seconds (user + system, all threads) this process used so far.
pub fn cpu_seconds() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

/// `1.5 GiB`-style sizes for people.
pub fn human_bytes(n: u64) -> String {
    ByteSize::b(n).display().iec().to_string()
}

/// Decimal MB/s of `bytes` over `secs`.
pub fn mb_per_s(bytes: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        bytes as f64 / secs / 1e6
    } else {
        0.0
    }
}

/// Seconds rounded to the millisecond (for JSON).
pub fn round_secs(secs: f64) -> f64 {
    (secs * 1000.0).round() / 1000.0
}

/// A timestamp in ns as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn format_time(unix_ns: i64) -> String {
    match jiff::Timestamp::from_nanosecond(unix_ns as i128) {
        Ok(t) => t.strftime("%Y-%m-%d %H:%M:%S UTC").to_string(),
        Err(_) => format!("{unix_ns} ns after the epoch"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_time(1_795_613_644 * 1_000_000_000), "2026-11-25 13:34:04 UTC");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
        let before = cpu_seconds();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1 && cpu_seconds() >= before);
    }
}
