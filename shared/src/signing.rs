//! Ed25519-signed tokens: attach tickets (primary → agent → relay) and app
//! tokens (primary → browser → edge), so a relay or an edge can check them
//! without a round trip to the primary.
//!
//! A token is `base64url(header).base64url(claims).base64url(signature)`,
//! unpadded, where the header is `{"alg":"EdDSA","kid":..,"typ":..}` and the
//! signature covers the first two parts joined by `.`. The `kid` picks the
//! public key, so keys can be rotated by publishing the new one before
//! signing with it. Verification bounds the token's length before decoding,
//! checks the signature before it parses the claims, then the type, then
//! the expiry; garbage is an error, never a panic.

use std::collections::HashMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use uuid::Uuid;

/// Who may open an app.
#[derive(
    Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum SharingLevel {
    /// Only the workspace owner.
    #[default]
    Owner,
    /// Any signed-in user.
    Authenticated,
    /// Anyone, signed in or not.
    Public,
}

impl SharingLevel {
    /// Parses a stored level; anything unknown is the most restrictive.
    pub fn from_stored(s: &str) -> Self {
        match s {
            "public" => SharingLevel::Public,
            "authenticated" => SharingLevel::Authenticated,
            _ => SharingLevel::Owner,
        }
    }

    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            SharingLevel::Owner => "owner",
            SharingLevel::Authenticated => "authenticated",
            SharingLevel::Public => "public",
        }
    }
}

/// The longest token [`Verifier::verify`] looks at; anything longer is
/// [`TokenError::Malformed`] before a byte is decoded.
pub const MAX_TOKEN_LEN: usize = 4096;

/// The header's `alg`, the JOSE name of Ed25519.
const ALG: &str = "EdDSA";
/// Length of an Ed25519 public key.
const PUBLIC_KEY_LEN: usize = 32;

// === Errors ===

/// Why a key or a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TokenError {
    /// Not a token: too long, not three base64url parts, undecodable JSON,
    /// or an `alg` other than `EdDSA`.
    #[error("malformed token")]
    Malformed,
    /// The header's `kid` names no key the verifier knows.
    #[error("unknown signing key")]
    UnknownKey,
    /// The signature does not match the header and claims.
    #[error("bad signature")]
    BadSignature,
    /// Validly signed, but a different kind of token (`typ`) than asked for.
    #[error("wrong token type")]
    WrongType,
    /// Validly signed, but its expiry is not after `now`.
    #[error("token expired")]
    Expired,
    /// A key could not be loaded: PKCS#8 that is not an Ed25519 v2
    /// document, or a public key that is not base64url of 32 bytes.
    #[error("invalid key")]
    InvalidKey,
}

// === Claims ===

/// What a token carries. `TYPE` goes into the header so a token minted for
/// one purpose is never accepted for another.
pub trait Claims: Serialize + DeserializeOwned {
    /// The header's `typ`.
    const TYPE: &'static str;
    /// Unix seconds after which the token is refused.
    fn expires_at(&self) -> i64;
}

/// Lets an agent attach to a relay on behalf of a workspace.
///
/// Unknown fields are refused so that a field a newer primary adds to narrow
/// a token fails closed on an older verifier rather than being ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachTicket {
    /// The agent attaching.
    pub agent_id: Uuid,
    /// The workspace the agent belongs to.
    pub workspace_id: Uuid,
    /// The audience: the address of the one relay that may accept it (as
    /// the relay advertises itself), so no other relay can replay it.
    pub relay: String,
    /// Random; a relay accepts each nonce once, so a ticket attaches once.
    pub nonce: String,
    /// Issued at, unix milliseconds: of two tickets for one agent, the
    /// later one says where it is.
    pub issued_at_ms: i64,
    /// Expiry, unix seconds.
    pub exp: i64,
}

impl Claims for AttachTicket {
    const TYPE: &'static str = "attach";
    fn expires_at(&self) -> i64 {
        self.exp
    }
}

/// What an app token opens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AppTarget {
    /// A declared app, by its slug.
    Slug(String),
    /// A port on the agent's machine.
    Port {
        /// The port on the agent's loopback interface (a dev URL's number).
        port: u16,
        /// Whether the app there speaks TLS.
        https: bool,
    },
}

