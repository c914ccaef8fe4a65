//! Optional access control of the temp-file API: shared bearer tokens and signed download links.
//!
//! **Tokens.** A server started with one or more tokens ([`ServerConfig::tokens`]; the binary's
//! `--token`, `--token-file` or [`TOKEN_ENV`]) answers every endpoint but `/health` only to
//! requests with `Authorization: Bearer <token>` naming one of them; anything else gets `401`
//! with `{"success":false,"message":…}` and `WWW-Authenticate: Bearer`. Tokens are compared in
//! constant time and never logged. Several tokens are accepted at once so one can be rotated
//! without downtime: start the server with old and new, move the clients to the new one, restart
//! the server with the new one only. Without tokens the server is open, like the original.
//!
//! **Signed download links.** A webapp holding a token can give a browser a time-limited link to
//! one file without handing out the token:
//!
//! ```text
//! GET /api/tempfile/download/{file_id}?exp={unix seconds}&sig={hex HMAC-SHA256(token, "{file_id}:{exp}")}
//! ```
//!
//! `sig` is the lowercase hex HMAC-SHA256 of the ASCII text `{file_id}:{exp}` keyed with the
//! token's bytes ([`sign_download`]; [`TempfileClient::signed_download_url`] makes whole links).
//! The server accepts a link signed with any of its tokens until `exp` has passed (then `403`
//! "download link expired"); a wrong signature, or one made for another id or expiry, gets `403`.
//! The same signature from a webapp:
//!
//! ```text
//! Python:  hmac.new(token.encode(), f"{file_id}:{exp}".encode(), hashlib.sha256).hexdigest()
//! Node.js: crypto.createHmac("sha256", token).update(`${fileId}:${exp}`).digest("hex")
//! ```
//!
//! [`ServerConfig::tokens`]: crate::ServerConfig::tokens
//! [`TempfileClient::signed_download_url`]: crate::TempfileClient::signed_download_url

use std::fmt;
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::TempfileError;

/// The environment variable holding the token(s), read by the server binary, the worker and the
/// example client: one token, or a comma-separated list (the server accepts all; a client sends
/// the first).
pub const TOKEN_ENV: &str = "TEMPFILE_TOKEN";

/// Shortest accepted token, in characters (32 random hex digits or more are recommended:
/// `openssl rand -hex 32`).
pub const MIN_TOKEN_LEN: usize = 16;

/// Longest accepted token, in characters.
pub const MAX_TOKEN_LEN: usize = 512;

/// A shared secret. Its `Debug` form is redacted, so it cannot leak through a logged config.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// Checks a token: [`MIN_TOKEN_LEN`] to [`MAX_TOKEN_LEN`] visible ASCII characters other
    /// than `,` (it travels in an HTTP header and separates list items); surrounding blanks are
    /// dropped. The error never contains the token.
    pub fn new(token: &str) -> Result<Token, TempfileError> {
        let t = token.trim();
        let bad = |why: String| Err(TempfileError::InvalidToken(why));
        if t.len() < MIN_TOKEN_LEN || t.len() > MAX_TOKEN_LEN {
            return bad(format!(
                "a token must be {MIN_TOKEN_LEN} to {MAX_TOKEN_LEN} characters long, this one has {}",
                t.chars().count()
            ));
        }
        if !t.bytes().all(|b| b.is_ascii_graphic() && b != b',') {
            return bad("a token may hold only visible ASCII characters other than `,`".into());
        }
        Ok(Token(t.to_owned()))
    }

    /// Tokens separated by commas or line breaks; empty items are skipped.
    pub fn parse_list(list: &str) -> Result<Vec<Token>, TempfileError> {
        list.split([',', '\n'])
            .filter(|t| !t.trim().is_empty())
            .map(Token::new)
            .collect()
    }

    /// The tokens of a file (a mounted secret): separated by commas or line breaks.
    pub fn from_file(path: &Path) -> Result<Vec<Token>, TempfileError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| TempfileError::io("read token file", path, e))?;
        let tokens = Token::parse_list(&text)?;
        if tokens.is_empty() {
            return Err(TempfileError::InvalidToken(format!(
                "{} holds no token",
                path.display()
            )));
        }
        Ok(tokens)
    }

    /// The first token of [`TOKEN_ENV`], or `None` when it is unset or empty.
    pub fn from_env() -> Result<Option<Token>, TempfileError> {
        match std::env::var(TOKEN_ENV) {
            Ok(v) => Ok(Token::parse_list(&v)?.into_iter().next()),
            Err(_) => Ok(None),
        }
    }

    /// The secret itself, for the `Authorization` header.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

type HmacSha256 = Hmac<Sha256>;

fn download_mac(token: &Token, file_id: &str, expires: u64) -> HmacSha256 {
    // HMAC accepts keys of any length; this cannot fail.
    let mut mac = HmacSha256::new_from_slice(token.0.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(file_id.as_bytes());
    mac.update(b":");
    mac.update(expires.to_string().as_bytes());
    mac
}

/// The `sig` of a download link for `file_id` valid until `expires` (unix seconds): lowercase
/// hex HMAC-SHA256 of `{file_id}:{expires}` keyed with the token.
pub fn sign_download(token: &Token, file_id: &str, expires: u64) -> String {
    let tag = download_mac(token, file_id, expires)
        .finalize()
        .into_bytes();
    tag.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a server makes of a signed link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LinkCheck {
    /// Signed with one of the tokens and not expired.
    Valid,
    /// Signed with one of the tokens, but `exp` has passed.
    Expired,
    /// Malformed, or not signed with any token for this id and expiry.
    Invalid,
}

/// The tokens a server accepts, kept as SHA-256 digests so that every comparison takes the same
/// time whatever the lengths.
#[derive(Clone)]
pub(crate) struct AccessTokens {
    tokens: Vec<Token>,
    digests: Vec<[u8; 32]>,
}

impl fmt::Debug for AccessTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AccessTokens({} token(s))", self.tokens.len())
    }
}

