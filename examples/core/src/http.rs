//! The admin HTTP JSON API (`/api/v1/...`, bearer admin token), as the design's table
//! lists it. Handlers only parse, call the store through `Shared`, and answer.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::DefaultBodyLimit;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::api;
use crate::error::CoreError;
use crate::page::PageQuery;
use crate::shared::{now_ms, Shared};

#[derive(Clone)]
struct AppState {
    shared: Arc<Shared>,
    /// SHA-256 of the admin token (compared digest to digest).
    admin_token_hash: Arc<[u8]>,
}

/// The admin router.
pub fn router(shared: Arc<Shared>, admin_token: &str) -> Router {
    let state = AppState {
        shared,
        admin_token_hash: digest(admin_token).into(),
    };
    let loc = "/api/v1/locations/{id}";
    // Health for container checks and load balancers: no token, no data.
    let health = Router::new()
        .route("/readyz", get(readyz))
        .with_state(state.clone());
    let admin = Router::new()
        .route("/api/v1/locations", post(create_location))
        .route(loc, get(get_location).patch(patch_location))
        .route(
            &format!("{loc}/tokens"),
            get(list_tokens).post(create_token),
        )
        .route(
            &format!("{loc}/tokens/{{token_id}}"),
            axum::routing::delete(revoke_token),
        )
        .route(&format!("{loc}/peers"), get(list_peers).post(add_peers))
        .route(
            &format!("{loc}/peers/{{peer_id}}"),
            axum::routing::patch(patch_peer).delete(delete_peer),
        )
        .route(
            &format!("{loc}/peers/{{peer_id}}/mfa-session"),
            post(start_mfa).delete(end_mfa),
        )
        .route(&format!("{loc}/gateways"), get(gateways))
        .route(&format!("{loc}/stats"), get(stats))
        .route(&format!("{loc}/events"), get(events))
        .route(&format!("{loc}/firewall"), axum::routing::put(put_firewall))
        .route("/api/v1/audit", get(audit_findings))
        .fallback(|| async { CoreError::not_found("no such endpoint") })
        // Bulk peer adds of many thousand peers are legitimate.
        .layer(DefaultBodyLimit::max(gatehouse_proto::MAX_MESSAGE_BYTES))
        .layer(middleware::from_fn_with_state(state.clone(), require_admin))
        .with_state(state);
    health.merge(admin)
}

/// `GET /readyz`: 200 once the store answers (it is taken on the blocking pool, as every
/// request does), so a wedged store turns the health check red.
async fn readyz(State(state): State<AppState>) -> Response {
    match state.shared.read(|_| Ok(())).await {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(e) => e.into_response(),
    }
}

fn digest(s: &str) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, s.as_bytes())
        .as_ref()
        .to_vec()
}

async fn require_admin(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(t) if digest(t).as_slice() == &*state.admin_token_hash => next.run(req).await,
        _ => CoreError::Unauthorized.into_response(),
    }
}

/// `Json` whose rejections answer in the API's error shape.
struct Body<T>(T);

impl<S, T> FromRequest<S> for Body<T>
where
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = CoreError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(e) => Err(CoreError::Invalid {
                msg: e.body_text(),
                field: None,
            }),
        }
    }
}

/// `?limit=N&after=ID`, whose rejections answer in the API's error shape.
struct Paging(PageQuery);

impl<S: Send + Sync> FromRequestParts<S> for Paging {
    type Rejection = CoreError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, CoreError> {
        match Query::<PageQuery>::from_request_parts(parts, state).await {
            Ok(Query(q)) => Ok(Paging(q)),
            Err(e) => Err(CoreError::Invalid {
                msg: e.body_text(),
                field: None,
            }),
        }
    }
}

type ApiResult<T> = Result<T, CoreError>;

async fn create_location(
    State(st): State<AppState>,
    Body(new): Body<api::NewLocation>,
) -> ApiResult<(StatusCode, Json<api::LocationView>)> {
    let now = now_ms();
    let view = st.shared.read(move |s| s.create_location(new, now)).await?;
    tracing::info!(location = view.id, name = %view.name, "location created");
    Ok((StatusCode::CREATED, Json(view)))
}

async fn get_location(
    State(st): State<AppState>,
    Path(id): Path<u64>,
) -> ApiResult<Json<api::LocationView>> {
    Ok(Json(st.shared.read(move |s| s.location(id)).await?))
}

async fn patch_location(
    State(st): State<AppState>,
    Path(id): Path<u64>,
    Body(patch): Body<api::LocationPatch>,
) -> ApiResult<Json<api::LocationView>> {
    let view = st
        .shared
        .change(id, move |s| {
            let (view, delta) = s.patch_location(id, patch)?;
            Ok((view, Some(delta)))
        })
        .await?;
    Ok(Json(view))
}

async fn create_token(
    State(st): State<AppState>,
    Path(id): Path<u64>,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<api::TokenView>)> {
    let now = now_ms();
    // The body is optional: empty means an unbound token that never expires.
    let new = if body.iter().all(u8::is_ascii_whitespace) {
        api::NewToken::default()
    } else {
        serde_json::from_slice::<api::NewToken>(&body).map_err(|e| CoreError::Invalid {
            msg: format!("invalid JSON body: {e}"),
            field: None,
        })?
    };
    let token = st
        .shared
        .read(move |s| s.create_token(id, &new, now))
        .await?;
    tracing::info!(location = id, token_id = token.id, "gateway token created");
    Ok((StatusCode::CREATED, Json(token)))
}

async fn list_tokens(
    State(st): State<AppState>,
    Path(id): Path<u64>,
    Paging(q): Paging,
) -> ApiResult<Json<Vec<api::TokenInfo>>> {
    let page = q.check(true)?;
    Ok(Json(st.shared.read(move |s| s.tokens(id, page)).await?))
}

