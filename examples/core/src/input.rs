//! Strings and lists that arrive from gateways, made safe to store, log and show.
//!
//! The rule: a gateway id is an identity (a database key, a binding of its token), so a
//! bad one is refused, never rewritten: 1..=128 bytes of printable ASCII without spaces,
//! the agent's own rule for the ids it generates. Every other string (hostname, version,
//! event detail, error messages and rejected items of `Applied`, endpoints, snapshot
//! request reasons) is sanitized: control characters become U+FFFD and the text is cut at
//! its bound (on a character boundary, marked with `…`). Lists are capped the same way.
//! Pure: no I/O.

use gatehouse_proto::v1 as pb;

/// Longest gateway id (bytes).
pub const MAX_GATEWAY_ID: usize = 128;
/// Longest hostname (a DNS name).
pub const MAX_NAME: usize = 253;
/// Longest agent version.
pub const MAX_VERSION: usize = 64;
/// Longest free text: event detail, snapshot request reason, rejection reason.
pub const MAX_TEXT: usize = 512;
/// Longest error message of an `Applied`.
pub const MAX_MESSAGE: usize = 1024;
/// Longest rejected item path or endpoint.
pub const MAX_ITEM: usize = 256;
/// Rejections kept from one `Applied` (the agent lists at most 101).
pub const MAX_REJECTIONS: usize = 128;

/// Why a gateway id is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadGatewayId {
    #[error("the gateway id is empty")]
    Empty,
    #[error("the gateway id is longer than {MAX_GATEWAY_ID} bytes")]
    TooLong,
    #[error("the gateway id must be printable ASCII without spaces")]
    NotPrintable,
}

/// Checks a gateway id (refused, never rewritten).
pub fn gateway_id(id: &str) -> Result<&str, BadGatewayId> {
    if id.is_empty() {
        Err(BadGatewayId::Empty)
    } else if id.len() > MAX_GATEWAY_ID {
        Err(BadGatewayId::TooLong)
    } else if !id.bytes().all(|b| b.is_ascii_graphic()) {
        Err(BadGatewayId::NotPrintable)
    } else {
        Ok(id)
    }
}

/// `s` with control characters replaced and cut to at most `max` bytes.
pub fn text(s: &str, max: usize) -> String {
    const CUT: char = '…';
    let clean = |c: char| if c.is_control() { '\u{FFFD}' } else { c };
    if s.len() <= max && !s.chars().any(char::is_control) {
        return s.to_owned();
    }
    let mut out = String::with_capacity(max.min(s.len()));
    for c in s.chars().map(clean) {
        if out.len() + c.len_utf8() > max {
            // Make room for the mark.
            while out.len() + CUT.len_utf8() > max {
                if out.pop().is_none() {
                    break;
                }
            }
            if out.len() + CUT.len_utf8() <= max {
                out.push(CUT);
            }
            return out;
        }
        out.push(c);
    }
    out
}

/// A `Hello` whose strings are safe (the id is checked separately and kept as is).
pub fn hello(h: &pb::Hello) -> pb::Hello {
    pb::Hello {
        gateway_id: h.gateway_id.clone(),
        name: text(&h.name, MAX_NAME),
        version: text(&h.version, MAX_VERSION),
        applied_revision: h.applied_revision,
        pending_events: h.pending_events.iter().map(event).collect(),
    }
}

/// A `PeerEvent` whose detail is safe.
pub fn event(e: &pb::PeerEvent) -> pb::PeerEvent {
    pb::PeerEvent {
        detail: text(&e.detail, MAX_TEXT),
        ..e.clone()
    }
}

/// An `Applied` whose error is safe and whose rejections are capped.
pub fn applied(a: &pb::Applied) -> pb::Applied {
    let error = a.error.as_ref().map(|e| {
        let mut rejected: Vec<pb::Rejection> = e
            .rejected
            .iter()
            .take(MAX_REJECTIONS)
            .map(|r| pb::Rejection {
                item: text(&r.item, MAX_ITEM),
                reason: text(&r.reason, MAX_TEXT),
            })
            .collect();
        if e.rejected.len() > MAX_REJECTIONS {
            rejected.push(pb::Rejection {
                item: "...".into(),
                reason: format!(
                    "{} more rejections dropped by the Core",
                    e.rejected.len() - MAX_REJECTIONS
                ),
            });
        }
        pb::ApplyError {
            kind: e.kind,
            message: text(&e.message, MAX_MESSAGE),
            rejected,
        }
    });
    pb::Applied { error, ..a.clone() }
}

/// A stats row's endpoint, safe to store (the Core stores no other string of it).
pub fn endpoint(s: &str) -> String {
    text(s, MAX_ITEM)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_ids_are_refused_not_rewritten() {
        assert_eq!(gateway_id("gw-1"), Ok("gw-1"));
        assert_eq!(gateway_id(""), Err(BadGatewayId::Empty));
        assert_eq!(gateway_id(&"a".repeat(129)), Err(BadGatewayId::TooLong));
        assert!(gateway_id(&"a".repeat(128)).is_ok());
        for bad in ["gw 1", "gw\n1", "gw\u{1b}[31m", "gwé"] {
            assert_eq!(gateway_id(bad), Err(BadGatewayId::NotPrintable), "{bad:?}");
        }
    }

    #[test]
    fn text_replaces_controls_and_cuts_on_a_char_boundary() {
        assert_eq!(text("host-1", 10), "host-1");
        assert_eq!(text("a\u{1b}[2Jb\n", 20), "a\u{FFFD}[2Jb\u{FFFD}");
        let cut = text(&"é".repeat(100), 11);
        assert!(cut.len() <= 11, "{cut}");
        assert!(cut.ends_with('…'));
        assert_eq!(cut, "éééé…");
        assert_eq!(text(&"x".repeat(5000), MAX_TEXT).len(), MAX_TEXT);
        assert_eq!(text("abc", 2), "");
    }

    #[test]
    fn applied_rejections_are_capped_and_clean() {
        let a = pb::Applied {
            revision: 1,
            attempted_revision: 2,
            error: Some(pb::ApplyError {
                kind: 1,
                message: "m\u{7}".repeat(2000),
                rejected: (0..1000)
                    .map(|i| pb::Rejection {
                        item: format!("peers[{i}]"),
                        reason: "bad\r\n".into(),
                    })
                    .collect(),
            }),
        };
        let e = applied(&a).error.unwrap();
        assert_eq!(e.rejected.len(), MAX_REJECTIONS + 1);
        assert!(e.message.len() <= MAX_MESSAGE);
        assert!(!e.message.chars().any(char::is_control));
        assert_eq!(e.rejected[0].reason, "bad\u{FFFD}\u{FFFD}");
        assert!(e.rejected[MAX_REJECTIONS].reason.contains("872 more"));
    }
}
