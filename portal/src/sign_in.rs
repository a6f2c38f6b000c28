//! People sign in: the account's sign-in page (`/{account}`) and the email one-time code, ending
//! in a client token bound to the nonce the client drew, whose fragment goes back to the
//! client's own handler (design, sequence 1).
//!
//! ```text
//! client ── browser: GET /{account}?as=client&nonce&state&callback&name
//!   portal: a pending sign-in (`pending`), cookie `fz_sign_in`, 303 to /{account}
//! GET /{account}                      the methods (`page::methods`), each form with the CSRF token
//! POST /{account}/sign-in/email       a code (`code`) hashed and kept for a known address, mailed
//! GET  /{account}/sign-in/email       the code form
//! POST /{account}/sign-in/email/code  one try spent, the code checked; on success a token made
//!   for nonce ‖ fragment, the sign-in ended, 303 to callback?account&fragment&state&user
//! ```
//!
//! What it defends (each has a test in `portal/tests/sign_in.rs`): forms only with the pending
//! sign-in's CSRF token (compared in constant time) and its cookie (HttpOnly, SameSite=Lax,
//! Secure over TLS, scoped to the account's path); the result only to the client's loopback
//! listener or deep link (`pending::Callback`); sign-ins and codes single-use; pending sign-ins
//! bounded and expiring; requests per source address and codes per address rate-limited; an
//! address the account does not know gets the same page, after the same work (an argon2 hash),
//! as one it knows, and the mail and its store write happen after the answer either way.

pub mod code;
pub mod oidc;
pub mod page;
pub mod pending;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Form;
use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use subtle::ConstantTimeEq as _;

use crate::agents::source_address;
use crate::broker::Account;
use crate::http::AppState;
use crate::limits::{Rate, RateLimiter};
use crate::mail::{Mailer, Sent};
use crate::store::{SendLimit, SignedIn, StoreError, TokenKind};
use oidc::{OidcAttempt, Provider};
use pending::{ClientRequest, Pending, id_hash};

/// The sign-in cookie's name.
pub const COOKIE: &str = "fz_sign_in";

/// The provider id of an email sign-in: what a policy's `provider` condition sees.
pub const EMAIL_PROVIDER: &str = "email";

/// Tries a code allows.
pub const CODE_ATTEMPTS: u32 = 3;

/// How long a code works.
pub const CODE_LIFETIME_SECS: i64 = pending::LIFETIME_SECS;

/// Codes sent to one address within five minutes; more are refused, whether or not the
/// account knows the address. Counted in the store, so across replicas; at most
/// `max_counted` sends are counted at once (about 100 bytes each).
pub const SEND_LIMIT: SendLimit = SendLimit {
    per_window: 3,
    window_secs: 5 * 60,
    max_counted: 100_000,
};

/// Sign-in requests (pages opened, forms sent) per source address: 30 at once, then one every
/// two seconds.
const SOURCE_RATE: Rate = Rate {
    per_second: 1,
    burst: 30,
};

/// Source addresses the request limiter remembers at once; past it, the idle are forgotten
/// first, and if none is, the request is refused.
const MAX_REMEMBERED: usize = 100_000;

/// The longest email address (RFC 5321's path limit).
const MAX_EMAIL_CHARS: usize = 254;

/// The sign-in side of the portal: limits, providers, and where mail goes. The sign-ins under
/// way are in the store, so that any replica can take their next step.
#[derive(Debug)]
pub struct SignIn {
    sources: Mutex<RateLimiter<IpAddr>>,
    mailer: Mailer,
    /// Served over TLS: cookies are `Secure`.
    secure: bool,
    /// Each account's OpenID Connect providers, by (account, provider id).
    providers: HashMap<(String, String), Arc<Provider>>,
    /// How browsers reach the portal (`Config::public_url`).
    public_url: String,
}

impl SignIn {
    pub fn new(mailer: Mailer, secure: bool) -> SignIn {
        SignIn {
            sources: Mutex::default(),
            mailer,
            secure,
            providers: HashMap::new(),
            public_url: String::new(),
        }
    }

