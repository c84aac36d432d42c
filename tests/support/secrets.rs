//! Finding secrets where they must not be: every form a secret could leak in, and a
//! scanner that looks for all of them in collected files and names what it found (which
//! secret, in which form, in which file, with the surrounding text redacted) without ever
//! printing a secret in full.
//!
//! Forms of a binary secret (a WireGuard key, a token's random part, a DER key): the raw
//! bytes, standard base64 (with and without padding), URL-safe base64 (with and without
//! padding), hex in lower and upper case, the bytes as a Rust `Debug` or JSON list of
//! decimals (`[1, 2, 3]`, `[1,2,3]`), and base64 of the secret inside a longer blob (the
//! characters that do not depend on its neighbours, for each of the three alignments and
//! both alphabets: a prost message with the key in it, encoded as a whole). A text secret
//! (a token) is its text and the same encodings of its bytes. A PEM private key is its
//! text, the base64 lines of its body that hold private material, its DER in every binary
//! form, and its private scalar in every binary form.
//!
//! Use with `#[path = "support/secrets.rs"] mod secrets;`.

#![allow(dead_code)]

use std::collections::HashMap;
use std::fmt;

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine as _;

/// Forms shorter than this are not looked for (too likely to occur by chance).
pub const MIN_FORM_LEN: usize = 12;

/// One way a secret can be written.
#[derive(Clone)]
pub struct Form {
    pub label: String,
    pub bytes: Vec<u8>,
}

/// A secret and every form it is looked for in. `Debug` never shows the value.
#[derive(Clone)]
pub struct Secret {
    name: String,
    forms: Vec<Form>,
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secret")
            .field("name", &self.name)
            .field("forms", &self.forms.len())
            .finish()
    }
}

/// The encodings of a binary value, labelled `"{prefix}{encoding}"`.
pub fn binary_forms(prefix: &str, raw: &[u8]) -> Vec<Form> {
    let mut forms = vec![
        form(format!("{prefix}raw bytes"), raw.to_vec()),
        form(format!("{prefix}base64"), STANDARD.encode(raw)),
        form(
            format!("{prefix}base64 without padding"),
            STANDARD_NO_PAD.encode(raw),
        ),
        form(format!("{prefix}URL-safe base64"), URL_SAFE.encode(raw)),
        form(
            format!("{prefix}URL-safe base64 without padding"),
            URL_SAFE_NO_PAD.encode(raw),
        ),
        form(format!("{prefix}hex"), hex(raw, false)),
        form(format!("{prefix}HEX"), hex(raw, true)),
        form(
            format!("{prefix}decimal list `1, 2, 3`"),
            decimals(raw, ", "),
        ),
        form(format!("{prefix}decimal list `1,2,3`"), decimals(raw, ",")),
    ];
    for shift in 0..3 {
        for (alphabet, url) in [("base64", false), ("URL-safe base64", true)] {
            if let Some(core) = embedded_base64(raw, shift, url) {
                forms.push(form(
                    format!("{prefix}{alphabet} inside a longer blob (offset {shift} mod 3)"),
                    core,
                ));
            }
        }
    }
    forms
}

fn form(label: String, bytes: impl Into<Vec<u8>>) -> Form {
    Form {
        label,
        bytes: bytes.into(),
    }
}

/// Curve25519 clamping, as WireGuard applies it to a private key.
pub fn clamp(raw: &[u8; 32]) -> [u8; 32] {
    let mut k = *raw;
    k[0] &= 248;
    k[31] &= 127;
    k[31] |= 64;
    k
}

pub fn hex(raw: &[u8], upper: bool) -> String {
    raw.iter()
        .map(|b| {
            if upper {
                format!("{b:02X}")
            } else {
                format!("{b:02x}")
            }
        })
        .collect()
}

fn decimals(raw: &[u8], sep: &str) -> String {
    raw.iter()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join(sep)
}

/// The base64 characters of `raw` that are the same whatever surrounds it, when `raw`
/// starts `shift` bytes after a multiple of 3 inside a longer value encoded as a whole:
/// only the 4-character groups made of `raw`'s bytes alone.
pub fn embedded_base64(raw: &[u8], shift: usize, url: bool) -> Option<Vec<u8>> {
    let lead = (3 - shift % 3) % 3;
    if raw.len() < lead + 3 {
        return None;
    }
    let body = &raw[lead..];
    let whole = body.len() / 3 * 3;
    let engine = if url {
        URL_SAFE_NO_PAD
    } else {
        STANDARD_NO_PAD
    };
    Some(engine.encode(&body[..whole]).into_bytes())
}

