//! The tunnel against a real QUIC relay with a test mesh CA.

use devmesh_shared::tunnel::{self, StreamHeader, status};
use quinn::{ConnectionError, ReadError, ReadToEndError};
use tokio::task::JoinHandle;

use super::*;
use crate::testutil::{
    DelayForwarder, RelayConn, RelayOptions, TestCa, TestRelay, banner_server, closed_port,
    echo_server, eventually, header_bytes, open_stream, within,
};

/// The malformed-input corpus, for its `TUNNEL` cases.
#[path = "../../../cli/tests/corpus/decode.rs"]
mod corpus;

/// A serving agent, stopped on drop.
struct Agent {
    cancel: CancellationToken,
    moved: CancellationToken,
    task: JoinHandle<End>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn attached_agent(relay: &mut TestRelay, timing: Timing) -> (RelayConn, Agent) {
    let config = client_config(&relay.ca.pem).unwrap();
    let attached = attach(&relay.info(), &config, "ticket-1", &timing)
        .await
        .unwrap();
    assert_eq!(attached.relay_name, "test-relay");
    let (cancel, moved) = (CancellationToken::new(), CancellationToken::new());
    let task = tokio::spawn({
        let (cancel, moved) = (cancel.clone(), moved.clone());
        async move {
            attached
                .serve("agent-1".into(), &timing, &cancel, &moved)
                .await
        }
    });
    let conn = relay.next_attached().await;
    assert_eq!(conn.ticket, "ticket-1");
    (
        conn,
        Agent {
            cancel,
            moved,
            task,
        },
    )
}

async fn read_all(recv: &mut RecvStream) -> Vec<u8> {
    within("the stream to finish", recv.read_to_end(16 << 20))
        .await
        .unwrap()
}

#[tokio::test]
async fn tcp_stream_gets_ok_and_echo_and_relay_half_close_reaches_the_app() {
    let mut relay = TestRelay::start(RelayOptions::default()).await;
    let (rc, _agent) = attached_agent(&mut relay, Timing::default()).await;
    let mut echo = echo_server().await;

    let header = header_bytes(&StreamHeader::Tcp { port: echo.port });
    let (mut send, mut recv) = open_stream(&rc.conn, &header).await;
    // Enough to need flow control on the way, written while reading.
    let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let writer = tokio::spawn({
        let payload = payload.clone();
        async move {
            send.write_all(&payload).await.unwrap();
            // Half-close: the app must see EOF, and still answer.
            send.finish().unwrap();
            send
        }
    });
    let got = read_all(&mut recv).await;
    assert_eq!(got[0], status::OK);
    assert_eq!(got[1..], payload[..]);
    within("the echo server's EOF", echo.eofs.recv())
        .await
        .unwrap();
    drop(writer.await.unwrap());
}

#[tokio::test]
async fn app_half_close_finishes_the_stream_and_the_relay_can_still_send() {
    let mut relay = TestRelay::start(RelayOptions::default()).await;
    let (rc, _agent) = attached_agent(&mut relay, Timing::default()).await;
    let mut banner = banner_server(b"SSH-2.0-test\r\n").await;

    let header = header_bytes(&StreamHeader::Tcp { port: banner.port });
    let (mut send, mut recv) = open_stream(&rc.conn, &header).await;
    // The app half-closed after its banner: the stream finishes...
    let got = read_all(&mut recv).await;
    assert_eq!(got, b"\x00SSH-2.0-test\r\n");
    // ...while the other direction still flows.
    send.write_all(b"late bytes").await.unwrap();
    send.finish().unwrap();
    let received = within("the app to read", banner.received.recv())
        .await
        .unwrap();
    assert_eq!(received, b"late bytes");
}

#[tokio::test]
async fn nothing_listening_gives_refused() {
    let mut relay = TestRelay::start(RelayOptions::default()).await;
    let (rc, _agent) = attached_agent(&mut relay, Timing::default()).await;
    let port = closed_port().await;

    let (_send, mut recv) = open_stream(&rc.conn, &header_bytes(&StreamHeader::Tcp { port })).await;
    assert_eq!(read_all(&mut recv).await, [status::REFUSED]);
}

#[tokio::test]
async fn garbage_headers_reset_their_stream_and_the_connection_lives_on() {
    let mut relay = TestRelay::start(RelayOptions::default()).await;
    let (rc, _agent) = attached_agent(&mut relay, Timing::default()).await;

    let garbage = corpus::cases("TUNNEL ");
    assert!(garbage.len() >= 20, "{} TUNNEL cases", garbage.len());
    for (line, bytes) in garbage {
        let (mut send, mut recv) = within("a stream to open", rc.conn.open_bi()).await.unwrap();
        // The agent may reset a long case before all of it is written.
        let _ = within("the case to be sent", send.write_all(&bytes)).await;
        let _ = send.finish();
        let err = within("the stream to be reset", recv.read_to_end(1024))
            .await
            .unwrap_err();
        let code = match &err {
            ReadToEndError::Read(ReadError::Reset(code)) => Some(*code),
            _ => None,
        };
        let reset = code == Some(stream_code::BAD_HEADER);
        assert!(reset, "http.txt:{line}: {err:?}");
        assert!(rc.conn.close_reason().is_none(), "http.txt:{line}");
    }

    assert!(rc.conn.close_reason().is_none());
    let mut echo = echo_server().await;
    let (mut send, mut recv) = open_stream(
        &rc.conn,
        &header_bytes(&StreamHeader::Tcp { port: echo.port }),
    )
    .await;
    send.write_all(b"still here").await.unwrap();
    send.finish().unwrap();
    assert_eq!(read_all(&mut recv).await, b"\x00still here");
    within("echo EOF", echo.eofs.recv()).await.unwrap();
}

#[tokio::test]
async fn a_relay_outside_the_mesh_ca_is_not_trusted() {
    let relay = TestRelay::start(RelayOptions::default()).await;
    let other = TestCa::new("some other CA");
    let config = client_config(&other.pem).unwrap();
    let err = attach(&relay.info(), &config, "ticket-1", &Timing::default())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            TunnelError::Connection(ConnectionError::TransportError(_))
        ),
        "{err:?}"
    );
    assert!(
        relay.tickets().is_empty(),
        "no ticket goes to an untrusted relay"
    );
}