impl AccessTokens {
    pub(crate) fn new(tokens: &[Token]) -> Self {
        AccessTokens {
            digests: tokens.iter().map(|t| digest(t.0.as_bytes())).collect(),
            tokens: tokens.to_vec(),
        }
    }

    /// True when no token is configured: the server is open.
    pub(crate) fn is_open(&self) -> bool {
        self.tokens.is_empty()
    }

    /// True when an `Authorization` header value is `Bearer <one of the tokens>`.
    pub(crate) fn accepts_header(&self, authorization: Option<&str>) -> bool {
        let Some((scheme, presented)) = authorization.and_then(|v| v.trim().split_once(' ')) else {
            return false;
        };
        if !scheme.eq_ignore_ascii_case("bearer") {
            return false;
        }
        let presented = digest(presented.trim().as_bytes());
        // No early exit: the time does not depend on which token matched.
        self.digests
            .iter()
            .fold(subtle::Choice::from(0), |any, d| any | d.ct_eq(&presented))
            .into()
    }

    /// Checks the `exp` and `sig` query values of a download of `file_id` at `now` (unix s).
    pub(crate) fn check_link(&self, file_id: &str, exp: &str, sig: &str, now: u64) -> LinkCheck {
        let Some(expires) = parse_digits(exp) else {
            return LinkCheck::Invalid;
        };
        let Some(tag) = parse_hex(sig) else {
            return LinkCheck::Invalid;
        };
        let signed = self.tokens.iter().fold(false, |any, t| {
            // `verify_slice` compares in constant time.
            let ok = download_mac(t, file_id, expires).verify_slice(&tag).is_ok();
            any | ok
        });
        match (signed, now <= expires) {
            (false, _) => LinkCheck::Invalid,
            (true, false) => LinkCheck::Expired,
            (true, true) => LinkCheck::Valid,
        }
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn parse_digits(s: &str) -> Option<u64> {
    (!s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

fn parse_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() != 64 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(s: &str) -> Token {
        Token::new(s).unwrap()
    }

    #[test]
    fn tokens_are_checked_and_never_printed() {
        let t = token("  0123456789abcdef  ");
        assert_eq!(t.expose(), "0123456789abcdef");
        assert_eq!(format!("{t:?}"), "Token(<redacted>)");
        for bad in [
            "short",
            "0123456789 abcdef",
            "0123456789abcdef,x",
            "0123456789abcdéf",
        ] {
            let e = Token::new(bad).unwrap_err().to_string();
            assert!(!e.contains(bad.trim()), "{e}");
        }
        let list =
            Token::parse_list("aaaaaaaaaaaaaaaa, bbbbbbbbbbbbbbbb\ncccccccccccccccc,").unwrap();
        assert_eq!(list.len(), 3);
        assert_eq!(list[2].expose(), "cccccccccccccccc");
        let access = AccessTokens::new(&list);
        assert_eq!(format!("{access:?}"), "AccessTokens(3 token(s))");
    }

    #[test]
    fn bearer_headers() {
        let a = AccessTokens::new(&[token("aaaaaaaaaaaaaaaa"), token("bbbbbbbbbbbbbbbb")]);
        assert!(a.accepts_header(Some("Bearer aaaaaaaaaaaaaaaa")));
        assert!(a.accepts_header(Some("bearer bbbbbbbbbbbbbbbb")));
        assert!(!a.accepts_header(Some("Bearer aaaaaaaaaaaaaaa")));
        assert!(!a.accepts_header(Some("Basic aaaaaaaaaaaaaaaa")));
        assert!(!a.accepts_header(Some("aaaaaaaaaaaaaaaa")));
        assert!(!a.accepts_header(None));
        assert!(!a.is_open());
        assert!(AccessTokens::new(&[]).is_open());
    }

    #[test]
    fn download_signatures() {
        // Same value as Python's hmac.new(b"0123456789abcdef", b"id-1:1700000000", sha256).
        let t = token("0123456789abcdef");
        let sig = sign_download(&t, "id-1", 1_700_000_000);
        assert_eq!(
            sig,
            "a8f740094298e5d763104edd3d2a2ee82c9774ddb76b7c5dd0e188d7f5ce0c85"
        );
        let a = AccessTokens::new(&[token("ffffffffffffffff"), t.clone()]);
        assert_eq!(
            a.check_link("id-1", "1700000000", &sig, 1_700_000_000),
            LinkCheck::Valid
        );
        assert_eq!(
            a.check_link("id-1", "1700000000", &sig, 1_700_000_001),
            LinkCheck::Expired
        );
        assert_eq!(
            a.check_link("id-2", "1700000000", &sig, 0),
            LinkCheck::Invalid
        );
        assert_eq!(
            a.check_link("id-1", "1700000001", &sig, 0),
            LinkCheck::Invalid
        );
        assert_eq!(
            a.check_link("id-1", "1700000000", &sig.to_uppercase(), 0),
            LinkCheck::Valid
        );
        assert_eq!(a.check_link("id-1", "17e8", &sig, 0), LinkCheck::Invalid);
        assert_eq!(
            a.check_link("id-1", "1700000000", &sig[1..], 0),
            LinkCheck::Invalid
        );
        let other = AccessTokens::new(&[token("ffffffffffffffff")]);
        assert_eq!(
            other.check_link("id-1", "1700000000", &sig, 0),
            LinkCheck::Invalid
        );
    }
}