    /// With the OpenID Connect providers of every account of `config` (their secrets read
    /// now), which send people back to the portal at `public_url`.
    pub fn with_providers(
        mut self,
        config: &crate::config::Config,
        public_url: String,
    ) -> Result<SignIn, oidc::OidcError> {
        for account in &config.accounts {
            for provider in &account.oidc {
                self.providers.insert(
                    (account.slug.clone(), provider.id.clone()),
                    Arc::new(Provider::new(provider)?),
                );
            }
        }
        self.public_url = public_url;
        Ok(self)
    }

    /// Where provider `id` of account `slug` sends people back.
    fn redirect_url(&self, slug: &str, id: &str) -> String {
        format!("{}/{slug}/sign-in/oidc/{id}/callback", self.public_url)
    }

    /// Forgets idle limits, and deletes written mail whose code has expired: the sweeper
    /// calls it.
    pub fn forget_expired(&self) {
        lock(&self.sources).forget_idle(Instant::now());
        let lifetime = Duration::from_secs(CODE_LIFETIME_SECS.unsigned_abs());
        self.mailer.prune(lifetime);
    }

    /// Takes one request from `source`; `Err` is the refusal to send.
    fn admit(&self, source: Option<IpAddr>, account: &str) -> Result<(), Box<Response>> {
        let Some(source) = source else {
            return Ok(());
        };
        let mut sources = lock(&self.sources);
        if sources.len() >= MAX_REMEMBERED {
            sources.forget_idle(Instant::now());
        }
        let refused = if sources.len() >= MAX_REMEMBERED {
            Some(Duration::from_secs(60))
        } else {
            sources.take(source, SOURCE_RATE, Instant::now()).err()
        };
        match refused {
            None => Ok(()),
            Some(wait) => Err(Box::new(html(
                StatusCode::TOO_MANY_REQUESTS,
                page::message(
                    account,
                    "Too many requests",
                    &format!(
                        "Too many sign-in requests came from your address. Try again in {} s.",
                        wait.as_secs().max(1)
                    ),
                ),
                None,
            ))),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these leaves nothing half-done that matters: the table
    // and the limiters stay usable.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `GET /{account}`: with a client's query, starts a sign-in and sends the browser to the
/// clean page; without one, shows the methods of the sign-in under way, or says to start from
/// the client.
pub async fn start_page(
    State(app): State<Arc<AppState>>,
    Path(slug): Path<String>,
    RawQuery(query): RawQuery,
    peer: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
) -> Response {
    let Ok(account) = app.broker.account(&slug) else {
        return no_account(&slug);
    };
    let sign_in = &app.sign_in;
    let now = app.broker.clock().timestamp();
    let source = source_of(&app, peer, &headers);
    if let Some(query) = query.filter(|q| !q.is_empty()) {
        if let Err(refused) = sign_in.admit(source, &slug) {
            return *refused;
        }
        let pairs: Vec<(String, String)> = match serde_urlencoded::from_str(&query) {
            Ok(pairs) => pairs,
            Err(_) => {
                return bad_request(
                    &slug,
                    "The sign-in link is damaged: its query cannot be read.",
                );
            }
        };
        let request = match ClientRequest::from_query(&pairs) {
            Ok(request) => request,
            Err(problem) => {
                return bad_request(
                    &slug,
                    &format!("The sign-in link is not one the fz client makes: {problem}."),
                );
            }
        };
        let Some(id) = pending::new_id() else {
            tracing::error!("the system random number generator failed: no sign-in id");
            return unavailable(&slug);
        };
        let record = Pending::record(&slug, &request, source, now);
        let started = app
            .broker
            .store()
            .start_sign_in(
                &id_hash(&id),
                &record,
                pending::LIFETIME_SECS,
                pending::admit,
            )
            .await;
        return match started {
            Ok(Ok(())) => {
                let mut response = see_other(&format!("/{slug}"));
                set_cookie(&mut response, &cookie(&slug, &id, sign_in.secure, true));
                response
            }
            Ok(Err(refused)) => html(
                StatusCode::SERVICE_UNAVAILABLE,
                page::message(&slug, "Try again later", &refused.to_string()),
                None,
            ),
            Err(error) => {
                tracing::error!(%error, "cannot keep a sign-in");
                unavailable(&slug)
            }
        };
    }
    let pending = match cookie_value(&headers) {
        Some(id) => match find_pending(&app, &id, &slug, now).await {
            Ok(pending) => pending,
            Err(_) => return unavailable(&slug),
        },
        None => None,
    };
    match pending {
        Some(pending) => methods_page(sign_in, account, &pending, None, StatusCode::OK),
        None => html(
            StatusCode::OK,
            page::start_from_the_client(&slug, &portal_url(&headers, sign_in.secure)),
            None,
        ),
    }
}

/// The email form. Fields a forged post leaves out are empty, and refused as wrong.
#[derive(Debug, Deserialize)]
pub struct EmailForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    email: String,
}

/// `POST /{account}/sign-in/email`: a code for the address, if the account knows it.
pub async fn email_requested(
    State(app): State<Arc<AppState>>,
    Path(slug): Path<String>,
    peer: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    Form(form): Form<EmailForm>,
) -> Response {
    let Step {
        account,
        id,
        pending,
        now,
    } = match form_step(&app, &slug, peer, &headers, &form.csrf).await {
        Ok(step) => step,
        Err(refused) => return *refused,
    };
    let sign_in = app.sign_in.clone();
    if !account.settings.email.enabled {
        return bad_request(&slug, "This account does not offer sign-in by email.");
    }
    let Some(email) = email_address(&form.email) else {
        return methods_page(
            &sign_in,
            account,
            &pending,
            Some("That is not an email address."),
            StatusCode::BAD_REQUEST,
        );
    };
    let counted = app
        .broker
        .store()
        .count_code_send(&slug, &email, now, SEND_LIMIT)
        .await;
    let wait = match counted {
        Ok(counted) => counted.err(),
        Err(error) => {
            tracing::error!(%error, "cannot count a sign-in code sent");
            return unavailable(&slug);
        }
    };
    if let Some(wait) = wait {
        let minutes = wait.unsigned_abs().div_ceil(60).max(1);
        return methods_page(
            &sign_in,
            account,
            &pending,
            Some(&format!(
                "Too many codes were sent to that address. Try again in {minutes} minute{}.",
                if minutes == 1 { "" } else { "s" }
            )),
            StatusCode::TOO_MANY_REQUESTS,
        );
    }
    // The same work for every address: a code drawn and hashed. Whether the account knows
    // it, the store write and the mail come after the answer.
    let drawn = tokio::task::spawn_blocking(|| {
        let code = code::generate()?;
        let hash = code::hash(&code)?;
        Ok::<_, code::CodeError>((code, hash))
    })
    .await;
    let (code, hash) = match drawn {
        Ok(Ok(drawn)) => drawn,
        Ok(Err(error)) => {
            tracing::error!(%error, "cannot make a sign-in code");
            return unavailable(&slug);
        }
        Err(error) => {
            tracing::error!(%error, "the code task failed");
            return unavailable(&slug);
        }
    };
    // The code form shows the address, on whichever replica the browser asks next.
    match app
        .broker
        .store()
        .set_sign_in_email(&slug, &id_hash(&id), &email)
        .await
    {
        Ok(true) => {}
        Ok(false) => return expired(&slug),
        Err(error) => {
            tracing::error!(%error, "cannot keep a sign-in's address");
            return unavailable(&slug);
        }
    }
    let listed = account
        .policy
        .current()
        .table
        .table()
        .users
        .binary_search_by(|u| u.email.as_str().cmp(&email))
        .is_ok();
    let broker = app.broker.clone();
    tokio::spawn(async move {
        let store = broker.store();
        let known = listed || store.knows_user(&slug, &email).await.unwrap_or(false);
        // A disabled user gets no code: the page said the same as for anyone.
        let known = known && !store.is_disabled(&slug, &email).await.unwrap_or(true);
        if !known {
            tracing::info!(account = %slug, "a sign-in code was asked for an address the account does not know; none sent");
            return;
        }
        let expires_at = now.saturating_add(CODE_LIFETIME_SECS);
        if let Err(error) = store
            .put_email_code(&slug, &email, &hash, (now, expires_at), CODE_ATTEMPTS)
            .await
        {
            tracing::error!(%error, account = %slug, "cannot keep a sign-in code");
            return;
        }
        let body = format!(
            "Your code to sign in to {slug} with fz:\n\n    {}\n\nIt works once, for 15 minutes. \
             If you did not ask for it, ignore this message: nobody can sign in without it.\n",
            code::display(&code)
        );
        match sign_in
            .mailer
            .send(&email, &format!("Your fz sign-in code for {slug}"), body)
            .await
        {
            Ok(Sent::File(path)) => tracing::info!(
                account = %slug,
                path = %path.display(),
                "no SMTP server is configured: the sign-in code's mail was written to a file"
            ),
            Ok(Sent::Smtp) => tracing::info!(account = %slug, "a sign-in code was mailed"),
            Err(error) => tracing::error!(%error, account = %slug, "cannot send a sign-in code"),
        }
    });
    see_other(&format!("/{}/sign-in/email", account.settings.slug))
}

/// `GET /{account}/sign-in/email`: the form for the code.
pub async fn code_page(
    State(app): State<Arc<AppState>>,
    Path(slug): Path<String>,
    headers: HeaderMap,
) -> Response {
    if app.broker.account(&slug).is_err() {
        return no_account(&slug);
    }
    let now = app.broker.clock().timestamp();
    let pending = match cookie_value(&headers) {
        Some(id) => match find_pending(&app, &id, &slug, now).await {
            Ok(pending) => pending,
            Err(_) => return unavailable(&slug),
        },
        None => None,
    };
    match pending {
        Some(Pending {
            email: Some(email),
            csrf,
            request,
            ..
        }) => html(
            StatusCode::OK,
            page::code(&slug, &email, &csrf, None),
            Some(&request.callback.origin()),
        ),
        Some(_) => see_other(&format!("/{slug}")),
        None => expired(&slug),
    }
}

/// A query with nothing but the anti-forgery token (a provider's button).
#[derive(Debug, Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

/// The code form. Fields a forged post leaves out are empty, and refused as wrong.
#[derive(Debug, Deserialize)]
pub struct CodeForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    code: String,
}

/// `POST /{account}/sign-in/email/code`: one try at the code; the right one ends the sign-in.
pub async fn code_entered(
    State(app): State<Arc<AppState>>,
    Path(slug): Path<String>,
    peer: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    Form(form): Form<CodeForm>,
) -> Response {
    let Step {
        account,
        id,
        pending,
        now,
    } = match form_step(&app, &slug, peer, &headers, &form.csrf).await {
        Ok(step) => step,
        Err(refused) => return *refused,
    };
    let Some(email) = pending.email.clone() else {
        return see_other(&format!("/{slug}"));
    };
    let again = |message: &str, status| {
        html(
            status,
            page::code(&slug, &email, &pending.csrf, Some(message)),
            Some(&pending.request.callback.origin()),
        )
    };
    let Some(typed) = code::normalise(&form.code) else {
        return again(
            "A code is 8 letters and digits, like ABCD-EFGH.",
            StatusCode::BAD_REQUEST,
        );
    };
    let store = app.broker.store();
    let waiting = match store.spend_email_code_try(&slug, &email, now).await {
        Ok(waiting) => waiting,
        Err(error) => {
            tracing::error!(%error, "cannot read a sign-in code");
            return unavailable(&slug);
        }
    };
    // Checked against a dummy when no code waits, so that the answer takes as long.
    let hash = waiting
        .clone()
        .unwrap_or_else(|| code::dummy_hash().to_owned());
    let matches = tokio::task::spawn_blocking(move || code::verify(&hash, &typed))
        .await
        .unwrap_or(false);
    let Some(hash) = waiting else {
        return again(
            "No code is waiting for this address: it expired, was used, or was tried too \
             many times. Ask for a new one.",
            StatusCode::UNAUTHORIZED,
        );
    };
    if !matches {
        return again("That code is not right.", StatusCode::UNAUTHORIZED);
    }
    match store.use_email_code(&slug, &email, &hash).await {
        Ok(true) => {}
        Ok(false) => {
            return again(
                "That code was used or replaced a moment ago. Ask for a new one.",
                StatusCode::UNAUTHORIZED,
            );
        }
        Err(error) => {
            tracing::error!(%error, "cannot use a sign-in code");
            return unavailable(&slug);
        }
    }
    let lifetime = account.settings.email.token_lifetime_secs;
    let person = Person {
        email: &email,
        provider: EMAIL_PROVIDER,
        identity: None,
        token_lifetime_secs: lifetime,
    };
    finish(&app, &slug, &id, &pending, person, now).await
}

/// Who a sign-in proved the person to be.
struct Person<'a> {
    email: &'a str,
    provider: &'a str,
    /// (issuer, subject), for an OpenID Connect sign-in.
    identity: Option<(&'a str, &'a str)>,
    token_lifetime_secs: u64,
}

