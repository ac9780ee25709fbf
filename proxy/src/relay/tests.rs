//! Two real relays on loopback, a minimal agent speaking the tunnel
//! protocol, and mesh clients with and without the right certificates.

use std::time::Duration;

use devmesh_shared::signing::SigningKey;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

use super::*;

/// A mesh CA and what it signs.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        Self {
            cert: params.self_signed(&key).unwrap(),
            key,
        }
    }

    /// A relay certificate for `name` (server and client auth).
    fn issue(&self, name: &str) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
    }
}

struct TestRelay {
    relay: Relay,
    events: mpsc::UnboundedReceiver<AttachEvent>,
    _shutdown: tokio_util::sync::DropGuard,
}

fn start_relay(ca: &Ca, region: &str, signer: &SigningKey, locations: Locations) -> TestRelay {
    let socket = devmesh_shared::net::udp_socket("127.0.0.1:0".parse().unwrap()).unwrap();
    let address = socket.local_addr().unwrap().to_string();
    let (chain, key) = ca.issue(&format!("{region}.relay.test"));
    let (events, rx) = mpsc::unbounded_channel();
    let shutdown = CancellationToken::new();
    let relay = Relay::start(
        RelayConfig {
            socket,
            advertised: RelayInfo {
                region: region.into(),
                address,
                server_name: format!("{region}.relay.test"),
            },
            cert_chain: chain,
            key,
            mesh_ca_pem: ca.cert.pem(),
            keys: Keys::new(&[signer.public_key()]).unwrap(),
            events,
            locations,
        },
        shutdown.clone(),
        &TaskTracker::new(),
    )
    .unwrap();
    TestRelay {
        relay,
        events: rx,
        _shutdown: shutdown.drop_guard(),
    }
}

/// A QUIC client trusting `ca`, speaking `alpn`, with an optional client
/// certificate.
fn client(
    ca: &Ca,
    alpn: &[u8],
    cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> (quinn::Endpoint, quinn::ClientConfig) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut tls = match cert {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    let config = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ));
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    (endpoint, config)
}

/// A minimal agent: attaches to `relay` and echoes every stream's bytes
/// after answering its header with `ok`.
async fn echo_agent(ca: &Ca, relay: &TestRelay, signer: &SigningKey) -> (Uuid, Connection) {
    let agent = Uuid::new_v4();
    let (endpoint, config) = client(ca, tunnel::ALPN, None);
    let conn = endpoint
        .connect_with(
            config,
            relay.relay.local_addr,
            &relay.relay.advertised().server_name,
        )
        .unwrap()
        .await
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let ticket = signer.sign(&AttachTicket {
        agent_id: agent,
        workspace_id: Uuid::new_v4(),
        exp: chrono::Utc::now().timestamp() + 60,
    });
    tio::write_control(&mut send, &Control::Attach { ticket })
        .await
        .unwrap();
    assert!(matches!(
        tio::read_control(&mut recv).await.unwrap(),
        Some(Control::Attached { .. })
    ));
    let serving = conn.clone();
    tokio::spawn(async move {
        let _control = (send, recv);
        while let Ok((mut s, mut r)) = serving.accept_bi().await {
            tokio::spawn(async move {
                tio::read_header(&mut r).await.unwrap();
                s.write_all(&[tunnel::status::OK]).await.unwrap();
                let _ = tokio::io::copy(&mut r, &mut s).await;
                let _ = s.finish();
            });
        }
    });
    (agent, conn)
}

async fn echo_through(relay: &Relay, agent: Uuid, text: &[u8]) -> Result<Vec<u8>, OpenError> {
    let (mut send, mut recv) = relay.open(agent, &StreamHeader::Tcp { port: 1 }).await?;
    send.write_all(text).await.unwrap();
    send.finish().unwrap();
    Ok(recv.read_to_end(1 << 20).await.unwrap())
}

