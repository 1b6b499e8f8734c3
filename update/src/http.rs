//! Repositories served over HTTP(S) (`[update] source = "https://…"`, a
//! directory `kiln publish-update` wrote, behind any web server): a tough
//! transport on reqwest, the HTTP client oci-client already brings.

use tough::{Transport, TransportError, TransportErrorKind, TransportStream};
use url::Url;

/// Fetches repository files with HTTP GET.
#[derive(Debug, Clone, Default)]
pub struct HttpTransport {
    client: reqwest::Client,
}

#[tough::async_trait]
impl Transport for HttpTransport {
    async fn fetch(&self, url: Url) -> Result<TransportStream, TransportError> {
        let other = |url: &Url, why: String| {
            TransportError::new_with_cause(TransportErrorKind::Other, url.clone(), why)
        };
        let response = self
            .client
            .get(url.as_str())
            .send()
            .await
            .map_err(|e| other(&url, e.to_string()))?;
        let status = response.status();
        // S3 and CloudFront answer 403 for a key that does not exist.
        if status == reqwest::StatusCode::NOT_FOUND || status == reqwest::StatusCode::FORBIDDEN {
            return Err(TransportError::new(TransportErrorKind::FileNotFound, url));
        }
        if !status.is_success() {
            return Err(other(&url, format!("HTTP {status}")));
        }
        let body = response
            .bytes()
            .await
            .map_err(|e| other(&url, e.to_string()))?;
        Ok(Box::pin(futures::stream::once(async move { Ok(body) })))
    }
}
