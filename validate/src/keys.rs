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

/// The u-coordinates of the points of order dividing 8 (0 and 1, the two of order 8, p-1),
/// and the non-canonical encodings p and p+1 of 0 and 1. The top bit is ignored by X25519.
const LOW_ORDER: [[u8; 32]; 7] = [
    [0; 32],
    [
        1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0,
    ],
    [
        0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f, 0xc4,
        0x6a, 0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16, 0x5f, 0x49,
        0xb8, 0x00,
    ],
    [
        0x5f, 0x9c, 0x95, 0xbc, 0xa3, 0x50, 0x8c, 0x24, 0xb1, 0xd0, 0xb1, 0x55, 0x9c, 0x83, 0xef,
        0x5b, 0x04, 0x44, 0x5c, 0xc4, 0x58, 0x1c, 0x8e, 0x86, 0xd8, 0x22, 0x4e, 0xdd, 0xd0, 0x9f,
        0x11, 0x57,
    ],
    p_plus(-1),
    p_plus(0),
    p_plus(1),
];

/// The little-endian encoding of p + d (p = 2^255 - 19), for d in -1..=1.
const fn p_plus(d: i8) -> [u8; 32] {
    let mut k = [0xff; 32];
    k[0] = (0xed_i16 + d as i16) as u8;
    k[31] = 0x7f;
    k
}

/// Whether `u` (a Montgomery u-coordinate, any encoding) is a point of low order: any shared
/// secret with it is all-zero (WireGuard refuses such a handshake).
pub fn is_low_order(u: &[u8; 32]) -> bool {
    let mut masked = *u;
    masked[31] &= 0x7f;
    LOW_ORDER.contains(&masked)
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

    /// The table agrees with the definition: a clamped scalar (a multiple of 8) times the
    /// point is the all-zero point exactly for points of low order.
    #[test]
    fn the_table_agrees_with_scalar_multiplication() {
        let by_mult = |u: &[u8; 32]| x25519_dalek::x25519([0x5a; 32], *u) == [0; 32];
        for h in LOW_ORDER {
            assert!(by_mult(&hex(h)), "{h}");
        }
        let mut probes: Vec<[u8; 32]> = (0..=255u8).map(|b| [b; 32]).collect();
        probes.extend((0..64u8).map(|i| {
            let mut k = p_plus(1);
            k[0] = k[0].wrapping_add(i);
            k
        }));
        probes.extend((0..32u8).map(|i| {
            let mut k = [0; 32];
            k[0] = i;
            k
        }));
        for u in probes {
            assert_eq!(is_low_order(&u), by_mult(&u), "{u:?}");
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
