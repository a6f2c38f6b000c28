//! Sign-in with an OpenID Connect provider: discovery, the authorization-code flow with PKCE
//! (S256, always), and the ID token's checks (signature against the provider's published
//! keys, issuer, audience, expiry, and the nonce drawn for this sign-in), through the
//! `openidconnect` crate. Its HTTP client follows no redirects (a provider's endpoint that
//! redirects is refused, never followed to wherever it points) and gives up after 10 s.
//!
//! What comes out is an [`Identity`]: the person as the provider keys them (issuer, subject),
//! their address only when the provider says it is verified, and the groups its configured
//! claim lists (from the ID token, else from UserInfo, whose `sub` must be the ID token's).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use openidconnect::core::{CoreAuthenticationFlow, CoreClient, CoreProviderMetadata};
use openidconnect::{
    AuthorizationCode, ClaimsVerificationError, ClientId, ClientSecret, CsrfToken,
    EndpointMaybeSet, EndpointNotSet, EndpointSet, IssuerUrl, Nonce, OAuth2TokenResponse,
    PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, Scope, TokenResponse,
};
use serde_json::Value;

use crate::config::OidcConfig;
use crate::sign_in::pending;

/// How long discovered metadata (endpoints, keys) is used before it is fetched again. An ID
/// token signed with a key the cache does not know makes the portal fetch the keys again at
/// once and check that same token again (the code behind it is never exchanged twice).
const METADATA_LIFETIME: Duration = Duration::from_secs(3600);

/// A client made from discovered metadata: the authorization endpoint is known, the token
/// and UserInfo endpoints may be.
type ProviderClient = CoreClient<
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointMaybeSet,
    EndpointMaybeSet,
>;

/// How long one request to a provider may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// Groups kept from one sign-in, and the longest group name kept: a provider that lists more,
/// or longer, is cut (and the cut logged), so one person cannot fill the store.
pub const MAX_GROUPS: usize = 1024;
pub const MAX_GROUP_CHARS: usize = 256;

/// The largest UserInfo answer read.
const MAX_USERINFO_BYTES: usize = 256 * 1024;

/// The longest address or subject taken from a provider.
const MAX_CLAIM_CHARS: usize = 254;

/// A configured provider, ready to sign people in.
pub struct Provider {
    pub config: OidcConfig,
    secret: ClientSecret,
    http: reqwest::Client,
    metadata: tokio::sync::Mutex<Option<(Instant, CoreProviderMetadata)>>,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("id", &self.config.id)
            .field("issuer", &self.config.issuer)
            .finish_non_exhaustive()
    }
}

/// One trip of a sign-in to a provider: what is sent there and checked on the person's return.
#[derive(Clone, PartialEq, Eq)]
pub struct OidcAttempt {
    pub provider: String,
    /// The `state` sent to the provider, which its answer must carry back.
    pub state: String,
    nonce: String,
    verifier: String,
}

impl OidcAttempt {
    /// Trip `number` of sign-in `sign_in_id` (its cookie) to `provider`: its state, nonce and
    /// PKCE verifier are derived from the cookie (`pending::derived`, 43 characters of
    /// base64url, as RFC 7636 allows a verifier), so the store keeps only the trip's number.
    pub fn derived(sign_in_id: &str, provider: &str, number: i64) -> OidcAttempt {
        OidcAttempt {
            provider: provider.to_owned(),
            state: pending::derived(sign_in_id, "oidc-state", number),
            nonce: pending::derived(sign_in_id, "oidc-nonce", number),
            verifier: pending::derived(sign_in_id, "oidc-pkce-verifier", number),
        }
    }
}

impl std::fmt::Debug for OidcAttempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcAttempt")
            .field("provider", &self.provider)
            .finish_non_exhaustive()
    }
}

/// A person as a provider vouched for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub issuer: String,
    pub subject: String,
    /// Lowercase; verified by the provider.
    pub email: String,
    /// `None` when no groups claim is configured (memberships from this provider are then
    /// left alone).
    pub groups: Option<Vec<String>>,
}

