//! Two real relays on loopback, a minimal agent speaking the tunnel
//! protocol, and mesh clients with and without the right certificates.

use std::time::Duration;

use devmesh_shared::signing::SigningKey;
use devmesh_shared::tunnel::session::{AgentSession, PingTiming};
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
    peers: MeshPeers,
    revocations: Arc<crate::revocations::Revocations>,
    events: mpsc::UnboundedReceiver<AttachEvent>,
    _shutdown: tokio_util::sync::DropGuard,
}

fn start_relay(ca: &Ca, region: &str, signer: &SigningKey, locations: Locations) -> TestRelay {
    start_relay_with(ca, region, signer, locations, false, 0)
}

/// A relay; `signs` gives it `signer` to sign its own mesh grants with.
fn start_relay_with(
    ca: &Ca,
    region: &str,
    signer: &SigningKey,
    locations: Locations,
    signs: bool,
    max_per_ip: usize,
) -> TestRelay {
    let socket = devmesh_net::sockets::udp_socket("127.0.0.1:0".parse().unwrap()).unwrap();
    let address = socket.local_addr().unwrap().to_string();
    let (chain, key) = ca.issue(&format!("{region}.relay.test"));
    let (events, rx) = mpsc::unbounded_channel();
    let shutdown = CancellationToken::new();
    let mesh_peers = peers();
    let revocations: Arc<crate::revocations::Revocations> = Arc::default();
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
            peers: mesh_peers.clone(),
            max_connections_per_ip: max_per_ip,
            revocations: revocations.clone(),
            grant_signer: signs.then(|| {
                let key = SigningKey::from_pkcs8("k", signer.pkcs8()).unwrap();
                Arc::new(move |g: &StreamGrant| key.sign(g)) as GrantSigner
            }),
        },
        shutdown.clone(),
        &TaskTracker::new(),
    )
    .unwrap();
    TestRelay {
        relay,
        peers: mesh_peers,
        revocations,
        events: rx,
        _shutdown: shutdown.drop_guard(),
    }
}

