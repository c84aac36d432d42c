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

    /// A new gateway token for the location (unbound, no expiry): its secret.
    pub async fn create_token(&self, location: u64) -> Result<String> {
        let t: TokenView = self
            .call(Method::POST, &tokens(location), None::<&()>)
            .await?;
        Ok(t.token)
    }

    /// A new gateway token, bound to a gateway id and/or expiring: its id and secret.
    pub async fn create_gateway_token(&self, location: u64, new: &NewToken) -> Result<TokenView> {
        self.call(Method::POST, &tokens(location), Some(new)).await
    }

    /// Every token of the location (never their secrets).
    pub async fn tokens(&self, location: u64) -> Result<Vec<TokenInfo>> {
        self.all(&tokens(location), |t: &TokenInfo| t.id.to_string())
            .await
    }

    /// Revokes a token: streams using it end, and it is refused from now on.
    pub async fn revoke_token(&self, location: u64, token_id: u64) -> Result<()> {
        let path = format!("{}/{token_id}", tokens(location));
        self.call_empty(Method::DELETE, &path).await
    }

    /// One page of a list endpoint (`path` without query): `?limit=N&after=ID`.
    pub async fn page<T: DeserializeOwned>(
        &self,
        path: &str,
        limit: u32,
        after: Option<&str>,
    ) -> Result<Vec<T>> {
        let mut query = format!("{path}?limit={limit}");
        if let Some(a) = after {
            query.push_str("&after=");
            query.push_str(&urlencode(a));
        }
        self.get(&query).await
    }

    /// Every item of a list endpoint, page by page; `key` is the item's pagination key.
    async fn all<T: DeserializeOwned>(
        &self,
        path: &str,
        key: impl Fn(&T) -> String,
    ) -> Result<Vec<T>> {
        let mut out: Vec<T> = Vec::new();
        loop {
            let after = out.last().map(&key);
            let page: Vec<T> = self.page(path, LIST_PAGE, after.as_deref()).await?;
            let last = page.len() < LIST_PAGE as usize;
            out.extend(page);
            if last {
                return Ok(out);
            }
        }
    }

    /// Adds one peer.
    pub async fn add_peer(&self, location: u64, peer: &NewPeer) -> Result<PeerView> {
        self.call(Method::POST, &peers(location), Some(peer)).await
    }

    /// Adds many peers in one revision.
    pub async fn add_peers(&self, location: u64, new: &[NewPeer]) -> Result<Vec<PeerView>> {
        self.call(Method::POST, &peers(location), Some(&new)).await
    }

    /// Every peer of the location (all pages).
    pub async fn peers(&self, location: u64) -> Result<Vec<PeerView>> {
        self.all(&peers(location), |p: &PeerView| p.id.to_string())
            .await
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

    /// Every gateway seen (all pages).
    pub async fn gateways(&self, location: u64) -> Result<Vec<GatewayView>> {
        let path = format!("/api/v1/locations/{location}/gateways");
        self.all(&path, |g: &GatewayView| g.gateway_id.clone())
            .await
    }

    /// `GET /api/v1/audit`: stored items that fail the shared rules.
    pub async fn audit(&self) -> Result<Vec<crate::audit::Finding>> {
        self.get("/api/v1/audit").await
    }

    /// Every stats row (all pages).
    pub async fn stats(&self, location: u64) -> Result<Vec<StatsView>> {
        let path = format!("/api/v1/locations/{location}/stats");
        self.all(&path, |r: &StatsView| r.id.to_string()).await
    }

    /// Every event (all pages).
    pub async fn events(&self, location: u64) -> Result<Vec<EventView>> {
        let path = format!("/api/v1/locations/{location}/events");
        self.all(&path, |e: &EventView| e.id.to_string()).await
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

    /// A call whose success has no body (204).
    async fn call_empty(&self, method: Method, path: &str) -> Result<()> {
        let resp = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await?;
        if resp.status().is_success() {
            return Ok(());
        }
        Err(api_error(resp).await)
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
        Err(api_error(resp).await)
    }
}

/// Items per page when a list is read whole.
const LIST_PAGE: u32 = 1000;

async fn api_error(resp: reqwest::Response) -> ClientError {
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(ErrorBody {
        error: text,
        field: None,
    });
    ClientError::Api { status, body }
}

/// Percent-encodes a query value (gateway ids are printable ASCII).
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn tokens(location: u64) -> String {
    format!("/api/v1/locations/{location}/tokens")
}

fn peers(location: u64) -> String {
    format!("/api/v1/locations/{location}/peers")
}
