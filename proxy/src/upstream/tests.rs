//! The pool's bookkeeping, on in-memory HTTP/1.1 connections.

use super::*;

fn key(port: u16) -> Key {
    Key {
        agent: Uuid::nil(),
        port,
        https: false,
    }
}

/// A client connection over an in-memory pipe, and the pipe's other end
/// (dropping it closes the connection).
async fn connection() -> (SendRequest<Body>, tokio::io::DuplexStream) {
    let (ours, theirs) = tokio::io::duplex(1024);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(ours))
        .await
        .unwrap();
    tokio::spawn(conn);
    (sender, theirs)
}

#[tokio::test(start_paused = true)]
async fn a_quiet_apps_connections_go_within_a_minute_of_expiring() {
    let pool = Pool::default();
    let mut pipes = Vec::new();
    for _ in 0..3 {
        let (sender, pipe) = connection().await;
        pipes.push(pipe);
        pool.put_back(key(8080), sender);
    }
    let (sender, pipe) = connection().await;
    pipes.push(pipe);
    pool.put_back(key(3000), sender);
    assert_eq!(pool.idle_count(), 4, "fresh connections are kept");

    // Port 8080 goes quiet; another app's connection returns after the
    // idle timeout and sweeps 8080's expired ones with its own.
    tokio::time::advance(IDLE_TIMEOUT + Duration::from_secs(1)).await;
    let (sender, pipe) = connection().await;
    pipes.push(pipe);
    pool.put_back(key(3000), sender);
    assert_eq!(pool.idle_count(), 1, "only the connection just returned");
    assert!(pool.take(key(8080)).is_none());
}

#[tokio::test(start_paused = true)]
async fn an_app_keeps_at_most_its_share_of_idle_connections() {
    let pool = Pool::default();
    let mut pipes = Vec::new();
    for _ in 0..MAX_IDLE_PER_KEY + 5 {
        let (sender, pipe) = connection().await;
        pipes.push(pipe);
        pool.put_back(key(8080), sender);
    }
    assert_eq!(pool.idle_count(), MAX_IDLE_PER_KEY);
}

#[tokio::test(start_paused = true)]
async fn a_full_list_of_closed_connections_makes_room_for_a_live_one() {
    let pool = Pool::default();
    for _ in 0..MAX_IDLE_PER_KEY {
        // The other end goes at once: the app closed every connection.
        let (sender, _pipe) = connection().await;
        pool.put_back(key(8080), sender);
    }
    // Let the connections' tasks see the pipes close.
    tokio::time::sleep(Duration::from_millis(10)).await;
    let (sender, _pipe) = connection().await;
    pool.put_back(key(8080), sender);
    assert_eq!(pool.idle_count(), 1, "only the live connection stays");
}
