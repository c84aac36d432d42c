//! Tests of the kernel backend against a real kernel WireGuard, each in its own network
//! namespace (removed by a guard, also on failure). This host's kernel has no WireGuard:
//! the `#[ignore]`d tests run inside a VM with `tests/vm/run-kernel-tests.sh`. The one
//! plain test checks the clear "no WireGuard here" error and skips where WireGuard exists.

#[path = "netns/mod.rs"]
mod netns;
#[path = "vm/support.rs"]
mod support;

use std::collections::BTreeSet;
use std::io::Write as _;

use gatehouse::backend::kernel::KernelBackend;
use gatehouse::backend::link::Link;
use gatehouse::backend::{Backend, BackendError};
use gatehouse::model::{Desired, Key, PeerSpec};
use gatehouse::plan::{plan, Op};
use netns::{is_root, unique, Netns};
use support::{assert_dump_matches, desired, parse_dump, Dump};

fn backend_in(ns: &Netns, interface: &str) -> KernelBackend {
    ns.enter(|| KernelBackend::new(interface).expect("kernel backend"))
}

fn wg_dump(ns: &Netns, interface: &str) -> Dump {
    parse_dump(&ns.exec("wg", &["show", interface, "dump"]))
}

/// Observes, plans and applies; returns the plan's length.
fn converge(backend: &mut KernelBackend, want: &Desired) -> usize {
    let observed = backend.observe().expect("observe");
    let p = plan(want, &observed);
    backend.apply(&p).expect("apply");
    p.len()
}

fn assert_observed_matches(backend: &mut KernelBackend, want: &Desired) {
    let seen = backend.observe().expect("observe");
    let link = seen.link.as_ref().expect("link exists");
    assert!(link.up);
    assert_eq!(Some(link.mtu), want.interface.mtu);
    assert_eq!(link.addresses, want.interface.addresses);
    assert_eq!(
        seen.device.private_key.as_ref(),
        Some(&want.interface.private_key)
    );
    assert_eq!(seen.device.listen_port, want.interface.listen_port);
    assert_eq!(seen.device.fwmark, want.interface.fwmark);
    assert_eq!(seen.device.peers.len(), want.peers.len());
    for (key, w) in &want.peers {
        assert_eq!(&seen.device.peers[key].config, w, "observed peer {key}");
    }
}

#[test]
fn a_kernel_without_wireguard_names_the_userspace_backend() {
    match KernelBackend::new("ghk-unsup0") {
        Ok(_) => {
            eprintln!("skipped: this kernel has WireGuard, the Unsupported path cannot be checked");
            return;
        }
        Err(BackendError::Unsupported(msg)) => {
            assert!(msg.contains("backend = \"userspace\""), "{msg}");
            assert!(!msg.contains('\n'), "one line: {msg}");
        }
        Err(other) => panic!("expected Unsupported, got {other:?}"),
    }
    // Creating the link is the other place a kernel without WireGuard fails.
    if !is_root() {
        eprintln!("skipped the link-creation half: needs root (creates a link in a netns)");
        return;
    }
    let ns = Netns::new("ku");
    let name = unique("ghku");
    let result = ns.enter(|| Link::open().and_then(|mut l| l.create_wireguard(&name)));
    match result {
        Err(BackendError::Unsupported(msg)) => assert!(msg.contains("backend = \"userspace\"")),
        other => panic!("expected Unsupported, got {other:?}"),
    }
}

#[test]
fn invalid_interface_names_are_config_errors() {
    for name in ["", "this-is-16-bytes", "a/b", "wg 0", "wg\t0", ".", ".."] {
        match KernelBackend::new(name) {
            Err(BackendError::Config(msg)) => assert!(!msg.is_empty()),
            other => panic!("{name:?}: expected Config, got {other:?}"),
        }
    }
}

#[test]
#[ignore = "needs kernel WireGuard: tests/vm/run-kernel-tests.sh"]
fn ten_thousand_peers_and_one_with_five_thousand_ips_are_applied_exactly() {
    let ns = Netns::new("k1");
    let name = unique("ghk1");
    let want = desired(1, 40001, 10_000, 5_000);
    let mut backend = backend_in(&ns, &name);
    let steps = converge(&mut backend, &want);
    assert!(steps > 10_000, "{steps} steps");
    let counters = backend.counters();
    // 10,000 peers * 80 bytes + 4,000 * 28 + 1,000 * 40 bytes of addresses, 32 KiB each.
    assert!(
        (25..=32).contains(&counters.device_writes),
        "device messages: {}",
        counters.device_writes
    );
    assert_dump_matches(&wg_dump(&ns, &name), &want);
    assert_observed_matches(&mut backend, &want);
}

