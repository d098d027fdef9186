//! A steady load of calls through the balancer, every answer recorded.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use test_support::ClusterStack;

/// One call and how it ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// When it was sent.
    pub sent_at: Instant,
    /// Its status; 0 when the connection failed.
    pub status: u16,
    /// The problem code, for a gateway's problem+json.
    pub code: Option<String>,
    /// `Mqtt-Request-Sent`, when the gateway answered with a problem.
    pub sent: Option<String>,
    /// Whether the answer was a gateway's problem+json (not the balancer's own page).
    pub problem: bool,
    /// Why no answer came, when none did.
    pub error: Option<String>,
}

/// `clients` clients, each calling `delay` (the device waits `work`) in a loop, alternating
/// over the stack's devices, through the balancer.
pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Outcome>>>,
}

impl Load {
    pub fn start(stack: &ClusterStack, clients: usize, work: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let devices = stack.device_ids();
        let tasks = (0..clients)
            .map(|c| {
                let stop = stop.clone();
                let url = format!(
                    "{}/api/v1/devices/{}/services/delay?timeout_ms=5000",
                    stack.url(),
                    devices[c % devices.len()]
                );
                let body = work.as_millis().to_string();
                tokio::spawn(async move {
                    let http = test_support::http_client();
                    let mut outcomes = Vec::new();
                    while !stop.load(Ordering::SeqCst) {
                        let sent_at = Instant::now();
                        let response = http
                            .post(&url)
                            .body(body.clone())
                            .timeout(Duration::from_secs(10))
                            .send()
                            .await;
                        let outcome = match response {
                            Ok(response) => {
                                let status = response.status().as_u16();
                                let header = |name: &str| {
                                    response
                                        .headers()
                                        .get(name)
                                        .and_then(|v| v.to_str().ok())
                                        .map(str::to_owned)
                                };
                                let problem = header("content-type").as_deref()
                                    == Some("application/problem+json");
                                let sent = header("mqtt-request-sent");
                                let text = response.text().await.unwrap_or_default();
                                let code = serde_json::from_str::<serde_json::Value>(&text)
                                    .ok()
                                    .and_then(|v| v["code"].as_str().map(str::to_owned));
                                Outcome {
                                    sent_at,
                                    status,
                                    code: code.filter(|_| problem),
                                    sent,
                                    problem,
                                    error: None,
                                }
                            }
                            Err(e) => Outcome {
                                sent_at,
                                status: 0,
                                code: None,
                                sent: None,
                                problem: false,
                                error: Some(format!("{e:?}")),
                            },
                        };
                        outcomes.push(outcome);
                    }
                    outcomes
                })
            })
            .collect();
        Self { stop, tasks }
    }

    /// Stops the clients and returns every outcome, in the order each client had them.
    pub async fn stop(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::SeqCst);
        let mut all = Vec::new();
        for task in self.tasks {
            all.extend(task.await.expect("a load client"));
        }
        all
    }
}
