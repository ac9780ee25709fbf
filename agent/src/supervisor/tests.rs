//! Choosing, leaving and moving between real QUIC relays on loopback, one
//! of them made far away by a delaying UDP forwarder.

use std::net::SocketAddr;

use quinn::ConnectionError;

use super::*;
use crate::testutil::{
    Behaviour, DelayForwarder, FakePrimary, RELAY_NAME, RelayOptions, TestCa, TestRelay,
    echo_through, empty_manifest, eventually, within,
};
use crate::tunnel::close;

/// One-way delay of the far path: about 60 ms round trip, far beyond both
/// margins of the chooser against a loopback relay's ~1 ms.
/// One-way delay of a far relay: far enough that a busy CI machine's
/// scheduling noise on the near path never makes the far one look nearer.
const FAR: Duration = Duration::from_millis(100);

fn timing() -> Timing {
    Timing {
        ping_interval: Duration::from_millis(100),
        // Three handshakes through the 100 ms delay take ~300 ms each; a loaded
        // machine must not turn the far relay into an unreachable one.
        probe_timeout: Duration::from_millis(1500),
        ..Timing::default()
    }
}

fn relay_at(region: &str, addr: SocketAddr) -> RelayInfo {
    RelayInfo {
        region: region.into(),
        address: addr.to_string(),
        server_name: RELAY_NAME.into(),
    }
}

fn manifest(ca: &TestCa, relays: Vec<RelayInfo>) -> AgentManifest {
    AgentManifest {
        relays,
        mesh_ca_pem: ca.pem.clone(),
        ..empty_manifest()
    }
}

/// Two relays sharing one mesh CA.
async fn two_relays() -> (Arc<TestCa>, TestRelay, TestRelay) {
    let ca = Arc::new(TestCa::new("test mesh CA"));
    let a = TestRelay::start_in(ca.clone(), RelayOptions::default()).await;
    let b = TestRelay::start_in(ca.clone(), RelayOptions::default()).await;
    (ca, a, b)
}

/// The supervisor running against `primary`; cancelled on drop.
struct Supervised {
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl Supervised {
    fn start(primary: &FakePrimary, timing: Timing) -> Self {
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run(primary.client(), None, timing, cancel.clone()));
        Self { cancel, task }
    }

