//! The Core's error type: what went wrong and which input field it concerns, so the admin
//! API can answer `{"error": ..., "field": ...}` with the right status.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::api::ErrorBody;

/// An error of an admin request or a store operation.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// Malformed input (400).
    #[error("{msg}")]
    Invalid { msg: String, field: Option<String> },
    /// Unknown location, peer or session (404).
    #[error("{msg}")]
    NotFound { msg: String, field: Option<String> },
    /// Input that clashes with stored state (409).
    #[error("{msg}")]
    Conflict { msg: String, field: Option<String> },
    /// Missing or wrong admin token (401).
    #[error("missing or wrong admin token")]
    Unauthorized,
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("internal: {0}")]
    Internal(String),
}

impl CoreError {
    pub fn invalid(field: impl Into<String>, msg: impl Into<String>) -> Self {
        CoreError::Invalid {
            msg: msg.into(),
            field: Some(field.into()),
        }
    }

    pub fn conflict(field: impl Into<String>, msg: impl Into<String>) -> Self {
        CoreError::Conflict {
            msg: msg.into(),
            field: Some(field.into()),
        }
    }

    pub fn not_found(msg: impl Into<String>) -> Self {
        CoreError::NotFound {
            msg: msg.into(),
            field: None,
        }
    }

    /// Prefixes the field with `prefix` (e.g. "[3]." for the fourth peer of a bulk add).
    pub fn in_item(self, prefix: &str) -> Self {
        let wrap = |f: Option<String>| Some(format!("{prefix}{}", f.unwrap_or_default()));
        match self {
            CoreError::Invalid { msg, field } => CoreError::Invalid {
                msg,
                field: wrap(field),
            },
            CoreError::Conflict { msg, field } => CoreError::Conflict {
                msg,
                field: wrap(field),
            },
            other => other,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            CoreError::Invalid { .. } => StatusCode::BAD_REQUEST,
            CoreError::NotFound { .. } => StatusCode::NOT_FOUND,
            CoreError::Conflict { .. } => StatusCode::CONFLICT,
            CoreError::Unauthorized => StatusCode::UNAUTHORIZED,
            CoreError::Db(_) | CoreError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn field(&self) -> Option<String> {
        match self {
            CoreError::Invalid { field, .. }
            | CoreError::NotFound { field, .. }
            | CoreError::Conflict { field, .. } => field.clone(),
            _ => None,
        }
    }
}

impl IntoResponse for CoreError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self, "admin request failed");
        }
        let body = ErrorBody {
            error: self.to_string(),
            field: self.field(),
        };
        (status, Json(body)).into_response()
    }
}