/// Ends sign-in `id`: the token for the client's nonce, and the browser sent to the client's
/// handler with the fragment, the client's state, and who signed in.
async fn finish(
    app: &AppState,
    slug: &str,
    id: &str,
    pending: &Pending,
    person: Person<'_>,
    now: i64,
) -> Response {
    // The sign-in ends here, whatever follows: its cookie and CSRF token are good no more,
    // on every replica, and only one of two steps racing to end it goes on.
    match app.broker.store().end_sign_in(&id_hash(id)).await {
        Ok(true) => {}
        Ok(false) => return expired(slug),
        Err(error) => {
            tracing::error!(%error, "cannot end a sign-in");
            return unavailable(slug);
        }
    }
    match app.broker.store().is_disabled(slug, person.email).await {
        Ok(false) => {}
        Ok(true) => {
            tracing::info!(account = %slug, provider = person.provider, "a disabled user's sign-in was refused");
            return html(
                StatusCode::FORBIDDEN,
                page::message(
                    slug,
                    "You cannot sign in",
                    "An administrator of this account has disabled your user. Ask them.",
                ),
                None,
            );
        }
        Err(error) => {
            tracing::error!(%error, "cannot tell whether a user is disabled");
            return unavailable(slug);
        }
    }
    let lifetime = i64::try_from(person.token_lifetime_secs).unwrap_or(i64::MAX);
    let kind = TokenKind::Client {
        user: person.email.to_owned(),
        provider: Some(person.provider.to_owned()),
    };
    let token = app
        .broker
        .store()
        .create_signed_in_token(
            slug,
            kind,
            &pending.request.device,
            (now.saturating_add(lifetime), now),
            SignedIn {
                nonce: &pending.request.nonce,
                identity: person.identity,
            },
        )
        .await;
    let token = match token {
        Ok(token) => token,
        Err(error) => {
            tracing::error!(%error, "cannot make a signed-in token");
            return unavailable(slug);
        }
    };
    tracing::info!(account = %slug, token = %token.id, provider = person.provider, "signed in");
    let query = serde_urlencoded::to_string([
        ("account", slug),
        ("fragment", token.secret.as_str()),
        ("state", pending.request.state.as_str()),
        ("user", person.email),
    ])
    .unwrap_or_default();
    let mut response = see_other(&format!("{}?{query}", pending.request.callback.url()));
    set_cookie(&mut response, &cookie(slug, "", app.sign_in.secure, false));
    response
}