/// Why a sign-in with a provider failed. Shown to the person, so it says what went wrong in
/// words they can take to their administrator, and never carries a secret.
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("cannot read the client secret file `{}`: {source}", path.display())]
    Secret {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot make an HTTP client: {0}")]
    Client(String),
    #[error("cannot use the CA file `{}`: {cause}", path.display())]
    CaFile { path: PathBuf, cause: String },
    #[error("the identity provider's configuration cannot be read: {0}")]
    Discovery(String),
    #[error("the identity provider did not take the sign-in's code: {0}")]
    Exchange(String),
    #[error("the identity provider answered without an ID token")]
    NoIdToken,
    #[error("the identity provider's ID token was refused: {0}")]
    IdToken(String),
    #[error("the identity provider gave no email address for this person")]
    NoEmail,
    #[error(
        "the identity provider does not say that {0} is verified, so it proves nothing; verify \
         the address at the provider and sign in again"
    )]
    Unverified(String),
    #[error("the identity provider's UserInfo cannot be read: {0}")]
    UserInfo(String),
}

impl Provider {
    /// A provider from its configuration; its secret is read now, its metadata at first use.
    pub fn new(config: &OidcConfig) -> Result<Provider, OidcError> {
        let secret = std::fs::read_to_string(&config.client_secret_file).map_err(|source| {
            OidcError::Secret {
                path: config.client_secret_file.clone(),
                source,
            }
        })?;
        let mut builder = reqwest::Client::builder();
        if let Some(path) = &config.ca_file {
            let ca_error = |cause: String| OidcError::CaFile {
                path: path.clone(),
                cause,
            };
            let pem = std::fs::read(path).map_err(|e| ca_error(e.to_string()))?;
            let certificates =
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| ca_error(e.to_string()))?;
            if certificates.is_empty() {
                return Err(ca_error("no certificate in it".to_owned()));
            }
            for certificate in certificates {
                builder = builder.add_root_certificate(certificate);
            }
        }
        let http = builder
            .redirect(reqwest::redirect::Policy::none())
            .timeout(HTTP_TIMEOUT)
            // A connection per request: sign-ins are rare, and a pooled connection the
            // provider closed meanwhile fails the request it is reused for.
            .pool_max_idle_per_host(0)
            .build()
            .map_err(|e| OidcError::Client(e.to_string()))?;
        Ok(Provider {
            config: config.clone(),
            secret: ClientSecret::new(secret.trim().to_owned()),
            http,
            metadata: tokio::sync::Mutex::default(),
        })
    }

    /// The provider's metadata, discovered (again, past its lifetime, or when `fresh`).
    async fn metadata(&self, fresh: bool) -> Result<CoreProviderMetadata, OidcError> {
        let mut cached = self.metadata.lock().await;
        if let Some((at, metadata)) = cached.as_ref()
            && !fresh
            && at.elapsed() < METADATA_LIFETIME
        {
            return Ok(metadata.clone());
        }
        let issuer = IssuerUrl::new(self.config.issuer.clone())
            .map_err(|e| OidcError::Discovery(e.to_string()))?;
        let metadata = CoreProviderMetadata::discover_async(issuer, &self.http)
            .await
            .map_err(|e| OidcError::Discovery(chain(&e)))?;
        *cached = Some((Instant::now(), metadata.clone()));
        Ok(metadata)
    }

    /// The OAuth client the portal is to this provider, sending people back to `redirect`.
    fn client(
        &self,
        metadata: CoreProviderMetadata,
        redirect: &str,
    ) -> Result<ProviderClient, OidcError> {
        let redirect = RedirectUrl::new(redirect.to_owned())
            .map_err(|e| OidcError::Discovery(e.to_string()))?;
        Ok(CoreClient::from_provider_metadata(
            metadata,
            ClientId::new(self.config.client_id.clone()),
            Some(self.secret.clone()),
        )
        .set_redirect_uri(redirect))
    }

    /// Where to send the person on `attempt`, to come back to `redirect`.
    pub async fn start(&self, redirect: &str, attempt: &OidcAttempt) -> Result<String, OidcError> {
        let client = self.client(self.metadata(false).await?, redirect)?;
        let challenge = PkceCodeChallenge::from_code_verifier_sha256(&PkceCodeVerifier::new(
            attempt.verifier.clone(),
        ));
        let state = CsrfToken::new(attempt.state.clone());
        let nonce = Nonce::new(attempt.nonce.clone());
        let mut request = client.authorize_url(
            CoreAuthenticationFlow::AuthorizationCode,
            move || state,
            move || nonce,
        );
        // `openid` is always asked for by the crate.
        for scope in self.config.scopes.iter().filter(|s| *s != "openid") {
            request = request.add_scope(Scope::new(scope.clone()));
        }
        let (url, _, _) = request.set_pkce_challenge(challenge).url();
        Ok(url.to_string())
    }

    /// Exchanges the code the person came back with (with the PKCE verifier), checks the ID
    /// token, and says who they are.
    pub async fn finish(
        &self,
        attempt: &OidcAttempt,
        code: &str,
        redirect: &str,
    ) -> Result<Identity, OidcError> {
        let metadata = self.metadata(false).await?;
        let userinfo_url = metadata.userinfo_endpoint().map(|u| u.url().clone());
        let client = self.client(metadata, redirect)?;
        // The code is exchanged once: a provider takes it only once.
        let response = client
            .exchange_code(AuthorizationCode::new(code.to_owned()))
            .map_err(|e| OidcError::Exchange(e.to_string()))?
            .set_pkce_verifier(PkceCodeVerifier::new(attempt.verifier.clone()))
            .request_async(&self.http)
            .await
            .map_err(|e| OidcError::Exchange(chain(&e)))?;
        let id_token = response.id_token().ok_or(OidcError::NoIdToken)?;
        let nonce = Nonce::new(attempt.nonce.clone());
        let claims = match id_token.claims(&client.id_token_verifier(), &nonce) {
            Ok(claims) => claims.clone(),
            // Signed with a key the cached metadata does not know: the provider may have
            // rotated its keys. Its keys are fetched again and the same token checked again.
            Err(ClaimsVerificationError::SignatureVerification(_)) => {
                let fresh = self.client(self.metadata(true).await?, redirect)?;
                id_token
                    .claims(&fresh.id_token_verifier(), &nonce)
                    .map_err(|e| OidcError::IdToken(chain(&e)))?
                    .clone()
            }
            Err(error) => return Err(OidcError::IdToken(chain(&error))),
        };
        let issuer = claims.issuer().as_str().to_owned();
        let subject = claims.subject().as_str().to_owned();
        if subject.is_empty() || subject.len() > MAX_CLAIM_CHARS {
            return Err(OidcError::IdToken(
                "its subject is empty or too long".to_owned(),
            ));
        }
        // The token's own claims, as JSON, for the groups claim (its signature was checked
        // above, so its payload is the provider's word).
        let payload = payload(&id_token.to_string());
        let mut email = claims.email().map(|e| e.as_str().to_lowercase());
        let mut verified = claims.email_verified();
        let mut groups = self
            .config
            .groups_claim
            .as_ref()
            .and_then(|claim| payload.as_ref().and_then(|p| p.get(claim)).cloned());
        let needs_userinfo =
            email.is_none() || (self.config.groups_claim.is_some() && groups.is_none());
        if needs_userinfo && let Some(url) = userinfo_url {
            let info = self
                .userinfo(url, response.access_token().secret(), &subject)
                .await?;
            if email.is_none() {
                email = info
                    .get("email")
                    .and_then(Value::as_str)
                    .map(str::to_lowercase);
                verified = info.get("email_verified").and_then(Value::as_bool);
            }
            if groups.is_none() {
                groups = self
                    .config
                    .groups_claim
                    .as_ref()
                    .and_then(|claim| info.get(claim))
                    .cloned();
            }
        }
        let email = email
            .filter(|e| !e.is_empty() && e.len() <= MAX_CLAIM_CHARS && e.contains('@'))
            .ok_or(OidcError::NoEmail)?;
        if verified != Some(true) {
            return Err(OidcError::Unverified(email));
        }
        let groups = self
            .config
            .groups_claim
            .as_ref()
            .map(|_| group_names(groups.as_ref(), &self.config.id));
        Ok(Identity {
            issuer,
            subject,
            email,
            groups,
        })
    }

    /// UserInfo for the access token; its `sub` must be the ID token's.
    async fn userinfo(
        &self,
        url: url::Url,
        access_token: &str,
        subject: &str,
    ) -> Result<serde_json::Map<String, Value>, OidcError> {
        let response = self
            .http
            .get(url)
            .bearer_auth(access_token)
            .send()
            .await
            .map_err(|e| OidcError::UserInfo(e.to_string()))?;
        if !response.status().is_success() {
            return Err(OidcError::UserInfo(format!(
                "it answered {}",
                response.status()
            )));
        }
        let mut response = response;
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| OidcError::UserInfo(e.to_string()))?
        {
            if body.len() + chunk.len() > MAX_USERINFO_BYTES {
                return Err(OidcError::UserInfo("it is too large".to_owned()));
            }
            body.extend_from_slice(&chunk);
        }
        let info: serde_json::Map<String, Value> =
            serde_json::from_slice(&body).map_err(|e| OidcError::UserInfo(e.to_string()))?;
        if info.get("sub").and_then(Value::as_str) != Some(subject) {
            return Err(OidcError::UserInfo(
                "it is about another person than the ID token".to_owned(),
            ));
        }
        Ok(info)
    }
}

