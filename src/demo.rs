//! A tiny backend for demos and tests: answers every request with what it received.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use axum::Router;
use axum::http::{HeaderMap, Method, Uri};

async fn echo(method: Method, uri: Uri, headers: HeaderMap) -> String {
    let host = headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("-");
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    format!("portcullis demo backend\nmethod: {method}\npath: {path}\nhost: {host}\n")
}

pub async fn run(listen: SocketAddr) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    println!(
        "demo backend listening on http://{}",
        listener.local_addr()?
    );
    axum::serve(listener, Router::new().fallback(echo))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
