use super::*;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

const STEP: Duration = Duration::from_micros(100);
/// What a download moves per step at full speed: 640 MB/s.
const CHUNK: usize = 64 * 1024;

/// Runs a download on `bulk_lane` for `span`, `chunk` bytes per step when
/// admitted, beside interactive requests (1.4 KiB every millisecond) on
/// `busy_lane` when given, and returns how many bytes the download moved.
fn download(
    bulk_lane: &Arc<Lane>,
    busy_lane: Option<&Arc<Lane>>,
    span: Duration,
    chunk: usize,
) -> u64 {
    let t0 = Instant::now();
    let mut bulk = Pacer::new(bulk_lane.clone(), t0);
    let mut small = busy_lane.map(|l| Pacer::new(l.clone(), t0));
    let mut moved = 0;
    let mut now = t0;
    while now < t0 + span {
        if let Some(small) = &mut small
            && (now - t0).as_micros().is_multiple_of(1000)
        {
            assert!(small.admit(now).is_ok(), "interactive bytes never wait");
            small.moved(1400, now);
        }
        if bulk.admit(now).is_ok() {
            bulk.moved(chunk, now);
            moved += chunk as u64;
        }
        now += STEP;
    }
    moved
}

/// A connection on `lane` made bulk by moving `chunk` bytes every step for
/// `span`, and the time it got there.
fn bulk_after(lane: &Arc<Lane>, chunk: usize, span: Duration) -> (Pacer, Instant) {
    let t0 = Instant::now();
    let mut conn = Pacer::new(lane.clone(), t0);
    let mut now = t0;
    while now < t0 + span {
        conn.admit(now).unwrap();
        conn.moved(chunk, now);
        now += STEP;
    }
    assert!(conn.bulk());
    (conn, now)
}

#[test]
fn a_download_moves_at_a_quarter_of_its_speed_beside_its_own_workspaces_requests() {
    let lanes = Lanes::default();
    let span = Duration::from_millis(400);
    // Small reads, and reads that drain a whole stream window at once (a
    // pause alone would let the window fill and the next read take it).
    for chunk in [CHUNK, 8 << 20] {
        // A lane of its own: the simulated clock runs ahead of the real one.
        let a = lanes.lane(Uuid::new_v4(), 8080);
        let alone = download(&a, None, span, chunk);
        let beside = download(&a, Some(&a), span, chunk);
        let share = beside as f64 / alone as f64;
        assert!(
            (0.2..0.35).contains(&share),
            "beside interactive requests the download should move about a quarter \
             ({chunk} B reads): {share:.2}"
        );
    }
}

#[test]
fn another_apps_or_another_workspaces_requests_never_slow_a_download() {
    let span = Duration::from_millis(200);
    // Lanes of their own for each run: the simulated clock of one run is
    // ahead of the real one the next starts from.
    let alone = download(
        &Lanes::default().lane(Uuid::new_v4(), 8080),
        None,
        span,
        CHUNK,
    );
    for same_agent in [true, false] {
        let lanes = Lanes::default();
        let agent = Uuid::new_v4();
        let app = lanes.lane(agent, 8080);
        let other = if same_agent {
            lanes.lane(agent, 3000)
        } else {
            lanes.lane(Uuid::new_v4(), 8080)
        };
        assert_eq!(download(&app, Some(&other), span, CHUNK), alone);
    }
}

#[test]
fn a_download_runs_at_full_speed_again_once_the_requests_stop() {
    let lane = Arc::new(Lane::new(Instant::now()));
    let (mut bulk, mut now) = bulk_after(&lane, CHUNK, 2 * WINDOW);
    // One interactive request, then none.
    lane.touch(now);
    let mut held = 0;
    let quiet = now + RECENT;
    while now < quiet + BURST + WINDOW {
        if bulk.admit(now).is_ok() {
            bulk.moved(CHUNK, now);
        } else {
            held += 1;
        }
        now += STEP;
    }
    assert!(
        held > 0,
        "the download made way while the request was recent"
    );
    // From here on, every step moves.
    for _ in 0..1000 {
        assert!(bulk.admit(now).is_ok());
        bulk.moved(CHUNK, now);
        now += STEP;
    }
}

#[test]
fn a_paced_download_stays_bulk_and_is_asked_again_within_recent() {
    // A slow bulk connection (30 MB/s) whose reads take 400 KiB at once,
    // as hyper's do: each read owes far more than RECENT at its paced
    // rate. It must never be let off as idle (and turn interactive,
    // pacing others), and never wait more than RECENT at a time.
    let lane = Arc::new(Lane::new(Instant::now()));
    let (mut conn, mut now) = bulk_after(&lane, 3_000, 3 * WINDOW);
    let until = now + Duration::from_secs(2);
    let mut held = 0;
    while now < until {
        lane.touch(now);
        match conn.admit(now) {
            Ok(()) => {
                conn.moved(400 * 1024, now);
                assert!(conn.bulk(), "a paced download turned interactive");
            }
            Err(resume) => {
                held += 1;
                assert!(resume - now <= RECENT, "held {:?} at once", resume - now);
            }
        }
        now += Duration::from_millis(1);
    }
    assert!(held > 100);
}

