//! The drill's traffic: `ping -D -i 0.1` from the client (its log kept and read as it
//! grows), and one TCP flow through the tunnel to an echo server on the far host: a line
//! every 100 ms, each echo checked, the arrival of each echo recorded like a ping answer.
//! Sockets are opened on threads that entered the namespace, so they live there whatever
//! thread uses them afterwards.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::task::JoinHandle;

use super::netns::{ChildGuard, Netns};
use super::timeline::{self, Answer};

/// How long one echo may take before the flow counts as broken (far beyond any move).
const ECHO_TIMEOUT: Duration = Duration::from_secs(120);

/// Now, as unix seconds (the clock of `ping -D`).
pub fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// `ping -D -n -i 0.1 target` in the client namespace, its output in a log file.
pub struct Pinger {
    _child: ChildGuard,
    pub log: PathBuf,
}

impl Pinger {
    pub fn start(client: &Netns, target: &str, log: &Path) -> Pinger {
        let out = std::fs::File::create(log).expect("create the ping log");
        let mut cmd = Command::new("ip");
        super::gateway::normal_priority(&mut cmd);
        let child = cmd
            .args([
                "netns",
                "exec",
                client.name(),
                "ping",
                "-D",
                "-n",
                "-i",
                "0.1",
            ])
            .arg(target)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(Stdio::null())
            .spawn()
            .expect("start ping");
        Pinger {
            _child: ChildGuard(child),
            log: log.to_path_buf(),
        }
    }

    /// Every answer so far.
    pub fn answers(&self) -> Vec<Answer> {
        timeline::parse_ping_log(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }
}

/// An echo server (one line back for each line) on `addr` inside `ns`.
pub fn echo_server(ns: &Netns, addr: &str) -> JoinHandle<()> {
    let std_listener =
        ns.enter(|| std::net::TcpListener::bind(addr).expect("bind the echo server"));
    std_listener.set_nonblocking(true).expect("nonblocking");
    let listener = tokio::net::TcpListener::from_std(std_listener).expect("tokio listener");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if write
                        .write_all(format!("{line}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            });
        }
    })
}

/// The TCP flow: what it recorded, shared with its task.
#[derive(Default)]
struct FlowLog {
    echoes: Vec<Answer>,
    error: Option<String>,
}

pub struct TcpFlow {
    task: JoinHandle<()>,
    log: Arc<Mutex<FlowLog>>,
}

impl TcpFlow {
    /// Connects from inside `client` to `addr` and starts sending.
    pub fn start(client: &Netns, addr: &str) -> TcpFlow {
        let target: std::net::SocketAddr = addr.parse().expect("echo address");
        let stream = client.enter(|| {
            std::net::TcpStream::connect_timeout(&target, Duration::from_secs(10))
                .expect("connect the TCP flow through the tunnel")
        });
        stream.set_nodelay(true).expect("nodelay");
        stream.set_nonblocking(true).expect("nonblocking");
        let stream = tokio::net::TcpStream::from_std(stream).expect("tokio stream");
        let log = Arc::new(Mutex::new(FlowLog::default()));
        let shared = log.clone();
        let task = tokio::spawn(async move {
            let result = run_flow(stream, &shared).await;
            if let Err(e) = result {
                shared.lock().expect("flow log").error = Some(e);
            }
        });
        TcpFlow { task, log }
    }

    pub fn answers(&self) -> Vec<Answer> {
        self.log.lock().expect("flow log").echoes.clone()
    }

    /// The flow's error, if it broke (a wrong echo, a reset, an echo overdue).
    pub fn error(&self) -> Option<String> {
        let log = self.log.lock().expect("flow log");
        if let Some(e) = &log.error {
            return Some(e.clone());
        }
        self.task
            .is_finished()
            .then(|| "the flow's task ended".to_string())
    }
}

impl Drop for TcpFlow {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run_flow(stream: tokio::net::TcpStream, log: &Mutex<FlowLog>) -> Result<(), String> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for seq in 0u64.. {
        tick.tick().await;
        write
            .write_all(format!("{seq}\n").as_bytes())
            .await
            .map_err(|e| format!("send line {seq}: {e}"))?;
        let line = tokio::time::timeout(ECHO_TIMEOUT, lines.next_line())
            .await
            .map_err(|_| format!("no echo of line {seq} within {ECHO_TIMEOUT:?}"))?
            .map_err(|e| format!("read echo {seq}: {e}"))?
            .ok_or_else(|| format!("the far host closed the flow before echo {seq}"))?;
        if line != seq.to_string() {
            return Err(format!("echo {seq}: got {line:?}"));
        }
        log.lock().expect("flow log").echoes.push(Answer {
            at: now_unix(),
            seq,
        });
    }
    Ok(())
}
