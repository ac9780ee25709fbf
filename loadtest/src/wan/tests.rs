use super::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[tokio::test(start_paused = true)]
async fn shaper_delays_and_never_reorders_under_jitter() {
    let mut s = Shaper::new(LinkSpec {
        delay: ms(40),
        jitter: ms(30),
        loss: 0.0,
        bytes_per_s: None,
    });
    let t0 = Instant::now();
    // Big jitter on the first chunk, none on the second: the second must
    // still not leave before the first.
    let Verdict::At(a) = s.schedule(t0, 10, 0.9, 1.0, true) else {
        panic!()
    };
    let Verdict::At(b) = s.schedule(t0 + ms(1), 10, 0.9, 0.0, true) else {
        panic!()
    };
    assert_eq!(a, t0 + ms(70));
    assert_eq!(b, a, "held back behind the jittered chunk");
    let Verdict::At(c) = s.schedule(t0 + ms(100), 10, 0.9, 0.0, true) else {
        panic!()
    };
    assert_eq!(c, t0 + ms(140));
}

#[tokio::test(start_paused = true)]
async fn shaper_spaces_chunks_under_a_bandwidth_cap() {
    let mut s = Shaper::new(LinkSpec {
        delay: ms(10),
        jitter: Duration::ZERO,
        loss: 0.0,
        bytes_per_s: Some(1000.0),
    });
    let t0 = Instant::now();
    let at = |v| match v {
        Verdict::At(t) => t,
        Verdict::Lost => panic!("lost"),
    };
    assert_eq!(at(s.schedule(t0, 100, 0.5, 0.0, false)), t0 + ms(110));
    assert_eq!(at(s.schedule(t0, 100, 0.5, 0.0, false)), t0 + ms(210));
    // After an idle gap the wire is free again.
    assert_eq!(
        at(s.schedule(t0 + ms(1000), 100, 0.5, 0.0, false)),
        t0 + ms(1110)
    );
}

#[tokio::test(start_paused = true)]
async fn loss_drops_datagrams_and_delays_stream_chunks() {
    let spec = LinkSpec {
        loss: 0.5,
        ..LinkSpec::rtt(ms(20))
    };
    let t0 = Instant::now();
    assert_eq!(
        Shaper::new(spec).schedule(t0, 1, 0.1, 0.0, true),
        Verdict::Lost
    );
    assert_eq!(
        Shaper::new(spec).schedule(t0, 1, 0.1, 0.0, false),
        Verdict::At(t0 + ms(30)),
        "one-way delay plus one round trip"
    );
    assert_eq!(
        Shaper::new(spec).schedule(t0, 1, 0.9, 0.0, true),
        Verdict::At(t0 + ms(10))
    );
}

#[tokio::test(start_paused = true)]
async fn pipe_delivers_everything_in_order_after_the_delay() {
    let (mut client, relay_in) = tokio::io::duplex(1024);
    let (relay_out, mut server) = tokio::io::duplex(1024);
    let c = Arc::new(Counters::default());
    let spec = LinkSpec::rtt(ms(80));
    let t0 = Instant::now();
    let task = tokio::spawn(pipe(
        relay_in,
        relay_out,
        spec,
        c.clone(),
        Arc::new(AtomicU64::new(DIR_NONE)),
        true,
    ));
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        for chunk in sent.chunks(777) {
            client.write_all(chunk).await.unwrap();
        }
        client.shutdown().await.unwrap();
    });
    let mut got = Vec::new();
    let mut first = None;
    let mut b = [0u8; 4096];
    loop {
        let n = server.read(&mut b).await.unwrap();
        if n == 0 {
            break;
        }
        first.get_or_insert(Instant::now());
        got.extend_from_slice(&b[..n]);
    }
    writer.await.unwrap();
    task.await.unwrap();
    assert_eq!(got, data);
    assert!(
        first.unwrap() - t0 >= ms(40),
        "nothing arrives before the one-way delay"
    );
    assert_eq!(c.snapshot().bytes_up, data.len() as u64);
}

#[tokio::test]
async fn tcp_relay_counts_turns_over_real_loopback() {
    let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = echo.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = echo.accept().await.unwrap();
        let mut b = [0u8; 64];
        loop {
            let n = s.read(&mut b).await.unwrap();
            if n == 0 {
                break;
            }
            s.write_all(&b[..n]).await.unwrap();
        }
    });
    let stop = CancellationToken::new();
    let relay = TcpRelay::start(target, LinkSpec::rtt(ms(2)), stop.clone())
        .await
        .unwrap();
    let mut s = TcpStream::connect(relay.addr).await.unwrap();
    for i in 0..3u8 {
        s.write_all(&[i; 8]).await.unwrap();
        let mut b = [0u8; 8];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(b, [i; 8]);
    }
    let snap = relay.counters.snapshot();
    assert_eq!(snap.connections, 1);
    assert_eq!(snap.round_trips, 3);
    assert_eq!((snap.bytes_up, snap.bytes_down), (24, 24));
    stop.cancel();
}

#[tokio::test]
async fn udp_relay_round_trips_datagrams_in_order() {
    let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let target = server.local_addr().unwrap();
    tokio::spawn(async move {
        let mut b = [0u8; 1500];
        while let Ok((n, from)) = server.recv_from(&mut b).await {
            let _ = server.send_to(&b[..n], from).await;
        }
    });
    let stop = CancellationToken::new();
    let relay = UdpRelay::start(target, LinkSpec::rtt(ms(2)), stop.clone())
        .await
        .unwrap();
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(relay.addr).await.unwrap();
    for i in 0..20u8 {
        client.send(&[i]).await.unwrap();
    }
    let mut b = [0u8; 16];
    for i in 0..20u8 {
        let n = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&b[..n], &[i]);
    }
    assert_eq!(relay.counters.snapshot().connections, 1);
    stop.cancel();
}

#[tokio::test]
async fn a_udp_flow_survives_its_target_dying_and_coming_back_on_the_same_port() {
    let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let target = server.local_addr().unwrap();
    drop(server);
    let stop = CancellationToken::new();
    let front =
        UdpRelay::start_by_source(target, LinkSpec::rtt(ms(0)), HashMap::new(), stop.clone())
            .await
            .unwrap();
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(front.addr).await.unwrap();
    // Nothing listens: the flow's socket gets "port unreachable".
    client.send(b"into the void").await.unwrap();
    let mut b = [0u8; 64];
    assert!(
        tokio::time::timeout(Duration::from_millis(200), client.recv(&mut b))
            .await
            .is_err()
    );
    // The target is back on its port: the same flow carries both ways.
    let server = UdpSocket::bind(target).await.unwrap();
    tokio::spawn(async move {
        let mut b = [0u8; 64];
        while let Ok((n, from)) = server.recv_from(&mut b).await {
            let _ = server.send_to(&b[..n], from).await;
        }
    });
    client.send(b"back").await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut b))
        .await
        .expect("an answer through the old flow")
        .unwrap();
    assert_eq!(&b[..n], b"back");
    assert_eq!(front.counters.snapshot().connections, 1);
    stop.cancel();
}
