//! The Core connection over TLS: the agent trusts `core.ca_file` instead of the system
//! roots, refuses a Core it cannot verify, and presents a client certificate under mTLS.
//! Certificates are generated per test (rcgen); everything runs on loopback, no root.

#[path = "support/mod.rs"]
mod support;

use std::net::SocketAddr;

use gatehouse_core::client::AdminClient;
use gatehouse_core::{CoreConfig, RunningCore, TlsConfig};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, SanType,
};
use support::{eventually, plain_location, settings, Agent, ADMIN_TOKEN};

struct Pki {
    ca_pem: String,
    server: (String, String),
    client: (String, String),
}

fn pki() -> Pki {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "gatehouse test CA");
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();

    let mut server = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    server
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_key = KeyPair::generate().unwrap();
    let server_cert = server.signed_by(&server_key, &ca).unwrap();

    let mut client = CertificateParams::new(vec!["gateway-1".to_string()]).unwrap();
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_key = KeyPair::generate().unwrap();
    let client_cert = client.signed_by(&client_key, &ca).unwrap();

    Pki {
        ca_pem: ca.pem(),
        server: (server_cert.pem(), server_key.serialize_pem()),
        client: (client_cert.pem(), client_key.serialize_pem()),
    }
}

struct TlsCore {
    core: RunningCore,
    admin: AdminClient,
    _dir: tempfile::TempDir,
}

async fn tls_core(pki: &Pki, mtls: bool) -> TlsCore {
    let dir = tempfile::tempdir().unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let core = gatehouse_core::start(CoreConfig {
        grpc_listen: any,
        http_listen: any,
        database: dir.path().join("core.db"),
        admin_token: ADMIN_TOKEN.into(),
        tls: Some(TlsConfig {
            cert_pem: pki.server.0.clone().into_bytes(),
            key_pem: pki.server.1.clone().into_bytes(),
            client_ca_pem: mtls.then(|| pki.ca_pem.clone().into_bytes()),
        }),
    })
    .await
    .expect("start Core with TLS");
    TlsCore {
        admin: AdminClient::new(core.http_url(), ADMIN_TOKEN),
        core,
        _dir: dir,
    }
}

async fn location(core: &TlsCore) -> (u64, String, u64) {
    let loc = core
        .admin
        .create_location(&plain_location("tls"))
        .await
        .unwrap();
    core.admin
        .add_peers(loc.id, &support::peer_list(0, 3))
        .await
        .unwrap();
    let token = core.admin.create_token(loc.id).await.unwrap();
    let rev = core.admin.location(loc.id).await.unwrap().revision;
    (loc.id, token, rev)
}

fn url(core: &TlsCore) -> String {
    format!("https://127.0.0.1:{}", core.core.grpc_addr().port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_trusts_the_configured_ca() {
    let pki = pki();
    let core = tls_core(&pki, false).await;
    let (loc, token, rev) = location(&core).await;
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(&url(&core), &token, dir.path());
    s.core.ca_pem = Some(pki.ca_pem.clone().into_bytes());
    let agent =
        Agent::start_with(s, gatehouse::backend::memory::MemoryBackend::new("wgtls0")).await;
    agent.applied(rev).await;
    eventually("Core lists the gateway over TLS", || async {
        let gws = core.admin.gateways(loc).await.unwrap();
        gws.len() == 1 && gws[0].applied_revision == rev
    })
    .await;
    agent.stop().await.unwrap();
    core.core.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unverifiable_core_is_refused() {
    let pki = pki();
    let core = tls_core(&pki, false).await;
    let (_loc, token, _rev) = location(&core).await;
    let dir = tempfile::tempdir().unwrap();
    // No ca_file: the system roots do not know the test CA.
    let s = settings(&url(&core), &token, dir.path());
    let agent =
        Agent::start_with(s, gatehouse::backend::memory::MemoryBackend::new("wgtls1")).await;
    eventually("the connection is refused", || async {
        agent.status().core.consecutive_failures >= 2
    })
    .await;
    let status = agent.status();
    assert!(!status.core.connected);
    assert_eq!(status.applied_revision, 0);
    let error = status.core.last_error.unwrap_or_default().to_lowercase();
    assert!(
        error.contains("certificate") || error.contains("tls"),
        "{error}"
    );
    agent.stop().await.unwrap();
    core.core.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_the_client_certificate() {
    let pki = pki();
    let core = tls_core(&pki, true).await;
    let (_loc, token, rev) = location(&core).await;

    // Without a client certificate: refused (on the first call, not on connect).
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(&url(&core), &token, dir.path());
    s.core.ca_pem = Some(pki.ca_pem.clone().into_bytes());
    let agent = Agent::start_with(
        s.clone(),
        gatehouse::backend::memory::MemoryBackend::new("wgtls2"),
    )
    .await;
    eventually("refused without a client certificate", || async {
        agent.status().core.consecutive_failures >= 2
    })
    .await;
    assert_eq!(agent.status().applied_revision, 0);
    agent.stop().await.unwrap();

    // With it: connected and applied.
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(&url(&core), &token, dir.path());
    s.core.ca_pem = Some(pki.ca_pem.clone().into_bytes());
    s.core.client_identity = Some((
        pki.client.0.clone().into_bytes(),
        pki.client.1.clone().into_bytes(),
    ));
    let agent =
        Agent::start_with(s, gatehouse::backend::memory::MemoryBackend::new("wgtls3")).await;
    agent.applied(rev).await;
    assert!(agent.status().core.connected);
    agent.stop().await.unwrap();
    core.core.stop().await;
}
