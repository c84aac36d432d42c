//! Root tests of `backend::link` (rtnetlink) in a fresh network namespace, on TUN and
//! veth links (this host has no WireGuard module). Run by `tests/netns/run-root-tests.sh`
//! or `sudo cargo test --test userspace_link -- --include-ignored`.

#[path = "netns/mod.rs"]
mod netns;

use std::collections::BTreeSet;

use gatehouse::backend::link::Link;
use gatehouse::backend::BackendError;
use ipnet::IpNet;
use netns::Netns;

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn open_in(ns: &Netns) -> Link {
    ns.enter(|| Link::open().expect("open rtnetlink"))
}

#[test]
#[ignore = "needs root (netns, tun); run tests/netns/run-root-tests.sh"]
fn missing_link_is_none_and_bad_name_is_config() {
    let ns = Netns::new("lk");
    let mut link = open_in(&ns);
    assert_eq!(link.get("nosuchlink0").unwrap(), None);
    assert!(matches!(link.get("a/b"), Err(BackendError::Config(_))));
    assert!(matches!(
        link.get("this-name-is-too-long"),
        Err(BackendError::Config(_))
    ));
    let lo = link.get("lo").unwrap().expect("lo exists");
    assert!(lo.up);
    assert_eq!(link.writes(), 0, "reads are not writes");
}

#[test]
#[ignore = "needs root (netns, tun); run tests/netns/run-root-tests.sh"]
fn tun_link_mtu_up_and_addresses() {
    let ns = Netns::new("lk");
    let dev = "ghtun0";
    ns.ip(&["tuntap", "add", "dev", dev, "mode", "tun"]);
    let mut link = open_in(&ns);

    let info = link.get(dev).unwrap().expect("tun exists");
    assert_eq!(info.kind.as_deref(), Some("tun"));
    assert!(!info.up);
    assert!(info.index > 1);

    link.set_mtu(info.index, 1380).unwrap();
    link.set_up(info.index).unwrap();
    let after = link.get(dev).unwrap().unwrap();
    assert_eq!(after.mtu, 1380);
    assert!(after.up);
    assert!(ns.ip(&["link", "show", dev]).contains("mtu 1380"));

    assert_eq!(link.addresses(info.index).unwrap(), BTreeSet::new());
    let want: BTreeSet<IpNet> =
        [net("10.77.0.1/24"), net("fd77::1/64"), net("10.78.0.9/32")].into();
    for a in &want {
        link.add_address(info.index, *a).unwrap();
    }
    assert_eq!(
        link.addresses(info.index).unwrap(),
        want,
        "host bits kept, v4 and v6"
    );
    let shown = ns.ip(&["addr", "show", "dev", dev]);
    assert!(
        shown.contains("10.77.0.1/24") && shown.contains("fd77::1/64"),
        "{shown}"
    );

    // Adding what is there and removing what is gone are no errors.
    link.add_address(info.index, net("10.77.0.1/24")).unwrap();
    link.remove_address(info.index, net("10.77.0.1/24"))
        .unwrap();
    link.remove_address(info.index, net("10.77.0.1/24"))
        .unwrap();
    link.remove_address(info.index, net("fd77::1/64")).unwrap();
    assert_eq!(
        link.addresses(info.index).unwrap(),
        [net("10.78.0.9/32")].into()
    );
    assert!(!ns.ip(&["addr", "show", "dev", dev]).contains("10.77.0.1"));
    assert_eq!(link.writes(), 2 + 3 + 4);

    // Another link's addresses are not reported.
    ns.ip(&["tuntap", "add", "dev", "ghtun1", "mode", "tun"]);
    ns.ip(&["addr", "add", "10.99.0.1/24", "dev", "ghtun1"]);
    assert_eq!(
        link.addresses(info.index).unwrap(),
        [net("10.78.0.9/32")].into()
    );
}

#[test]
#[ignore = "needs root (netns, tun); run tests/netns/run-root-tests.sh"]
fn errors_name_the_operation_and_errno() {
    let ns = Netns::new("lk");
    let mut link = open_in(&ns);
    let err = link.set_mtu(999_999, 1400).unwrap_err().to_string();
    assert!(err.contains("set MTU of link 999999"), "{err}");
    assert!(err.contains("No such device"), "{err}");
    ns.ip(&["tuntap", "add", "dev", "ghtun2", "mode", "tun"]);
    let tun = link.get("ghtun2").unwrap().unwrap();
    let err = link.set_mtu(tun.index, 10).unwrap_err().to_string();
    assert!(err.contains("Invalid argument"), "{err}");
}

#[test]
#[ignore = "needs root (netns, tun); run tests/netns/run-root-tests.sh"]
fn delete_removes_a_link() {
    let ns = Netns::new("lk");
    ns.ip(&[
        "link", "add", "ghva", "type", "veth", "peer", "name", "ghvb",
    ]);
    let mut link = open_in(&ns);
    let a = link.get("ghva").unwrap().expect("veth exists");
    assert_eq!(a.kind.as_deref(), Some("veth"));
    link.delete(a.index).unwrap();
    assert_eq!(link.get("ghva").unwrap(), None);
    assert_eq!(link.get("ghvb").unwrap(), None, "its peer goes with it");
}

#[test]
#[ignore = "needs root (netns, tun); run tests/netns/run-root-tests.sh"]
fn create_wireguard_works_or_says_to_use_userspace() {
    let ns = Netns::new("lk");
    let mut link = open_in(&ns);
    match link.create_wireguard("ghwg0") {
        Ok(index) => {
            let info = link.get("ghwg0").unwrap().expect("created");
            assert_eq!(info.index, index);
            assert_eq!(info.kind.as_deref(), Some("wireguard"));
            link.delete(index).unwrap();
        }
        Err(BackendError::Unsupported(message)) => {
            assert!(message.contains("backend = \"userspace\""), "{message}");
            assert!(message.contains("Operation not supported"), "{message}");
            assert_eq!(link.get("ghwg0").unwrap(), None);
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
}