#[tokio::test]
async fn a_refused_ticket_is_reported() {
    let relay = TestRelay::start(RelayOptions {
        refuse_first: 1,
        ..RelayOptions::default()
    })
    .await;
    let config = client_config(&relay.ca.pem).unwrap();
    let err = attach(&relay.info(), &config, "ticket-1", &Timing::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, TunnelError::Refused(reason) if reason == "ticket expired"),
        "{err:?}"
    );
}

#[tokio::test]
async fn missing_pongs_mean_a_dead_connection() {
    let mut relay = TestRelay::start(RelayOptions {
        answer_pings: false,
        ..RelayOptions::default()
    })
    .await;
    let timing = Timing {
        ping_interval: Duration::from_millis(50),
        dead_after: Duration::from_millis(300),
        ..Timing::default()
    };
    let (rc, mut agent) = attached_agent(&mut relay, timing).await;
    let end = within("the agent to give up", &mut agent.task)
        .await
        .unwrap();
    assert!(
        matches!(&end, End::Lost(r) if r.contains("no pong")),
        "{end:?}"
    );
    let closed = within("the relay to see the close", rc.conn.closed()).await;
    assert!(
        matches!(&closed, ConnectionError::ApplicationClosed(c) if c.error_code == close::LOST),
        "{closed:?}"
    );
}

#[tokio::test]
async fn answered_pings_keep_the_connection_and_shutdown_closes_with_code_0() {
    let mut relay = TestRelay::start(RelayOptions::default()).await;
    let timing = Timing {
        ping_interval: Duration::from_millis(50),
        dead_after: Duration::from_millis(200),
        ..Timing::default()
    };
    let (rc, mut agent) = attached_agent(&mut relay, timing).await;
    // Several dead_after periods pass: the pongs must keep it alive.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!agent.task.is_finished());
    assert!(rc.conn.close_reason().is_none());

    agent.cancel.cancel();
    let end = within("the agent to stop", &mut agent.task).await.unwrap();
    assert_eq!(end, End::Shutdown);
    let closed = within("the relay to see the close", rc.conn.closed()).await;
    assert!(
        matches!(&closed, ConnectionError::ApplicationClosed(c)
            if c.error_code == close::SHUTDOWN && &c.reason[..] == b"shutdown"),
        "{closed:?}"
    );
}

