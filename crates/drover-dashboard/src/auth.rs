//! Who may act: the admin token, browser sessions with their CSRF tokens, and the login
//! form's own CSRF cookie.
//!
//! * No token configured: read-only; every action is refused (403).
//! * Scripts: `Authorization: Bearer TOKEN`. Browsers never attach that header on their own,
//!   so it needs no CSRF token.
//! * Browsers: `POST /login` with the token sets `drover_session` (HttpOnly, SameSite=Strict);
//!   each session has a CSRF token that every form carries and every POST must echo.
//!
//! Tokens are compared in constant time (`subtle`). Sessions live in memory (a restart logs
//! everyone out), are keyed by the SHA-256 of their id, expire after [`SESSION_TTL`], and
//! are capped at [`MAX_SESSIONS`].

use axum::http::HeaderMap;
use axum::http::header;
use drover_core::{ExposeSecret, SecretString};
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "drover_session";
/// The login form's CSRF cookie (double submit: the form field must equal it).
pub const LOGIN_COOKIE: &str = "drover_login";
/// How long a browser session lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at most; the one closest to expiry goes first.
pub const MAX_SESSIONS: usize = 1024;

/// How an action was authorised, recorded with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Session,
    Bearer,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Session => "session",
            Via::Bearer => "bearer",
        }
    }
}

/// Why an action is refused (all are 403s, except a missing or wrong bearer token on the
/// API, a 401).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    ReadOnly,
    NotLoggedIn,
    BadCsrf,
    BadBearer,
}

impl Refusal {
    pub fn message(&self) -> &'static str {
        match self {
            Refusal::ReadOnly => {
                "this dashboard is read-only: it was started without an admin token \
                 (--admin-token, DROVER_DASHBOARD_TOKEN or DROVER_DASHBOARD_TOKEN_FILE)"
            }
            Refusal::NotLoggedIn => "log in with the admin token to act on jobs",
            Refusal::BadCsrf => {
                "the form's CSRF token is missing or stale: reload the page and try again"
            }
            Refusal::BadBearer => "the bearer token is not the admin token",
        }
    }
}

struct Session {
    csrf: String,
    expires: Instant,
}

/// The admin token and the sessions.
pub struct Auth {
    token: Option<SecretString>,
    sessions: Mutex<HashMap<String, Session>>,
}

/// A browser's session as a request carries it.
#[derive(Debug, Clone)]
pub struct SessionView {
    pub csrf: String,
}

impl Auth {
    pub fn new(token: Option<SecretString>) -> Auth {
        Auth {
            token: token.filter(|t| !t.expose_secret().is_empty()),
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// Whether actions are possible at all.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// Constant-time comparison with the admin token (false when there is none).
    pub fn token_matches(&self, candidate: &str) -> bool {
        match &self.token {
            Some(t) => {
                let a = Sha256::digest(t.expose_secret().as_bytes());
                let b = Sha256::digest(candidate.as_bytes());
                // Hashing first makes the comparison independent of the lengths too.
                bool::from(a.ct_eq(&b))
            }
            None => false,
        }
    }

    /// Starts a session; returns its id (the cookie value) and its CSRF token.
    pub fn create_session(&self) -> (String, String) {
        let id = random_token();
        let csrf = random_token();
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        sessions.retain(|_, s| s.expires > now);
        if sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone())
        {
            sessions.remove(&oldest);
        }
        sessions.insert(
            session_key(&id),
            Session {
                csrf: csrf.clone(),
                expires: now + SESSION_TTL,
            },
        );
        (id, csrf)
    }

    /// The live session the request's cookie names, if any.
    pub fn session(&self, headers: &HeaderMap) -> Option<SessionView> {
        let id = cookie(headers, SESSION_COOKIE)?;
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions
            .get(&session_key(&id))
            .filter(|s| s.expires > Instant::now())
            .map(|s| SessionView {
                csrf: s.csrf.clone(),
            })
    }

    /// Ends the request's session, if any.
    pub fn end_session(&self, headers: &HeaderMap) {
        if let Some(id) = cookie(headers, SESSION_COOKIE) {
            let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
            sessions.remove(&session_key(&id));
        }
    }

    /// Authorises an action: a bearer token, or a session whose CSRF token equals the
    /// form's `csrf` field.
    pub fn authorize(&self, headers: &HeaderMap, csrf: Option<&str>) -> Result<Via, Refusal> {
        if !self.has_token() {
            return Err(Refusal::ReadOnly);
        }
        if let Some(bearer) = bearer(headers) {
            return if self.token_matches(bearer) {
                Ok(Via::Bearer)
            } else {
                Err(Refusal::BadBearer)
            };
        }
        let Some(session) = self.session(headers) else {
            return Err(Refusal::NotLoggedIn);
        };
        match csrf {
            Some(c) if bool::from(c.as_bytes().ct_eq(session.csrf.as_bytes())) => Ok(Via::Session),
            _ => Err(Refusal::BadCsrf),
        }
    }
}

fn session_key(id: &str) -> String {
    hex::encode(Sha256::digest(id.as_bytes()))
}

/// 32 random bytes from the thread's CSPRNG, hex-encoded.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// The token of an `Authorization: Bearer TOKEN` header.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// A `Set-Cookie` value: HttpOnly, SameSite=Strict, on `path`, for `max_age` seconds (0
/// deletes it).
pub fn set_cookie(name: &str, value: &str, path: &str, max_age: u64) -> String {
    format!("{name}={value}; Path={path}; Max-Age={max_age}; HttpOnly; SameSite=Strict")
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(k.clone(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn read_only_without_a_token() {
        let auth = Auth::new(None);
        assert!(!auth.has_token());
        assert!(!auth.token_matches(""));
        let h = headers(&[(header::AUTHORIZATION, "Bearer x")]);
        assert_eq!(auth.authorize(&h, None), Err(Refusal::ReadOnly));
        // An empty configured token is no token.
        assert!(!Auth::new(Some(SecretString::from(""))).has_token());
    }

    #[test]
    fn bearer_and_session_with_csrf() {
        let auth = Auth::new(Some(SecretString::from("s3cret")));
        let ok = headers(&[(header::AUTHORIZATION, "Bearer s3cret")]);
        assert_eq!(auth.authorize(&ok, None), Ok(Via::Bearer));
        let bad = headers(&[(header::AUTHORIZATION, "bearer s3cre")]);
        assert_eq!(auth.authorize(&bad, None), Err(Refusal::BadBearer));
        assert_eq!(
            auth.authorize(&HeaderMap::new(), None),
            Err(Refusal::NotLoggedIn)
        );
        let (id, csrf) = auth.create_session();
        let h = headers(&[(header::COOKIE, &format!("a=b; {SESSION_COOKIE}={id}"))]);
        assert_eq!(auth.authorize(&h, Some(&csrf)), Ok(Via::Session));
        assert_eq!(auth.authorize(&h, Some("nope")), Err(Refusal::BadCsrf));
        assert_eq!(auth.authorize(&h, None), Err(Refusal::BadCsrf));
        auth.end_session(&h);
        assert_eq!(auth.authorize(&h, Some(&csrf)), Err(Refusal::NotLoggedIn));
    }

    #[test]
    fn cookies_are_parsed_and_set_strictly() {
        let h = headers(&[(header::COOKIE, "x=1; drover_login=abc")]);
        assert_eq!(cookie(&h, LOGIN_COOKIE).as_deref(), Some("abc"));
        assert_eq!(cookie(&h, "y"), None);
        let c = set_cookie(SESSION_COOKIE, "v", "/", 60);
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict"));
    }
}