impl Secret {
    /// A binary secret (a key): `raw` in every binary form.
    pub fn binary(name: impl Into<String>, raw: &[u8]) -> Secret {
        Secret::from_forms(name, binary_forms("", raw))
    }

    /// A WireGuard private key: every binary form of it and of its clamped form (what
    /// WireGuard uses and reads back: bits 0-2 of the first byte cleared, bit 7 of the
    /// last cleared and bit 6 set), which is the same secret.
    pub fn wireguard_private_key(name: impl Into<String>, raw: &[u8; 32]) -> Secret {
        let mut forms = binary_forms("", raw);
        forms.extend(binary_forms("clamped, ", &clamp(raw)));
        Secret::from_forms(name, forms)
    }

    /// A text secret (a token): its text, and every binary form of its bytes.
    pub fn text(name: impl Into<String>, text: &str) -> Secret {
        let mut forms = vec![form("text".into(), text.as_bytes().to_vec())];
        for f in binary_forms("its bytes as ", text.as_bytes()) {
            if f.label != "its bytes as raw bytes" {
                forms.push(f);
            }
        }
        Secret::from_forms(name, forms)
    }

    /// Adds every binary form of a part of the secret (a token's random bytes).
    pub fn with_binary_part(mut self, part: &str, raw: &[u8]) -> Secret {
        let extra = binary_forms(&format!("{part} as "), raw);
        self.forms.extend(extra);
        let name = std::mem::take(&mut self.name);
        Secret::from_forms(name, self.forms)
    }

    /// A PEM private key (PKCS#8): its text, the body lines holding private material,
    /// its DER in every binary form, and for an EC key its private scalar likewise.
    pub fn pem_private_key(name: impl Into<String>, pem: &str) -> Secret {
        let der = pem_der(pem).expect("a PEM private key");
        let mut forms = vec![form("PEM text".into(), pem.as_bytes().to_vec())];
        let scalar = ec_private_scalar(&der);
        let lines: Vec<&str> = pem_body_lines(pem);
        let mut offset = 0usize;
        for (i, line) in lines.iter().enumerate() {
            let len = line.len() / 4 * 3;
            let private = match scalar {
                // Only lines with some of the scalar: the others may be the public key,
                // which the certificate carries as well.
                Some((start, n)) => offset < start + n && start < offset + len,
                None => true,
            };
            if private {
                forms.push(form(
                    format!("PEM body line {}", i + 1),
                    line.as_bytes().to_vec(),
                ));
            }
            offset += len;
        }
        forms.extend(binary_forms("DER as ", &der));
        if let Some((start, n)) = scalar {
            forms.extend(binary_forms("private scalar as ", &der[start..start + n]));
        }
        Secret::from_forms(name, forms)
    }

    fn from_forms(name: impl Into<String>, forms: Vec<Form>) -> Secret {
        let mut kept: Vec<Form> = Vec::new();
        for f in forms {
            if f.bytes.len() >= MIN_FORM_LEN && !kept.iter().any(|k| k.bytes == f.bytes) {
                kept.push(f);
            }
        }
        Secret {
            name: name.into(),
            forms: kept,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn forms(&self) -> &[Form] {
        &self.forms
    }
}

/// The base64 lines between the PEM armour lines.
fn pem_body_lines(pem: &str) -> Vec<&str> {
    pem.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("-----"))
        .collect()
}

/// The DER bytes of a PEM document.
pub fn pem_der(pem: &str) -> Option<Vec<u8>> {
    STANDARD.decode(pem_body_lines(pem).concat()).ok()
}

/// Where the private scalar of a PKCS#8 EC key (RFC 5915 `ECPrivateKey` inside) is:
/// `INTEGER 1, OCTET STRING (32 or 48 bytes)`.
pub fn ec_private_scalar(der: &[u8]) -> Option<(usize, usize)> {
    for n in [32u8, 48, 66] {
        let pattern = [0x02, 0x01, 0x01, 0x04, n];
        if let Some(i) = der.windows(pattern.len()).position(|w| w == pattern) {
            let start = i + pattern.len();
            if start + n as usize <= der.len() {
                return Some((start, n as usize));
            }
        }
    }
    None
}

/// A secret found where it must not be.
#[derive(Clone, Debug)]
pub struct Leak {
    pub secret: String,
    pub form: String,
    pub source: String,
    pub offset: usize,
    /// How many times this secret was found in this form in this source.
    pub count: usize,
    /// The text around the first match, every secret in it redacted.
    pub context: String,
    /// A hint of the value found: its first 4 characters and its length.
    pub hint: String,
}

impl fmt::Display for Leak {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} as {} in {} at byte {} ({} time{}; value {}): …{}…",
            self.secret,
            self.form,
            self.source,
            self.offset,
            self.count,
            if self.count == 1 { "" } else { "s" },
            self.hint,
            self.context
        )
    }
}