/// `GET /{account}/sign-in/oidc/{provider}?csrf=…`: sends the person to the provider, with
/// PKCE, a state and a nonce kept in the sign-in. (A link, with the anti-forgery token in its
/// query: see `page::methods`.)
pub async fn oidc_start(
    State(app): State<Arc<AppState>>,
    Path((slug, provider_id)): Path<(String, String)>,
    peer: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    axum::extract::Query(form): axum::extract::Query<CsrfForm>,
) -> Response {
    let Step { id, .. } = match form_step(&app, &slug, peer, &headers, &form.csrf).await {
        Ok(step) => step,
        Err(refused) => return *refused,
    };
    let sign_in = &app.sign_in;
    let Some(provider) = sign_in.providers.get(&(slug.clone(), provider_id.clone())) else {
        return bad_request(&slug, "This account has no identity provider of that name.");
    };
    // A new trip, whose state, nonce and verifier differ from any trip before it.
    let opened = app
        .broker
        .store()
        .open_oidc_attempt(&slug, &id_hash(&id), &provider_id)
        .await;
    let attempt = match opened {
        Ok(Some(number)) => OidcAttempt::derived(&id, &provider_id, number),
        Ok(None) => return expired(&slug),
        Err(error) => {
            tracing::error!(%error, "cannot keep a sign-in's trip to its provider");
            return unavailable(&slug);
        }
    };
    let started = provider
        .start(&sign_in.redirect_url(&slug, &provider_id), &attempt)
        .await;
    match started {
        Ok(url) => see_other(&url),
        Err(error) => {
            tracing::warn!(%error, account = %slug, provider = %provider_id, "cannot start an OIDC sign-in");
            provider_failed(&slug, &error)
        }
    }
}