#[test]
#[ignore = "needs kernel WireGuard: tests/vm/run-kernel-tests.sh"]
fn the_same_state_again_plans_nothing_and_writes_nothing() {
    let ns = Netns::new("k2");
    let name = unique("ghk2");
    let want = desired(2, 40002, 10_000, 5_000);
    let mut backend = backend_in(&ns, &name);
    converge(&mut backend, &want);
    let before = backend.counters();
    let p = plan(&want, &backend.observe().unwrap());
    assert!(p.is_empty(), "second plan: {}", p.summary());
    backend.apply(&p).unwrap();
    assert_eq!(
        backend.counters(),
        before,
        "a no-op snapshot sent write messages"
    );
}

#[test]
#[ignore = "needs kernel WireGuard: tests/vm/run-kernel-tests.sh"]
fn changing_one_peer_keeps_the_others_sessions_and_counters() {
    let gw = Netns::new("k3g");
    let cl = Netns::new("k3c");
    gw.veth_to(&cl, "k3", "192.168.77.1/24", "192.168.77.2/24");
    let gw_if = unique("ghk3g");
    let cl_if = unique("ghk3c");

    let client_key = support::secret(31);
    let mut want = desired(3, 40003, 20, 0);
    want.interface.addresses = ["10.77.0.1/24".parse().unwrap()].into();
    let client = PeerSpec::new(client_key.public_key(), ["10.77.0.2/32".parse().unwrap()]);
    want.peers
        .insert(client.public_key, std::sync::Arc::new(client.clone()));
    let mut backend = backend_in(&gw, &gw_if);
    converge(&mut backend, &want);

    // A real client: kernel WireGuard configured with `wg` in the other namespace.
    let mut keyfile = tempfile::NamedTempFile::new().unwrap();
    writeln!(keyfile, "{}", client_key.expose_base64()).unwrap();
    let keypath = keyfile.path().to_str().unwrap().to_owned();
    cl.ip(&["link", "add", &cl_if, "type", "wireguard"]);
    let gw_pub = want.interface.private_key.public_key().to_base64();
    cl.exec(
        "wg",
        &[
            "set",
            &cl_if,
            "private-key",
            &keypath,
            "peer",
            &gw_pub,
            "endpoint",
            "192.168.77.1:40003",
            "allowed-ips",
            "10.77.0.0/24",
        ],
    );
    cl.ip(&["addr", "add", "10.77.0.2/24", "dev", &cl_if]);
    cl.ip(&["link", "set", &cl_if, "up"]);
    assert!(cl.ping("10.77.0.1", 5), "no traffic through the tunnel");
    assert!(cl.ping("10.77.0.1", 5));

    let before = backend.observe().unwrap().device.peers[&client.public_key].clone();
    assert!(before.last_handshake.is_some(), "no handshake: {before:?}");
    assert!(before.rx_bytes > 0 && before.tx_bytes > 0, "{before:?}");

    // Change ONE other peer.
    let other = *want
        .peers
        .keys()
        .find(|k| **k != client.public_key)
        .unwrap();
    std::sync::Arc::make_mut(want.peers.get_mut(&other).unwrap()).persistent_keepalive = 15;
    let p = plan(&want, &backend.observe().unwrap());
    assert_eq!(p.len(), 1, "{}", p.summary());
    assert!(matches!(&p.steps[0].op, Op::UpdatePeer(u) if u.public_key == other));
    let writes = backend.counters().device_writes;
    backend.apply(&p).unwrap();
    assert_eq!(backend.counters().device_writes, writes + 1);

    let after = backend.observe().unwrap().device.peers[&client.public_key].clone();
    assert_eq!(after.last_handshake, before.last_handshake, "session reset");
    assert!(after.rx_bytes >= before.rx_bytes && after.tx_bytes >= before.tx_bytes);
    assert!(cl.ping("10.77.0.1", 5), "tunnel broken after the change");
    let after_ping = backend.observe().unwrap().device.peers[&client.public_key].clone();
    assert_eq!(
        after_ping.last_handshake, before.last_handshake,
        "new handshake needed"
    );
    assert!(after_ping.rx_bytes > before.rx_bytes, "counters reset");
    assert_eq!(wg_dump(&gw, &gw_if).peers[&other].keepalive, 15);
}