/// Looks for every form of every secret.
pub struct Scanner {
    secrets: Vec<Secret>,
    /// (secret, form) by the form's first 4 bytes.
    by_prefix: HashMap<[u8; 4], Vec<(usize, usize)>>,
    /// Bit per first two bytes of a form: the quick test before the map.
    first_two: Vec<u64>,
}

impl Scanner {
    pub fn new(secrets: Vec<Secret>) -> Scanner {
        let mut by_prefix: HashMap<[u8; 4], Vec<(usize, usize)>> = HashMap::new();
        let mut first_two = vec![0u64; 65536 / 64];
        for (s, secret) in secrets.iter().enumerate() {
            assert!(
                !secret.forms.is_empty(),
                "{}: no form long enough",
                secret.name
            );
            for (f, form) in secret.forms.iter().enumerate() {
                let p = [form.bytes[0], form.bytes[1], form.bytes[2], form.bytes[3]];
                by_prefix.entry(p).or_default().push((s, f));
                let bit = usize::from(u16::from_be_bytes([p[0], p[1]]));
                first_two[bit / 64] |= 1 << (bit % 64);
            }
        }
        Scanner {
            secrets,
            by_prefix,
            first_two,
        }
    }

    pub fn secrets(&self) -> &[Secret] {
        &self.secrets
    }

    /// Every (secret, form) found in `data`, one entry per pair with its count. A match
    /// inside a longer match of the same secret (the hex of a key inside the hex of the
    /// DER holding it, a token's random part inside the token) is not reported again.
    pub fn scan(&self, source: &str, data: &[u8]) -> Vec<Leak> {
        // (secret, form, start, end)
        let mut hits: Vec<(usize, usize, usize, usize)> = Vec::new();
        if data.len() >= 4 {
            for i in 0..=data.len() - 4 {
                let bit = usize::from(u16::from_be_bytes([data[i], data[i + 1]]));
                if self.first_two[bit / 64] & (1 << (bit % 64)) == 0 {
                    continue;
                }
                let p = [data[i], data[i + 1], data[i + 2], data[i + 3]];
                let Some(candidates) = self.by_prefix.get(&p) else {
                    continue;
                };
                for &(s, f) in candidates {
                    let bytes = &self.secrets[s].forms[f].bytes;
                    if data[i..].starts_with(bytes) {
                        hits.push((s, f, i, i + bytes.len()));
                    }
                }
            }
        }
        // Longest first at each start, then drop what a kept hit of the same secret covers.
        hits.sort_by(|a, b| (a.0, a.2, b.3).cmp(&(b.0, b.2, a.3)));
        let mut kept: Vec<(usize, usize, usize, usize)> = Vec::new();
        for h in hits {
            let covered = kept
                .iter()
                .rev()
                .take_while(|k| k.0 == h.0)
                .any(|k| k.2 <= h.2 && h.3 <= k.3);
            if !covered {
                kept.push(h);
            }
        }
        let mut leaks: Vec<Leak> = Vec::new();
        for (s, f, start, end) in kept {
            let secret = &self.secrets[s];
            let label = &secret.forms[f].label;
            if let Some(l) = leaks
                .iter_mut()
                .find(|l| l.secret == secret.name && &l.form == label)
            {
                l.count += 1;
                continue;
            }
            leaks.push(Leak {
                secret: secret.name.clone(),
                form: label.clone(),
                source: source.to_string(),
                offset: start,
                count: 1,
                context: self.context(data, start, end),
                hint: hint(&data[start..end]),
            });
        }
        leaks
    }

    /// The text around `start..end`, with every form of every secret in it replaced.
    fn context(&self, data: &[u8], start: usize, end: usize) -> String {
        const AROUND: usize = 100;
        let from = start.saturating_sub(AROUND);
        let to = (end + AROUND).min(data.len());
        self.redact(&data[from..to])
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect()
    }