/// What the provider sends the person back with.
#[derive(Debug, Deserialize)]
pub struct ProviderAnswer {
    state: Option<String>,
    code: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

/// `GET /{account}/sign-in/oidc/{provider}/callback`: the person is back from the provider.
/// The state must be the one sent (compared in constant time) and is used up whatever
/// happens next; the code is exchanged and the ID token checked; the groups claim replaces
/// the person's memberships from this provider, and memberships it no longer names stop
/// counting at once.
pub async fn oidc_callback(
    State(app): State<Arc<AppState>>,
    Path((slug, provider_id)): Path<(String, String)>,
    peer: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    axum::extract::Query(answer): axum::extract::Query<ProviderAnswer>,
) -> Response {
    if app.broker.account(&slug).is_err() {
        return no_account(&slug);
    }
    let sign_in = &app.sign_in;
    let now = app.broker.clock().timestamp();
    if let Err(refused) = sign_in.admit(source_of(&app, peer, &headers), &slug) {
        return *refused;
    }
    let Some(id) = cookie_value(&headers) else {
        return expired(&slug);
    };
    let pending = match find_pending(&app, &id, &slug, now).await {
        Ok(Some(pending)) => pending,
        Ok(None) => return expired(&slug),
        Err(_) => return unavailable(&slug),
    };
    // The trip is taken: a second answer (a replay) finds none.
    let attempt = match app
        .broker
        .store()
        .take_oidc_attempt(&slug, &id_hash(&id))
        .await
    {
        Ok(Some((provider, number))) => OidcAttempt::derived(&id, &provider, number),
        Ok(None) => return expired(&slug),
        Err(error) => {
            tracing::error!(%error, "cannot take a sign-in's trip to its provider");
            return unavailable(&slug);
        }
    };
    let state_matches = answer
        .state
        .as_deref()
        .is_some_and(|state| bool::from(state.as_bytes().ct_eq(attempt.state.as_bytes())));
    if attempt.provider != provider_id || !state_matches {
        return bad_request(
            &slug,
            "The identity provider's answer does not belong to this sign-in (its state is \
             wrong or missing). Start again from the fz client.",
        );
    }
    if let Some(error) = answer.error {
        let described = answer
            .error_description
            .map(|d| format!(" ({})", d.chars().take(256).collect::<String>()))
            .unwrap_or_default();
        return html(
            StatusCode::UNAUTHORIZED,
            page::message(
                &slug,
                "The identity provider did not sign you in",
                &format!(
                    "It said: {}{described}.",
                    error.chars().take(64).collect::<String>()
                ),
            ),
            None,
        );
    }
    let Some(code) = answer.code.filter(|c| !c.is_empty() && c.len() <= 2048) else {
        return bad_request(&slug, "The identity provider's answer has no code.");
    };
    let Some(provider) = sign_in.providers.get(&(slug.clone(), provider_id.clone())) else {
        return bad_request(&slug, "This account has no identity provider of that name.");
    };
    let identity = match provider
        .finish(&attempt, &code, &sign_in.redirect_url(&slug, &provider_id))
        .await
    {
        Ok(identity) => identity,
        Err(error) => {
            tracing::warn!(%error, account = %slug, provider = %provider_id, "an OIDC sign-in was refused");
            return provider_failed(&slug, &error);
        }
    };
    let recorded = app
        .broker
        .store()
        .record_identity(
            &slug,
            &provider_id,
            (&identity.issuer, &identity.subject),
            &identity.email,
            identity.groups.as_deref(),
            now,
        )
        .await;
    if let Err(error) = recorded {
        tracing::warn!(%error, account = %slug, provider = %provider_id, "an OIDC identity was refused");
        return html(
            StatusCode::FORBIDDEN,
            page::message(
                &slug,
                "This sign-in cannot go on",
                &format!("This {error}. Ask the account's administrator."),
            ),
            None,
        );
    }
    if let Some(groups) = &identity.groups {
        app.broker
            .idp_groups_changed(&slug, &identity.email, &provider_id, groups)
            .await;
    }
    let person = Person {
        email: &identity.email,
        provider: &provider_id,
        identity: Some((&identity.issuer, &identity.subject)),
        token_lifetime_secs: provider.config.token_lifetime_secs,
    };
    finish(&app, &slug, &id, &pending, person, now).await
}

fn provider_failed(slug: &str, error: &oidc::OidcError) -> Response {
    html(
        StatusCode::BAD_GATEWAY,
        page::message(
            slug,
            "Signing in with the identity provider failed",
            &error.to_string(),
        ),
        None,
    )
}

/// A step of a sign-in under way, as a form (or the provider's button) asks for it.
struct Step<'a> {
    account: &'a Account,
    /// The sign-in's id (its cookie).
    id: String,
    pending: Pending,
    now: i64,
}