    async fn stop(mut self) {
        self.cancel.cancel();
        within("the supervisor to stop", &mut self.task)
            .await
            .unwrap();
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attaches_to_the_nearer_of_two_relays() {
    let (ca, far, mut near) = two_relays().await;
    let far_path = DelayForwarder::start(far.addr, FAR).await;
    // The far relay comes first: only measuring can prefer the near one.
    let relays = vec![relay_at("far", far_path.addr), relay_at("near", near.addr)];
    let primary = FakePrimary::start(Behaviour::new(manifest(&ca, relays))).await;
    let agent = Supervised::start(&primary, timing());

    let rc = near.next_attached().await;
    assert_eq!(rc.ticket, "ticket-1");
    assert_eq!(
        primary.recorded(|r| r.ticket_relays.clone()),
        [near.addr.to_string()],
        "the ticket names the relay it is for"
    );
    echo_through(&rc).await;
    // Measured, not attached to. (A round is three probes, but on a loaded
    // machine one may exceed the probe timeout and end the round early.)
    eventually("the far relay to be probed", || far.probes() >= 1).await;
    assert!(far.tickets().is_empty(), "no attach to the far relay");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_relay_shuts_down_the_agent_reattaches_to_the_next_nearest_at_once() {
    let (ca, near, mut other) = two_relays().await;
    // At first the manifest knows only one relay; the agent must fetch it
    // again after the loss to learn of the other.
    let near_info = relay_at("near", near.addr);
    let primary = FakePrimary::start(Behaviour::new(manifest(&ca, vec![near_info.clone()]))).await;
    let agent = Supervised::start(&primary, timing());
    let mut near = near;
    let _first = near.next_attached().await;
    primary.set_manifest(manifest(
        &ca,
        vec![near_info, relay_at("other", other.addr)],
    ));

    let lost_at = Instant::now();
    drop(near);
    // `next_attached` waits at most `DEADLINE`; the bound here is tighter:
    // a probe timeout for the dead relay, a short backoff, one attach.
    let rc = other.next_attached().await;
    let took = lost_at.elapsed();
    // Not a speed target: a bound that separates "at once" from the
    // back-off an agent uses when no relay takes it (up to 30 s).
    assert!(took < Duration::from_secs(10), "re-attached after {took:?}");
    assert_eq!(rc.ticket, "ticket-2");
    primary.recorded(|r| assert_eq!(r.manifest_calls, 2));
    echo_through(&rc).await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_loss_the_agent_goes_to_the_relay_measured_next_nearest_without_starting_over() {
    let (ca, near, mut other) = two_relays().await;
    // `other` is far, so the first attach is to `near`.
    let other_path = DelayForwarder::start(other.addr, FAR).await;
    let primary = FakePrimary::start(Behaviour::new(manifest(
        &ca,
        vec![
            relay_at("near", near.addr),
            relay_at("other", other_path.addr),
        ],
    )))
    .await;
    let agent = Supervised::start(&primary, timing());
    let mut near = near;
    let _first = near.next_attached().await;

    drop(near);
    let rc = other.next_attached().await;
    // The last measurement said where to go: the agent did not start over
    // (fetch the manifest, measure every relay), which costs round trips
    // while the workspace is unreachable.
    primary.recorded(|r| assert_eq!(r.manifest_calls, 1));
    echo_through(&rc).await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moves_make_before_break_only_after_three_rounds_of_a_clearly_nearer_relay() {
    let (ca, mut a, mut b) = two_relays().await;
    let a_path = DelayForwarder::start(a.addr, Duration::ZERO).await;
    let b_path = DelayForwarder::start(b.addr, FAR).await;
    let relays = vec![relay_at("b", b_path.addr), relay_at("a", a_path.addr)];
    let primary = FakePrimary::start(Behaviour::new(manifest(&ca, relays))).await;
    let agent = Supervised::start(
        &primary,
        Timing {
            recheck_interval: Duration::from_millis(50),
            ..timing()
        },
    );

    let rc_a = a.next_attached().await;
    let a_closed = tokio::spawn({
        let conn = rc_a.conn.clone();
        async move { (conn.closed().await, Instant::now()) }
    });
    // Re-checks that find "a" nearer change nothing.
    eventually("five measurement rounds", || b.probes() >= 5 * 3).await;
    assert!(rc_a.conn.close_reason().is_none());
    assert!(b.tickets().is_empty());

    // The paths swap: now "b" is the near one.
    let probes_before_swap = b.probes();
    a_path.set_delay(FAR);
    b_path.set_delay(Duration::ZERO);
    let rc_b = b.next_attached().await;
    assert_eq!(rc_b.ticket, "ticket-2");

    // Each round probes "b" three times. The first round that finds it
    // nearer may have started before the swap but has at least one probe
    // after it; the two rounds after that are whole: at least 1 + 2 * 3.
    // Moving a round sooner would leave at most six.
    let probes_after_swap = rc_b.probes_before - probes_before_swap;
    assert!(
        probes_after_swap > 6,
        "moved after {probes_after_swap} probes of the nearer relay"
    );
    // Make before break: "a" saw the close only after "b" had attached us.
    let (closed, closed_at) = within("the old tunnel to close", a_closed).await.unwrap();
    assert!(
        matches!(&closed, ConnectionError::ApplicationClosed(c) if c.error_code == close::MOVED),
        "{closed:?}"
    );
    assert!(closed_at >= rc_b.attached_at);
    echo_through(&rc_b).await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_the_agent_goes_back_to_the_near_relay_once_it_answers_again() {
    let (ca, mut near, mut far) = two_relays().await;
    let near_path = DelayForwarder::start(near.addr, Duration::ZERO).await;
    let far_path = DelayForwarder::start(far.addr, FAR).await;
    let relays = vec![
        relay_at("near", near_path.addr),
        relay_at("far", far_path.addr),
    ];
    let primary = FakePrimary::start(Behaviour::new(manifest(&ca, relays))).await;
    // The usual re-check interval is far longer than the test: only the
    // re-checks after a failover can bring the agent back.
    let agent = Supervised::start(
        &primary,
        Timing {
            failback_interval: Duration::from_millis(300),
            ..timing()
        },
    );
    let first = near.next_attached().await;
    assert_eq!(first.ticket, "ticket-1");
    // Serving, so what follows is a loss, not a failed attach.
    echo_through(&first).await;

    // The near relay goes silent: the agent fails over to the far one.
    near_path.cut();
    let on_far = far.next_attached().await;
    assert_eq!(on_far.ticket, "ticket-2");
    let far_closed = tokio::spawn({
        let conn = on_far.conn.clone();
        async move { conn.closed().await }
    });
    echo_through(&on_far).await;

    // The near relay answers again: the agent goes back, make before break.
    near_path.set_delay(Duration::ZERO);
    let back = near.next_attached().await;
    assert_eq!(back.ticket, "ticket-3");
    echo_through(&back).await;
    let closed = within("the far tunnel to close", far_closed).await.unwrap();
    assert!(
        matches!(&closed, ConnectionError::ApplicationClosed(c) if c.error_code == close::MOVED),
        "{closed:?}"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_a_nearer_relay_turned_away_goes_back_to_it_once_it_accepts() {
    let ca = Arc::new(TestCa::new("test mesh CA"));
    let mut near = TestRelay::start_in(
        ca.clone(),
        RelayOptions {
            refuse_first: 1,
            ..RelayOptions::default()
        },
    )
    .await;
    let mut far = TestRelay::start_in(ca.clone(), RelayOptions::default()).await;
    let far_path = DelayForwarder::start(far.addr, FAR).await;
    let relays = vec![relay_at("near", near.addr), relay_at("far", far_path.addr)];
    let primary = FakePrimary::start(Behaviour::new(manifest(&ca, relays))).await;
    // Three re-checks of at least half a second each: the echo through
    // the far relay is done long before the agent moves back.
    let agent = Supervised::start(
        &primary,
        Timing {
            failback_interval: Duration::from_secs(1),
            ..timing()
        },
    );

    // The near relay turns the first attach away; the agent takes the far one.
    let on_far = far.next_attached().await;
    assert_eq!(near.tickets(), ["ticket-1"]);
    assert_eq!(on_far.ticket, "ticket-2");
    echo_through(&on_far).await;

    // Well before the usual re-check, it is back on the near relay.
    let back = near.next_attached().await;
    assert_eq!(back.ticket, "ticket-3");
    echo_through(&back).await;
    agent.stop().await;
}
