//! The attach session: what each end of the control stream says, and when,
//! as two state machines that do no IO. The agent, the relay, the agent's
//! test relay and the load tool's agents all drive these, each with its own
//! streams, on tokio's clock (so paused-time tests move it); [`super::io::flush`] writes what a session queued and
//! [`super::io::attach`] runs the agent's opening exchange.
//!
//! ```text
//! agent                                   relay
//!   Attach { ticket }          ────────▶    checks the ticket (its policy)
//!                              ◀────────    Attached { relay } | Refused { reason }
//!   Ping { n } every ping_interval ─────▶
//!                              ◀────────    Pong { n }
//! ```
//!
//! The agent declares the relay dead when no pong arrives for `dead_after`;
//! the relay answers every ping and reports the agent alive at most once
//! per [`ALIVE_REPORT_EVERY`]. Either end answers a ping, and a message
//! that makes no sense in the current phase is a protocol error before the
//! attach and ignored after it (so later versions may add messages).

use std::collections::VecDeque;
use std::time::Duration;

use thiserror::Error;
use tokio::time::Instant;

use super::Control;

/// How often, at most, a relay reports an attached agent alive upstream.
pub const ALIVE_REPORT_EVERY: Duration = Duration::from_secs(30);

/// Why a session ended or never began.
#[derive(Debug, Error)]
pub enum SessionError {
    /// The relay refused the ticket.
    #[error("the relay refused the attach: {0}")]
    Refused(String),
    /// The peer said something that makes no sense at this point.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The peer ended the control stream.
    #[error("the peer closed the control stream")]
    Closed,
    /// No pong for this long.
    #[error("no pong from the relay for {0:?}")]
    Dead(Duration),
    /// Reading or writing the control stream failed.
    #[error("control stream: {0}")]
    Io(#[from] std::io::Error),
}

/// A control message's name, for logs; never its contents (a ticket is a
/// bearer credential).
pub fn kind(c: &Control) -> &'static str {
    match c {
        Control::Attach { .. } => "attach",
        Control::Attached { .. } => "attached",
        Control::Refused { .. } => "refused",
        Control::Ping { .. } => "ping",
        Control::Pong { .. } => "pong",
    }
}

/// Something a session has queued for its peer.
pub trait Outbox {
    /// The next message to write, in order.
    fn transmit(&mut self) -> Option<Control>;
}

// === Agent ===

/// The agent's ping timers.
#[derive(Debug, Clone, Copy)]
pub struct PingTiming {
    /// How often the agent pings.
    pub ping_interval: Duration,
    /// No pong for this long means the relay is gone.
    pub dead_after: Duration,
}

/// The agent's end: sends the ticket, waits for the answer, then pings.
#[derive(Debug)]
pub struct AgentSession {
    timing: PingTiming,
    outbox: VecDeque<Control>,
    relay: Option<String>,
    nonce: u64,
    next_ping: Instant,
    dead_at: Instant,
}

impl AgentSession {
    /// A session that opens by presenting `ticket`.
    pub fn new(ticket: String, timing: PingTiming, now: Instant) -> Self {
        Self {
            timing,
            outbox: VecDeque::from([Control::Attach { ticket }]),
            relay: None,
            nonce: 0,
            next_ping: now + timing.ping_interval,
            dead_at: now + timing.dead_after,
        }
    }

    /// The relay's name once it accepted the ticket.
    pub fn relay(&self) -> Option<&str> {
        self.relay.as_deref()
    }

    /// Takes a message from the relay (`None`: it ended the stream).
    pub fn receive(&mut self, message: Option<Control>, now: Instant) -> Result<(), SessionError> {
        let Some(message) = message else {
            return Err(match self.relay {
                None => SessionError::Protocol(
                    "the relay closed the control stream without answering".into(),
                ),
                Some(_) => SessionError::Closed,
            });
        };
        match (message, self.relay.is_some()) {
            (Control::Attached { relay }, false) => {
                self.relay = Some(relay);
                self.next_ping = now + self.timing.ping_interval;
                self.dead_at = now + self.timing.dead_after;
            }
            (Control::Refused { reason }, false) => return Err(SessionError::Refused(reason)),
            (Control::Ping { nonce }, _) => self.outbox.push_back(Control::Pong { nonce }),
            (other, false) => {
                return Err(SessionError::Protocol(format!(
                    "expected attached or refused, got {}",
                    kind(&other)
                )));
            }
            (Control::Pong { .. }, true) => self.dead_at = now + self.timing.dead_after,
            (_, true) => {}
        }
        Ok(())
    }

