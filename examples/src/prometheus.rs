//! Serving a router's metrics to Prometheus. The library records through the `metrics`
//! facade and ships no exporter; a service installs one. This is the whole recipe with
//! `metrics-exporter-prometheus`: install its recorder, then answer `GET /metrics` with its
//! rendering (here with a minimal HTTP/1.1 responder on tokio, to stay small; a service would
//! add the route to its own web server, or enable the exporter's `http-listener` feature).

use std::io;

use metrics_exporter_prometheus::{BuildError, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Installs the Prometheus recorder as the process's global `metrics` recorder. Once per
/// process, before the router is built (so it sees the metric descriptions).
pub fn install_recorder() -> Result<PrometheusHandle, BuildError> {
    PrometheusBuilder::new()
        // Latencies as histograms with buckets from 100 us to 5 s (the default is summaries).
        .set_buckets(&[
            0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
        ])?
        .install_recorder()
}

/// Answers every HTTP request on `listener` with the current metrics, until the task is
/// dropped.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle) -> io::Result<()> {
    loop {
        let (mut stream, _) = listener.accept().await?;
        let handle = handle.clone();
        tokio::spawn(async move {
            // Read the request head (we answer every path alike).
            let mut buf = [0u8; 4096];
            let mut head = Vec::new();
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let body = handle.render();
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// `GET /metrics` on `addr`, for the test and the example's self-check.
pub async fn scrape(addr: std::net::SocketAddr) -> io::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    match text.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_string()),
        _ => Err(io::Error::other(format!("unexpected answer: {text:.200}"))),
    }
}