/// What every step of a sign-in checks first: the account exists, the source is within its
/// rate, and the request's cookie names a sign-in under way whose CSRF token it carries.
async fn form_step<'a>(
    app: &'a AppState,
    slug: &str,
    peer: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
    headers: &HeaderMap,
    csrf: &str,
) -> Result<Step<'a>, Box<Response>> {
    let account = app
        .broker
        .account(slug)
        .map_err(|_| Box::new(no_account(slug)))?;
    let now = app.broker.clock().timestamp();
    app.sign_in.admit(source_of(app, peer, headers), slug)?;
    let (id, pending) = checked_pending(app, headers, slug, csrf, now).await?;
    Ok(Step {
        account,
        id,
        pending,
        now,
    })
}

/// The pending sign-in the request's cookie names, if the form's CSRF token is its own.
async fn checked_pending(
    app: &AppState,
    headers: &HeaderMap,
    slug: &str,
    csrf: &str,
    now: i64,
) -> Result<(String, Pending), Box<Response>> {
    let Some(id) = cookie_value(headers) else {
        return Err(Box::new(expired(slug)));
    };
    let pending = match find_pending(app, &id, slug, now).await {
        Ok(Some(pending)) => pending,
        Ok(None) => return Err(Box::new(expired(slug))),
        Err(_) => return Err(Box::new(unavailable(slug))),
    };
    if !bool::from(pending.csrf.as_bytes().ct_eq(csrf.as_bytes())) {
        return Err(Box::new(html(
            StatusCode::FORBIDDEN,
            page::message(
                slug,
                "This form was not sent by the sign-in page",
                "The form's anti-forgery token is missing or wrong. Go back to the sign-in page \
                 and send it from there.",
            ),
            None,
        )));
    }
    Ok((id, pending))
}

