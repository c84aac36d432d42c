//! The `gatehouse-core` configuration file (TOML): keys, defaults, and their checks.
//! Unknown keys are rejected with the key named. `config/core.toml` documents every key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use serde::Deserialize;

use crate::{CoreConfig, TlsConfig};

/// The file as written (before secrets and TLS files are read).
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default = "default_grpc_listen")]
    pub grpc_listen: SocketAddr,
    #[serde(default = "default_http_listen")]
    pub http_listen: SocketAddr,
    #[serde(default = "default_database")]
    pub database: PathBuf,
    #[serde(default)]
    pub admin_token: Option<String>,
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for FileConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileConfig")
            .field("grpc_listen", &self.grpc_listen)
            .field("http_listen", &self.http_listen)
            .field("database", &self.database)
            .field(
                "admin_token",
                &self.admin_token.as_ref().map(|_| "<redacted>"),
            )
            .field("admin_token_file", &self.admin_token_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .field("client_ca_file", &self.client_ca_file)
            .finish()
    }
}

fn default_grpc_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 50055))
}

fn default_http_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

fn default_database() -> PathBuf {
    PathBuf::from("gatehouse-core.db")
}

impl FileConfig {
    /// Parses the TOML text.
    pub fn parse(text: &str) -> anyhow::Result<FileConfig> {
        // toml's message names the unknown key and where it is.
        toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim_end()))
    }

    /// Reads `path`, or takes every default when there is no file.
    pub fn load(path: Option<&Path>) -> anyhow::Result<FileConfig> {
        match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?;
                Self::parse(&text).with_context(|| format!("in {}", p.display()))
            }
            None => Self::parse(""),
        }
    }

    /// Checks the combinations and reads the token and TLS files.
    pub fn resolve(self) -> anyhow::Result<CoreConfig> {
        let admin_token = match (self.admin_token, &self.admin_token_file) {
            (Some(_), Some(_)) => bail!("set admin_token or admin_token_file, not both"),
            (Some(t), None) => t,
            (None, Some(p)) => std::fs::read_to_string(p)
                .with_context(|| format!("reading admin_token_file {}", p.display()))?
                .trim()
                .to_owned(),
            (None, None) => bail!("admin_token or admin_token_file is required"),
        };
        if admin_token.trim().is_empty() {
            bail!("the admin token is empty");
        }
        let tls = match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => Some(TlsConfig::from_files(
                cert,
                key,
                self.client_ca_file.as_deref(),
            )?),
            (None, None) if self.client_ca_file.is_some() => {
                bail!("client_ca_file needs tls_cert_file and tls_key_file")
            }
            (None, None) => None,
            _ => bail!("tls_cert_file and tls_key_file go together"),
        };
        Ok(CoreConfig {
            grpc_listen: self.grpc_listen,
            http_listen: self.http_listen,
            database: self.database,
            admin_token,
            tls,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = FileConfig::parse("admin_token = \"x\"").unwrap();
        assert_eq!(c.grpc_listen, "127.0.0.1:50055".parse().unwrap());
        assert_eq!(c.http_listen, "127.0.0.1:8080".parse().unwrap());
        let core = c.resolve().unwrap();
        assert_eq!(core.admin_token, "x");
        assert!(core.tls.is_none());
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = FileConfig::parse("admin_token = \"x\"\ngrpc_listn = \"[::1]:1\"").unwrap_err();
        assert!(e.to_string().contains("grpc_listn"), "{e}");
    }

    #[test]
    fn a_token_is_required_once() {
        assert!(FileConfig::parse("").unwrap().resolve().is_err());
        let both = "admin_token = \"x\"\nadmin_token_file = \"/nonexistent\"";
        assert!(FileConfig::parse(both).unwrap().resolve().is_err());
    }

    #[test]
    fn token_file_is_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        std::fs::write(&p, "s3cret\n").unwrap();
        let text = format!("admin_token_file = {:?}", p.display().to_string());
        let core = FileConfig::parse(&text).unwrap().resolve().unwrap();
        assert_eq!(core.admin_token, "s3cret");
        assert!(!format!("{core:?}").contains("s3cret"));
    }

    #[test]
    fn the_documented_example_parses_to_the_defaults() {
        let doc = FileConfig::parse(include_str!("../../../config/core.toml")).unwrap();
        assert_eq!(doc, FileConfig::parse("").unwrap());
    }

    #[test]
    fn tls_files_go_together() {
        let text = "admin_token = \"x\"\ntls_cert_file = \"/a\"";
        assert!(FileConfig::parse(text).unwrap().resolve().is_err());
    }
}