#[test]
fn a_mesh_ca_without_certificates_is_rejected() {
    for pem in [
        "",
        "not pem at all",
        "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
    ] {
        assert!(
            matches!(client_config(pem), Err(TunnelError::MeshCa(_))),
            "{pem:?}"
        );
    }
}

#[tokio::test]
async fn a_move_closes_the_old_tunnel_with_the_moved_code() {
    let mut relay = TestRelay::start(RelayOptions::default()).await;
    let (rc, mut agent) = attached_agent(&mut relay, Timing::default()).await;
    agent.moved.cancel();
    let end = within("the agent to leave", &mut agent.task).await.unwrap();
    assert_eq!(end, End::Moved);
    let closed = within("the relay to see the close", rc.conn.closed()).await;
    assert!(
        matches!(&closed, ConnectionError::ApplicationClosed(c) if c.error_code == close::MOVED),
        "{closed:?}"
    );
}

// === Measuring ===

/// One probe of `relay` as a measurement makes it, with the default timers.
async fn probe_as_usual(relay: &RelayInfo, ca: &TestCa) -> Duration {
    let config = client_config(&ca.pem).unwrap();
    probe(
        relay,
        &config,
        &Timing::default(),
        &Probes::default(),
        PROBES_PER_RELAY,
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn a_probe_is_a_bare_handshake_closed_with_the_probe_code() {
    let relay = TestRelay::start(RelayOptions::default()).await;
    let rtt = probe_as_usual(&relay.info(), &relay.ca).await;
    assert!(rtt < Duration::from_secs(1), "{rtt:?}");
    eventually("the relay to see three probes", || relay.probes() == 3).await;
    assert!(relay.tickets().is_empty(), "a probe never sends a ticket");
}

#[tokio::test]
async fn a_probe_through_a_delay_measures_the_round_trip() {
    let relay = TestRelay::start(RelayOptions::default()).await;
    let delay = Duration::from_millis(25);
    let far = DelayForwarder::start(relay.addr, delay).await;
    let far_info = RelayInfo {
        address: far.addr.to_string(),
        ..relay.info()
    };
    let rtt = probe_as_usual(&far_info, &relay.ca).await;
    // Both directions wait: at least two delays per round trip.
    assert!(rtt >= 2 * delay, "{rtt:?}");
    eventually("the relay to see three probes", || relay.probes() == 3).await;
}

#[tokio::test]
async fn measure_keeps_the_order_and_marks_relays_that_do_not_answer() {
    let ca = Arc::new(TestCa::new("mesh"));
    let live = TestRelay::start_in(ca.clone(), RelayOptions::default()).await;
    let foreign = TestRelay::start(RelayOptions::default()).await;
    let silent = tokio::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let relays = [
        RelayInfo {
            region: "silent".into(),
            address: silent.local_addr().unwrap().to_string(),
            ..live.info()
        },
        RelayInfo {
            region: "live".into(),
            ..live.info()
        },
        RelayInfo {
            region: "foreign".into(),
            ..foreign.info()
        },
    ];
    let timing = Timing {
        probe_timeout: Duration::from_millis(300),
        ..Timing::default()
    };
    let config = client_config(&ca.pem).unwrap();
    let started = Instant::now();
    let measured = measure(&relays, &config, &timing, &Arc::default(), PROBES_PER_RELAY).await;
    // In parallel, and one failure ends a relay's probes: about one timeout.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let got: Vec<(&str, bool)> = measured
        .iter()
        .map(|m| (m.relay.region.as_str(), m.rtt.is_some()))
        .collect();
    assert_eq!(got, [("silent", false), ("live", true), ("foreign", false)]);
    assert!(foreign.tickets().is_empty() && live.tickets().is_empty());
}

#[tokio::test]
async fn probe_streams_count_the_upload_then_send_the_download() {
    let mut relay = TestRelay::start(RelayOptions::default()).await;
    let (rc, _agent) = attached_agent(&mut relay, Timing::default()).await;
    let (mut send, mut recv) = open_stream(
        &rc.conn,
        &header_bytes(&StreamHeader::Probe { download: 100_000 }),
    )
    .await;
    send.write_all(&[7u8; 12_345]).await.unwrap();
    send.finish().unwrap();
    let got = read_all(&mut recv).await;
    assert_eq!(got[0], tunnel::status::OK);
    assert_eq!(got[1..9], 12_345u64.to_be_bytes());
    assert_eq!(got.len(), 9 + 100_000);
    // More than any probe may ask for is refused.
    let too_much = StreamHeader::Probe {
        download: tunnel::MAX_PROBE_BYTES + 1,
    };
    let (_send, mut recv) = open_stream(&rc.conn, &header_bytes(&too_much)).await;
    assert_eq!(read_all(&mut recv).await, [tunnel::status::REFUSED]);
}

#[tokio::test]
async fn udp_streams_carry_datagrams_and_a_garbage_frame_ends_that_flow_only() {
    let mut relay = TestRelay::start(RelayOptions::default()).await;
    let (rc, _agent) = attached_agent(&mut relay, Timing::default()).await;
    let echo = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = echo.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = echo.recv_from(&mut buf).await {
            let _ = echo.send_to(&buf[..n], from).await;
        }
    });
    let header = header_bytes(&StreamHeader::Udp { port });
    let (mut send, mut recv) = open_stream(&rc.conn, &header).await;
    let mut status = [0u8; 1];
    recv.read_exact(&mut status).await.unwrap();
    assert_eq!(status[0], tunnel::status::OK);
    let mut framed = Vec::new();
    tunnel::udp::frame(b"hello", &mut framed);
    send.write_all(&framed).await.unwrap();
    let mut buf = vec![0u8; tunnel::udp::MAX_DATAGRAM];
    let got = within("the echo", tunnel::udp::read(&mut recv, &mut buf))
        .await
        .unwrap();
    assert_eq!(got, tunnel::udp::Received::Datagram(5));
    assert_eq!(&buf[..5], b"hello");

    // A length no datagram has: that flow is reset.
    send.write_all(&[0xff, 0xfe]).await.unwrap();
    let err = within("the flow to be reset", recv.read_to_end(1024))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ReadToEndError::Read(ReadError::Reset(c)) if c == stream_code::BAD_HEADER),
        "{err:?}"
    );
    // The connection, and another flow, carry on.
    assert!(rc.conn.close_reason().is_none());
    let (mut send, mut recv) = open_stream(&rc.conn, &header).await;
    recv.read_exact(&mut status).await.unwrap();
    send.write_all(&framed).await.unwrap();
    let got = within("the echo", tunnel::udp::read(&mut recv, &mut buf))
        .await
        .unwrap();
    assert_eq!(got, tunnel::udp::Received::Datagram(5));
}

