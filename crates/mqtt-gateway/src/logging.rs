//! Logs that never stop the gateway: log lines are appended to a bounded buffer in memory, and a
//! writer thread of their own writes the buffer to stdout a few milliseconds later, many lines
//! in one write. Whoever reads stdout (journald, a Docker log driver, `| tee` on a full disk)
//! can stall without stalling a call, `/healthz` or SIGTERM: while the writer is stuck, lines
//! that do not fit the buffer are dropped and counted (`mqtt_gateway_log_lines_dropped_total`).
//!
//! Why not tracing-appender's non-blocking writer: it hands every line to its thread through a
//! channel, which wakes that thread once per line; at 13,000 calls a second that cost about
//! 4 µs of CPU per call (BENCHMARKS.md). Here the thread is woken once per batch.
//!
//! Caller text (paths, header names, the caller's name) reaches log lines only through
//! [`bounded`], so no request can write an outsized line.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use crate::cli::LogFormat;

/// The most bytes of log lines that may wait for the writer: several seconds of calls at full
/// speed; past it lines are dropped rather than held without bound.
pub const BUFFERED_BYTES: usize = 4 * 1024 * 1024;

/// How long the writer waits after the first line of a batch, so later lines join it.
const BATCH_DELAY: Duration = Duration::from_millis(5);

/// The longest text from a caller that a log field carries; the rest is cut with an ellipsis.
pub const MAX_FIELD_CHARS: usize = 256;

/// Lines waiting for the writer thread.
struct Pending {
    lines: Mutex<Vec<u8>>,
    /// Signalled when the buffer stops being empty, or at shutdown.
    wake: Condvar,
    dropped: AtomicU64,
    closing: AtomicBool,
}

impl Pending {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        // Appending bytes cannot leave the buffer inconsistent: a poisoned lock is still fine.
        self.lines.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends one line (or text), or drops and counts it when the buffer is full.
    fn append(&self, bytes: &[u8]) {
        let mut lines = self.lock();
        if lines.len() + bytes.len() > BUFFERED_BYTES {
            drop(lines);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let was_empty = lines.is_empty();
        lines.extend_from_slice(bytes);
        drop(lines);
        if was_empty {
            self.wake.notify_one();
        }
    }
}

static PENDING: OnceLock<Arc<Pending>> = OnceLock::new();

/// Log lines dropped because the reader of stdout stopped reading (0 before [`init`]).
pub fn dropped_lines() -> u64 {
    PENDING
        .get()
        .map_or(0, |p| p.dropped.load(Ordering::Relaxed))
}

/// Prints text that is not a log line (a startup banner), in order with the logs and without
/// blocking once [`init`] has run; before that (or in tests), to stdout, ignoring a closed one.
pub fn print(text: &str) {
    match PENDING.get() {
        Some(pending) => pending.append(text.as_bytes()),
        None => {
            let _ = std::io::stdout().write_all(text.as_bytes());
        }
    }
}

/// What tracing's formatter writes each event to: one `write` per formatted line.
#[derive(Clone)]
struct LineWriter(Arc<Pending>);

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LineWriter {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// The process's logging. Keep it until the process ends; [`Logging::finish`] writes what is
/// left, waiting at most a second and a half.
pub struct Logging {
    pending: Arc<Pending>,
    /// Says the writer thread has written everything and ended.
    done: std::sync::mpsc::Receiver<()>,
}

impl Logging {
    /// Writes what is buffered, but gives up after 1.5 s: a reader that is stuck at exit must
    /// not keep the process from ending.
    pub fn finish(self) {
        self.pending.closing.store(true, Ordering::Release);
        self.pending.wake.notify_one();
        // Disconnected at once when the thread could not be started.
        let _ = self.done.recv_timeout(Duration::from_millis(1500));
    }
}

/// The writer thread: waits for a first line, lets a batch gather, writes it, again.
fn write_batches(pending: Arc<Pending>) {
    let mut batch = Vec::new();
    let mut stdout = std::io::stdout();
    loop {
        {
            let mut lines = pending.lock();
            while lines.is_empty() && !pending.closing.load(Ordering::Acquire) {
                lines = pending.wake.wait(lines).unwrap_or_else(|e| e.into_inner());
            }
            if lines.is_empty() {
                return; // closing, and nothing left
            }
        }
        if !pending.closing.load(Ordering::Acquire) {
            std::thread::sleep(BATCH_DELAY);
        }
        std::mem::swap(&mut batch, &mut *pending.lock());
        // Blocks while the reader is stuck: only this thread waits.
        if stdout
            .write_all(&batch)
            .and_then(|()| stdout.flush())
            .is_err()
        {
            // A closed stdout: the lines are lost, and counted.
            let lost = batch.iter().filter(|b| **b == b'\n').count();
            pending.dropped.fetch_add(lost as u64, Ordering::Relaxed);
        }
        batch.clear();
        // Keep a moderate buffer, not the largest burst ever seen.
        batch.shrink_to(64 * 1024);
    }
}

/// Installs the global subscriber: `RUST_LOG` or the default filter, text or JSON, colours only
/// on a terminal.
pub fn init(format: LogFormat) -> Logging {
    use std::io::IsTerminal;
    let terminal = std::io::stdout().is_terminal();
    let pending = PENDING
        .get_or_init(|| {
            Arc::new(Pending {
                lines: Mutex::new(Vec::with_capacity(64 * 1024)),
                wake: Condvar::new(),
                dropped: AtomicU64::new(0),
                closing: AtomicBool::new(false),
            })
        })
        .clone();
    let (done_tx, done) = std::sync::mpsc::channel();
    let _ = std::thread::Builder::new()
        .name("log-writer".into())
        .spawn({
            let pending = pending.clone();
            move || {
                write_batches(pending);
                let _ = done_tx.send(());
            }
        });
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,rumqttd=warn,rumqttd::server::broker=off,rumqttc=warn".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(terminal)
        .with_writer(LineWriter(pending.clone()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Logging { pending, done }
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

    #[test]
    fn a_full_buffer_drops_and_counts_lines_instead_of_growing() {
        let pending = Pending {
            lines: Mutex::new(Vec::new()),
            wake: Condvar::new(),
            dropped: AtomicU64::new(0),
            closing: AtomicBool::new(false),
        };
        let line = vec![b'x'; 1000];
        for _ in 0..(BUFFERED_BYTES / 1000 + 10) {
            pending.append(&line);
        }
        assert!(pending.lock().len() <= BUFFERED_BYTES);
        assert_eq!(pending.dropped.load(Ordering::Relaxed), 10);
    }
}
