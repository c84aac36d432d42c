//! Processes of a test's network namespaces: finding them by the namespace they live in
//! (not by name), and killing them by pid when the test ends. Everything that runs in a
//! namespace a test created was started by that test (the agent, the wireguard-go it
//! started, hook shells), so this is how a test cleans up processes it did not spawn
//! itself, such as a wireguard-go orphaned by a SIGKILLed agent.

#![allow(dead_code)]

use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The identity (device, inode) of a named network namespace.
pub fn netns_id(name: &str) -> Option<(u64, u64)> {
    let meta = std::fs::metadata(format!("/var/run/netns/{name}")).ok()?;
    Some((meta.dev(), meta.ino()))
}

/// Pids of the processes whose network namespace is `id` (never this test process).
pub fn pids_in(id: (u64, u64)) -> Vec<u32> {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .map(|m| (m.dev(), m.ino()) == id)
                .unwrap_or(false)
        })
        .collect()
}

/// The command line of a process, arguments split.
pub fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The wireguard-go serving `interface` among the processes of namespace `id`.
pub fn wireguard_go_pid(id: (u64, u64), interface: &str) -> Option<u32> {
    pids_in(id).into_iter().find(|&pid| {
        let args = cmdline(pid);
        args.first().is_some_and(|a| a.ends_with("wireguard-go"))
            && args.iter().skip(1).any(|a| a == interface)
    })
}

/// True while the process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X"))
        }
    }
}

/// Sends `signal` to `pid`.
pub fn signal(pid: u32, signal: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        if pid > 1 {
            // SAFETY: kill(2) takes plain integers.
            unsafe { libc::kill(pid, signal) };
        }
    }
}

/// Waits (polling) until `pid` is gone; false when it still runs after `within`.
pub fn wait_gone(pid: u32, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// On drop: SIGKILLs every process in the given namespaces and removes the UAPI sockets
/// and logs of the given interfaces (a SIGKILLed wireguard-go leaves its socket behind).
#[derive(Debug, Default)]
pub struct Cleanup {
    pub namespaces: Vec<(u64, u64)>,
    pub files: Vec<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for id in &self.namespaces {
            // Twice: a process may have forked while the first round ran.
            for _ in 0..2 {
                let pids = pids_in(*id);
                for &pid in &pids {
                    signal(pid, libc::SIGKILL);
                }
                for pid in pids {
                    let _ = wait_gone(pid, Duration::from_secs(5));
                }
            }
        }
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}
