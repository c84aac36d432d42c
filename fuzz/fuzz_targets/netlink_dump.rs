//! The netlink dump reader: datagrams of a `WG_CMD_GET_DEVICE` answer (the input split at
//! each `|||`) → parts → merged device state; never a panic.
#![no_main]

use gatehouse::backend::kernel::dump::merge_dump;
use gatehouse::backend::kernel::genl::parse_dump;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The sequence number of the first message, so that its answers are read.
    let seq = data
        .get(8..12)
        .map_or(0, |b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
    let datagrams: Vec<&[u8]> = split(data, b"|||");
    if let Ok(parts) = parse_dump(&datagrams, seq) {
        let _ = merge_dump(&parts);
    }
});

fn split<'a>(data: &'a [u8], sep: &[u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while let Some(i) = rest.windows(sep.len()).position(|w| w == sep) {
        out.push(&rest[..i]);
        rest = &rest[i + sep.len()..];
    }
    out.push(rest);
    out
}
