//! One module per subcommand.

mod abort;
mod demo;
mod export;
mod hash;
mod net;
mod points;
mod sync;
mod verify;

use std::time::{SystemTime, UNIX_EPOCH};

use diskferry_protocol::{Generation, SessionId};

use crate::cli::Command;

/// Runs a parsed command.
pub fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Hash(a) => hash::run(a),
        Command::Abort(a) => abort::run(a),
        Command::Sync(a) => sync::run(a),
        Command::Verify(a) => verify::run(a),
        Command::Points(a) => points::run(a),
        Command::Export(a) => export::run(a),
        Command::Demo(a) => demo::run(a),
        Command::Init(a) => net::init(a),
        Command::Id(a) => net::id(a),
        Command::Serve(a) => net::serve(a),
        Command::Push(a) => net::push(a),
    }
}

/// A fresh random generation id (never 0, which means "none" on disk).
pub fn new_generation() -> Generation {
    Generation(rand::random::<u128>() | 1)
}

/// A fresh random session id.
pub fn new_session() -> SessionId {
    SessionId(rand::random::<u128>() | 1)
}

/// Now, in nanoseconds since the Unix epoch.
pub fn now_unix_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64)
}

/// CPU seconds (user + system) this process used so far.
pub fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return 0.0 };
    // Fields after the command name (which may hold spaces) start after ')'.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { return 0.0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12].iter().filter_map(|&i| f.get(i)?.parse::<f64>().ok()).sum();
    ticks / rustix::param::clock_ticks_per_second() as f64
}

/// `1.5 GiB`-style sizes for people.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
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
    let secs = unix_ns.div_euclid(1_000_000_000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_time(1_795_613_644 * 1_000_000_000), "2026-11-25 13:34:04 UTC");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 30), "3.00 GiB");
    }
}
