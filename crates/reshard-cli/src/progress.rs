//! Progress of a transform on stderr: a bar with human units, rate and ETA on a terminal; plain
//! lines with the same figures, at most one per interval, when stderr is a file or a pipe (logs).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use indicatif::{BinaryBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};
use reshard_core::execute::ProgressFn;

/// Where progress goes.
pub enum Progress {
    /// A bar redrawn in place (stderr is a terminal).
    Bar {
        bar: ProgressBar,
        /// Workers report out of order; the bar only moves forward.
        shown: AtomicU64,
    },
    /// One line per `interval` (and one at the end).
    Lines { start: Instant, interval: Duration, state: Mutex<LineState> },
}

/// What the plain lines have reported so far.
#[derive(Default)]
pub struct LineState {
    reported: bool,
    last: Option<Instant>,
    done: u64,
    total: u64,
    printed: Option<u64>,
}

impl Progress {
    /// A bar when stderr is a terminal, else lines every `interval`.
    pub fn new(terminal: bool, interval: Duration) -> Arc<Progress> {
        Arc::new(if terminal {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "reshard: {percent:>3}% [{wide_bar}] {binary_bytes} of {binary_total_bytes} ({binary_bytes_per_sec}, ETA {eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            Progress::Bar { bar, shown: AtomicU64::new(0) }
        } else {
            Progress::Lines { start: Instant::now(), interval, state: Mutex::new(LineState::default()) }
        })
    }

    /// The executor's callback.
    pub fn callback(self: &Arc<Self>) -> Arc<ProgressFn> {
        let me = self.clone();
        Arc::new(move |done: u64, total: u64| me.report(done, total))
    }

    fn report(&self, done: u64, total: u64) {
        match self {
            Progress::Bar { bar, shown } => {
                if bar.length() != Some(total) {
                    bar.set_length(total);
                }
                if shown.fetch_max(done, Ordering::Relaxed) < done {
                    bar.set_position(done);
                }
            }
            Progress::Lines { start, interval, state } => {
                let mut s = state.lock().unwrap_or_else(PoisonError::into_inner);
                s.reported = true;
                s.done = s.done.max(done);
                s.total = total;
                let now = Instant::now();
                if now.duration_since(s.last.unwrap_or(*start)) >= *interval {
                    s.last = Some(now);
                    s.printed = Some(s.done);
                    eprintln!("{}", line(s.done, s.total, now.duration_since(*start)));
                }
            }
        }
    }

    /// Removes the bar, or prints the last line if the last one printed was not at the end.
    pub fn finish(&self) {
        match self {
            Progress::Bar { bar, .. } => bar.finish_and_clear(),
            Progress::Lines { start, state, .. } => {
                let s = state.lock().unwrap_or_else(PoisonError::into_inner);
                if s.reported && s.printed != Some(s.done) {
                    eprintln!("{}", line(s.done, s.total, start.elapsed()));
                }
            }
        }
    }
}

/// `reshard:  45% 1.20 GiB of 2.67 GiB (850.30 MiB/s, ETA 2s)`.
pub fn line(done: u64, total: u64, elapsed: Duration) -> String {
    let pct = (done.saturating_mul(100)).checked_div(total).unwrap_or(100);
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
    let eta = if done >= total {
        "0s".to_string()
    } else if rate > 0.0 {
        duration((total - done) as f64 / rate)
    } else {
        "?".to_string()
    };
    format!(
        "reshard: {pct:>3}% {} of {} ({}/s, ETA {eta})",
        BinaryBytes(done),
        BinaryBytes(total),
        BinaryBytes(rate as u64)
    )
}

/// `12s`, `3m05s`, `2h07m`.
fn duration(secs: f64) -> String {
    let s = secs.ceil() as u64;
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_have_units_rate_and_eta() {
        assert_eq!(
            line(1 << 30, 4 << 30, Duration::from_secs(2)),
            "reshard:  25% 1.00 GiB of 4.00 GiB (512.00 MiB/s, ETA 6s)"
        );
        assert_eq!(line(10, 10, Duration::ZERO), "reshard: 100% 10 B of 10 B (0 B/s, ETA 0s)");
        assert_eq!(line(0, 0, Duration::ZERO), "reshard: 100% 0 B of 0 B (0 B/s, ETA 0s)");
        assert_eq!(line(0, 5, Duration::from_secs(1)), "reshard:   0% 0 B of 5 B (0 B/s, ETA ?)");
        assert_eq!(duration(3725.0), "1h02m");
        assert_eq!(duration(65.2), "1m06s");
    }
}
