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

// ------------------------------------------------------------------ traffic --

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Enters the named namespace on this thread.
pub fn setns(name: &str) {
    let path = format!("/var/run/netns/{name}");
    let f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {name}: {}", std::io::Error::last_os_error());
}

/// Runs `f` on a thread in the named namespace.
pub fn in_ns<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            setns(name);
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// TCP servers on `[::]` (both families) and UDP servers on each of `udp_addrs` (so an
/// answer leaves from the address asked) in a namespace: each TCP connection gets the
/// address it came from as a line, then every line back; each UDP datagram gets the
/// sender's address back. Stopped on drop.
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Servers {
    pub fn start(ns: Option<&str>, tcp: &[u16], udp: &[u16], udp_addrs: &[&str]) -> Servers {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for &port in tcp {
            let (stop, ns) = (stop.clone(), ns.map(str::to_string));
            let (tx, rx) = std::sync::mpsc::channel();
            threads.push(std::thread::spawn(move || {
                if let Some(ns) = &ns {
                    setns(ns);
                }
                let l = TcpListener::bind(("::", port)).expect("bind tcp");
                l.set_nonblocking(true).expect("nonblocking");
                tx.send(()).expect("started");
                while !stop.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((mut c, from)) => {
                            let _ = c.set_nonblocking(false);
                            std::thread::spawn(move || {
                                let _ = writeln!(c, "{}", from.ip().to_canonical());
                                let mut buf = [0u8; 512];
                                while let Ok(n) = c.read(&mut buf) {
                                    if n == 0 || c.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            });
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            }));
            rx.recv().expect("tcp server up");
        }
        for (&port, addr) in udp
            .iter()
            .flat_map(|p| udp_addrs.iter().map(move |a| (p, a.to_string())))
        {
            let (stop, ns) = (stop.clone(), ns.map(str::to_string));
            let (tx, rx) = std::sync::mpsc::channel();
            threads.push(std::thread::spawn(move || {
                if let Some(ns) = &ns {
                    setns(ns);
                }
                let ip: std::net::IpAddr = addr.parse().expect("an address");
                let s = UdpSocket::bind((ip, port)).expect("bind udp");
                s.set_read_timeout(Some(Duration::from_millis(50)))
                    .expect("timeout");
                tx.send(()).expect("started");
                let mut buf = [0u8; 512];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((_, from)) = s.recv_from(&mut buf) {
                        let _ = s.send_to(from.ip().to_canonical().to_string().as_bytes(), from);
                    }
                }
            }));
            rx.recv().expect("udp server up");
        }
        Servers { stop, threads }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A TCP connection from the calling thread's namespace: the source the server saw, or
/// None when it does not connect within 1.5 s.
pub fn tcp_probe(to: SocketAddr, bind: Option<std::net::IpAddr>) -> Option<String> {
    let mut s = match bind {
        None => TcpStream::connect_timeout(&to, Duration::from_millis(1500)).ok()?,
        Some(ip) => {
            let sock = socket2::Socket::new(
                socket2::Domain::for_address(to),
                socket2::Type::STREAM,
                None,
            )
            .ok()?;
            sock.bind(&SocketAddr::new(ip, 0).into()).ok()?;
            sock.connect_timeout(&to.into(), Duration::from_millis(1500))
                .ok()?;
            sock.into()
        }
    };
    s.set_read_timeout(Some(Duration::from_millis(1500))).ok()?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).ok()? == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    Some(String::from_utf8_lossy(&line).into_owned())
}

/// One UDP exchange: the source the server saw, or None without an answer in 1 s.
pub fn udp_probe(to: SocketAddr) -> Option<String> {
    let any: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse().ok()?
    } else {
        "[::]:0".parse().ok()?
    };
    let s = UdpSocket::bind(any).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    s.send_to(b"x", to).ok()?;
    let mut buf = [0u8; 128];
    let (n, _) = s.recv_from(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// An open TCP connection that echoes: `alive()` says whether a round trip still works.
pub struct Conn(TcpStream);

impl Conn {
    pub fn open(to: SocketAddr) -> Option<Conn> {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_millis(1500)).ok()?;
        s.set_read_timeout(Some(Duration::from_millis(1500))).ok()?;
        let mut b = [0u8; 1];
        while s.read(&mut b).ok()? == 1 && b[0] != b'\n' {}
        Some(Conn(s))
    }

    pub fn alive(&mut self) -> bool {
        if self.0.write_all(b"ping\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 5];
        self.0.read_exact(&mut buf).is_ok()
    }
}