#[tokio::test]
async fn the_relay_may_hold_many_more_streams_than_it_was_first_granted() {
    let mut relay = TestRelay::start(RelayOptions::default()).await;
    let (rc, _agent) = attached_agent(&mut relay, Timing::default()).await;
    // Every stream stays open (a probe waits for the upload's end), so the
    // relay can only open the later ones if the agent raised its grant.
    let wanted = devmesh_net::quic::INITIAL_STREAMS as usize * 3;
    let mut held = Vec::with_capacity(wanted);
    for _ in 0..wanted {
        let header = header_bytes(&StreamHeader::Probe { download: 1 });
        let (send, mut recv) = open_stream(&rc.conn, &header).await;
        let mut status = [0u8; 1];
        within(
            "the agent to answer the stream",
            recv.read_exact(&mut status),
        )
        .await
        .unwrap();
        assert_eq!(status[0], status::OK);
        held.push((send, recv));
    }
    // Each still works.
    for (mut send, mut recv) in held.drain(..).rev().take(3) {
        send.finish().unwrap();
        let got = read_all(&mut recv).await;
        assert_eq!(got[..8], 0u64.to_be_bytes());
    }
}

#[tokio::test]
async fn probes_share_one_endpoint_per_address_family() {
    let relay = TestRelay::start(RelayOptions::default()).await;
    let config = client_config(&relay.ca.pem).unwrap();
    let probes = Probes::default();
    for _ in 0..3 {
        probe(
            &relay.info(),
            &config,
            &Timing::default(),
            &probes,
            PROBES_PER_RELAY,
        )
        .await
        .unwrap();
    }
    let v4: SocketAddr = (Ipv4Addr::LOCALHOST, 1).into();
    let first = probes.endpoint(v4).unwrap().local_addr().unwrap();
    assert_eq!(probes.endpoint(v4).unwrap().local_addr().unwrap(), first);
}
