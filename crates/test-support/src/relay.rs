//! A TCP relay between a client and the broker that a test can cut.

/// A TCP relay between a client and the broker that a test can cut, to break one client's
/// connection while the broker stays up. A network fault, not a broker mock: every byte is the
/// real broker's.
pub struct FaultyLink {
    pub port: u16,
    down: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultyLink {
    /// Relays loopback connections on a new free port to `broker_port`.
    pub async fn start(broker_port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (down, _) = tokio::sync::watch::channel(false);
        let down_tx = down.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                let mut down_rx = down_tx.subscribe();
                if *down_rx.borrow() {
                    continue; // dropped: the link is down
                }
                tokio::spawn(async move {
                    let Ok(mut server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", broker_port)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = down_rx.wait_for(|down| *down) => {}
                    }
                });
            }
        });
        FaultyLink { port, down, task }
    }

    /// Cuts every connection and refuses new ones until [`FaultyLink::up`].
    pub fn down(&self) {
        self.down.send_replace(true);
    }

    /// Accepts connections again.
    pub fn up(&self) {
        self.down.send_replace(false);
    }

    /// The URL clients use to go through the relay.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for FaultyLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}
