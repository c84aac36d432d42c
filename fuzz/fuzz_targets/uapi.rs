//! The UAPI reader (wireguard-go's `get=1` and `set=1` answers): any text is a device state
//! or an error, never a panic.
#![no_main]

use gatehouse::backend::userspace::uapi::{parse_errno, parse_get};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = parse_get(&text);
    let _ = parse_errno(&text);
});
