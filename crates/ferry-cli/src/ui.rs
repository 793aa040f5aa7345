//! What the user sees: progress bars, sizes, one-line errors, logging.

use std::io::IsTerminal;
use std::time::Duration;

use ferry_core::progress::Progress;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Logs on stderr. Daemons (coordinator, agent) log at info by default,
/// commands only errors. The HTTP/2 and gRPC layers stay at info at most,
/// so no request header (the token) is ever logged.
pub fn init_tracing(verbose: u8, daemon: bool, json: bool) {
    let level = match verbose + u8::from(daemon) {
        0 => "error",
        1 => "info,h2=warn,hyper=warn,tower=warn,tonic=warn",
        _ => "debug,h2=info,hyper=info,hyper_util=info,tower=info,tonic=info,reqwest=info",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.with_ansi(std::io::stderr().is_terminal()).init();
    }
}

/// Serves Prometheus metrics on `addr` (`/metrics`), for daemons.
pub fn serve_metrics(addr: Option<std::net::SocketAddr>) -> anyhow::Result<()> {
    let Some(addr) = addr else {
        return Ok(());
    };
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|e| anyhow::anyhow!("serving metrics on {addr}: {e}"))?;
    ferry_core::telemetry::describe();
    tracing::info!(%addr, "metrics on http://{addr}/metrics");
    Ok(())
}

/// The error and its causes on one line, without repeating a cause that
/// the message already contains.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        // SQLite's own cause repeats the message with its code in front
        // ("Error code 26: file is not a database").
        let repeated = s.starts_with("Error code ")
            && s.split_once(": ").is_some_and(|(_, t)| out.ends_with(t));
        if out.contains(&s) || repeated {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s);
    }
    printable(&out.replace('\n', " "))
}

/// `s` with control characters shown as their Unicode pictures (`\n` as
/// U+240A, ESC as U+241B), as rclone shows them: a key or file name that
/// holds them can neither break a message into two lines nor drive the
/// terminal.
pub fn printable(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '\u{0}'..='\u{1f}' => char::from_u32(0x2400 + c as u32).unwrap_or('?'),
            '\u{7f}' => '\u{2421}',
            c => c,
        })
        .collect()
}

/// Parses 4096, 16K, 16KiB, 1M, 1MiB, 2G.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num.parse().map_err(|_| format!("not a size: {s:?}"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("unknown unit in {s:?} (use K, M or G)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size too large: {s:?}"))
}

pub fn human_bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < units.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// A progress bar on stderr when it is a terminal; otherwise silent but for
/// warnings.
pub struct Bar {
    bar: Option<ProgressBar>,
    /// Files (objects, for a bucket sync) done and known, shown beside the bytes.
    items: std::sync::atomic::AtomicU64,
    items_total: std::sync::atomic::AtomicU64,
    unit: &'static str,
}

impl Bar {
    pub fn new(verb: &str) -> Self {
        let unit = if verb.starts_with("bucket") {
            "objects"
        } else {
            "files"
        };
        let mut me = Self {
            bar: None,
            items: Default::default(),
            items_total: Default::default(),
            unit,
        };
        if !std::io::stderr().is_terminal() {
            return me;
        }
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}")
                .expect("valid template"),
        );
        bar.set_prefix(verb.to_string());
        bar.enable_steady_tick(Duration::from_millis(200));
        me.bar = Some(bar);
        me
    }

    fn show_items(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        if let Some(b) = &self.bar {
            let (done, total) = (self.items.load(Relaxed), self.items_total.load(Relaxed));
            b.set_message(if total >= done {
                format!("{done}/{total} {}", self.unit)
            } else {
                format!("{done} {}", self.unit)
            });
        }
    }

    /// Sets the bar from a remote job's counters.
    pub fn set(&self, done: u64, total: u64) {
        if let Some(b) = &self.bar {
            b.set_length(total.max(done));
            b.set_position(done);
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }

    /// A line on stderr, above the bar when there is one.
    pub fn note(&self, line: &str) {
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }

    /// A bar that counts from now but draws nothing until [`Bar::show`]:
    /// `ferry sync`'s restore starts while the snapshot's bar still owns the
    /// terminal line.
    pub fn hidden(verb: &str) -> Self {
        let me = Self::new(verb);
        if let Some(b) = &me.bar {
            b.set_draw_target(ProgressDrawTarget::hidden());
        }
        me
    }

    pub fn show(&self) {
        if let Some(b) = &self.bar {
            b.set_draw_target(ProgressDrawTarget::stderr());
        }
    }
}

impl Progress for Bar {
    fn wants_totals(&self) -> bool {
        self.bar.is_some()
    }

    fn add_total(&self, files: u64, bytes: u64) {
        if let Some(b) = &self.bar {
            b.inc_length(bytes);
            self.items_total
                .fetch_add(files, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn file_done(&self) {
        if self.bar.is_some() {
            let n = self
                .items
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1;
            // A message per 64 items: cheap on the pipeline's threads.
            if n.is_multiple_of(64)
                || n == self.items_total.load(std::sync::atomic::Ordering::Relaxed)
            {
                self.show_items();
            }
        }
    }

    fn advance(&self, bytes: u64) {
        if let Some(b) = &self.bar {
            b.inc(bytes);
        }
    }

    fn warn(&self, message: &str) {
        let message = printable(message);
        match &self.bar {
            Some(b) => b.println(format!("warning: {message}")),
            None => eprintln!("warning: {message}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_drops_causes_that_only_repeat() {
        #[derive(Debug)]
        struct Inner;
        impl std::fmt::Display for Inner {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("Error code 26: file is not a database")
            }
        }
        impl std::error::Error for Inner {}
        let e = anyhow::Error::new(Inner)
            .context("file is not a database")
            .context("catalog j");
        assert_eq!(one_line(&e), "catalog j: file is not a database");
        let e = anyhow::anyhow!("Error code 5: busy").context("catalog j: locked");
        assert_eq!(one_line(&e), "catalog j: locked: Error code 5: busy");
        let e = anyhow::anyhow!("disk full\nsecond line").context("writing x");
        assert_eq!(one_line(&e), "writing x: disk full second line");
        let e = anyhow::anyhow!("a\u{1b}[31mred\tkey");
        assert_eq!(one_line(&e), "a\u{241b}[31mred\u{2409}key");
    }

    #[test]
    fn control_characters_are_shown_not_sent() {
        assert_eq!(
            printable("evil\nwarning: fake\u{1b}[31m\u{7f}"),
            "evil\u{240a}warning: fake\u{241b}[31m\u{2421}"
        );
        assert_eq!(printable("日本語 ok"), "日本語 ok");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("16K"), Ok(16384));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("K").is_err());
        assert_eq!(human_bytes(1536), "1.5 KiB");
    }
}
