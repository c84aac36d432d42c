//! A redacting wrapper for secrets taken from the configuration (the Core token).
//!
//! `Secret` has no `Display` and no `Serialize`; its `Debug` prints `<redacted>`; its memory
//! is zeroed on drop. The only way to the value is [`Secret::expose`], which the gRPC client
//! calls when it builds the `authorization` header.

use std::fmt;
use std::str::FromStr;

use zeroize::Zeroizing;

/// A secret string (token). Never printed: `Debug` shows `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

/// What a secret is shown as in `Debug` output and in `check-config`.
pub const REDACTED: &str = "<redacted>";

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: String) -> Self {
        Secret(Zeroizing::new(value))
    }

    /// The secret value, for the one place that must send it. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True for an empty secret (an unset token).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret::new(value)
    }
}

/// For clap's value parser (`--token`).
impl FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret::new(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let s = Secret::new("hunter2-token".into());
        let shown = format!("{s:?} {:?}", Some(s.clone()));
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains(REDACTED));
        assert_eq!(s.expose(), "hunter2-token");
    }
}
