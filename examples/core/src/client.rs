//! A small typed client of the admin API, for tests, demos and scripts.
//! Every call returns the API's serde structs; a 4xx/5xx becomes [`ClientError::Api`]
//! with the status and the `{"error", "field"}` body.

use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api::*;

/// What can go wrong calling the admin API.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("admin API request failed: {0}")]
    Http(#[from] reqwest::Error),
    #[error("admin API answered {status}: {}{}", body.error,
        body.field.as_deref().map(|f| format!(" (field {f})")).unwrap_or_default())]
    Api { status: StatusCode, body: ErrorBody },
}

impl ClientError {
    /// The HTTP status of an API error.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            ClientError::Http(e) => e.status(),
        }
    }

    /// The field an API error names.
    pub fn field(&self) -> Option<&str> {
        match self {
            ClientError::Api { body, .. } => body.field.as_deref(),
            ClientError::Http(_) => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// The admin API at `base_url` (e.g. `http://127.0.0.1:8080`).
#[derive(Clone)]
pub struct AdminClient {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl std::fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl AdminClient {
    pub fn new(base_url: impl Into<String>, token: impl Into<String>) -> Self {
        AdminClient {
            http: reqwest::Client::new(),
            base: base_url.into().trim_end_matches('/').to_owned(),
            token: token.into(),
        }
    }

    pub async fn create_location(&self, new: &NewLocation) -> Result<LocationView> {
        self.call(Method::POST, "/api/v1/locations", Some(new))
            .await
    }

    pub async fn location(&self, id: u64) -> Result<LocationView> {
        self.get(&format!("/api/v1/locations/{id}")).await
    }

    pub async fn patch_location(&self, id: u64, patch: &LocationPatch) -> Result<LocationView> {
        self.call(
            Method::PATCH,
            &format!("/api/v1/locations/{id}"),
            Some(patch),
        )
        .await
    }

    /// A new gateway token for the location.
    pub async fn create_token(&self, location: u64) -> Result<String> {
        let t: TokenView = self
            .call(
                Method::POST,
                &format!("/api/v1/locations/{location}/tokens"),
                None::<&()>,
            )
            .await?;
        Ok(t.token)
    }

    /// Adds one peer.
    pub async fn add_peer(&self, location: u64, peer: &NewPeer) -> Result<PeerView> {
        self.call(Method::POST, &peers(location), Some(peer)).await
    }

    /// Adds many peers in one revision.
    pub async fn add_peers(&self, location: u64, new: &[NewPeer]) -> Result<Vec<PeerView>> {
        self.call(Method::POST, &peers(location), Some(&new)).await
    }

    pub async fn peers(&self, location: u64) -> Result<Vec<PeerView>> {
        self.get(&peers(location)).await
    }

    pub async fn patch_peer(
        &self,
        location: u64,
        peer: u64,
        patch: &PeerPatch,
    ) -> Result<PeerView> {
        let path = format!("{}/{peer}", peers(location));
        self.call(Method::PATCH, &path, Some(patch)).await
    }

    pub async fn delete_peer(&self, location: u64, peer: u64) -> Result<RevisionView> {
        let path = format!("{}/{peer}", peers(location));
        self.call(Method::DELETE, &path, None::<&()>).await
    }

    /// Starts an MFA session; `preshared_key` (base64) or a generated one.
    pub async fn start_mfa_session(
        &self,
        location: u64,
        peer: u64,
        preshared_key: Option<&str>,
    ) -> Result<MfaSessionStarted> {
        let path = format!("{}/{peer}/mfa-session", peers(location));
        let body = NewMfaSession {
            preshared_key: preshared_key.map(str::to_owned),
        };
        self.call(Method::POST, &path, Some(&body)).await
    }

    pub async fn end_mfa_session(&self, location: u64, peer: u64) -> Result<RevisionView> {
        let path = format!("{}/{peer}/mfa-session", peers(location));
        self.call(Method::DELETE, &path, None::<&()>).await
    }

    pub async fn gateways(&self, location: u64) -> Result<Vec<GatewayView>> {
        self.get(&format!("/api/v1/locations/{location}/gateways"))
            .await
    }

    /// `GET /api/v1/audit`: stored items that fail the shared rules.
    pub async fn audit(&self) -> Result<Vec<crate::audit::Finding>> {
        self.get("/api/v1/audit").await
    }

    pub async fn stats(&self, location: u64) -> Result<Vec<StatsView>> {
        self.get(&format!("/api/v1/locations/{location}/stats"))
            .await
    }

    pub async fn events(&self, location: u64) -> Result<Vec<EventView>> {
        self.get(&format!("/api/v1/locations/{location}/events"))
            .await
    }

    pub async fn put_firewall(
        &self,
        location: u64,
        policy: &FirewallPolicy,
    ) -> Result<FirewallPolicy> {
        let path = format!("/api/v1/locations/{location}/firewall");
        self.call(Method::PUT, &path, Some(policy)).await
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call(Method::GET, path, None::<&()>).await
    }

    async fn call<T: DeserializeOwned, B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp.json().await?);
        }
        let text = resp.text().await.unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(ErrorBody {
            error: text,
            field: None,
        });
        Err(ClientError::Api { status, body })
    }
}

fn peers(location: u64) -> String {
    format!("/api/v1/locations/{location}/peers")
}
