//! The agent's state file reader: any bytes are a state or a reason why not, never a panic;
//! the location it keeps goes through the validator as on restore.
#![no_main]

use gatehouse_proto::v1;
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

fuzz_target!(|data: &[u8]| {
    // The location kept in the state is restored through the validator, as at start.
    if let Ok(state) = gatehouse::state::decode_state(data) {
        if let Some(bytes) = &state.location {
            if let Ok(location) = v1::Location::decode(bytes.as_slice()) {
                let _ = gatehouse::validate::validate_location(&location);
            }
        }
    }
});
