//! The reference Core as a real process (`gatehouse-core --config FILE`) with its output
//! in a log file, and a test PKI (a CA, a server certificate for 127.0.0.1 and localhost,
//! a client certificate for mTLS) made with rcgen.
//!
//! The process starts in the calling thread's network namespace, is stopped with SIGTERM
//! (or killed with SIGKILL on drop) by its pid, and can be started again on the same
//! configuration, database and ports. Use with `#[path = "support/core_process.rs"]`.

#![allow(dead_code)]

use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, SanType,
};

/// PEM texts of a test PKI.
pub struct Pki {
    pub ca_cert: String,
    pub server_cert: String,
    pub server_key: String,
    pub client_cert: String,
    pub client_key: String,
}

impl Pki {
    /// A fresh CA, a server certificate (`localhost`, `127.0.0.1`) and a client
    /// certificate (`gateway-1`), each key a new ECDSA P-256 key.
    pub fn generate() -> Pki {
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "gatehouse test CA");
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("CA key"))
            .expect("CA certificate");

        let mut server =
            CertificateParams::new(vec!["localhost".to_string()]).expect("server params");
        server
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().expect("address")));
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_key = KeyPair::generate().expect("server key");
        let server_cert = server
            .signed_by(&server_key, &ca)
            .expect("server certificate");

        let mut client =
            CertificateParams::new(vec!["gateway-1".to_string()]).expect("client params");
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_key = KeyPair::generate().expect("client key");
        let client_cert = client
            .signed_by(&client_key, &ca)
            .expect("client certificate");

        Pki {
            ca_cert: ca.pem(),
            server_cert: server_cert.pem(),
            server_key: server_key.serialize_pem(),
            client_cert: client_cert.pem(),
            client_key: client_key.serialize_pem(),
        }
    }
}

/// The `gatehouse-core` binary next to the agent's, built first (a dev-dependency gives
/// the tests its library, not its binary); `GATEHOUSE_CORE_BIN` when set. Cargo's
/// variables of the running test are removed, so build scripts that watch one do not
/// run again.
pub fn core_binary() -> PathBuf {
    // Built beforehand where cargo cannot run (the VM: tests/vm/run-kernel-tests.sh).
    if let Some(bin) = std::env::var_os("GATEHOUSE_CORE_BIN") {
        return PathBuf::from(bin);
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy().into_owned();
        if name.starts_with("CARGO_")
            && !["CARGO_HOME", "CARGO_TARGET_DIR"].contains(&name.as_str())
        {
            cmd.env_remove(name);
        }
    }
    let status = cmd
        .args([
            "build",
            "-q",
            "-p",
            "gatehouse-core",
            "--bin",
            "gatehouse-core",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .status()
        .expect("run cargo build -p gatehouse-core");
    assert!(status.success(), "cargo build -p gatehouse-core failed");
    let bin = Path::new(env!("CARGO_BIN_EXE_gatehouse")).with_file_name("gatehouse-core");
    assert!(bin.exists(), "{} is missing", bin.display());
    bin
}

/// A free TCP port on 127.0.0.1 of the calling thread's network namespace.
pub fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr")
}

/// A `gatehouse-core` process; SIGKILLed by pid and reaped on drop if it still runs.
pub struct CoreProcess {
    child: Option<Child>,
    pub binary: PathBuf,
    pub config: PathBuf,
    /// stdout and stderr of every run, appended.
    pub log: PathBuf,
    /// The admin API (`http_listen`).
    pub http: SocketAddr,
    env: Vec<(String, String)>,
}

impl CoreProcess {
    /// Starts `binary --config config` with only `PATH` and `env` in its environment.
    pub fn start(
        binary: &Path,
        config: &Path,
        log: &Path,
        http: SocketAddr,
        env: &[(&str, &str)],
    ) -> CoreProcess {
        let mut core = CoreProcess {
            child: None,
            binary: binary.to_path_buf(),
            config: config.to_path_buf(),
            log: log.to_path_buf(),
            http,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        core.spawn();
        core
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "the Core already runs");
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the Core log");
        let err = out.try_clone().expect("dup the Core log");
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--config")
            .arg(&self.config)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        if let Some(path) = std::env::var_os("PATH") {
            cmd.env("PATH", path);
        }
        self.child = Some(cmd.spawn().expect("start gatehouse-core"));
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits until `/readyz` answers 200; panics (with the log's tail) if the process
    /// exits or `within` passes first.
    pub async fn wait_ready(&mut self, within: Duration) {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("http client");
        let url = format!("http://{}/readyz", self.http);
        let deadline = Instant::now() + within;
        loop {
            if let Ok(r) = client.get(&url).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "gatehouse-core exited at start ({status}):\n{}",
                    tail(&self.log, 30)
                );
            }
            assert!(
                Instant::now() < deadline,
                "gatehouse-core not ready within {within:?}:\n{}",
                tail(&self.log, 30)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then waits up to `within` for the exit; panics if it does not exit.
    pub fn stop(&mut self, within: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("the Core runs");
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: kill(2) takes plain integers; the pid is our unreaped child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().expect("wait for gatehouse-core") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("gatehouse-core did not exit within {within:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL (a crash: no shutdown of any kind), then reaps it.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("the Core runs");
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: kill(2) takes plain integers; the pid is our unreaped child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = child.wait();
    }

    /// Whether the process runs (started and not stopped or killed).
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts it again (same configuration, database, ports and log).
    pub fn start_again(&mut self) {
        self.spawn();
    }
}

impl Drop for CoreProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The last `n` lines of a file (empty when unreadable).
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
