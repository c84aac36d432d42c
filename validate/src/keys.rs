//! Keys: 32 bytes; no all-zero private or preshared key (WireGuard reads an all-zero key as
//! "no key"); no low-order public key (any shared secret with it is all-zero).

/// Exactly 32 bytes.
pub fn key32(bytes: &[u8]) -> Result<[u8; 32], String> {
    <[u8; 32]>::try_from(bytes).map_err(|_| format!("must be 32 bytes, got {}", bytes.len()))
}

/// A peer's (or the interface's) public key: 32 bytes, not of low order.
pub fn public_key(bytes: &[u8]) -> Result<[u8; 32], String> {
    let key = key32(bytes)?;
    if is_low_order(&key) {
        return Err("is a low-order point (no shared secret can be derived)".into());
    }
    Ok(key)
}

/// An interface private key: 32 bytes, not all zero.
pub fn private_key(bytes: &[u8]) -> Result<[u8; 32], String> {
    let key = key32(bytes)?;
    if key == [0; 32] {
        return Err("must not be all zero".into());
    }
    Ok(key)
}

/// A preshared key: empty (none) or 32 bytes, not all zero.
pub fn preshared_key(bytes: &[u8]) -> Result<Option<[u8; 32]>, String> {
    if bytes.is_empty() {
        return Ok(None);
    }
    let key =
        key32(bytes).map_err(|_| format!("must be 32 bytes or empty, got {}", bytes.len()))?;
    if key == [0; 32] {
        return Err("must not be all zero (leave it empty for no preshared key)".into());
    }
    Ok(Some(key))
}

/// Whether `u` (a Montgomery u-coordinate, any encoding) has order dividing 8: multiplied by
/// a clamped scalar (a multiple of 8 that is not a multiple of either prime subgroup order) it
/// gives the all-zero point exactly then. This is WireGuard's own test on the DH result.
pub fn is_low_order(u: &[u8; 32]) -> bool {
    x25519_dalek::x25519([0x5a; 32], *u) == [0; 32]
}

/// The interface's public key for a private key (clamped as WireGuard does).
pub fn public_of(private: &[u8; 32]) -> [u8; 32] {
    x25519_dalek::x25519(*private, x25519_dalek::X25519_BASEPOINT_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> [u8; 32] {
        let mut out = [0; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }

    /// The known small-order u-coordinates (and their non-canonical encodings).
    const LOW_ORDER: [&str; 7] = [
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0100000000000000000000000000000000000000000000000000000000000000",
        "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
        "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    ];

    #[test]
    fn low_order_points_are_rejected_in_every_encoding() {
        for h in LOW_ORDER {
            let mut k = hex(h);
            assert!(public_key(&k).is_err(), "{h}");
            k[31] |= 0x80; // the high bit is ignored by X25519
            assert!(public_key(&k).is_err(), "{h} with the high bit");
        }
    }

    #[test]
    fn real_public_keys_pass() {
        for seed in 1..=50u8 {
            let pk = public_of(&[seed; 32]);
            assert_eq!(public_key(&pk), Ok(pk));
        }
        assert!(public_key(&[7; 32]).is_ok());
        assert!(public_key(&[7; 31]).is_err());
    }

    #[test]
    fn zero_secrets_are_rejected() {
        assert!(private_key(&[0; 32]).is_err());
        assert!(private_key(&[1; 32]).is_ok());
        assert!(private_key(&[1; 33]).is_err());
        assert!(preshared_key(&[0; 32]).is_err());
        assert_eq!(preshared_key(&[]), Ok(None));
        assert_eq!(preshared_key(&[3; 32]), Ok(Some([3; 32])));
        assert!(preshared_key(&[3; 5]).is_err());
    }
}