/// A JWT's payload as JSON.
fn payload(jwt: &str) -> Option<serde_json::Map<String, Value>> {
    let part = jwt.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(part.trim_end_matches('=')).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The group names a claim lists: strings (a lone string counts as one), empty and overlong
/// ones dropped, at most [`MAX_GROUPS`], sorted and without repeats. Anything else is no group.
fn group_names(claim: Option<&Value>, provider: &str) -> Vec<String> {
    let listed: Vec<&str> = match claim {
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
        Some(Value::String(one)) => vec![one.as_str()],
        _ => Vec::new(),
    };
    let mut names: Vec<String> = listed
        .iter()
        .filter(|g| !g.is_empty() && g.chars().count() <= MAX_GROUP_CHARS)
        .map(|g| (*g).to_owned())
        .collect();
    names.sort();
    names.dedup();
    if names.len() < listed.len() {
        tracing::debug!(
            provider,
            "some groups were empty, overlong or repeated; dropped"
        );
    }
    if names.len() > MAX_GROUPS {
        tracing::warn!(
            provider,
            listed = names.len(),
            kept = MAX_GROUPS,
            "too many groups; cut"
        );
        names.truncate(MAX_GROUPS);
    }
    names
}

/// An error with its causes, for the person and the log.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_strings_bounded_and_sorted() {
        let claim = serde_json::json!(["SRE", "", "Finance", "SRE", 7, "x".repeat(300)]);
        assert_eq!(group_names(Some(&claim), "okta"), ["Finance", "SRE"]);
        assert_eq!(
            group_names(Some(&serde_json::json!("SRE")), "okta"),
            ["SRE"]
        );
        assert!(group_names(None, "okta").is_empty());
        let many: Vec<String> = (0..2000).map(|i| format!("g{i:04}")).collect();
        assert_eq!(
            group_names(Some(&serde_json::json!(many)), "okta").len(),
            MAX_GROUPS
        );
    }

    #[test]
    fn a_jwt_payload_reads_as_json() {
        let body = URL_SAFE_NO_PAD.encode(br#"{"sub":"1","groups":["a"]}"#);
        let claims = payload(&format!("x.{body}.y")).unwrap();
        assert_eq!(claims["groups"], serde_json::json!(["a"]));
        assert!(payload("not a jwt").is_none());
    }
}
