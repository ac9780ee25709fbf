//! The relay-choice policy, fed measurements by hand.

use super::*;

fn relay(region: &str) -> RelayInfo {
    RelayInfo {
        region: region.into(),
        address: format!("{region}.test:443"),
        server_name: format!("{region}.relay.test"),
    }
}

fn ms(n: u64) -> Option<Duration> {
    Some(Duration::from_millis(n))
}

/// A round: each region with its RTT in milliseconds (`None`: unreachable).
fn round(rtts: &[(&str, Option<Duration>)]) -> Vec<Measurement> {
    rtts.iter()
        .map(|&(region, rtt)| Measurement {
            relay: relay(region),
            rtt,
        })
        .collect()
}

fn stays(d: &Decision) -> bool {
    matches!(d, Decision::Stay { .. })
}

fn moves_to(d: &Decision) -> Option<&str> {
    match d {
        Decision::Move { to, .. } => Some(to.relay.region.as_str()),
        Decision::Stay { .. } => None,
    }
}

#[test]
fn candidates_are_ordered_by_rtt_with_unreachable_ones_last_in_manifest_order() {
    let measured = round(&[
        ("a", None),
        ("b", ms(40)),
        ("c", ms(3)),
        ("d", None),
        ("e", ms(40)),
    ]);
    let order: Vec<String> = order_candidates(measured)
        .into_iter()
        .map(|m| m.relay.region)
        .collect();
    assert_eq!(order, ["c", "b", "e", "a", "d"]);
}

#[test]
fn candidates_keep_the_manifest_order_when_nothing_answers() {
    let order: Vec<String> = order_candidates(round(&[("a", None), ("b", None), ("c", None)]))
        .into_iter()
        .map(|m| m.relay.region)
        .collect();
    assert_eq!(order, ["a", "b", "c"]);
}

#[test]
fn clearly_nearer_needs_both_margins() {
    let d = |n| Duration::from_millis(n);
    // 25 % lower and 5 ms lower: both hold.
    assert!(clearly_nearer(d(30), ms(40)));
    assert!(clearly_nearer(d(75), ms(100)));
    // 24 % lower: the relative margin fails.
    assert!(!clearly_nearer(d(76), ms(100)));
    // 50 % lower but only 2 ms: the absolute margin fails.
    assert!(!clearly_nearer(d(2), ms(4)));
    // Exactly 5 ms and more than 25 %.
    assert!(clearly_nearer(d(5), ms(10)));
    assert!(!clearly_nearer(d(6), ms(10)));
    // Equal or slower is never nearer.
    assert!(!clearly_nearer(d(40), ms(40)));
    assert!(!clearly_nearer(d(50), ms(40)));
    // Anything that answers beats a current relay that does not.
    assert!(clearly_nearer(d(500), None));
}

#[test]
fn moves_only_after_three_consecutive_clearly_nearer_rounds() {
    let mut chooser = RelayChooser::new(relay("far"));
    let better = round(&[("far", ms(80)), ("near", ms(10))]);
    let first = chooser.observe(&better);
    assert_eq!(first, Decision::Stay { nearer_rounds: 1 });
    let second = chooser.observe(&better);
    assert_eq!(second, Decision::Stay { nearer_rounds: 2 });
    let third = chooser.observe(&better);
    assert_eq!(
        third,
        Decision::Move {
            to: Measurement {
                relay: relay("near"),
                rtt: ms(10)
            },
            from_rtt: ms(80),
        }
    );
}

#[test]
fn a_round_without_a_clear_winner_starts_the_count_over() {
    let mut chooser = RelayChooser::new(relay("far"));
    let better = round(&[("far", ms(80)), ("near", ms(10))]);
    let close = round(&[("far", ms(80)), ("near", ms(70))]);
    assert!(stays(&chooser.observe(&better)));
    assert!(stays(&chooser.observe(&better)));
    // Jitter: one round where "near" is only 12 % better.
    assert_eq!(chooser.observe(&close), Decision::Stay { nearer_rounds: 0 });
    assert!(stays(&chooser.observe(&better)));
    assert!(stays(&chooser.observe(&better)));
    assert_eq!(moves_to(&chooser.observe(&better)), Some("near"));
}

#[test]
fn small_differences_never_move_the_agent() {
    let mut chooser = RelayChooser::new(relay("a"));
    for rtts in [
        // 20 % better: under the relative margin.
        [("a", ms(50)), ("b", ms(40))],
        // 3 ms better: under the absolute margin.
        [("a", ms(4)), ("b", ms(1))],
        // The other relay does not answer.
        [("a", ms(50)), ("b", None)],
        // Nothing answers.
        [("a", None), ("b", None)],
    ] {
        for _ in 0..10 {
            assert!(stays(&chooser.observe(&round(&rtts))), "{rtts:?}");
        }
    }
    assert_eq!(chooser.current(), &relay("a"));
}

#[test]
fn a_current_relay_that_stops_answering_probes_is_left_after_three_rounds() {
    let mut chooser = RelayChooser::new(relay("a"));
    let round_ = round(&[("a", None), ("b", ms(200))]);
    assert!(stays(&chooser.observe(&round_)));
    assert!(stays(&chooser.observe(&round_)));
    assert_eq!(moves_to(&chooser.observe(&round_)), Some("b"));
}

