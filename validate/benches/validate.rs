//! How long the shared validator takes for a location of 100,000 peers (each a /32 and a
//! /128), and the overlap check alone. Run: `cargo bench -p gatehouse-validate`.

#[path = "../../tests/support/bench.rs"]
mod bench;
#[path = "../../tests/support/scale.rs"]
mod scale;

use bench::median_of;
use gatehouse_validate::overlap::{find_overlaps, Holder};
use gatehouse_validate::{keys, validate_location};
use ipnet::IpNet;

const PEERS: u32 = 100_000;

fn main() {
    let loc = scale::location_of(PEERS);
    assert!(keys::public_key(&loc.peers[0].public_key).is_ok());
    let whole = median_of(5, || {
        let v = validate_location(&loc).expect("valid");
        assert_eq!(v.peers.len(), PEERS as usize);
    });
    let entries: Vec<(IpNet, Holder<u32>)> = loc
        .peers
        .iter()
        .enumerate()
        .flat_map(|(i, p)| {
            p.allowed_ips
                .iter()
                .map(move |s| (s.parse().expect("prefix"), Holder::Peer(i as u32)))
        })
        .collect();
    let overlap = median_of(5, || assert!(find_overlaps(&entries).is_empty()));
    println!("validate_location, {PEERS} peers (2 prefixes each): {whole:?} (median of 5)");
    println!(
        "find_overlaps, {} prefixes: {overlap:?} (median of 5)",
        entries.len()
    );
}