#[tokio::test]
async fn a_stream_for_an_agent_attached_elsewhere_crosses_the_mesh() {
    devmesh_shared::runtime::install_crypto_provider();
    let (ca, signer) = (Ca::new("mesh"), SigningKey::generate("k"));
    let locations = Locations::default();
    let a = start_relay(&ca, "eu", &signer, locations.clone());
    let mut b = start_relay(&ca, "ap", &signer, Locations::default());
    let (agent, _conn) = echo_agent(&ca, &b, &signer).await;
    assert!(matches!(
        b.events.recv().await,
        Some(AttachEvent::Attached { agent: a, .. }) if a == agent
    ));

    // Unknown location: not connected. Known: across the mesh and back.
    assert_eq!(
        echo_through(&a.relay, agent, b"x").await,
        Err(OpenError::NotConnected)
    );
    locations.set(AgentLocation {
        agent_id: agent,
        relay: Some(b.relay.advertised().clone()),
    });
    for i in 0..3 {
        let text = format!("hello over the mesh {i}");
        assert_eq!(
            echo_through(&a.relay, agent, text.as_bytes())
                .await
                .unwrap(),
            text.as_bytes()
        );
    }
    assert_eq!(a.relay.stats().mesh_streams_out.load(Ordering::Relaxed), 3);
    assert_eq!(b.relay.stats().mesh_streams_in.load(Ordering::Relaxed), 3);

    // A home relay never forwards again: a location pointing back is refused.
    let stranger = Uuid::new_v4();
    locations.set(AgentLocation {
        agent_id: stranger,
        relay: Some(b.relay.advertised().clone()),
    });
    assert_eq!(
        echo_through(&a.relay, stranger, b"x").await,
        Err(OpenError::NotConnected)
    );
}

#[tokio::test]
async fn mesh_peers_need_a_certificate_from_the_mesh_ca() {
    devmesh_shared::runtime::install_crypto_provider();
    let (ca, signer) = (Ca::new("mesh"), SigningKey::generate("k"));
    let b = start_relay(&ca, "ap", &signer, Locations::default());
    let (agent, _conn) = echo_agent(&ca, &b, &signer).await;
    let header = MeshHeader {
        agent_id: agent,
        inner: StreamHeader::Tcp { port: 1 },
    };
    let server_name = b.relay.advertised().server_name.clone();

    // No client certificate: the handshake completes, then the relay closes.
    let (endpoint, config) = client(&ca, tunnel::MESH_ALPN, None);
    let conn = endpoint
        .connect_with(config, b.relay.local_addr, &server_name)
        .unwrap()
        .await
        .unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .expect("the relay closes the connection");
    assert!(
        matches!(reason, quinn::ConnectionError::ApplicationClosed(ref c) if c.error_code == 4u32.into()),
        "{reason:?}"
    );

    // A certificate from another CA fails the handshake.
    let foreign = Ca::new("not the mesh");
    let (endpoint, config) = client(&ca, tunnel::MESH_ALPN, Some(foreign.issue("x.relay.test")));
    let handshake = endpoint
        .connect_with(config, b.relay.local_addr, &server_name)
        .unwrap()
        .await;
    let refused = match handshake {
        Err(_) => true,
        // TLS 1.3 clients finish before the server checks their certificate.
        Ok(c) => {
            let opened = async {
                let (mut s, mut r) = c.open_bi().await?;
                tio::write_mesh_header(&mut s, &header).await?;
                let mut status = [0u8; 1];
                r.read_exact(&mut status).await?;
                anyhow::Ok(status[0])
            };
            tokio::time::timeout(Duration::from_secs(5), opened)
                .await
                .map_or(true, |r| r.is_err())
        }
    };
    assert!(refused, "a foreign certificate reached the agent");

    // The right certificate reaches the agent.
    let (endpoint, config) = client(&ca, tunnel::MESH_ALPN, Some(ca.issue("eu.relay.test")));
    let c = endpoint
        .connect_with(config, b.relay.local_addr, &server_name)
        .unwrap()
        .await
        .unwrap();
    let (mut s, mut r) = c.open_bi().await.unwrap();
    tio::write_mesh_header(&mut s, &header).await.unwrap();
    let mut status = [0u8; 1];
    r.read_exact(&mut status).await.unwrap();
    assert_eq!(status[0], tunnel::status::OK);
}

#[tokio::test]
async fn a_renewed_certificate_is_served_to_new_connections() {
    devmesh_shared::runtime::install_crypto_provider();
    let (ca, signer) = (Ca::new("mesh"), SigningKey::generate("k"));
    let b = start_relay(&ca, "ap", &signer, Locations::default());
    let served = || async {
        let (endpoint, config) = client(&ca, tunnel::ALPN, None);
        let c = endpoint
            .connect_with(
                config,
                b.relay.local_addr,
                &b.relay.advertised().server_name,
            )
            .unwrap()
            .await
            .unwrap();
        let chain = c
            .peer_identity()
            .unwrap()
            .downcast::<Vec<CertificateDer<'static>>>()
            .unwrap();
        chain[0].clone()
    };
    let before = served().await;
    let (chain, key) = ca.issue("ap.relay.test");
    let renewed = chain[0].clone();
    b.relay.set_certificate(chain, key).unwrap();
    let after = served().await;
    assert_ne!(before, after);
    assert_eq!(after, renewed);
}
