//! `--bandwidth`: one token bucket shared by every worker, so the whole
//! bucket sync, or a snapshot's reading of its source, stays under the
//! rate whatever the concurrency.

use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Limiter {
    /// Bytes per second.
    rate: f64,
    state: Mutex<(Instant, f64)>,
}

impl Limiter {
    pub fn new(bytes_per_sec: u64) -> Self {
        Self {
            rate: bytes_per_sec.max(1) as f64,
            state: Mutex::new((Instant::now(), 0.0)),
        }
    }

    /// Waits until `n` more bytes fit under the rate.
    pub async fn take(&self, n: u64) {
        let wait = self.debit(n);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// [`Limiter::take`] for reader threads.
    pub fn take_blocking(&self, n: u64) {
        let wait = self.debit(n);
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }

    /// Takes `n` tokens; how long to wait for them.
    fn debit(&self, n: u64) -> Duration {
        {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            // Tokens refill at `rate`; a burst of at most one second.
            let (last, tokens) = *s;
            let tokens = (tokens + now.duration_since(last).as_secs_f64() * self.rate)
                .min(self.rate)
                - n as f64;
            *s = (now, tokens);
            if tokens < 0.0 {
                Duration::from_secs_f64(-tokens / self.rate)
            } else {
                Duration::ZERO
            }
        }
    }
}

/// Parses `10M`, `512K`, `1G` (bytes per second; `M` is MiB) or a plain number.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim().trim_end_matches("/s").trim_end_matches('B');
    let (num, mult) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("bad rate {s:?} (e.g. 10M for 10 MiB/s)"))?;
    if n <= 0.0 {
        return Err(format!("bad rate {s:?}: must be positive"));
    }
    Ok((n * mult as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(parse_rate("10M").unwrap(), 10 << 20);
        assert_eq!(parse_rate("512K").unwrap(), 512 << 10);
        assert_eq!(parse_rate("1000").unwrap(), 1000);
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("0").is_err());
    }

    #[tokio::test]
    async fn the_limiter_holds_the_rate() {
        let l = Limiter::new(4 << 20);
        let t = Instant::now();
        // The bucket starts empty: 3 MiB at 4 MiB/s take 0.75 s.
        for _ in 0..12 {
            l.take(256 << 10).await;
        }
        let s = t.elapsed().as_secs_f64();
        assert!(s >= 0.7, "3 MiB at 4 MiB/s took {s:.2}s");
    }
}
