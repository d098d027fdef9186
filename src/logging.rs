//! Logs that never stop the gateway: lines go through a bounded queue to a writer thread
//! (tracing-appender's non-blocking writer), so whoever reads stdout (journald, a Docker log
//! driver, `| tee` on a full disk) can stall without stalling a call, `/healthz` or SIGTERM.
//! When the reader stays stuck and the queue fills, lines are dropped and counted
//! (`mqtt_gateway_log_lines_dropped_total`).
//!
//! Caller text (paths, header names, the caller's name) reaches log lines only through
//! [`bounded`], so no request can write an outsized line.

use std::io::Write;
use std::sync::OnceLock;
use std::time::Duration;

use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};

use crate::config::LogFormat;

/// Lines that may wait for the reader: a burst of several seconds of calls, at most a few MiB
/// (a line is well under 1 KiB, caller text being cut short), then lines are dropped rather
/// than queued without bound.
pub const QUEUED_LINES: usize = 8 * 1024;

/// The longest text from a caller that a log field carries; the rest is cut with an ellipsis.
pub const MAX_FIELD_CHARS: usize = 256;

static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();
static WRITER: OnceLock<NonBlocking> = OnceLock::new();

/// Prints text that is not a log line (a startup banner), in order with the logs and without
/// blocking once [`init`] has run; before that (or in tests), to stdout, ignoring a closed one.
pub fn print(text: &str) {
    match WRITER.get() {
        Some(writer) => {
            let _ = writer.clone().write_all(text.as_bytes());
        }
        None => {
            let _ = std::io::stdout().write_all(text.as_bytes());
        }
    }
}

/// Log lines dropped because the reader of stdout stopped reading (0 before [`init`]).
pub fn dropped_lines() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}

/// The process's logging. Keep it until the process ends; [`Logging::finish`] flushes what is
/// queued, waiting at most a second and a half.
pub struct Logging {
    guard: WorkerGuard,
}

impl Logging {
    /// Flushes the queue, but gives up: a reader that is stuck at exit must not keep the
    /// process from ending (the worker's own shutdown waits up to 1.1 s, then may print to the
    /// stuck stdout itself, so it runs on a thread of its own).
    pub fn finish(self) {
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let guard = self.guard;
        let flushing = std::thread::Builder::new()
            .name("log-flush".into())
            .spawn(move || {
                drop(guard);
                let _ = done_tx.send(());
            });
        if flushing.is_ok() {
            let _ = done_rx.recv_timeout(Duration::from_millis(1500));
        }
    }
}

/// Installs the global subscriber: `RUST_LOG` or the default filter, text or JSON, colours only
/// on a terminal.
pub fn init(format: LogFormat) -> Logging {
    use std::io::IsTerminal;
    let terminal = std::io::stdout().is_terminal();
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("log-writer")
        .finish(std::io::stdout());
    let _ = DROPPED.set(writer.error_counter());
    let _ = WRITER.set(writer.clone());
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,rumqttd=warn,rumqttd::server::broker=off,rumqttc=warn".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(terminal)
        .with_writer(writer.clone());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Logging { guard }
}

/// `text`, cut to [`MAX_FIELD_CHARS`] characters (with `…` when cut), for a log field.
pub fn bounded(text: &str) -> std::borrow::Cow<'_, str> {
    match text.char_indices().nth(MAX_FIELD_CHARS) {
        None => text.into(),
        Some((at, _)) => format!("{}…", &text[..at]).into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_text_is_cut_to_a_bounded_length() {
        assert_eq!(bounded("short"), "short");
        let long = "é".repeat(10_000);
        let cut = bounded(&long);
        assert_eq!(cut.chars().count(), MAX_FIELD_CHARS + 1);
        assert!(cut.ends_with('…'));
    }
}