/// The sign-in of account `slug` that cookie `id` names, as the store keeps it; `None` when
/// there is none (why is logged); `Err` (logged) when the store cannot say.
async fn find_pending(
    app: &AppState,
    id: &str,
    slug: &str,
    now: i64,
) -> Result<Option<Pending>, StoreError> {
    let record = app
        .broker
        .store()
        .sign_in(&id_hash(id))
        .await
        .inspect_err(|error| tracing::error!(%error, "cannot read a sign-in"))?;
    match Pending::read(id, record, slug, now) {
        Ok(pending) => Ok(Some(pending)),
        Err(missing) => {
            // A browser that carries a sign-in cookie the portal no longer knows: an old tab,
            // or a sign-in that ended. Logged, since it also shows a lost sign-in.
            tracing::info!(account = %slug, ?missing, "a sign-in cookie names no pending sign-in");
            Ok(None)
        }
    }
}

fn methods_page(
    sign_in: &SignIn,
    account: &Account,
    pending: &Pending,
    error: Option<&str>,
    status: StatusCode,
) -> Response {
    let slug = &account.settings.slug;
    let methods = page::Methods {
        email: account.settings.email.enabled,
        oidc: account
            .settings
            .oidc
            .iter()
            .filter(|p| {
                sign_in
                    .providers
                    .contains_key(&(slug.clone(), p.id.clone()))
            })
            .map(|p| (p.id.clone(), p.name.clone().unwrap_or_else(|| p.id.clone())))
            .collect(),
    };
    html(
        status,
        page::methods(
            &account.settings.slug,
            &pending.request.device,
            &methods,
            &pending.csrf,
            error,
        ),
        None,
    )
}

/// An address as typed, trimmed and lowercased, if it looks like one: one `@` with something
/// on each side, no spaces or controls, at most 254 characters.
pub fn email_address(typed: &str) -> Option<String> {
    let email = typed.trim().to_lowercase();
    let (local, domain) = email.split_once('@')?;
    let plausible = email.len() <= MAX_EMAIL_CHARS
        && !local.is_empty()
        && !domain.is_empty()
        && !domain.contains('@')
        && !email
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "<>\"(),;:[]\\".contains(c));
    plausible.then_some(email)
}

