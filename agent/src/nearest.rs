//! Choosing the nearest relay: order the manifest's relays by measured
//! round-trip time, and decide, round after round, whether another relay is
//! clearly enough nearer to move to. Pure policy: it takes measurements and
//! returns decisions; probing lives in [`crate::tunnel`] and moving in
//! [`crate::supervisor`].
//!
//! The hysteresis keeps an agent from flapping between two relays at similar
//! distances (every move costs its users their open connections): another
//! relay must be nearer by both [`GAIN_PERCENT`] and [`MIN_GAIN`] for
//! [`ROUNDS`] consecutive measurement rounds.
//!
//! [`Failback`] paces the re-checks of an agent that may sit far from its
//! users after a failover, so that it goes back soon once a nearer relay
//! answers again.

use std::time::Duration;

use devmesh_net::backoff::Backoff;
use devmesh_shared::api::RelayInfo;

/// Another relay is clearly nearer only if its RTT is at least this many
/// percent lower than the current relay's. Relative, so that 40 ms vs 50 ms
/// (jitter on a long path) is not a reason to move but 4 ms vs 50 ms is.
pub(crate) const GAIN_PERCENT: u32 = 25;
/// ...and at least this much lower in absolute terms, so that 1 ms vs 2 ms
/// on a LAN, where scheduling noise dominates, is not a reason either.
pub(crate) const MIN_GAIN: Duration = Duration::from_millis(5);
/// Consecutive rounds another relay must be clearly nearer before moving.
pub(crate) const ROUNDS: u32 = 3;

/// One relay's round-trip time in one measurement round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Measurement {
    /// The relay, as the manifest lists it.
    pub(crate) relay: RelayInfo,
    /// The best probe's time; `None` if no probe got through.
    pub(crate) rtt: Option<Duration>,
}

/// The relays to try, best first: by RTT, then the unreachable ones, each
/// group in the order given (the manifest's). Unreachable relays stay in
/// the list because a probe can fail where an attach still works.
pub(crate) fn order_candidates(mut measured: Vec<Measurement>) -> Vec<Measurement> {
    // A stable sort keeps the manifest's order among equals.
    measured.sort_by_key(|m| (m.rtt.is_none(), m.rtt));
    measured
}

/// Makes the relays of a preferred region (`--relay-region`) win every
/// comparison while they answer: they count as zero RTT. When none
/// answers, the others are tried as usual, so a pinned agent still fails
/// over when its region goes down.
pub(crate) fn prefer_region(measured: &mut [Measurement], region: Option<&str>) {
    let Some(region) = region else { return };
    for m in measured.iter_mut().filter(|m| m.relay.region == region) {
        if m.rtt.is_some() {
            m.rtt = Some(Duration::ZERO);
        }
    }
}

/// Whether a relay at `candidate` is clearly nearer than the current one at
/// `current` (`None`: the current relay did not answer its probes).
pub(crate) fn clearly_nearer(candidate: Duration, current: Option<Duration>) -> bool {
    let Some(current) = current else {
        return true;
    };
    candidate.saturating_add(MIN_GAIN) <= current
        && candidate.saturating_mul(100) <= current.saturating_mul(100 - GAIN_PERCENT)
}

/// What to do after a measurement round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Stay on the current relay.
    Stay {
        /// Consecutive rounds (so far) in which another relay was clearly
        /// nearer; the move happens when this would reach [`ROUNDS`].
        nearer_rounds: u32,
    },
    /// Attach to `to` (then close the current connection).
    Move {
        /// The relay to move to: the nearest of this round.
        to: Measurement,
        /// The current relay's RTT in this round.
        from_rtt: Option<Duration>,
    },
}

/// The hysteresis state machine for an attached agent: fed one round of
/// measurements at a time, it says when to move.
#[derive(Debug)]
pub(crate) struct RelayChooser {
    current: RelayInfo,
    /// Consecutive rounds in which some other relay was clearly nearer.
    nearer_rounds: u32,
}

