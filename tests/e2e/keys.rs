//! Keys and secret files of the end-to-end harnesses: `wg genkey` / `wg pubkey` (the
//! real tools, as an operator makes keys) and files written with mode 0600.

#![allow(dead_code)]

use std::path::Path;
use std::process::Stdio;

/// `wg genkey`.
pub async fn wg_genkey() -> String {
    let out = tokio::process::Command::new("wg")
        .arg("genkey")
        .output()
        .await
        .expect("wg genkey");
    assert!(out.status.success(), "wg genkey failed");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `wg pubkey` of a private key.
pub async fn wg_pubkey(private: &str) -> String {
    use tokio::io::AsyncWriteExt as _;
    let mut child = tokio::process::Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("wg pubkey");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(format!("{private}\n").as_bytes())
        .await
        .expect("write to wg pubkey");
    drop(stdin);
    let out = child.wait_with_output().await.expect("wg pubkey");
    assert!(out.status.success(), "wg pubkey failed");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Writes a secret file with mode 0600.
pub fn write_secret(path: &Path, content: &str) {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .expect("write a secret file");
    f.write_all(content.as_bytes())
        .expect("write a secret file");
}
