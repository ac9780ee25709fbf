//! The one revocation store the primary and the edges check app tokens
//! against: for each revoked subject (a user, a workspace, an API key), the
//! time before which its app tokens are void.
//!
//! Bounded by time, not by count: an entry older than an app token's
//! lifetime can no longer void any unexpired token, so it is pruned; a
//! live revocation is never dropped to make room.

use std::collections::HashMap;

use devmesh_shared::api::RevokedSubject;
use devmesh_shared::signing::AppToken;
use parking_lot::RwLock;

use crate::app::APP_TOKEN_LIFETIME_SECS;

/// How long past a token's lifetime an entry is kept (clock skew between
/// the primary that minted a token and the one that revoked it).
const MARGIN_MS: i64 = 60_000;

/// Revocation cut-offs (unix milliseconds) by subject.
#[derive(Debug, Default)]
pub struct Revocations {
    cut_offs: RwLock<HashMap<RevokedSubject, i64>>,
}

impl Revocations {
    /// Voids the app tokens of `subject` minted at or before `at_ms`.
    pub fn revoke(&self, subject: RevokedSubject, at_ms: i64) {
        let mut map = self.cut_offs.write();
        let at = map.entry(subject).or_insert(at_ms);
        *at = (*at).max(at_ms);
        // Pruning costs a pass over the map; doing it when the map doubles
        // keeps the cost per revocation constant.
        if map.len().is_power_of_two() {
            prune(&mut map, chrono::Utc::now().timestamp_millis());
        }
    }

    /// Whether a revocation voids `token`.
    pub fn revokes(&self, token: &AppToken) -> bool {
        let map = self.cut_offs.read();
        let cut = |s: RevokedSubject| map.get(&s).is_some_and(|at| token.issued_at_ms <= *at);
        token
            .user_id
            .is_some_and(|id| cut(RevokedSubject::User { id }))
            || cut(RevokedSubject::Workspace {
                id: token.workspace_id,
            })
            || token
                .key_id
                .as_ref()
                .is_some_and(|id| cut(RevokedSubject::Key { id: id.clone() }))
    }

    /// Whether `subject` was revoked at or after `issued_at_ms` (a session
    /// that began then must end).
    pub fn cuts(&self, subject: &RevokedSubject, issued_at_ms: i64) -> bool {
        self.cut_offs
            .read()
            .get(subject)
            .is_some_and(|at| issued_at_ms <= *at)
    }

    /// How many subjects are revoked.
    pub fn len(&self) -> usize {
        self.cut_offs.read().len()
    }

    /// Whether nothing is revoked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops entries that can no longer void an unexpired token.
    pub fn prune(&self, now_ms: i64) {
        prune(&mut self.cut_offs.write(), now_ms);
    }
}

fn prune(map: &mut HashMap<RevokedSubject, i64>, now_ms: i64) {
    let oldest_live = now_ms - APP_TOKEN_LIFETIME_SECS * 1000 - MARGIN_MS;
    map.retain(|_, at| *at >= oldest_live);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(user: uuid::Uuid, issued_at_ms: i64) -> AppToken {
        AppToken {
            user_id: Some(user),
            workspace_id: uuid::Uuid::nil(),
            agent_id: uuid::Uuid::nil(),
            target: devmesh_shared::apphost::AppTarget::Slug("a".into()),
            host: "h".into(),
            sharing_level: devmesh_shared::api::SharingLevel::Owner,
            key_id: Some("k".into()),
            port: 1,
            https: false,
            base_path: "/".into(),
            issued_at_ms,
            exp: issued_at_ms / 1000 + APP_TOKEN_LIFETIME_SECS,
        }
    }

    #[test]
    fn live_revocations_stay_and_dead_ones_go() {
        let r = Revocations::default();
        let now = chrono::Utc::now().timestamp_millis();
        let (alice, bob) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        r.revoke(RevokedSubject::User { id: alice }, now);
        r.revoke(
            RevokedSubject::User { id: bob },
            now - APP_TOKEN_LIFETIME_SECS * 1000 - 2 * MARGIN_MS,
        );
        assert!(r.revokes(&token(alice, now - 1)));
        assert!(
            !r.revokes(&token(alice, now + 1)),
            "minted after the cut-off"
        );
        r.prune(now);
        assert_eq!(r.len(), 1, "the old entry could void no live token");
        assert!(r.revokes(&token(alice, now - 1)));
        // A flood of revocations is pruned as it grows, never by dropping
        // live entries.
        for i in 0..5000 {
            r.revoke(
                RevokedSubject::Key {
                    id: format!("old{i}"),
                },
                now - APP_TOKEN_LIFETIME_SECS * 1000 - 2 * MARGIN_MS,
            );
        }
        assert!(r.len() < 5000);
        assert!(r.revokes(&token(alice, now - 1)));
    }
}