#[test]
fn parallel_downloads_alone_do_not_pace_each_other() {
    // Eight downloads of one app at 30 MB/s each, nothing interactive:
    // past their first windows (when each is still judged interactive),
    // none is held back.
    let lane = Arc::new(Lane::new(Instant::now()));
    let t0 = Instant::now();
    let mut conns: Vec<_> = (0..8).map(|_| Pacer::new(lane.clone(), t0)).collect();
    let mut now = t0;
    let mut held_late = 0;
    while now < t0 + Duration::from_millis(500) {
        for c in &mut conns {
            match c.admit(now) {
                Ok(()) => c.moved(3_000, now),
                Err(_) if now > t0 + WINDOW + RECENT + BURST => held_late += 1,
                Err(_) => {}
            }
        }
        now += STEP;
    }
    assert!(conns.iter().all(Pacer::bulk));
    assert_eq!(held_late, 0);
}

#[test]
fn back_to_back_small_requests_on_one_connection_stay_interactive() {
    let lane = Arc::new(Lane::new(Instant::now()));
    let t0 = Instant::now();
    // 1.4 KiB every 170 µs: one keep-alive connection at c=1 on loopback.
    let mut small = Pacer::new(lane.clone(), t0);
    let mut now = t0;
    while now < t0 + Duration::from_secs(2) {
        assert!(small.admit(now).is_ok());
        small.moved(1400, now);
        assert!(!small.bulk());
        now += Duration::from_micros(170);
    }
}

#[test]
fn a_pooled_connection_that_carried_a_download_is_not_held_back_when_reused() {
    let lane = Arc::new(Lane::new(Instant::now()));
    let (mut conn, mut now) = bulk_after(&lane, CHUNK, 2 * WINDOW);
    // Idle in the pool, then a small request while the workspace is busy.
    now += Duration::from_secs(1);
    lane.touch(now);
    assert!(conn.admit(now).is_ok());
    conn.moved(1400, now);
    assert!(!conn.bulk());
}

#[test]
fn lanes_are_shared_per_workspace_and_forgotten_when_unused() {
    let lanes = Lanes::default();
    let agent = Uuid::new_v4();
    let a = lanes.lane(agent, 8080);
    assert!(Arc::ptr_eq(&a, &lanes.lane(agent, 8080)));
    drop(a);
    // Many short-lived workspaces: the map is swept as it grows.
    for _ in 0..1000 {
        drop(lanes.lane(Uuid::new_v4(), 8080));
    }
    assert!(lanes.len() < 200, "{} lanes kept", lanes.len());
}

/// The connection wrapper holds a download's reads back while requests to
/// its workspace flow, with real (virtual-time) timers.
#[tokio::test(start_paused = true)]
async fn a_paced_connection_waits_out_its_pauses() {
    let lanes = Lanes::default();
    let lane = lanes.lane(Uuid::new_v4(), 8080);
    let stats = Arc::new(RelayStats::default());

    let read_for = |lane: Arc<Lane>, span: Duration| {
        let stats = stats.clone();
        async move {
            let (mut app, conn) = tokio::io::duplex(1 << 20);
            tokio::spawn(async move {
                let chunk = vec![7u8; CHUNK];
                while app.write_all(&chunk).await.is_ok() {}
            });
            let mut conn = Paced::new(conn, lane, stats);
            let mut buf = vec![0u8; CHUNK];
            let (t0, mut got) = (Instant::now(), 0u64);
            while t0.elapsed() < span {
                got += conn.read(&mut buf).await.unwrap() as u64;
                // What moving a chunk costs.
                tokio::time::sleep(STEP).await;
            }
            got
        }
    };
    let span = Duration::from_millis(200);
    let alone = read_for(lane.clone(), span).await;
    assert_eq!(stats.bulk_pauses.load(Ordering::Relaxed), 0);

    let requests = {
        let lane = lane.clone();
        let stats = stats.clone();
        tokio::spawn(async move {
            let (mut client, conn) = tokio::io::duplex(1 << 16);
            let mut conn = Paced::new(conn, lane, stats);
            loop {
                conn.write_all(&[1u8; 1400]).await.unwrap();
                let mut b = [0u8; 1400];
                client.read_exact(&mut b).await.unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let beside = read_for(lane, span).await;
    requests.abort();
    let share = beside as f64 / alone as f64;
    assert!(
        (0.15..0.45).contains(&share),
        "the download should move about a quarter beside requests: {share:.2}"
    );
    assert!(stats.bulk_pauses.load(Ordering::Relaxed) > 0);
}