#[test]
fn a_current_relay_missing_from_the_round_counts_as_unreachable() {
    let mut chooser = RelayChooser::new(relay("gone"));
    let round_ = round(&[("b", ms(30))]);
    assert!(stays(&chooser.observe(&round_)));
    assert!(stays(&chooser.observe(&round_)));
    assert_eq!(moves_to(&chooser.observe(&round_)), Some("b"));
}

#[test]
fn the_move_goes_to_the_nearest_of_the_last_round() {
    let mut chooser = RelayChooser::new(relay("a"));
    assert!(stays(&chooser.observe(&round(&[
        ("a", ms(90)),
        ("b", ms(10)),
        ("c", ms(30))
    ]))));
    assert!(stays(&chooser.observe(&round(&[
        ("a", ms(90)),
        ("b", ms(30)),
        ("c", ms(10))
    ]))));
    // Ties go to the first in the manifest.
    let last = chooser.observe(&round(&[("a", ms(90)), ("c", ms(20)), ("b", ms(20))]));
    assert_eq!(moves_to(&last), Some("c"));
}

#[test]
fn after_a_move_the_new_relay_is_current_and_the_count_starts_over() {
    let mut chooser = RelayChooser::new(relay("a"));
    let b_nearer = round(&[("a", ms(90)), ("b", ms(10))]);
    for _ in 0..2 {
        assert!(stays(&chooser.observe(&b_nearer)));
    }
    assert_eq!(moves_to(&chooser.observe(&b_nearer)), Some("b"));
    chooser.moved_to(relay("b"));
    assert_eq!(chooser.current(), &relay("b"));
    // The same measurements now mean: stay.
    for _ in 0..5 {
        assert!(stays(&chooser.observe(&b_nearer)));
    }
    // And moving back takes three rounds again.
    let a_nearer = round(&[("a", ms(10)), ("b", ms(90))]);
    assert!(stays(&chooser.observe(&a_nearer)));
    assert!(stays(&chooser.observe(&a_nearer)));
    assert_eq!(moves_to(&chooser.observe(&a_nearer)), Some("a"));
}

#[test]
fn a_failed_move_needs_three_fresh_rounds() {
    let mut chooser = RelayChooser::new(relay("a"));
    let b_nearer = round(&[("a", ms(90)), ("b", ms(10))]);
    for _ in 0..2 {
        chooser.observe(&b_nearer);
    }
    assert_eq!(moves_to(&chooser.observe(&b_nearer)), Some("b"));
    // The attach to "b" failed; the agent is still on "a".
    assert_eq!(chooser.current(), &relay("a"));
    assert_eq!(
        chooser.observe(&b_nearer),
        Decision::Stay { nearer_rounds: 1 }
    );
}

// === Failback ===

const FIRST: Duration = Duration::from_secs(10);
const USUAL: Duration = Duration::from_secs(180);

fn within(d: Duration, nominal: Duration) -> bool {
    d >= nominal / 2 && d <= nominal
}

#[test]
fn failback_waits_double_while_nothing_is_nearer_then_end() {
    let mut f = Failback::new(FIRST, USUAL);
    let mut nominal = FIRST;
    let mut rounds = 0;
    while let Some((wait, handshakes)) = f.next(3) {
        assert!(within(wait, nominal), "{wait:?} under {nominal:?}");
        assert_eq!(
            handshakes, FAILBACK_HANDSHAKES,
            "looking costs one handshake"
        );
        f.observed(0);
        nominal = (nominal * 2).min(USUAL);
        rounds += 1;
    }
    // 10, 20, 40, 80, 160 s: a few extra rounds, then the usual schedule.
    assert_eq!(rounds, 5);
}

#[test]
fn a_nearer_relay_keeps_the_pace_and_its_rounds_measure_in_full() {
    let mut f = Failback::new(FIRST, USUAL);
    for _ in 0..3 {
        f.next(3).unwrap();
        f.observed(0);
    }
    // The fourth wait is under 80 s; a nearer relay keeps that pace.
    f.next(3).unwrap();
    for n in 1..=5 {
        f.observed(n);
        let (wait, handshakes) = f.next(3).unwrap();
        assert!(within(wait, Duration::from_secs(80)), "{wait:?}");
        assert_eq!(handshakes, 3, "confirming rounds measure as usual");
    }
    // Nothing nearer any more: doubling again.
    f.observed(0);
    let (wait, _) = f.next(3).unwrap();
    assert!(within(wait, Duration::from_secs(160)), "{wait:?}");
}

#[test]
fn a_relay_that_refuses_the_move_does_not_keep_the_pace() {
    let mut f = Failback::new(FIRST, USUAL);
    f.next(3).unwrap();
    f.move_failed();
    // A relay that answers probes but refuses attaches looks nearer round
    // after round; the waits grow anyway, and the schedule ends.
    let mut rounds = 0;
    while let Some((_, handshakes)) = f.next(3) {
        assert_eq!(handshakes, FAILBACK_HANDSHAKES);
        f.observed(1 + rounds % 3);
        rounds += 1;
        assert!(rounds < 10, "the schedule must end");
    }
}

#[test]
fn a_usual_interval_below_the_first_failback_wait_ends_the_schedule_at_once() {
    let mut f = Failback::new(FIRST, Duration::from_secs(1));
    assert!(f.next(3).is_none());
}