    /// When [`Self::tick`] next has something to do.
    pub fn deadline(&self) -> Instant {
        self.next_ping.min(self.dead_at)
    }

    /// Queues a ping when one is due; errs once the relay has been silent
    /// for `dead_after`.
    pub fn tick(&mut self, now: Instant) -> Result<(), SessionError> {
        if now >= self.dead_at {
            return Err(SessionError::Dead(self.timing.dead_after));
        }
        if now >= self.next_ping {
            self.nonce = self.nonce.wrapping_add(1);
            self.outbox.push_back(Control::Ping { nonce: self.nonce });
            // Missed pings are not made up: the next is an interval away.
            self.next_ping = now + self.timing.ping_interval;
        }
        Ok(())
    }
}

impl Outbox for AgentSession {
    fn transmit(&mut self) -> Option<Control> {
        self.outbox.pop_front()
    }
}

// === Relay ===

/// What the relay learned from a message.
#[derive(Debug, PartialEq, Eq)]
pub enum RelayEvent {
    /// The agent presented this ticket: check it, then
    /// [`RelaySession::accept`] or [`RelaySession::refuse`].
    Ticket(String),
    /// The agent is alive; report it upstream (at most once per
    /// [`ALIVE_REPORT_EVERY`]).
    Alive,
    /// Nothing to act on.
    Nothing,
}

/// The relay's end: waits for a ticket, answers it, then answers pings.
#[derive(Debug, Default)]
pub struct RelaySession {
    outbox: VecDeque<Control>,
    /// When the agent was last reported alive; `None` until attached.
    reported: Option<Instant>,
    ticket_seen: bool,
}

impl RelaySession {
    /// A session waiting for the agent's ticket.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes a message from the agent (`None`: it ended the stream).
    pub fn receive(
        &mut self,
        message: Option<Control>,
        now: Instant,
    ) -> Result<RelayEvent, SessionError> {
        let Some(message) = message else {
            return Err(SessionError::Closed);
        };
        match (message, self.ticket_seen) {
            (Control::Attach { ticket }, false) => {
                self.ticket_seen = true;
                Ok(RelayEvent::Ticket(ticket))
            }
            (other, false) => Err(SessionError::Protocol(format!(
                "expected attach, got {}",
                kind(&other)
            ))),
            (Control::Ping { nonce }, true) => {
                self.outbox.push_back(Control::Pong { nonce });
                match self.reported {
                    Some(at) if now.duration_since(at) >= ALIVE_REPORT_EVERY => {
                        self.reported = Some(now);
                        Ok(RelayEvent::Alive)
                    }
                    _ => Ok(RelayEvent::Nothing),
                }
            }
            (_, true) => Ok(RelayEvent::Nothing),
        }
    }

    /// Accepts the ticket: queues [`Control::Attached`] naming this relay.
    pub fn accept(&mut self, relay: String, now: Instant) {
        self.outbox.push_back(Control::Attached { relay });
        self.reported = Some(now);
    }

    /// Refuses the ticket, saying why; the relay closes next.
    pub fn refuse(&mut self, reason: String) {
        self.outbox.push_back(Control::Refused { reason });
    }
}