/// Lets a browser reach one app of one workspace through an edge.
///
/// Unknown fields are refused, for the reason given on [`AttachTicket`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AppToken {
    /// The user it was minted for; `None` for anonymous access to a public
    /// app.
    pub user_id: Option<Uuid>,
    /// The workspace; stopping or re-sharing it revokes the token.
    pub workspace_id: Uuid,
    /// The agent serving the app.
    pub agent_id: Uuid,
    /// The app or dev-URL port the host names; checked against the
    /// request's host so one token opens one app.
    pub target: AppTarget,
    /// The app host the token is valid for, so it cannot be replayed on
    /// another app's host.
    pub host: String,
    /// The sharing level the token was minted under.
    pub sharing_level: SharingLevel,
    /// The API key it was minted from, so revoking the key revokes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// Where the app listens in the workspace, so that a relay can serve the
    /// token's holder without asking the primary.
    #[serde(default)]
    pub port: u16,
    /// Whether the app speaks TLS.
    #[serde(default)]
    pub https: bool,
    /// The app's base path (`/` for dev URLs).
    #[serde(default)]
    pub base_path: String,
    /// Issued at, unix milliseconds; revocations cut off tokens issued until then.
    #[serde(default)]
    pub issued_at_ms: i64,
    /// Expiry, unix seconds.
    pub exp: i64,
}

impl Claims for AppToken {
    const TYPE: &'static str = "app";
    fn expires_at(&self) -> i64 {
        self.exp
    }
}

/// What a [`StreamGrant`] lets its holder open to an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantedStream {
    /// TCP to one port on the agent's machine.
    Port(u16),
    /// A shell: SSH or a terminal.
    Shell,
    /// Path probes (`devmesh ping`, `speedtest`).
    Probe,
    /// UDP flows to the agent's machine.
    Udp,
}

/// Lets a relay open one kind of stream to an agent attached to another
/// relay: carried in the mesh header and checked by the agent's home relay,
/// so that a mesh certificate alone reaches nothing. The primary signs one
/// for each decision it makes (edges carry the app token they were given,
/// which serves the same purpose for its agent and port).
///
/// Unknown fields are refused, for the reason given on [`AttachTicket`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamGrant {
    /// The agent the stream goes to; the home relay refuses any other.
    pub agent_id: Uuid,
    /// What may be opened.
    pub stream: GrantedStream,
    /// Expiry, unix seconds.
    pub exp: i64,
}

impl Claims for StreamGrant {
    const TYPE: &'static str = "stream";
    fn expires_at(&self) -> i64 {
        self.exp
    }
}

// === Keys ===

/// A private signing key with its id. `Debug` shows only the public half.
pub struct SigningKey {
    kid: String,
    pair: Ed25519KeyPair,
    pkcs8: Vec<u8>,
}

impl SigningKey {
    /// Generates a fresh key from the OS random number generator.
    ///
    /// # Panics
    ///
    /// If the OS random number generator fails, as nothing can be signed
    /// safely then.
    pub fn generate(kid: impl Into<String>) -> Self {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .expect("the OS random number generator failed");
        Self::from_pkcs8(kid, pkcs8.as_ref())
            .expect("ring parses the PKCS#8 document it just generated")
    }

