//! The CLI's side of the admin API: where to find it, and one request at a time.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::exit::{CliError, EX_UNAVAILABLE, EX_USAGE};

pub const DEFAULT_STATE_DIR: &str = ".portcullis";

pub struct AdminClient {
    base: String,
    token: String,
    http: Client<HttpConnector, Full<Bytes>>,
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

impl AdminClient {
    /// Explicit values (flags or environment) win; what is missing comes from the state
    /// directory a node wrote (`--state-dir`, else `./.portcullis` when it exists).
    pub fn resolve(
        url: Option<String>,
        token: Option<String>,
        state_dir: Option<&Path>,
    ) -> Result<Self, CliError> {
        let dir: Option<PathBuf> = state_dir.map(Path::to_path_buf).or_else(|| {
            let default = PathBuf::from(DEFAULT_STATE_DIR);
            default.is_dir().then_some(default)
        });
        let from_dir = |file: &str| dir.as_ref().and_then(|d| read_trimmed(&d.join(file)));
        let url = url.or_else(|| from_dir("admin.url")).ok_or_else(|| {
            CliError::new(
                EX_USAGE,
                "no admin API to talk to: pass --admin URL (or set PORTCULLIS_ADMIN_URL), or --state-dir DIR of a running node",
            )
        })?;
        let token = token.or_else(|| from_dir("admin.token")).ok_or_else(|| {
            CliError::new(
                EX_USAGE,
                "no admin token: pass --token (or set PORTCULLIS_ADMIN_TOKEN), or --state-dir DIR of a running node",
            )
        })?;
        let http = Client::builder(TokioExecutor::new()).build_http();
        Ok(AdminClient {
            base: url.trim_end_matches('/').to_string(),
            token,
            http,
        })
    }

    /// Sends one request; a non-2xx answer becomes the API's own error message.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Option<Value>, CliError> {
        let url = format!("{}{path}", self.base);
        let mut builder = Request::builder()
            .method(method)
            .uri(&url)
            .header("authorization", format!("Bearer {}", self.token))
            .header("accept", "application/json");
        let body = match body {
            Some(v) => {
                builder = builder.header("content-type", "application/json");
                Full::new(Bytes::from(v.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        let request = builder
            .body(body)
            .map_err(|e| CliError::new(EX_USAGE, format!("bad admin URL `{url}`: {e}")))?;
        let response = self.http.request(request).await.map_err(|e| {
            CliError::new(
                EX_UNAVAILABLE,
                format!(
                    "cannot reach the admin API at {}: {}; is `portcullis serve` running there?",
                    self.base,
                    portcullis_config::error::chain(&e)
                ),
            )
        })?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| CliError::new(EX_UNAVAILABLE, format!("reading the answer failed: {e}")))?
            .to_bytes();
        if status == StatusCode::NO_CONTENT || bytes.is_empty() {
            return if status.is_success() {
                Ok(None)
            } else {
                Err(CliError::new(1, format!("the admin API answered {status}")))
            };
        }
        let value: Value = serde_json::from_slice(&bytes).map_err(|_| {
            CliError::new(
                1,
                format!(
                    "the admin API answered {status} with something that is not JSON: {}",
                    String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
                ),
            )
        })?;
        if status.is_success() {
            Ok(Some(value))
        } else {
            let message = value["error"]["message"].as_str().unwrap_or("no message");
            let code = value["error"]["code"].as_str().unwrap_or("unknown");
            Err(CliError::new(
                1,
                format!("{message} ({code}, HTTP {})", status.as_u16()),
            ))
        }
    }
}
