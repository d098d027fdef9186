//! The only code that reaches into rumqttc's `EventLoop` past its documented API.
//!
//! Why at all: rumqttc v5 offers no way to queue a request from the task that polls the event
//! loop without going through the client's bounded channel (which that same task drains: a full
//! channel would deadlock it, rumqtt issue 1025), and no way to drop what it would otherwise
//! send again after a reconnect. Both are public fields (`pending`, `state`), so they work, but
//! they are not a stable API: a rumqttc upgrade must re-check these three functions.

use rumqttc::v5::{EventLoop, Request};

/// Queues a request to be sent next, from the task that polls the event loop.
pub(crate) fn send_next(eventloop: &mut EventLoop, request: Request) {
    eventloop.pending.push_back(request);
}

/// After a lost connection: moves what entered the channel since rumqttc's own clean-up into
/// its queue, and with a clean session drops all of it (nothing queued or unacknowledged may
/// reach the broker on the new connection, whose session knows nothing of it).
pub(crate) fn after_connection_lost(eventloop: &mut EventLoop, clean_session: bool) {
    eventloop.clean();
    if clean_session {
        eventloop.pending.clear();
        eventloop.state.events.clear();
    }
}

/// The broker came back without our session: drop every request rumqttc would send again.
pub(crate) fn forget_unsent(eventloop: &mut EventLoop) {
    eventloop.pending.clear();
}

#[cfg(test)]
mod tests {
    /// The fields above are reached from this file only, so an upgrade has one place to check.
    #[test]
    fn nothing_else_reaches_into_the_event_loop() {
        fn scan(dir: &std::path::Path, found: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    scan(&path, found);
                } else if path.extension().is_some_and(|e| e == "rs")
                    && !path.ends_with("event_loop_access.rs")
                {
                    let text = std::fs::read_to_string(&path).unwrap();
                    for (n, line) in text.lines().enumerate() {
                        if ["eventloop.pending", "eventloop.state", "eventloop.clean("]
                            .iter()
                            .any(|needle| line.contains(needle))
                        {
                            found.push(format!("{}:{}: {line}", path.display(), n + 1));
                        }
                    }
                }
            }
        }
        let mut found = Vec::new();
        scan(
            std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src")),
            &mut found,
        );
        assert!(found.is_empty(), "{found:#?}");
    }
}
