//! Bandwidth limits (`--bwlimit`, `bandwidth_limit`): block payload paced
//! at the sender, frame by frame, so the link sees a steady rate rather
//! than bursts. A pacer hands out send times in the order they are asked
//! for, so pushes that share one (a daemon's limit) get equal shares.
//! Written here: the rate limiter crates count permits per period (bursts
//! at each period's start), not a smooth byte rate shared first come,
//! first served.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// At most `rate` bytes a second, with a burst of at most 50 ms of it.
#[derive(Debug)]
pub struct Pacer {
    rate: f64,
    burst: Duration,
    /// When the bytes handed out so far have all gone at the rate.
    next_free: Mutex<Option<Instant>>,
}

impl Pacer {
    /// A pacer of `bytes_per_second` (at least 1).
    pub fn new(bytes_per_second: u64) -> Pacer {
        Pacer { rate: bytes_per_second.max(1) as f64, burst: Duration::from_millis(50), next_free: Mutex::new(None) }
    }

    pub fn rate(&self) -> u64 {
        self.rate as u64
    }

    /// Waits until `bytes` more may go.
    pub async fn take(&self, bytes: usize) {
        let start = {
            let mut next = self.next_free.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            // Idle time is not saved up beyond the burst.
            let earliest = now.checked_sub(self.burst).unwrap_or(now);
            let start = next.map_or(earliest, |n| n.max(earliest));
            *next = Some(start + Duration::from_secs_f64(bytes as f64 / self.rate));
            start
        };
        // A start already past (within the burst) does not wait.
        tokio::time::sleep_until(start).await;
    }
}

/// A rate with binary suffixes, in bytes a second: `50M` is 50 MiB/s.
pub fn parse_rate(s: &str) -> Option<u64> {
    let s = s.trim().trim_end_matches("/s");
    diskferry_protocol::parse_size(s).filter(|r| *r > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn paces_to_the_rate_and_shares_it() {
        let p = std::sync::Arc::new(Pacer::new(1 << 20));
        let t0 = Instant::now();
        for _ in 0..32 {
            p.take(64 << 10).await;
        }
        // 2 MiB at 1 MiB/s: 2 s, less the first burst.
        let took = t0.elapsed().as_secs_f64();
        assert!((1.85..=2.05).contains(&took), "{took}");
        // Two takers share it evenly.
        let t0 = Instant::now();
        let (a, b) = (p.clone(), p.clone());
        let one = tokio::spawn(async move {
            for _ in 0..16 {
                a.take(64 << 10).await;
            }
            t0.elapsed().as_secs_f64()
        });
        let two = tokio::spawn(async move {
            for _ in 0..16 {
                b.take(64 << 10).await;
            }
            t0.elapsed().as_secs_f64()
        });
        let (x, y) = (one.await.unwrap(), two.await.unwrap());
        assert!((x - y).abs() < 0.15, "{x} vs {y}");
        assert!((1.8..=2.1).contains(&x.max(y)), "{x} {y}");
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("50M"), Some(50 << 20));
        assert_eq!(parse_rate("512K/s"), Some(512 << 10));
        assert_eq!(parse_rate("0"), None);
        assert_eq!(parse_rate("fast"), None);
    }
}