/// The test relays' names, all accepted as mesh peers.
fn peers() -> MeshPeers {
    let p = MeshPeers::default();
    p.set(
        ["eu", "ap", "plain", "primary"]
            .iter()
            .map(|r| MeshPeer {
                server_name: format!("{r}.relay.test"),
                certs_valid_from: 0,
            })
            .collect(),
    );
    p
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

/// A fresh ticket for a new agent addressed to `relay`.
fn ticket_for(relay: &TestRelay) -> AttachTicket {
    AttachTicket {
        agent_id: Uuid::new_v4(),
        workspace_id: Uuid::new_v4(),
        relay: relay.relay.advertised().address.clone(),
        nonce: Uuid::new_v4().to_string(),
        issued_at_ms: chrono::Utc::now().timestamp_millis(),
        exp: chrono::Utc::now().timestamp() + 60,
    }
}

/// A QUIC connection to `relay` speaking `alpn`, with a client
/// certificate when given.
async fn connect(
    ca: &Ca,
    relay: &TestRelay,
    alpn: &[u8],
    cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Connection {
    let (endpoint, config) = client(ca, alpn, cert);
    endpoint
        .connect_with(
            config,
            relay.relay.local_addr,
            &relay.relay.advertised().server_name,
        )
        .unwrap()
        .await
        .unwrap()
}

/// Presents `ticket` to `relay` as an agent would; the tunnel and its
/// control stream, or the relay's reason for refusing.
async fn attach(
    ca: &Ca,
    relay: &TestRelay,
    ticket: String,
) -> Result<(Connection, SendStream, RecvStream), String> {
    let conn = connect(ca, relay, tunnel::ALPN, None).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let timing = PingTiming {
        ping_interval: Duration::from_secs(10),
        dead_after: Duration::from_secs(30),
    };
    let mut session = AgentSession::new(ticket, timing, tokio::time::Instant::now());
    match tio::attach(&mut send, &mut recv, &mut session).await {
        Ok(_) => Ok((conn, send, recv)),
        Err(SessionError::Refused(reason)) => Err(reason),
        Err(other) => Err(other.to_string()),
    }
}

/// A minimal agent: attaches to `relay` and echoes every stream's bytes
/// after answering its header with `ok`.
async fn echo_agent(ca: &Ca, relay: &TestRelay, signer: &SigningKey) -> (Uuid, Connection) {
    let ticket = ticket_for(relay);
    let agent = ticket.agent_id;
    (agent, echo_with(ca, relay, signer.sign(&ticket)).await)
}

/// [`echo_agent`] with a given signed ticket; the agent's connection.
async fn echo_with(ca: &Ca, relay: &TestRelay, ticket: String) -> Connection {
    let (conn, send, recv) = attach(ca, relay, ticket).await.unwrap();
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
    conn
}

#[tokio::test]
async fn a_ticket_attaches_once_and_only_to_the_relay_it_names() {
    devmesh_net::runtime::install_crypto_provider();
    let (ca, signer) = (Ca::new("mesh"), SigningKey::generate("k"));
    let eu = start_relay(&ca, "eu", &signer, Locations::default());
    let ap = start_relay(&ca, "ap", &signer, Locations::default());
    let ticket = signer.sign(&ticket_for(&eu));

    // A relay that saw it (or stole it) cannot use it elsewhere.
    let refused = attach(&ca, &ap, ticket.clone()).await.err().unwrap();
    assert!(refused.contains("another relay"), "{refused}");
    assert!(ap.relay.attached_agents().is_empty());

    // It attaches where it was meant to, once.
    let (_tunnel, _send, _recv) = attach(&ca, &eu, ticket.clone()).await.unwrap();
    assert_eq!(eu.relay.attachment_proofs(), vec![ticket.clone()]);
    let replayed = attach(&ca, &eu, ticket).await.err().unwrap();
    assert!(replayed.contains("already used"), "{replayed}");
    assert_eq!(eu.relay.attachment_proofs().len(), 1);
    assert_eq!(eu.relay.stats().attach_refused.load(Ordering::Relaxed), 1);
}

/// A grant for port 1 of `agent`, as the primary signs them.
fn grant(signer: &SigningKey, agent: Uuid) -> String {
    signer.sign(&StreamGrant {
        agent_id: agent,
        stream: GrantedStream::Port(1),
        exp: chrono::Utc::now().timestamp() + 60,
    })
}

async fn echo_through(
    relay: &Relay,
    agent: Uuid,
    grant: &str,
    text: &[u8],
) -> Result<Vec<u8>, OpenError> {
    let (mut send, mut recv) = relay
        .open(agent, &StreamHeader::Tcp { port: 1 }, Some(grant))
        .await?;
    send.write_all(text).await.unwrap();
    send.finish().unwrap();
    Ok(recv.read_to_end(1 << 20).await.unwrap())
}

#[tokio::test]
async fn a_stream_for_an_agent_attached_elsewhere_crosses_the_mesh() {
    devmesh_net::runtime::install_crypto_provider();
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
        echo_through(&a.relay, agent, &grant(&signer, agent), b"x").await,
        Err(OpenError::NotConnected)
    );
    locations.set(AgentLocation {
        agent_id: agent,
        relay: Some(b.relay.advertised().clone()),
    });
    for i in 0..3 {
        let text = format!("hello over the mesh {i}");
        assert_eq!(
            echo_through(&a.relay, agent, &grant(&signer, agent), text.as_bytes())
                .await
                .unwrap(),
            text.as_bytes()
        );
    }
    assert_eq!(a.relay.stats().mesh_streams_out.load(Ordering::Relaxed), 3);
    assert_eq!(b.relay.stats().mesh_streams_in.load(Ordering::Relaxed), 3);

    // A home relay never forwards again: a location pointing back is refused
    // (once the wait for the stranger to be located elsewhere ends: here,
    // when the primary says it is nowhere).
    let stranger = Uuid::new_v4();
    locations.set(AgentLocation {
        agent_id: stranger,
        relay: Some(b.relay.advertised().clone()),
    });
    let nowhere = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        locations.set(AgentLocation {
            agent_id: stranger,
            relay: None,
        });
    };
    let stranger_grant = grant(&signer, stranger);
    let (answer, ()) = tokio::join!(
        echo_through(&a.relay, stranger, &stranger_grant, b"x"),
        nowhere
    );
    assert_eq!(answer, Err(OpenError::NotConnected));
}

