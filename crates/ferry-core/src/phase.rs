//! The cutover report: what each phase of a snapshot or a restore took.
//!
//! Phases overlap (packs upload while files are still read, chunks are
//! written while other packs are fetched), so a phase is reported as the
//! window it was active in, measured from the start of its run, with the
//! bytes and files it moved. An operator reads the final delta's downtime
//! off these windows; their durations need not add up to the total.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// One phase: when it was active and how much it moved.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Phase {
    /// scan, upload, commit (snapshot); plan, fetch, write, finish, verify
    /// (restore).
    pub name: String,
    /// Seconds from the start of the run to the phase's first work.
    pub start_s: f64,
    /// Seconds from the start of the run to the phase's last work.
    pub end_s: f64,
    /// `end_s - start_s`.
    pub seconds: f64,
    pub bytes: u64,
    /// Files the phase read or wrote. Packs mix files, so upload and
    /// fetch count `objects` instead.
    pub files: u64,
    /// Vault objects put or got (packs, index, snapshot record).
    pub objects: u64,
}

impl Phase {
    /// The same phase on a timeline that started `by` seconds earlier
    /// (a sync's restore follows its snapshot).
    pub fn shifted(mut self, by: f64) -> Phase {
        self.start_s += by;
        self.end_s += by;
        self
    }
}

/// Records one phase from any number of threads: the earliest start, the
/// latest end, bytes and files. Lock-free, so the hot path pays two
/// atomic min/max updates per piece of work.
pub struct PhaseClock {
    t0: Instant,
    first_ns: AtomicU64,
    last_ns: AtomicU64,
    bytes: AtomicU64,
    files: AtomicU64,
    objects: AtomicU64,
}

impl Default for PhaseClock {
    /// A clock whose run starts now.
    fn default() -> Self {
        PhaseClock::new(Instant::now())
    }
}

impl PhaseClock {
    pub fn new(t0: Instant) -> Self {
        PhaseClock {
            t0,
            first_ns: AtomicU64::new(u64::MAX),
            last_ns: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            files: AtomicU64::new(0),
            objects: AtomicU64::new(0),
        }
    }

    fn now_ns(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }

    /// Work of this phase starts now.
    pub fn begin(&self) {
        self.first_ns.fetch_min(self.now_ns(), Ordering::Relaxed);
    }

    /// Work of this phase ended now, having moved `bytes`.
    pub fn end(&self, bytes: u64) {
        self.last_ns.fetch_max(self.now_ns(), Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts files and vault objects, without moving the window.
    pub fn count(&self, files: u64, objects: u64) {
        self.files.fetch_add(files, Ordering::Relaxed);
        self.objects.fetch_add(objects, Ordering::Relaxed);
    }

    /// The phase as it stands. A phase that never ran is an empty window
    /// where it would have been, at `at_s`.
    pub fn phase(&self, name: &str, at_s: f64) -> Phase {
        let (first, last) = (
            self.first_ns.load(Ordering::Relaxed),
            self.last_ns.load(Ordering::Relaxed),
        );
        let (start_s, end_s) = if first == u64::MAX {
            (at_s, at_s)
        } else {
            (first as f64 / 1e9, (last.max(first)) as f64 / 1e9)
        };
        Phase {
            name: name.into(),
            start_s,
            end_s,
            seconds: end_s - start_s,
            bytes: self.bytes.load(Ordering::Relaxed),
            files: self.files.load(Ordering::Relaxed),
            objects: self.objects.load(Ordering::Relaxed),
        }
    }
}

/// A phase that ran once, from `start_s` to `end_s` seconds into its run.
pub fn span(name: &str, start_s: f64, end_s: f64, bytes: u64, files: u64, objects: u64) -> Phase {
    Phase {
        name: name.into(),
        start_s,
        end_s,
        seconds: end_s - start_s,
        bytes,
        files,
        objects,
    }
}

/// The report as an aligned text table, for the human output.
pub fn table(phases: &[Phase]) -> String {
    let mut out =
        String::from("  phase      start s    end s  seconds          bytes    files  objects\n");
    for p in phases {
        out.push_str(&format!(
            "  {:<9} {:>8.2} {:>8.2} {:>8.2} {:>14} {:>8} {:>8}\n",
            p.name, p.start_s, p.end_s, p.seconds, p.bytes, p.files, p.objects
        ));
    }
    out.pop();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_clock_keeps_the_widest_window_and_sums_counts() {
        let t0 = Instant::now();
        let c = PhaseClock::new(t0);
        assert_eq!(
            c.phase("fetch", 1.5).start_s,
            1.5,
            "never ran: empty window"
        );
        std::thread::sleep(Duration::from_millis(20));
        c.begin();
        c.end(100);
        c.count(1, 1);
        std::thread::sleep(Duration::from_millis(20));
        c.begin();
        c.end(50);
        c.count(2, 1);
        let p = c.phase("fetch", 0.0);
        assert!(p.start_s >= 0.02 && p.start_s < p.end_s, "{p:?}");
        assert!(p.seconds >= 0.02, "{p:?}");
        assert_eq!((p.bytes, p.files, p.objects), (150, 3, 2));
        let s = p.clone().shifted(2.0);
        assert!((s.start_s - p.start_s - 2.0).abs() < 1e-9);
        assert!(
            table(&[p])
                .lines()
                .nth(1)
                .unwrap()
                .trim_start()
                .starts_with("fetch")
        );
    }
}
