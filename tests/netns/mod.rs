//! Shared support for root tests in network namespaces: a namespace that deletes itself,
//! running code inside it, and child processes killed by pid when the test ends.
//!
//! Use from a test binary with `#[path = "netns/mod.rs"] mod netns;`. Every name derives
//! from a caller's tag, the test process id and a counter, so several test binaries can
//! run at once. Guards clean up on drop, also when the test panics.

#![allow(dead_code)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call: `<tag><pid % 100000><n>`; keep the tag short
/// when it names an interface (15 bytes at most).
pub fn unique(tag: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{tag}{}{n}", std::process::id() % 100_000)
}

/// True when the test runs as root (root tests skip with a message otherwise).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs a command, panicking with its stderr when it fails.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = output(program, args);
    assert!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command and returns its output, whatever its status.
pub fn output(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// A network namespace created for one test and deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `gh-<tag><pid><n>` with its loopback up.
    pub fn new(tag: &str) -> Netns {
        let name = format!("gh-{}", unique(tag));
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> args...`, panicking on failure.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs a program inside the namespace, panicking on failure.
    pub fn exec(&self, program: &str, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", self.name.as_str(), program];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs a program inside the namespace and returns its output, whatever its status.
    pub fn exec_output(&self, program: &str, args: &[&str]) -> Output {
        let mut all = vec!["netns", "exec", self.name.as_str(), program];
        all.extend_from_slice(args);
        output("ip", &all)
    }

    /// A command that runs inside the namespace (`ip netns exec`), for spawning.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.name.as_str(), program]);
        cmd
    }

    /// Runs `f` on a thread that entered the namespace, and returns its result.
    /// Sockets opened inside `f` stay in the namespace for their whole life, whichever
    /// thread uses them afterwards.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        in_netns(&self.name, f)
    }

    /// Joins this namespace and `other` with a veth pair, `(here, there)` named by `tag`,
    /// each up with the given address (CIDR).
    pub fn veth_to(&self, other: &Netns, tag: &str, here: &str, there: &str) -> (String, String) {
        let a = unique(&format!("{tag}a"));
        let b = unique(&format!("{tag}b"));
        self.ip(&[
            "link",
            "add",
            &a,
            "type",
            "veth",
            "peer",
            "name",
            &b,
            "netns",
            other.name(),
        ]);
        self.ip(&["addr", "add", here, "dev", &a]);
        self.ip(&["link", "set", &a, "up"]);
        other.ip(&["addr", "add", there, "dev", &b]);
        other.ip(&["link", "set", &b, "up"]);
        (a, b)
    }

    /// A bridge `name` in this namespace, up, with address `addr` (CIDR): a segment other
    /// namespaces plug into.
    pub fn bridge(&self, name: &str, addr: &str) {
        self.ip(&["link", "add", name, "type", "bridge"]);
        self.ip(&["addr", "add", addr, "dev", name]);
        self.ip(&["link", "set", name, "up"]);
    }

    /// A veth from this namespace (address `addr`, CIDR) into the bridge `bridge` of
    /// `segment`, both ends up; returns the name of this namespace's end.
    pub fn plug_into(&self, segment: &Netns, bridge: &str, tag: &str, addr: &str) -> String {
        let here = unique(&format!("{tag}h"));
        let there = unique(&format!("{tag}s"));
        self.ip(&[
            "link",
            "add",
            &here,
            "type",
            "veth",
            "peer",
            "name",
            &there,
            "netns",
            segment.name(),
        ]);
        self.ip(&["addr", "add", addr, "dev", &here]);
        self.ip(&["link", "set", &here, "up"]);
        segment.ip(&["link", "set", &there, "master", bridge]);
        segment.ip(&["link", "set", &there, "up"]);
        here
    }

    /// wireguard-go for `iface` in this namespace, in the foreground at the normal
    /// scheduling priority (whatever the test's own), its output dropped; returns once its
    /// UAPI socket exists (panics after 30 s).
    pub fn spawn_wireguard_go(&self, iface: &str) -> ChildGuard {
        use std::os::unix::process::CommandExt as _;
        let mut cmd = self.command("wireguard-go");
        // SAFETY: setpriority(2) is async-signal-safe and touches only the child.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setpriority(libc::PRIO_PROCESS, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .args(["-f", iface])
            .env("WG_PROCESS_FOREGROUND", "1")
            .env("LOG_LEVEL", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start wireguard-go for {iface}: {e}"));
        let guard = ChildGuard(child);
        let sock = std::path::PathBuf::from(format!("/var/run/wireguard/{iface}.sock"));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !sock.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "wireguard-go made no UAPI socket for {iface} within 30 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        guard
    }

    /// True when `ping -c1` from this namespace reaches `addr` within `secs` seconds.
    pub fn ping(&self, addr: &str, secs: u32) -> bool {
        let w = secs.to_string();
        self.exec_output("ping", &["-c", "1", "-W", &w, addr])
            .status
            .success()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Also removes every interface that lives in it.
        let _ = output("ip", &["netns", "del", &self.name]);
    }
}

/// A child process killed (by its pid) and reaped when the guard drops.
#[derive(Debug)]
pub struct ChildGuard(pub Child);

impl ChildGuard {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Kills the process with this pid (SIGKILL) when the guard drops, if it still runs.
/// For processes the code under test started; the pid is read right after the start.
#[derive(Debug)]
pub struct PidGuard(pub Option<u32>);

impl Drop for PidGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            if let Ok(pid) = i32::try_from(pid) {
                // SAFETY: kill has no memory preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// Runs `f` on a thread that entered the named namespace; the thread ends when `f`
/// returns. Panics in `f` come back to the caller.
pub fn in_netns<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/var/run/netns/{name}");
    let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: a valid namespace fd; setns changes only this thread, which ends
            // when `f` returns.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// Runs `f` with a multi-thread tokio runtime (two workers) built on a thread inside the
/// named namespace: the runtime's threads, and every socket and child process made on
/// them, live there. A whole test body runs this way (`|rt| rt.block_on(body(..))`).
pub fn with_runtime_in<T: Send>(
    name: &str,
    f: impl FnOnce(&tokio::runtime::Runtime) -> T + Send,
) -> T {
    in_netns(name, || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        f(&runtime)
    })
}
