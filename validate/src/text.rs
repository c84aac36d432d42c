//! Names and strings: an interface name is 1..15 bytes of `[A-Za-z0-9_.-]` (so `wg%d`, which
//! the kernel would expand to a new name at every creation, is refused); strings from the
//! network are bounded in length and printable.

/// Longest location name, firewall comment, gateway name or version accepted (bytes).
pub const MAX_TEXT: usize = 256;

/// A Linux interface name (IFNAMSIZ - 1 bytes), not `.` or `..`.
pub fn interface_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 15 {
        return Err(format!("{name:?}: must be 1 to 15 bytes long"));
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not a valid interface name"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!(
            "{name:?}: must not contain {c:?} (only A-Z a-z 0-9 _ . -)"
        ));
    }
    Ok(())
}

/// A string from the network: at most `max` bytes, no control characters.
pub fn printable(s: &str, max: usize) -> Result<(), String> {
    if s.len() > max {
        return Err(format!("{} bytes is longer than {max}", s.len()));
    }
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(format!("contains the control character {c:?}"));
    }
    Ok(())
}

/// A string as the admin wrote it: trimmed, then [`printable`].
pub fn normalize_printable(s: &str, max: usize) -> Result<String, String> {
    let t = s.trim();
    printable(t, max)?;
    Ok(t.to_owned())
}

/// A string on the wire: printable and already trimmed.
pub fn canonical_printable(s: &str, max: usize) -> Result<(), String> {
    printable(s, max)?;
    if s.trim() != s {
        return Err(format!("surrounding whitespace in {s:?}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names() {
        for good in ["wg0", "a", "gatehouse-01234", "wg_0.1"] {
            assert!(interface_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "gatehouse-012345",
            "wg%d",
            "wg/0",
            "wg 0",
            "wg:0",
            ".",
            "..",
            "wg\t",
            "wgé",
        ] {
            assert!(interface_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn strings() {
        assert!(printable("office 1", 10).is_ok());
        assert!(printable("office\n", 10).is_err());
        assert!(printable("x".repeat(11).as_str(), 10).is_err());
        assert_eq!(normalize_printable("  office ", 10).unwrap(), "office");
        assert!(canonical_printable(" office", 10).is_err());
        assert!(canonical_printable("office", 10).is_ok());
    }
}
