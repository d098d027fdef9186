//! `mqtt-gateway healthcheck`: is the gateway on this machine ready? For container health checks
//! (Docker's `HEALTHCHECK`), so the image needs no curl.
//!
//! One HTTP/1.1 `GET /readyz` over a plain TCP connection: 200 means connected to the broker and
//! subscribed. Part of the binary only, not the library: nothing else needs an HTTP client.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// The whole check, connect to status line. `/readyz` answers from memory, so on a healthy
/// gateway this takes a millisecond; two seconds leaves room for a loaded machine while staying
/// under Docker's default health check timeout (30 s) by far.
const TIMEOUT: Duration = Duration::from_secs(2);

/// Checks `GET /readyz` on the gateway listening on `listen` (the `serve --listen` address);
/// an unspecified address (`0.0.0.0`, `[::]`) is reached through loopback. Ok with a line to
/// print when it answers 200.
pub(crate) async fn check(listen: SocketAddr) -> Result<String, String> {
    let addr = reachable(listen);
    let url = format!("http://{addr}/readyz");
    let status = tokio::time::timeout(TIMEOUT, status_of_readyz(addr))
        .await
        .map_err(|_| format!("{url}: no answer within {TIMEOUT:?}"))?
        .map_err(|e| format!("{url}: {e}"))?;
    if status == 200 {
        Ok(format!("{url}: 200, ready"))
    } else {
        Err(format!("{url}: {status}, not ready"))
    }
}

/// Where to connect to reach a server bound to `listen`.
fn reachable(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// The status code of `GET /readyz`, read from the status line (`HTTP/1.1 200 OK`).
async fn status_of_readyz(addr: SocketAddr) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!("GET /readyz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut status_line = String::new();
    // A status line is a few dozen bytes; the cap keeps a wrong server from feeding us forever.
    BufReader::new(stream)
        .take(256)
        .read_line(&mut status_line)
        .await?;
    status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not an HTTP status line: {:?}", status_line.trim_end()),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_addresses_are_checked_on_loopback() {
        let at = |s: &str| reachable(s.parse().unwrap()).to_string();
        assert_eq!(at("0.0.0.0:8080"), "127.0.0.1:8080");
        assert_eq!(at("[::]:8080"), "[::1]:8080");
        assert_eq!(at("10.1.2.3:9000"), "10.1.2.3:9000");
    }
}