impl RelayChooser {
    /// A chooser for an agent attached to `current`.
    pub(crate) fn new(current: RelayInfo) -> Self {
        Self {
            current,
            nearer_rounds: 0,
        }
    }

    /// The relay the agent is attached to.
    pub(crate) fn current(&self) -> &RelayInfo {
        &self.current
    }

    /// Takes one round of measurements. A relay missing from `round` counts
    /// as unreachable; so does the current relay if it is missing.
    ///
    /// The rounds need not name the same relay each time: the agent leaves
    /// once *some* other relay has been clearly nearer for [`ROUNDS`] rounds
    /// in a row, and goes to the nearest of the last round.
    pub(crate) fn observe(&mut self, round: &[Measurement]) -> Decision {
        let from_rtt = round
            .iter()
            .find(|m| m.relay == self.current)
            .and_then(|m| m.rtt);
        let best = round
            .iter()
            .filter(|m| m.relay != self.current)
            .filter_map(|m| m.rtt.map(|rtt| (m, rtt)))
            .min_by_key(|&(_, rtt)| rtt);
        match best {
            Some((m, rtt)) if clearly_nearer(rtt, from_rtt) => {
                self.nearer_rounds += 1;
                if self.nearer_rounds >= ROUNDS {
                    self.nearer_rounds = 0;
                    return Decision::Move {
                        to: m.clone(),
                        from_rtt,
                    };
                }
            }
            _ => self.nearer_rounds = 0,
        }
        Decision::Stay {
            nearer_rounds: self.nearer_rounds,
        }
    }

    /// The agent is now attached to `relay`; the count starts over.
    pub(crate) fn moved_to(&mut self, relay: RelayInfo) {
        self.current = relay;
        self.nearer_rounds = 0;
    }
}

/// Handshakes per relay in a failback re-check that is looking for a
/// nearer relay: after a large failover every displaced agent re-checks
/// at once, and one handshake per relay keeps that burst small. The
/// rounds that confirm a nearer relay make the usual number.
pub(crate) const FAILBACK_HANDSHAKES: u32 = 1;

/// The re-check schedule of a *displaced* agent: one attached after its
/// relay was lost (by a measurement that may be stale, or taken while the
/// nearest relay was down) or after a nearer relay turned it away.
///
/// The first wait is `first` (jittered to half of it at the least); the
/// waits double while no relay is clearly nearer, and keep their length
/// while one is, until [`ROUNDS`] rounds move the agent. Once the waits
/// reach `usual`, the schedule ends and the agent re-checks as any other.
/// A move that fails stops the waits from keeping their length, so a
/// relay that answers probes but refuses attaches costs a few re-checks,
/// not one every few seconds for ever.
#[derive(Debug)]
pub(crate) struct Failback {
    waits: Backoff,
    /// The last round found a relay clearly nearer.
    nearer: bool,
    /// A move to a nearer relay failed during this schedule.
    move_failed: bool,
}

impl Failback {
    pub(crate) fn new(first: Duration, usual: Duration) -> Self {
        debug_assert!(!first.is_zero(), "a zero failback wait would spin");
        Self {
            waits: Backoff::new(first, usual),
            nearer: false,
            move_failed: false,
        }
    }

    /// The wait before the next re-check and the handshakes per relay it
    /// makes; `None` once the schedule has run its course.
    pub(crate) fn next(&mut self, usual_handshakes: u32) -> Option<(Duration, u32)> {
        if self.nearer && !self.move_failed {
            return Some((self.waits.again(), usual_handshakes));
        }
        if self.waits.at_cap() {
            return None;
        }
        Some((self.waits.next_delay(), FAILBACK_HANDSHAKES))
    }

    /// A re-check found `nearer_rounds` rounds in a row with a relay
    /// clearly nearer (see [`Decision::Stay`]).
    pub(crate) fn observed(&mut self, nearer_rounds: u32) {
        self.nearer = nearer_rounds > 0;
    }

    /// A re-check decided to move but the nearer relay did not take the
    /// agent.
    pub(crate) fn move_failed(&mut self) {
        self.nearer = false;
        self.move_failed = true;
    }
}

#[cfg(test)]
mod tests;
