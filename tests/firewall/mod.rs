//! Helpers of the firewall tests: a policy builder, a fresh network namespace for a
//! closure (a thread that unshares its namespace: nothing to clean up), and `nft` output.

#![allow(dead_code)]

use gatehouse_proto::v1;

/// Runs `f` on a thread in a new, empty network namespace (loopback down). The namespace
/// goes away with the thread. None when not root.
pub fn in_fresh_netns<T: Send>(f: impl FnOnce() -> T + Send) -> Option<T> {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root");
        return None;
    }
    Some(std::thread::scope(|s| {
        s.spawn(|| {
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }))
}

/// `nft` with arguments, in the calling thread's namespace; stdout.
pub fn nft(args: &[&str]) -> String {
    let out = std::process::Command::new("nft")
        .args(args)
        .output()
        .expect("nft runs");
    assert!(
        out.status.success(),
        "nft {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A rule: `rule(prio, verdict).src(..).dst(..).ports(..).protos(..)`.
pub fn rule(priority: u32, verdict: v1::Verdict) -> v1::FirewallRule {
    v1::FirewallRule {
        priority,
        verdict: verdict as i32,
        ..Default::default()
    }
}

pub trait RuleExt {
    fn src(self, s: &[&str]) -> Self;
    fn dst(self, s: &[&str]) -> Self;
    fn ports(self, p: &[(u32, u32)]) -> Self;
    fn protos(self, p: &[v1::Protocol]) -> Self;
}

impl RuleExt for v1::FirewallRule {
    fn src(mut self, s: &[&str]) -> Self {
        self.sources = s.iter().map(|x| x.to_string()).collect();
        self
    }
    fn dst(mut self, s: &[&str]) -> Self {
        self.destinations = s.iter().map(|x| x.to_string()).collect();
        self
    }
    fn ports(mut self, p: &[(u32, u32)]) -> Self {
        self.ports = p
            .iter()
            .map(|(start, end)| v1::PortRange {
                start: *start,
                end: *end,
            })
            .collect();
        self
    }
    fn protos(mut self, p: &[v1::Protocol]) -> Self {
        self.protocols = p.iter().map(|x| *x as i32).collect();
        self
    }
}

pub fn policy(default: v1::Verdict, rules: Vec<v1::FirewallRule>) -> v1::FirewallPolicy {
    v1::FirewallPolicy {
        enabled: true,
        default_verdict: default as i32,
        rules,
    }
}