    /// `data` as text with every form of every secret replaced by `<SECRET>` (for
    /// printing a log's tail when a test fails).
    pub fn redact(&self, data: &[u8]) -> String {
        let mut out = data.to_vec();
        let mut forms: Vec<&Form> = self.secrets.iter().flat_map(|s| s.forms.iter()).collect();
        forms.sort_by_key(|f| std::cmp::Reverse(f.bytes.len()));
        for f in forms {
            out = replace_all(&out, &f.bytes, b"<SECRET>");
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

fn replace_all(data: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    while i < data.len() {
        if data[i..].starts_with(needle) {
            out.extend_from_slice(with);
            i += needle.len();
        } else {
            out.push(data[i]);
            i += 1;
        }
    }
    out
}

/// What may be shown of a found value: its first 4 characters (escaped) and its length.
pub fn hint(value: &[u8]) -> String {
    let head: String = value
        .iter()
        .take(4)
        .map(|&b| {
            if b.is_ascii_graphic() {
                (b as char).to_string()
            } else {
                format!("\\x{b:02x}")
            }
        })
        .collect();
    format!("{head}… ({} bytes)", value.len())
}

/// The leaks as one message, one line each.
pub fn report(leaks: &[Leak]) -> String {
    leaks
        .iter()
        .map(|l| format!("  - {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> [u8; 32] {
        let mut k = [0u8; 32];
        for (i, b) in k.iter_mut().enumerate() {
            *b = seed
                .wrapping_mul(31)
                .wrapping_add(i as u8 * 7)
                .wrapping_add(1);
        }
        k
    }

    const PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgYDq9oK2ndhQLGRLs
0vQsQ0nWJrPcx2fFC9zmaOmD1FqhRANCAAS3RZ0JwOCLDHJ1eIDYdiKoAomwdYhC
zdN52A/fdjY1xqlVVxhxzc54fs3jkkDgMSAYBMnLXohHQh0kmchwdhBN
-----END PRIVATE KEY-----
";

    #[test]
    fn every_form_of_a_key_is_found_and_named() {
        let raw = key(1);
        let scanner = Scanner::new(vec![Secret::binary("the key", &raw)]);
        for f in scanner.secrets()[0].forms().to_vec() {
            let mut data = b"2026-01-01T00:00:00Z DEBUG agent: value=".to_vec();
            data.extend_from_slice(&f.bytes);
            data.extend_from_slice(b" done\n");
            let leaks = scanner.scan("agent.log", &data);
            assert_eq!(leaks.len(), 1, "{}: {leaks:?}", f.label);
            assert_eq!(leaks[0].secret, "the key");
            assert_eq!(leaks[0].form, f.label);
            assert_eq!(leaks[0].source, "agent.log");
            assert_eq!(leaks[0].offset, 40);
            let shown = leaks[0].to_string();
            assert!(shown.contains("<SECRET>"), "{shown}");
            assert!(!shown.contains(&STANDARD.encode(raw)[..20]), "{shown}");
            assert!(!shown.contains(&hex(&raw, false)[..20]), "{shown}");
        }
    }

    #[test]
    fn a_key_inside_a_longer_base64_blob_is_found_at_every_alignment() {
        let raw = key(2);
        let scanner = Scanner::new(vec![Secret::binary("k", &raw)]);
        for lead in 0..6 {
            let mut blob = vec![0x0a; lead];
            blob.push(0x20);
            blob.extend_from_slice(&raw);
            // Its first bits differ from the zero bits that end a lone key's last character.
            blob.extend_from_slice(&[0xf2, 0x34, 0x56, 0x78]);
            for text in [STANDARD.encode(&blob), URL_SAFE_NO_PAD.encode(&blob)] {
                let data = format!("{{\"location\":\"{text}\"}}");
                let leaks = scanner.scan("state", data.as_bytes());
                assert_eq!(leaks.len(), 1, "lead {lead}: {leaks:?}");
                assert!(leaks[0].form.contains("inside a longer blob"), "{leaks:?}");
            }
        }
    }

    #[test]
    fn a_private_key_is_found_clamped_too() {
        let mut raw = key(6);
        raw[0] |= 7;
        raw[31] |= 128;
        let clamped = clamp(&raw);
        assert_ne!(raw, clamped);
        let scanner = Scanner::new(vec![Secret::wireguard_private_key("location key", &raw)]);
        // As the state keeps it: inside a base64 blob, read back from the interface.
        let mut blob = vec![0x1a, 0x37, 0x0a, 0x20];
        blob.extend_from_slice(&clamped);
        blob.extend_from_slice(&[0xf2, 0x00]);
        let leaks = scanner.scan("state", STANDARD.encode(&blob).as_bytes());
        assert_eq!(leaks.len(), 1, "{leaks:?}");
        assert!(leaks[0].form.starts_with("clamped, "), "{leaks:?}");
        let leaks = scanner.scan("log", STANDARD.encode(clamped).as_bytes());
        assert_eq!(leaks[0].form, "clamped, base64");
        let leaks = scanner.scan("log", STANDARD.encode(raw).as_bytes());
        assert_eq!(leaks[0].form, "base64");
    }

    #[test]
    fn a_token_is_found_as_text_and_by_its_random_part() {
        let random = key(3);
        let token = format!("ght_{}", URL_SAFE_NO_PAD.encode(random));
        let secret = Secret::text("gateway token", &token).with_binary_part("random part", &random);
        let scanner = Scanner::new(vec![secret]);
        let leaks = scanner.scan(
            "core.log",
            format!("authorization: Bearer {token}\n").as_bytes(),
        );
        assert_eq!(leaks.len(), 1, "{leaks:?}");
        assert_eq!(leaks[0].form, "text");
        let leaks = scanner.scan("x", hex(&random, true).as_bytes());
        assert_eq!(leaks[0].form, "random part as HEX");
        let leaks = scanner.scan("x", STANDARD.encode(token.as_bytes()).as_bytes());
        assert_eq!(leaks[0].form, "its bytes as base64");
        let leaks = scanner.scan("x", format!("{:?}", token.as_bytes()).as_bytes());
        assert_eq!(leaks[0].form, "its bytes as decimal list `1, 2, 3`");
    }

    #[test]
    fn a_pem_key_is_found_by_its_private_lines_der_and_scalar() {
        let secret = Secret::pem_private_key("client key", PEM);
        let der = pem_der(PEM).unwrap();
        let (start, n) = ec_private_scalar(&der).unwrap();
        assert_eq!(n, 32);
        let labels: Vec<&str> = secret.forms().iter().map(|f| f.label.as_str()).collect();
        // 138 bytes: lines 1 and 2 hold the scalar (bytes 36..68), line 3 only the
        // public key (which the certificate also carries).
        assert!(labels.contains(&"PEM body line 1"), "{labels:?}");
        assert!(labels.contains(&"PEM body line 2"), "{labels:?}");
        assert!(!labels.contains(&"PEM body line 3"), "{labels:?}");
        let scanner = Scanner::new(vec![secret]);
        let lines: Vec<&str> = PEM.lines().collect();
        let leaks = scanner.scan(
            "json log",
            format!("{{\"line\":\"{}\"}}", lines[2]).as_bytes(),
        );
        assert_eq!(leaks[0].form, "PEM body line 2", "{leaks:?}");
        let leaks = scanner.scan("x", hex(&der, false).as_bytes());
        assert_eq!(leaks.len(), 1, "{leaks:?}");
        assert_eq!(leaks[0].form, "DER as hex");
        let leaks = scanner.scan("x", hex(&der[start..start + n], true).as_bytes());
        assert_eq!(leaks[0].form, "private scalar as HEX");
        let leaks = scanner.scan("x", PEM.as_bytes());
        assert_eq!(leaks.len(), 1, "{leaks:?}");
        assert_eq!(leaks[0].form, "PEM text");
        // Keys as the tests make them (rcgen, ECDSA P-256) have their scalar found.
        let generated = rcgen::KeyPair::generate().unwrap().serialize_pem();
        assert!(ec_private_scalar(&pem_der(&generated).unwrap()).is_some());
        // The public key alone (as in the certificate) is not the secret.
        let public = &der[der.len() - 65..];
        assert!(scanner
            .scan("cert", STANDARD.encode(public).as_bytes())
            .is_empty());
    }

    #[test]
    fn clean_data_and_near_misses_are_not_reported() {
        let raw = key(4);
        let scanner = Scanner::new(vec![Secret::binary("k", &raw)]);
        let mut near = STANDARD.encode(raw).into_bytes();
        near[20] ^= 1;
        assert!(scanner.scan("x", &near).is_empty());
        assert!(scanner.scan("x", b"").is_empty());
        assert!(scanner.scan("x", b"abc").is_empty());
        let other = key(5);
        assert!(scanner.scan("x", hex(&other, false).as_bytes()).is_empty());
        // Counted once per form and source, however often it appears.
        let twice = format!("{0} and {0}", hex(&raw, false));
        let leaks = scanner.scan("x", twice.as_bytes());
        assert_eq!(leaks.len(), 1);
        assert_eq!(leaks[0].count, 2);
    }
}