fn source_of(
    app: &AppState,
    peer: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
    headers: &HeaderMap,
) -> Option<IpAddr> {
    source_address(
        peer.map(|axum::Extension(ConnectInfo(peer))| peer),
        headers,
        app.trusted_proxy.as_ref(),
    )
}

/// The sign-in cookie's value, if the request carries exactly one.
fn cookie_value(headers: &HeaderMap) -> Option<String> {
    let mut found = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_owned());
    let value = found.next()?;
    found.next().is_none().then_some(value)
}

/// The `Set-Cookie` value that holds sign-in `id` (or, `live` false, deletes it).
fn cookie(slug: &str, id: &str, secure: bool, live: bool) -> String {
    let max_age = if live { pending::LIFETIME_SECS } else { 0 };
    format!(
        "{COOKIE}={id}; Path=/{slug}; Max-Age={max_age}; HttpOnly; SameSite=Lax{}",
        if secure { "; Secure" } else { "" }
    )
}

fn set_cookie(response: &mut Response, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
}

/// The portal's address as the browser reached it, for the hint on the bare sign-in page.
fn portal_url(headers: &HeaderMap, secure: bool) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| h.len() <= 255)
        .unwrap_or("PORTAL");
    format!("{}://{host}", if secure { "wss" } else { "ws" })
}

/// A page with the headers every sign-in page carries: nothing cached, never framed, no
/// referrer, no script; forms post only to the portal and, where a form's answer redirects to
/// the client, to its handler's origin.
fn html(status: StatusCode, body: String, redirects_to: Option<&str>) -> Response {
    let form_action = match redirects_to {
        Some(origin) => format!("'self' {origin}"),
        None => "'self'".to_owned(),
    };
    let policy = format!(
        "default-src 'none'; style-src 'unsafe-inline'; form-action {form_action}; \
         frame-ancestors 'none'; base-uri 'none'"
    );
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if let Ok(policy) = HeaderValue::from_str(&policy) {
        headers.insert(header::CONTENT_SECURITY_POLICY, policy);
    }
    response
}

fn see_other(location: &str) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    if let Ok(location) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response.headers_mut().insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

fn no_account(slug: &str) -> Response {
    html(
        StatusCode::NOT_FOUND,
        page::message(
            slug,
            "No such account",
            "This portal serves no account of that name.",
        ),
        None,
    )
}

fn bad_request(slug: &str, text: &str) -> Response {
    html(
        StatusCode::BAD_REQUEST,
        page::message(slug, "This sign-in cannot go on", text),
        None,
    )
}

fn expired(slug: &str) -> Response {
    html(
        StatusCode::BAD_REQUEST,
        page::message(
            slug,
            "This sign-in has ended",
            "It expired, was finished already, or was never started in this browser. Start \
             again from the fz client.",
        ),
        None,
    )
}

fn unavailable(slug: &str) -> Response {
    html(
        StatusCode::SERVICE_UNAVAILABLE,
        page::message(
            slug,
            "Try again later",
            "The portal cannot finish this step now. Try again in a moment.",
        ),
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_lowercased_and_checked() {
        assert_eq!(
            email_address("  Alice@ACME.example "),
            Some("alice@acme.example".to_owned())
        );
        for bad in [
            "",
            "alice",
            "@acme",
            "alice@",
            "a@b@c",
            "a b@c",
            "a<b>@c",
            &format!("{}@x", "a".repeat(254)),
        ] {
            assert_eq!(email_address(bad), None, "{bad}");
        }
    }

    #[test]
    fn one_cookie_or_none() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; fz_sign_in=abc; b=2"),
        );
        assert_eq!(cookie_value(&headers).as_deref(), Some("abc"));
        headers.append(header::COOKIE, HeaderValue::from_static("fz_sign_in=def"));
        assert_eq!(cookie_value(&headers), None);
        assert!(cookie("acme", "x", true, true).ends_with("HttpOnly; SameSite=Lax; Secure"));
        assert!(cookie("acme", "", false, false).contains("Max-Age=0"));
    }
}