#[test]
#[ignore = "needs kernel WireGuard: tests/vm/run-kernel-tests.sh"]
fn an_existing_interface_is_adopted_without_changes() {
    let ns = Netns::new("k4");
    let name = unique("ghk4");
    let want = desired(4, 40004, 300, 600);
    let mut first = backend_in(&ns, &name);
    converge(&mut first, &want);
    let link_writes = first.counters().link_writes;
    assert!(
        link_writes >= 4,
        "create, MTU, addresses, up: {link_writes}"
    );

    // A second instance (a restarted agent) adopts it.
    let mut second = backend_in(&ns, &name);
    let p = plan(&want, &second.observe().unwrap());
    assert!(p.is_empty(), "adoption plan: {}", p.summary());
    second.apply(&p).unwrap();
    assert_eq!(
        second.counters().device_writes + second.counters().link_writes,
        0
    );

    // An interface configured by hand (wg setconf, ip) is adopted the same way.
    let hand = unique("ghk4h");
    let small = desired(44, 40044, 3, 0);
    let mut conf = tempfile::NamedTempFile::new().unwrap();
    writeln!(
        conf,
        "[Interface]\nPrivateKey = {}\nListenPort = 40044",
        small.interface.private_key.expose_base64()
    )
    .unwrap();
    for p in small.peers.values() {
        let ips: Vec<String> = p.allowed_ips.iter().map(|n| n.to_string()).collect();
        writeln!(
            conf,
            "[Peer]\nPublicKey = {}\nAllowedIPs = {}",
            p.public_key,
            ips.join(",")
        )
        .unwrap();
    }
    ns.ip(&["link", "add", &hand, "type", "wireguard"]);
    ns.exec("wg", &["setconf", &hand, conf.path().to_str().unwrap()]);
    ns.ip(&["link", "set", &hand, "mtu", "1400"]);
    for a in &small.interface.addresses {
        ns.ip(&["addr", "add", &a.to_string(), "dev", &hand]);
    }
    ns.ip(&["link", "set", &hand, "up"]);
    let mut adopted = backend_in(&ns, &hand);
    let p = plan(&small, &adopted.observe().unwrap());
    assert!(p.is_empty(), "hand-made interface plan: {:?}", p.steps);
}

#[test]
#[ignore = "needs kernel WireGuard: tests/vm/run-kernel-tests.sh"]
fn a_taken_listen_port_is_named_and_the_new_interface_removed() {
    let ns = Netns::new("k5");
    let a = unique("ghk5a");
    let b = unique("ghk5b");
    let mut first = backend_in(&ns, &a);
    converge(&mut first, &desired(5, 40005, 2, 0));

    let mut second = backend_in(&ns, &b);
    let mut want = desired(55, 40005, 2, 0);
    want.interface.addresses = ["10.201.0.1/16".parse().unwrap()].into();
    let p = plan(&want, &second.observe().unwrap());
    let err = second.apply(&p).expect_err("port 40005 is taken");
    assert!(err.to_string().contains("40005"), "{err}");
    assert!(!err.is_fatal());
    assert_eq!(
        second.observe().unwrap().link,
        None,
        "half-configured interface left"
    );
    // The adopted interface of the first instance is untouched.
    assert_eq!(wg_dump(&ns, &a).listen_port, 40005);
}

#[test]
#[ignore = "needs kernel WireGuard: tests/vm/run-kernel-tests.sh"]
fn a_failed_apply_never_deletes_an_adopted_interface() {
    let ns = Netns::new("k6");
    let a = unique("ghk6a");
    let b = unique("ghk6b");
    converge(&mut backend_in(&ns, &a), &desired(6, 40006, 1, 0));
    let mut adopted = backend_in(&ns, &b);
    converge(&mut adopted, &desired(66, 40066, 1, 0));
    let mut want = desired(66, 40006, 1, 0);
    want.interface.listen_port = 40006;
    let p = plan(&want, &adopted.observe().unwrap());
    assert!(adopted.apply(&p).is_err());
    assert!(
        adopted.observe().unwrap().link.is_some(),
        "adopted interface deleted"
    );
}

#[test]
#[ignore = "needs kernel WireGuard: tests/vm/run-kernel-tests.sh"]
fn a_peer_removed_by_hand_is_re_added_alone() {
    let ns = Netns::new("k7");
    let name = unique("ghk7");
    let want = desired(7, 40007, 50, 0);
    let mut backend = backend_in(&ns, &name);
    converge(&mut backend, &want);
    let victim: Key = *want.peers.keys().nth(17).unwrap();
    ns.exec("wg", &["set", &name, "peer", &victim.to_base64(), "remove"]);
    let p = plan(&want, &backend.observe().unwrap());
    assert_eq!(p.len(), 1, "{}", p.summary());
    assert!(matches!(&p.steps[0].op, Op::AddPeer(s) if s.public_key == victim));
    backend.apply(&p).unwrap();
    assert_dump_matches(&wg_dump(&ns, &name), &want);

    // Drift on the link too: an extra address and a wanted one removed by hand.
    ns.ip(&["addr", "add", "10.99.0.1/32", "dev", &name]);
    ns.ip(&["addr", "del", "10.200.0.1/16", "dev", &name]);
    let p = plan(&want, &backend.observe().unwrap());
    let ops: BTreeSet<String> = p.steps.iter().map(|s| format!("{:?}", s.op)).collect();
    assert_eq!(ops.len(), 2, "{ops:?}");
    backend.apply(&p).unwrap();
    assert!(plan(&want, &backend.observe().unwrap()).is_empty());
}

#[test]
#[ignore = "needs kernel WireGuard: tests/vm/run-kernel-tests.sh"]
fn remove_deletes_the_interface() {
    let ns = Netns::new("k8");
    let name = unique("ghk8");
    let mut backend = backend_in(&ns, &name);
    converge(&mut backend, &desired(8, 40008, 1, 0));
    backend.remove().unwrap();
    assert_eq!(backend.observe().unwrap().link, None);
    backend.remove().unwrap();
}
