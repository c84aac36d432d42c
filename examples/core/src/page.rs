//! Pagination of the admin API's lists: `?limit=N&after=ID`. Bodies stay JSON arrays;
//! items come in their key's order and a page holds the items after `after` (exclusive),
//! at most `limit` of them. A page shorter than `limit` is the last one.
//!
//! The key is the item's `id` (peers, tokens, events, stats) or its `gateway_id`
//! (gateways, ordered by that string).

use serde::Deserialize;

use crate::error::CoreError;

/// Items per page when `limit` is absent.
pub const DEFAULT_LIMIT: u32 = 1000;
/// Largest `limit` accepted.
pub const MAX_LIMIT: u32 = 10_000;

/// The query string as given.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    pub limit: Option<u32>,
    pub after: Option<String>,
}

/// A checked page request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    pub limit: u32,
    pub after: Option<String>,
}

impl Page {
    /// `after` as a numeric id (0: from the start). Checked by [`PageQuery::check`] for
    /// numeric lists.
    pub fn after_id(&self) -> i64 {
        self.after
            .as_deref()
            .and_then(|a| a.parse::<i64>().ok())
            .unwrap_or(0)
    }

    /// `after` as a string key ("": from the start).
    pub fn after_key(&self) -> &str {
        self.after.as_deref().unwrap_or("")
    }
}

impl PageQuery {
    /// Checks the limit (1..=MAX_LIMIT) and, for lists keyed by number, `after`.
    pub fn check(self, numeric: bool) -> Result<Page, CoreError> {
        let limit = self.limit.unwrap_or(DEFAULT_LIMIT);
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(CoreError::invalid(
                "limit",
                format!("must be 1..={MAX_LIMIT}"),
            ));
        }
        if numeric {
            if let Some(a) = &self.after {
                if a.parse::<u64>().map_or(true, |v| v > i64::MAX as u64) {
                    return Err(CoreError::invalid("after", "must be an item id"));
                }
            }
        }
        Ok(Page {
            limit,
            after: self.after,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_and_cursors_are_checked() {
        let q = |limit, after: Option<&str>| PageQuery {
            limit,
            after: after.map(str::to_owned),
        };
        assert_eq!(q(None, None).check(true).unwrap().limit, DEFAULT_LIMIT);
        assert!(q(Some(0), None).check(true).is_err());
        assert!(q(Some(MAX_LIMIT + 1), None).check(true).is_err());
        assert_eq!(q(Some(5), Some("7")).check(true).unwrap().after_id(), 7);
        assert!(q(None, Some("x")).check(true).is_err());
        assert!(q(None, Some("-1")).check(true).is_err());
        assert_eq!(
            q(None, Some("gw-a")).check(false).unwrap().after_key(),
            "gw-a"
        );
    }
}