    /// Loads a key saved with [`SigningKey::pkcs8`]: a PKCS#8 v2 document
    /// (one that includes the public key, as ring requires).
    pub fn from_pkcs8(kid: impl Into<String>, pkcs8: &[u8]) -> Result<Self, TokenError> {
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8).map_err(|_| TokenError::InvalidKey)?;
        Ok(Self {
            kid: kid.into(),
            pair,
            pkcs8: pkcs8.to_vec(),
        })
    }

    /// The PKCS#8 document, for storing the key. Secret.
    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The key id written into every token's header.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public half, to hand to verifiers.
    pub fn public_key(&self) -> PublicKey {
        PublicKey {
            kid: self.kid.clone(),
            key: URL_SAFE_NO_PAD.encode(self.pair.public_key().as_ref()),
        }
    }

    /// Signs `claims` into a token.
    ///
    /// Tokens longer than [`MAX_TOKEN_LEN`] are refused by verifiers, so the
    /// claims' strings must stay short (an app token's host, a slug).
    ///
    /// # Panics
    ///
    /// If `claims` cannot be serialised to JSON, which for the claims in
    /// this module cannot happen.
    pub fn sign<C: Claims>(&self, claims: &C) -> String {
        let header = Header {
            alg: ALG.into(),
            kid: self.kid.clone(),
            typ: C::TYPE.into(),
        };
        let header = serde_json::to_vec(&header).expect("a header serialises to JSON");
        let claims = serde_json::to_vec(claims).expect("claims serialise to JSON");
        let mut token = URL_SAFE_NO_PAD.encode(header);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(claims, &mut token);
        let signature = self.pair.sign(token.as_bytes());
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(signature.as_ref(), &mut token);
        token
    }
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("public_key", &self.public_key().key)
            .finish_non_exhaustive()
    }
}

/// A public key as published to verifiers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct PublicKey {
    /// The key id tokens name in their header.
    pub kid: String,
    /// The 32-byte Ed25519 public key, unpadded base64url.
    pub key: String,
}

/// The JOSE-style header of a token.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    alg: String,
    kid: String,
    typ: String,
}

// === Verifying ===

/// Checks tokens against a set of public keys, picked by `kid`.
#[derive(Debug, Clone, Default)]
pub struct Verifier {
    keys: HashMap<String, [u8; PUBLIC_KEY_LEN]>,
}

impl Verifier {
    /// A verifier trusting `keys`.
    pub fn new(keys: &[PublicKey]) -> Result<Self, TokenError> {
        let mut verifier = Self::default();
        for key in keys {
            verifier.insert(key)?;
        }
        Ok(verifier)
    }

    /// Trusts one more key, replacing any earlier key with the same `kid`.
    pub fn insert(&mut self, key: &PublicKey) -> Result<(), TokenError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(&key.key)
            .map_err(|_| TokenError::InvalidKey)?;
        let bytes = <[u8; PUBLIC_KEY_LEN]>::try_from(bytes).map_err(|_| TokenError::InvalidKey)?;
        self.keys.insert(key.kid.clone(), bytes);
        Ok(())
    }

    /// Checks `token` and returns its claims if it is signed by a known key,
    /// of type `C::TYPE`, and expires after `now_unix`.
    pub fn verify<C: Claims>(&self, token: &str, now_unix: i64) -> Result<C, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let (signed, signature) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let (header, claims) = signed.split_once('.').ok_or(TokenError::Malformed)?;
        if claims.contains('.') {
            return Err(TokenError::Malformed);
        }

        let header: Header = decode_json(header)?;
        if header.alg != ALG {
            return Err(TokenError::Malformed);
        }
        let key = self.keys.get(&header.kid).ok_or(TokenError::UnknownKey)?;
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| TokenError::Malformed)?;
        UnparsedPublicKey::new(&ED25519, key)
            .verify(signed.as_bytes(), &signature)
            .map_err(|_| TokenError::BadSignature)?;

        // Only signed bytes are looked at from here on.
        if header.typ != C::TYPE {
            return Err(TokenError::WrongType);
        }
        let claims: C = decode_json(claims)?;
        if claims.expires_at() <= now_unix {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }

    /// Like [`Verifier::verify`] but accepts an expired token: for tokens
    /// kept as proof of something that happened while they were valid (an
    /// attach ticket a relay accepted), never as a credential.
    pub fn verify_ignoring_expiry<C: Claims>(&self, token: &str) -> Result<C, TokenError> {
        self.verify(token, i64::MIN)
    }
}

fn decode_json<T: DeserializeOwned>(part: &str) -> Result<T, TokenError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| TokenError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed)
}