/// Deletes the token, then ends the streams that use it.
async fn revoke_token(
    State(st): State<AppState>,
    Path((id, token_id)): Path<(u64, u64)>,
) -> ApiResult<StatusCode> {
    st.shared
        .read(move |s| s.revoke_token(id, token_id))
        .await?;
    // No receiver: no stream is open.
    let _ = st.shared.revocations.send(token_id);
    tracing::info!(location = id, token_id, "gateway token revoked");
    Ok(StatusCode::NO_CONTENT)
}

async fn list_peers(
    State(st): State<AppState>,
    Path(id): Path<u64>,
    Paging(q): Paging,
) -> ApiResult<Json<Vec<api::PeerView>>> {
    let page = q.check(true)?;
    Ok(Json(st.shared.read(move |s| s.peers(id, &page)).await?))
}

async fn add_peers(
    State(st): State<AppState>,
    Path(id): Path<u64>,
    Body(body): Body<api::NewPeers>,
) -> ApiResult<Response> {
    let now = now_ms();
    let (peers, many) = match body {
        api::NewPeers::One(p) => (vec![p], false),
        api::NewPeers::Many(v) => (v, true),
    };
    let mut views = st
        .shared
        .change(id, move |s| {
            let (views, delta) = s.add_peers(id, peers, now, many)?;
            Ok((views, Some(delta)))
        })
        .await?;
    let body = if many {
        Json(views).into_response()
    } else {
        match views.pop() {
            Some(v) => Json(v).into_response(),
            None => return Err(CoreError::Internal("added peer not found".into())),
        }
    };
    Ok((StatusCode::CREATED, body).into_response())
}

async fn patch_peer(
    State(st): State<AppState>,
    Path((id, peer)): Path<(u64, u64)>,
    Body(patch): Body<api::PeerPatch>,
) -> ApiResult<Json<api::PeerView>> {
    let view = st
        .shared
        .change(id, move |s| {
            let (view, delta) = s.patch_peer(id, peer, patch)?;
            Ok((view, Some(delta)))
        })
        .await?;
    Ok(Json(view))
}

async fn delete_peer(
    State(st): State<AppState>,
    Path((id, peer)): Path<(u64, u64)>,
) -> ApiResult<Json<api::RevisionView>> {
    let revision = st
        .shared
        .change(id, move |s| {
            let delta = s.delete_peer(id, peer)?;
            Ok((delta.revision, Some(delta)))
        })
        .await?;
    Ok(Json(api::RevisionView { revision }))
}

async fn start_mfa(
    State(st): State<AppState>,
    Path((id, peer)): Path<(u64, u64)>,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<api::MfaSessionStarted>)> {
    let now = now_ms();
    // The body is optional: empty means "generate the preshared key".
    let psk = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        serde_json::from_slice::<api::NewMfaSession>(&body)
            .map_err(|e| CoreError::Invalid {
                msg: format!("invalid JSON body: {e}"),
                field: None,
            })?
            .preshared_key
    };
    let started = st
        .shared
        .change(id, move |s| {
            let (started, delta) = s.start_mfa(id, peer, psk.as_deref(), now)?;
            Ok((started, Some(delta)))
        })
        .await?;
    tracing::info!(
        location = id,
        peer,
        session = started.session_id,
        "MFA session started"
    );
    Ok((StatusCode::CREATED, Json(started)))
}

async fn end_mfa(
    State(st): State<AppState>,
    Path((id, peer)): Path<(u64, u64)>,
) -> ApiResult<Json<api::RevisionView>> {
    let now = now_ms();
    let revision = st
        .shared
        .change(id, move |s| {
            let delta = s.end_mfa(id, peer, now)?;
            Ok((delta.revision, Some(delta)))
        })
        .await?;
    tracing::info!(location = id, peer, "MFA session ended");
    Ok(Json(api::RevisionView { revision }))
}

async fn gateways(
    State(st): State<AppState>,
    Path(id): Path<u64>,
    Paging(q): Paging,
) -> ApiResult<Json<Vec<api::GatewayView>>> {
    let page = q.check(false)?;
    let mut rows = st.shared.read(move |s| s.gateways(id, &page)).await?;
    let live = st.shared.hub.connected(id);
    for row in &mut rows {
        row.connected = live.contains(&row.gateway_id);
    }
    Ok(Json(rows))
}

async fn stats(
    State(st): State<AppState>,
    Path(id): Path<u64>,
    Paging(q): Paging,
) -> ApiResult<Json<Vec<api::StatsView>>> {
    let page = q.check(true)?;
    Ok(Json(st.shared.read(move |s| s.stats(id, &page)).await?))
}

async fn events(
    State(st): State<AppState>,
    Path(id): Path<u64>,
    Paging(q): Paging,
) -> ApiResult<Json<Vec<api::EventView>>> {
    let page = q.check(true)?;
    Ok(Json(st.shared.read(move |s| s.events(id, &page)).await?))
}

async fn put_firewall(
    State(st): State<AppState>,
    Path(id): Path<u64>,
    Body(policy): Body<api::FirewallPolicy>,
) -> ApiResult<Json<api::FirewallPolicy>> {
    let policy = st
        .shared
        .change(id, move |s| {
            let (policy, delta) = s.put_firewall(id, policy)?;
            Ok((policy, Some(delta)))
        })
        .await?;
    Ok(Json(policy))
}

/// Stored items that fail the shared rules (checked at start) and what is served instead.
async fn audit_findings(State(st): State<AppState>) -> ApiResult<Json<Vec<crate::audit::Finding>>> {
    Ok(Json(st.shared.read(|s| Ok(s.audit_findings())).await?))
}