impl Outbox for RelaySession {
    fn transmit(&mut self) -> Option<Control> {
        self.outbox.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMING: PingTiming = PingTiming {
        ping_interval: Duration::from_secs(10),
        dead_after: Duration::from_secs(30),
    };

    fn drain(s: &mut impl Outbox) -> Vec<Control> {
        std::iter::from_fn(|| s.transmit()).collect()
    }

    /// Plays both ends against each other, message by message.
    fn exchange(agent: &mut AgentSession, relay: &mut RelaySession, now: Instant) {
        for m in drain(agent) {
            match relay.receive(Some(m), now).unwrap() {
                RelayEvent::Ticket(t) if t == "good" => relay.accept("sydney".into(), now),
                RelayEvent::Ticket(_) => relay.refuse("ticket expired".into()),
                _ => {}
            }
        }
        for m in drain(relay) {
            if let Err(e) = agent.receive(Some(m), now) {
                panic!("agent: {e}");
            }
        }
    }

    #[test]
    fn a_good_ticket_attaches_and_pings_keep_both_ends_alive() {
        let t0 = Instant::now();
        let mut agent = AgentSession::new("good".into(), TIMING, t0);
        let mut relay = RelaySession::new();
        exchange(&mut agent, &mut relay, t0);
        assert_eq!(agent.relay(), Some("sydney"));

        // An hour of pings, each answered: never dead, a ping every 10 s.
        let mut pings = 0;
        let mut now = t0;
        while now < t0 + Duration::from_secs(3600) {
            now = agent.deadline();
            agent.tick(now).unwrap();
            pings += agent.outbox.len();
            exchange(&mut agent, &mut relay, now);
        }
        assert!((355..=361).contains(&pings), "{pings} pings in an hour");
    }

    #[test]
    fn a_refused_ticket_says_why() {
        let t0 = Instant::now();
        let mut agent = AgentSession::new("stale".into(), TIMING, t0);
        let mut relay = RelaySession::new();
        for m in drain(&mut agent) {
            assert_eq!(
                relay.receive(Some(m), t0).unwrap(),
                RelayEvent::Ticket("stale".into())
            );
            relay.refuse("ticket expired".into());
        }
        let answer = drain(&mut relay).pop();
        match agent.receive(answer, t0) {
            Err(SessionError::Refused(reason)) => assert_eq!(reason, "ticket expired"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_silent_relay_is_declared_dead_after_dead_after() {
        let t0 = Instant::now();
        let mut agent = AgentSession::new("good".into(), TIMING, t0);
        agent
            .receive(Some(Control::Attached { relay: "r".into() }), t0)
            .unwrap();
        let died = loop {
            let now = agent.deadline();
            if let Err(e) = agent.tick(now) {
                assert!(matches!(e, SessionError::Dead(d) if d == TIMING.dead_after));
                break now;
            }
        };
        assert_eq!(died, t0 + TIMING.dead_after);
        // Pings kept going out meanwhile: 10 s and 20 s.
        assert_eq!(drain(&mut agent).len(), 3, "attach + two pings");
    }

    #[test]
    fn anything_but_an_answer_before_attach_is_a_protocol_error_on_both_ends() {
        let t0 = Instant::now();
        let mut agent = AgentSession::new("good".into(), TIMING, t0);
        assert!(matches!(
            agent.receive(Some(Control::Pong { nonce: 1 }), t0),
            Err(SessionError::Protocol(_))
        ));
        assert!(matches!(
            AgentSession::new("good".into(), TIMING, t0).receive(None, t0),
            Err(SessionError::Protocol(_))
        ));
        let mut relay = RelaySession::new();
        assert!(matches!(
            relay.receive(Some(Control::Ping { nonce: 1 }), t0),
            Err(SessionError::Protocol(_))
        ));
        // A second ticket on an attached session is ignored, not re-checked.
        let mut relay = RelaySession::new();
        let ticket = Control::Attach { ticket: "a".into() };
        relay.receive(Some(ticket.clone()), t0).unwrap();
        relay.accept("r".into(), t0);
        assert_eq!(
            relay.receive(Some(ticket), t0).unwrap(),
            RelayEvent::Nothing
        );
    }

    #[test]
    fn the_relay_reports_an_agent_alive_at_most_once_per_period() {
        let t0 = Instant::now();
        let mut relay = RelaySession::new();
        relay
            .receive(Some(Control::Attach { ticket: "t".into() }), t0)
            .unwrap();
        relay.accept("r".into(), t0);
        let mut alive = 0;
        for s in (10..=300).step_by(10) {
            let now = t0 + Duration::from_secs(s);
            if relay
                .receive(Some(Control::Ping { nonce: s }), now)
                .unwrap()
                == RelayEvent::Alive
            {
                alive += 1;
            }
        }
        assert_eq!(alive, 10, "one report per 30 s over 300 s");
        assert_eq!(drain(&mut relay).len(), 1 + 30, "attached + every pong");
    }
}