// === Tests ===

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const NOW: i64 = 1_700_000_000;

    fn ticket() -> AttachTicket {
        AttachTicket {
            agent_id: Uuid::new_v4(),
            workspace_id: Uuid::new_v4(),
            relay: "relay.example.com:7443".into(),
            nonce: "n".into(),
            issued_at_ms: NOW * 1000,
            exp: NOW + 60,
        }
    }

    fn app_token() -> AppToken {
        AppToken {
            user_id: None,
            workspace_id: Uuid::new_v4(),
            agent_id: Uuid::new_v4(),
            target: AppTarget::Port {
                port: 8080,
                https: false,
            },
            host: "8080--main--dev--alice.apps.example.com".into(),
            sharing_level: SharingLevel::Public,
            key_id: None,
            port: 8080,
            https: false,
            base_path: "/".into(),
            issued_at_ms: NOW * 1000,
            exp: NOW + 60,
        }
    }

    fn setup() -> (SigningKey, Verifier) {
        let key = SigningKey::generate("k1");
        let verifier = Verifier::new(&[key.public_key()]).unwrap();
        (key, verifier)
    }

    /// Replaces part `i` of a token.
    fn with_part(token: &str, i: usize, part: &str) -> String {
        let mut parts: Vec<&str> = token.split('.').collect();
        parts[i] = part;
        parts.join(".")
    }

    #[test]
    fn sign_and_verify_round_trip() {
        let (key, verifier) = setup();
        let t = ticket();
        assert_eq!(verifier.verify::<AttachTicket>(&key.sign(&t), NOW), Ok(t));

        let mut a = app_token();
        a.user_id = Some(Uuid::new_v4());
        a.target = AppTarget::Slug("code".into());
        assert_eq!(verifier.verify::<AppToken>(&key.sign(&a), NOW), Ok(a));
    }

    #[test]
    fn header_is_as_documented() {
        let key = SigningKey::generate("k1");
        let token = key.sign(&ticket());
        let header = URL_SAFE_NO_PAD
            .decode(token.split('.').next().unwrap())
            .unwrap();
        assert_eq!(header, br#"{"alg":"EdDSA","kid":"k1","typ":"attach"}"#);
        assert!(!token.contains('='));
    }

    #[test]
    fn expired_tokens_are_refused() {
        let (key, verifier) = setup();
        let token = key.sign(&ticket());
        assert_eq!(
            verifier.verify::<AttachTicket>(&token, NOW + 60),
            Err(TokenError::Expired)
        );
        assert!(verifier.verify::<AttachTicket>(&token, NOW + 59).is_ok());
    }

    #[test]
    fn expired_proofs_still_need_a_valid_signature() {
        let (key, verifier) = setup();
        let old = AttachTicket { exp: 1, ..ticket() };
        assert_eq!(
            verifier.verify_ignoring_expiry::<AttachTicket>(&key.sign(&old)),
            Ok(old.clone())
        );
        let stranger = SigningKey::generate("k1");
        assert_eq!(
            verifier.verify_ignoring_expiry::<AttachTicket>(&stranger.sign(&old)),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn tampered_claims_are_refused() {
        let (key, verifier) = setup();
        let mut t = ticket();
        let token = key.sign(&t);
        t.exp += 3600;
        let forged = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&t).unwrap());
        assert_eq!(
            verifier.verify::<AttachTicket>(&with_part(&token, 1, &forged), NOW),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn tampered_signatures_are_refused() {
        let (key, verifier) = setup();
        let token = key.sign(&ticket());
        let other = key.sign(&ticket());
        let other_sig = other.rsplit('.').next().unwrap();
        assert_eq!(
            verifier.verify::<AttachTicket>(&with_part(&token, 2, other_sig), NOW),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            verifier.verify::<AttachTicket>(&with_part(&token, 2, "AAAA"), NOW),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            verifier.verify::<AttachTicket>(&with_part(&token, 2, "!"), NOW),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let (_, verifier) = setup();
        let stranger = SigningKey::generate("k2");
        assert_eq!(
            verifier.verify::<AttachTicket>(&stranger.sign(&ticket()), NOW),
            Err(TokenError::UnknownKey)
        );
        // Same kid, different key: the signature gives it away.
        let impostor = SigningKey::generate("k1");
        assert_eq!(
            verifier.verify::<AttachTicket>(&impostor.sign(&ticket()), NOW),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn a_ticket_is_not_an_app_token() {
        let (key, verifier) = setup();
        assert_eq!(
            verifier.verify::<AppToken>(&key.sign(&ticket()), NOW),
            Err(TokenError::WrongType)
        );
        assert_eq!(
            verifier.verify::<AttachTicket>(&key.sign(&app_token()), NOW),
            Err(TokenError::WrongType)
        );
    }

    #[test]
    fn rotation_verifies_both_keys() {
        let old = SigningKey::generate("2024-01");
        let new = SigningKey::generate("2024-02");
        let mut verifier = Verifier::new(&[old.public_key()]).unwrap();
        verifier.insert(&new.public_key()).unwrap();
        let t = ticket();
        assert_eq!(verifier.verify(&old.sign(&t), NOW), Ok(t.clone()));
        assert_eq!(verifier.verify(&new.sign(&t), NOW), Ok(t));
    }

    #[test]
    fn pkcs8_round_trips() {
        let key = SigningKey::generate("k1");
        let loaded = SigningKey::from_pkcs8("k1", key.pkcs8()).unwrap();
        assert_eq!(loaded.public_key(), key.public_key());
        assert_eq!(loaded.kid(), "k1");
        let verifier = Verifier::new(&[key.public_key()]).unwrap();
        let t = ticket();
        assert_eq!(verifier.verify(&loaded.sign(&t), NOW), Ok(t));
        assert_eq!(
            SigningKey::from_pkcs8("k1", b"not a key").err(),
            Some(TokenError::InvalidKey)
        );
    }

    #[test]
    fn invalid_public_keys_are_refused() {
        for key in [
            "",
            "AAAA",
            "not base64!",
            &URL_SAFE_NO_PAD.encode([0u8; 33]),
        ] {
            let pk = PublicKey {
                kid: "k".into(),
                key: key.into(),
            };
            assert_eq!(
                Verifier::new(&[pk]).err(),
                Some(TokenError::InvalidKey),
                "{key}"
            );
        }
    }

    #[test]
    fn debug_hides_the_private_key() {
        let key = SigningKey::generate("k1");
        let shown = format!("{key:?}");
        assert!(shown.contains("k1") && shown.contains(&key.public_key().key));
        assert!(!shown.contains(&URL_SAFE_NO_PAD.encode(key.pkcs8())));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let (key, verifier) = setup();
        let token = key.sign(&ticket());
        for bad in [
            String::new(),
            "..".into(),
            "a.b".into(),
            format!("{token}.x"),
            format!("{token}="),
            "x".repeat(MAX_TOKEN_LEN + 1),
            with_part(
                &token,
                0,
                &URL_SAFE_NO_PAD.encode(r#"{"alg":"none","kid":"k1","typ":"attach"}"#),
            ),
        ] {
            assert_eq!(
                verifier.verify::<AttachTicket>(&bad, NOW),
                Err(TokenError::Malformed),
                "{bad}"
            );
        }
    }

    proptest! {
        #[test]
        fn arbitrary_strings_never_verify(
            s in prop_oneof![
                any::<String>(),
                "[A-Za-z0-9_-]{0,80}\\.[A-Za-z0-9_-]{0,200}\\.[A-Za-z0-9_-]{0,90}",
            ]
        ) {
            let (_, verifier) = setup();
            prop_assert!(verifier.verify::<AttachTicket>(&s, NOW).is_err());
            prop_assert!(verifier.verify::<AppToken>(&s, NOW).is_err());
        }

        #[test]
        fn any_one_byte_change_is_refused(at in any::<prop::sample::Index>(), to in "[A-Za-z0-9_.=-]") {
            let (key, verifier) = setup();
            let token = key.sign(&app_token());
            let i = at.index(token.len());
            prop_assume!(token[i..=i] != to);
            let tampered = format!("{}{}{}", &token[..i], to, &token[i + 1..]);
            prop_assert!(verifier.verify::<AppToken>(&tampered, NOW).is_err());
        }
    }
}