/// A relay that was started and is gone, which `knower` already takes for
/// dead (as when its mesh link went silent).
fn dead_relay(ca: &Ca, signer: &SigningKey, knower: &TestRelay) -> RelayInfo {
    let dead = start_relay(ca, "us", signer, Locations::default());
    let home = dead.relay.advertised().clone();
    drop(dead);
    knower
        .relay
        .inner
        .dead
        .lock()
        .insert(home.address.clone(), tokio::time::Instant::now());
    home
}

#[tokio::test]
async fn a_stream_for_an_agent_whose_relay_died_waits_for_it_to_attach_elsewhere() {
    devmesh_net::runtime::install_crypto_provider();
    let (ca, signer) = (Ca::new("mesh"), SigningKey::generate("k"));
    let locations = Locations::default();
    let a = start_relay(&ca, "eu", &signer, locations.clone());
    let mut c = start_relay(&ca, "ap", &signer, Locations::default());
    let dead_home = dead_relay(&ca, &signer, &a);
    let agent_ticket = ticket_for(&c);
    let agent = agent_ticket.agent_id;
    locations.set(AgentLocation {
        agent_id: agent,
        relay: Some(dead_home),
    });

    // The agent re-attaches elsewhere while a request waits for it.
    let started = tokio::time::Instant::now();
    let moves = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let conn = echo_with(&ca, &c, signer.sign(&agent_ticket)).await;
        assert!(matches!(
            c.events.recv().await,
            Some(AttachEvent::Attached { .. })
        ));
        locations.set(AgentLocation {
            agent_id: agent,
            relay: Some(c.relay.advertised().clone()),
        });
        conn
    };
    let agent_grant = grant(&signer, agent);
    let (answer, _conn) = tokio::join!(
        echo_through(&a.relay, agent, &agent_grant, b"still there"),
        moves
    );
    assert_eq!(answer.unwrap(), b"still there");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(a.relay.stats().rerouted.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn mesh_peers_need_a_certificate_from_the_mesh_ca() {
    devmesh_net::runtime::install_crypto_provider();
    let (ca, signer) = (Ca::new("mesh"), SigningKey::generate("k"));
    let b = start_relay(&ca, "ap", &signer, Locations::default());
    let (agent, _conn) = echo_agent(&ca, &b, &signer).await;
    let header = MeshHeader {
        agent_id: agent,
        grant: grant(&signer, agent),
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
        matches!(reason, quinn::ConnectionError::ApplicationClosed(ref c) if c.error_code == close::NO_MESH_CERTIFICATE.into()),
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
    devmesh_net::runtime::install_crypto_provider();
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

/// Opens a mesh stream to `relay` with `header` on a connection with a
/// valid mesh certificate; the home relay's status byte.
async fn mesh_status(ca: &Ca, relay: &TestRelay, header: &MeshHeader) -> u8 {
    let c = connect(
        ca,
        relay,
        tunnel::MESH_ALPN,
        Some(ca.issue("eu.relay.test")),
    )
    .await;
    let (mut s, mut r) = c.open_bi().await.unwrap();
    tio::write_mesh_header(&mut s, header).await.unwrap();
    let mut status = [0u8; 1];
    r.read_exact(&mut status).await.unwrap();
    status[0]
}

#[tokio::test]
async fn a_mesh_certificate_alone_opens_nothing_a_grant_opens_what_it_names() {
    devmesh_net::runtime::install_crypto_provider();
    let (ca, signer) = (Ca::new("mesh"), SigningKey::generate("k"));
    let home = start_relay(&ca, "ap", &signer, Locations::default());
    let (agent, _conn) = echo_agent(&ca, &home, &signer).await;
    let (other_agent, _other) = echo_agent(&ca, &home, &signer).await;
    let exp = chrono::Utc::now().timestamp() + 60;
    let port_grant = |agent, port| {
        signer.sign(&StreamGrant {
            agent_id: agent,
            stream: GrantedStream::Port(port),
            exp,
        })
    };
    let app_token = |agent, port| {
        signer.sign(&AppToken {
            user_id: None,
            workspace_id: Uuid::new_v4(),
            agent_id: agent,
            target: devmesh_shared::signing::AppTarget::Slug("app".into()),
            host: "app.apps.test".into(),
            sharing_level: devmesh_shared::api::SharingLevel::Public,
            key_id: Some("key1".into()),
            port,
            https: false,
            base_path: "/".into(),
            issued_at_ms: 0,
            exp,
        })
    };
    let to = |grant: String, port| MeshHeader {
        agent_id: agent,
        grant,
        inner: StreamHeader::Tcp { port },
    };
    let denied = [
        ("no grant", to(String::new(), 22)),
        ("garbage", to("x.y.z".into(), 22)),
        ("another port", to(port_grant(agent, 80), 22)),
        ("another agent", to(port_grant(other_agent, 22), 22)),
        (
            "an app token for another port",
            to(app_token(agent, 80), 22),
        ),
        (
            "a shell for a port grant",
            MeshHeader {
                agent_id: agent,
                grant: port_grant(agent, 22),
                inner: StreamHeader::Ssh,
            },
        ),
        (
            "a grant signed by anyone else",
            to(
                SigningKey::generate("k").sign(&StreamGrant {
                    agent_id: agent,
                    stream: GrantedStream::Port(22),
                    exp,
                }),
                22,
            ),
        ),
        (
            "an expired grant",
            to(
                signer.sign(&StreamGrant {
                    agent_id: agent,
                    stream: GrantedStream::Port(22),
                    exp: 1,
                }),
                22,
            ),
        ),
    ];
    for (what, header) in &denied {
        assert_eq!(
            mesh_status(&ca, &home, header).await,
            tunnel::status::DENIED,
            "{what}"
        );
    }
    assert_eq!(
        home.relay.stats().mesh_denied.load(Ordering::Relaxed),
        denied.len() as u64
    );
    assert_eq!(home.relay.stats().streams_local.load(Ordering::Relaxed), 0);
    for (what, header) in [
        ("a stream grant", to(port_grant(agent, 22), 22)),
        ("an app token", to(app_token(agent, 22), 22)),
    ] {
        assert_eq!(
            mesh_status(&ca, &home, &header).await,
            tunnel::status::OK,
            "{what}"
        );
    }
    // The key the app token came from is deleted: the token opens nothing.
    home.revocations.revoke(
        devmesh_shared::api::RevokedSubject::Key { id: "key1".into() },
        chrono::Utc::now().timestamp_millis(),
    );
    assert_eq!(
        mesh_status(&ca, &home, &to(app_token(agent, 22), 22)).await,
        tunnel::status::DENIED
    );
}

#[tokio::test]
async fn a_relay_that_holds_the_signing_key_grants_its_own_mesh_streams() {
    devmesh_net::runtime::install_crypto_provider();
    let (ca, signer) = (Ca::new("mesh"), SigningKey::generate("k"));
    let locations = Locations::default();
    let plain = start_relay(&ca, "plain", &signer, locations.clone());
    let home = start_relay(&ca, "ap", &signer, Locations::default());
    let (agent, _conn) = echo_agent(&ca, &home, &signer).await;
    locations.set(AgentLocation {
        agent_id: agent,
        relay: Some(home.relay.advertised().clone()),
    });
    // Without a grant and without a key to sign one: refused at home.
    let open = |relay: &Relay| {
        let relay = relay.clone();
        async move {
            relay
                .open(agent, &StreamHeader::Tcp { port: 1 }, None)
                .await
                .map(drop)
        }
    };
    assert_eq!(open(&plain.relay).await, Err(OpenError::Denied));
    let signing = start_relay_with(&ca, "primary", &signer, locations.clone(), true, 0);
    assert_eq!(open(&signing.relay).await, Ok(()));
}

#[tokio::test]
async fn a_relay_refuses_peers_that_are_not_or_no_longer_listed() {
    devmesh_net::runtime::install_crypto_provider();
    let (ca, signer) = (Ca::new("mesh"), SigningKey::generate("k"));
    let home = start_relay(&ca, "ap", &signer, Locations::default());
    let (agent, _conn) = echo_agent(&ca, &home, &signer).await;
    let header = MeshHeader {
        agent_id: agent,
        grant: grant(&signer, agent),
        inner: StreamHeader::Tcp { port: 1 },
    };
    let dial = |name: &str| {
        let (endpoint, config) = client(&ca, tunnel::MESH_ALPN, Some(ca.issue(name)));
        let server_name = home.relay.advertised().server_name.clone();
        let addr = home.relay.local_addr;
        async move {
            let c = endpoint
                .connect_with(config, addr, &server_name)
                .unwrap()
                .await
                .unwrap();
            (endpoint, c)
        }
    };
    let closed_with_5 = |c: Connection| async move {
        let reason = tokio::time::timeout(Duration::from_secs(5), c.closed())
            .await
            .expect("the relay closes the connection");
        matches!(reason, quinn::ConnectionError::ApplicationClosed(ref c) if c.error_code == close::NOT_A_MESH_PEER.into())
    };

    // A mesh-CA certificate for a relay the primary never listed.
    let (_e, stranger) = dial("gone.relay.test").await;
    assert!(closed_with_5(stranger).await);

    // A listed peer works until it is removed (its edge deleted): then its
    // open link is closed and a new one refused.
    let (_e, eu) = dial("eu.relay.test").await;
    let (mut s, mut r) = eu.open_bi().await.unwrap();
    tio::write_mesh_header(&mut s, &header).await.unwrap();
    let mut status = [0u8; 1];
    r.read_exact(&mut status).await.unwrap();
    assert_eq!(status[0], tunnel::status::OK);
    home.peers.set(vec![MeshPeer {
        server_name: "primary.relay.test".into(),
        certs_valid_from: 0,
    }]);
    assert!(closed_with_5(eu).await);
    let (_e, again) = dial("eu.relay.test").await;
    assert!(closed_with_5(again).await);

    // Certificates issued before the edge's token was regenerated.
    home.peers.set(vec![MeshPeer {
        server_name: "eu.relay.test".into(),
        certs_valid_from: chrono::Utc::now().timestamp() + 3600,
    }]);
    let (_e, old) = dial("eu.relay.test").await;
    assert!(closed_with_5(old).await);
    assert_eq!(
        home.relay
            .stats()
            .mesh_peers_refused
            .load(Ordering::Relaxed),
        4
    );
}

#[tokio::test]
async fn strangers_get_one_stream_and_each_ip_a_bounded_number_of_connections() {
    devmesh_net::runtime::install_crypto_provider();
    let (ca, signer) = (Ca::new("mesh"), SigningKey::generate("k"));
    let relay = start_relay_with(&ca, "ap", &signer, Locations::default(), false, 2);
    let connect = || {
        let (endpoint, config) = client(&ca, tunnel::ALPN, None);
        let addr = relay.relay.local_addr;
        let name = relay.relay.advertised().server_name.clone();
        async move {
            let c = endpoint.connect_with(config, addr, &name).unwrap().await;
            (endpoint, c)
        }
    };
    // Before presenting a ticket, one stream (the control stream) and no more.
    let (_e1, first) = connect().await;
    let first = first.unwrap();
    let (mut control, _r) = first.open_bi().await.unwrap();
    control.write_all(b"\x01").await.unwrap();
    let second = tokio::time::timeout(Duration::from_millis(500), first.open_bi()).await;
    assert!(
        second.is_err(),
        "a second stream opened before authenticating"
    );

    // Two connections from this IP are allowed, a third is refused.
    let (_e2, two) = connect().await;
    assert!(two.is_ok());
    let (_e3, three) = connect().await;
    assert!(
        three.is_err(),
        "a third connection from one IP was accepted"
    );
    assert_eq!(
        relay.relay.stats().refused_per_ip.load(Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn an_agent_that_does_not_come_back_is_waited_for_once_then_fails_at_once() {
    devmesh_net::runtime::install_crypto_provider();
    let (ca, signer) = (Ca::new("mesh"), SigningKey::generate("k"));
    let locations = Locations::default();
    let a = start_relay(&ca, "eu", &signer, locations.clone());
    let dead_home = dead_relay(&ca, &signer, &a);
    let agent = Uuid::new_v4();
    locations.set(AgentLocation {
        agent_id: agent,
        relay: Some(dead_home.clone()),
    });
    let g = grant(&signer, agent);
    let started = tokio::time::Instant::now();
    assert_eq!(
        echo_through(&a.relay, agent, &g, b"x").await,
        Err(OpenError::Lost)
    );
    assert!(started.elapsed() >= REROUTE_WAIT);
    // Told the same again (an edge repeats the primary's answers): still
    // the same place, so the next open does not wait again.
    locations.set(AgentLocation {
        agent_id: agent,
        relay: Some(dead_home),
    });
    let started = tokio::time::Instant::now();
    assert_eq!(
        echo_through(&a.relay, agent, &g, b"x").await,
        Err(OpenError::Lost)
    );
    assert!(started.elapsed() < REROUTE_WAIT);
    assert_eq!(a.relay.stats().rerouted.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn an_agent_that_cannot_read_a_header_is_counted_and_the_open_fails_at_once() {
    devmesh_net::runtime::install_crypto_provider();
    let (ca, signer) = (Ca::new("mesh"), SigningKey::generate("k"));
    let relay = start_relay(&ca, "eu", &signer, Locations::default());
    // An agent that resets every stream as the real one does a header it
    // cannot parse.
    let ticket = ticket_for(&relay);
    let agent = ticket.agent_id;
    let (conn, send, recv) = attach(&ca, &relay, signer.sign(&ticket)).await.unwrap();
    let serving = conn.clone();
    tokio::spawn(async move {
        let _control = (send, recv);
        while let Ok((mut s, mut r)) = serving.accept_bi().await {
            let _ = s.reset(stream_code::BAD_HEADER.into());
            let _ = r.stop(stream_code::BAD_HEADER.into());
        }
    });
    let started = tokio::time::Instant::now();
    let opened = relay
        .relay
        .open(agent, &StreamHeader::Tcp { port: 1 }, None)
        .await;
    assert_eq!(opened.err(), Some(OpenError::Unsupported));
    // Nothing to wait for: the agent is right here and answered.
    assert!(started.elapsed() < REROUTE_WAIT);
    let stats = relay.relay.stats();
    assert_eq!(stats.agent_refused_headers.load(Ordering::Relaxed), 1);
    assert!(
        stats
            .openmetrics("devmesh_edge")
            .contains("devmesh_edge_agent_refused_headers_total 1\n")
    );
}
