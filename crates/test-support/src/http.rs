//! HTTP clients for tests and the benchmark: reqwest for ordinary calls, and raw HTTP/2 with
//! flow-control windows of our choosing, for clients that read or send nothing.

use std::net::SocketAddr;

use bytes::Bytes;
use tokio::net::TcpStream;

/// A reqwest client: no proxy from the environment, a large idle pool (tests make many calls).
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(1024)
        .build()
        .expect("HTTP client")
}

/// An HTTP/2 (prior knowledge) client whose stream windows are `window` bytes: 0 is a client
/// that reads no response body. The connection is driven by a task of its own.
pub async fn h2_client(
    addr: SocketAddr,
    window: u32,
) -> Result<h2::client::SendRequest<Bytes>, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(window)
        .max_concurrent_streams(1000)
        .handshake::<_, Bytes>(tcp)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A POST head for [`h2_client`], with a `content-length` when given.
pub fn h2_post(addr: SocketAddr, path: &str, length: Option<usize>) -> http::Request<()> {
    let mut request = http::Request::post(format!("http://{addr}{path}"));
    if let Some(length) = length {
        request = request.header("content-length", length);
    }
    request.body(()).expect("a valid request")
}
