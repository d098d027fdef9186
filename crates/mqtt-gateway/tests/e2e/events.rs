//! A small reader of `text/event-stream` responses, for the suite's streamed calls.

use std::time::Duration;

use serde_json::Value;

/// One server-sent event.
#[derive(Debug)]
pub struct Event {
    pub event: String,
    pub data: Value,
}

/// Reads events until one named `last` (included), or fails after `within`.
pub async fn read_until(
    response: &mut reqwest::Response,
    last: &str,
    within: Duration,
) -> Vec<Event> {
    let mut buffer = String::new();
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let mut event = String::from("message");
            let mut data = String::new();
            for line in block.lines() {
                if let Some(name) = line.strip_prefix("event:") {
                    event = name.trim().to_owned();
                } else if let Some(more) = line.strip_prefix("data:") {
                    data.push_str(more.trim_start());
                }
            }
            if data.is_empty() {
                continue; // a keep-alive comment
            }
            let done = event == last;
            events.push(Event {
                event,
                data: serde_json::from_str(&data).expect("JSON event data"),
            });
            if done {
                return events;
            }
        }
        let chunk = tokio::time::timeout_at(deadline, response.chunk())
            .await
            .unwrap_or_else(|_| panic!("no {last:?} event within {within:?}; got {events:?}"))
            .expect("the stream stays readable")
            .unwrap_or_else(|| panic!("the stream ended before a {last:?} event; got {events:?}"));
        buffer.push_str(std::str::from_utf8(&chunk).expect("UTF-8 events"));
    }
}
