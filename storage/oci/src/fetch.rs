//! What a pull asks of the registry itself rather than through `oci-client`, so that it
//! is bounded: manifests and indexes read with a cap ([`MAX_MANIFEST`]; `oci-client`
//! reads a body whole, however large), and the registry's auth challenge, to see where
//! credentials would be sent before they are.

use futures_util::StreamExt;
use oci_client::errors::OciDistributionError;
use oci_client::Reference;

use crate::error::{OciError, Result};
use crate::manifest::MAX_MANIFEST;

/// How a request authenticates.
#[derive(Clone, Debug)]
pub(crate) enum Auth {
    None,
    Bearer(String),
    Basic(String, String),
}

/// A registry spoken to over `scheme`.
#[derive(Debug)]
pub(crate) struct RegistryHttp {
    http: reqwest::Client,
    scheme: &'static str,
    registry: String,
    /// The image, for errors.
    whole: String,
}

impl RegistryHttp {
    pub(crate) fn new(reference: &Reference, plain_http: bool) -> Self {
        Self {
            http: reqwest::Client::new(),
            scheme: if plain_http { "http" } else { "https" },
            registry: reference.resolve_registry().to_string(),
            whole: reference.whole(),
        }
    }

    fn err(&self, e: impl Into<OciDistributionError>) -> OciError {
        OciError::Registry {
            reference: self.whole.clone(),
            source: Box::new(e.into()),
        }
    }

    /// The `Bearer` challenge `/v2/` answers with, if the registry asks for a token.
    pub(crate) async fn bearer_challenge(&self) -> Result<Option<Challenge>> {
        let url = format!("{}://{}/v2/", self.scheme, self.registry);
        let res = self.http.get(&url).send().await.map_err(|e| self.err(e))?;
        let Some(header) = res.headers().get(reqwest::header::WWW_AUTHENTICATE) else {
            return Ok(None);
        };
        Ok(header.to_str().ok().and_then(bearer_challenge))
    }

    /// A pull token for `reference` from the realm of `challenge`, with `auth` (basic
    /// credentials, or none): the response read with a cap ([`MAX_TOKEN_RESPONSE`]).
    /// boxlet does this exchange itself, on the challenge it checked, rather than let
    /// `oci-client` ask `/v2/` again (and read the answer whole).
    pub(crate) async fn token(
        &self,
        challenge: &Challenge,
        reference: &Reference,
        auth: &Auth,
    ) -> Result<String> {
        let mut query = vec![(
            "scope",
            format!("repository:{}:pull", reference.repository()),
        )];
        if let Some(service) = &challenge.service {
            query.push(("service", service.clone()));
        }
        let mut req = self.http.get(&challenge.realm).query(&query);
        if let Auth::Basic(user, password) = auth {
            req = req.basic_auth(user, Some(password));
        }
        let res = req.send().await.map_err(|e| self.err(e))?;
        let status = res.status();
        let too_large = || OciError::TooLarge {
            what: format!("{} ({})", self.whole, challenge.realm),
            reason: format!("a token response of more than {MAX_TOKEN_RESPONSE} bytes"),
        };
        if res.content_length().is_some_and(|n| n > MAX_TOKEN_RESPONSE) {
            return Err(too_large());
        }
        let mut bytes = Vec::new();
        let mut body = res.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| self.err(e))?;
            if bytes.len() as u64 + chunk.len() as u64 > MAX_TOKEN_RESPONSE {
                return Err(too_large());
            }
            bytes.extend_from_slice(&chunk);
        }
        if !status.is_success() {
            return Err(self.err(OciDistributionError::ServerError {
                code: status.as_u16(),
                url: challenge.realm.clone(),
                message: String::from_utf8_lossy(&bytes[..bytes.len().min(4096)])
                    .trim()
                    .to_string(),
            }));
        }
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
        }
        let parsed: TokenResponse = serde_json::from_slice(&bytes)
            .map_err(|e| OciError::malformed(format!("{} ({})", self.whole, challenge.realm), e))?;
        parsed
            .token
            .or(parsed.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                OciError::malformed(
                    format!("{} ({})", self.whole, challenge.realm),
                    "a token response without a token",
                )
            })
    }

    /// Whether credentials may go to `realm`: the registry's own scheme and host (any
    /// port).
    pub(crate) fn realm_is_the_registrys(&self, realm: &str) -> bool {
        let Ok(url) = reqwest::Url::parse(realm) else {
            return false;
        };
        let host = self
            .registry
            .rsplit_once(':')
            .filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit()))
            .map_or(self.registry.as_str(), |(h, _)| h);
        url.scheme() == self.scheme && url.host_str() == Some(host.trim_matches(['[', ']']))
    }

    /// The manifest or index `reference` names (by digest, else by tag), at most
    /// [`MAX_MANIFEST`] bytes, with the registry's `Docker-Content-Digest`.
    pub(crate) async fn manifest(
        &self,
        reference: &Reference,
        auth: &Auth,
        accept: &[&str],
    ) -> Result<(Vec<u8>, Option<String>)> {
        let url = format!(
            "{}://{}/v2/{}/manifests/{}",
            self.scheme,
            self.registry,
            reference.repository(),
            reference
                .digest()
                .unwrap_or_else(|| reference.tag().unwrap_or("latest"))
        );
        let mut req = self
            .http
            .get(&url)
            .header(reqwest::header::ACCEPT, accept.join(", "));
        req = match auth {
            Auth::None => req,
            Auth::Bearer(token) => req.bearer_auth(token),
            Auth::Basic(user, password) => req.basic_auth(user, Some(password)),
        };
        let res = req.send().await.map_err(|e| self.err(e))?;
        let status = res.status();
        if !status.is_success() {
            let mut message = String::new();
            let mut body = res.bytes_stream();
            while let Some(Ok(chunk)) = body.next().await {
                message.push_str(&String::from_utf8_lossy(&chunk));
                if message.len() > 4096 {
                    message.truncate(4096);
                    break;
                }
            }
            return Err(self.err(OciDistributionError::ServerError {
                code: status.as_u16(),
                url,
                message: message.trim().to_string(),
            }));
        }
        if res.content_length().is_some_and(|n| n > MAX_MANIFEST) {
            return Err(self.too_large(&url));
        }
        let digest = res
            .headers()
            .get("Docker-Content-Digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut bytes = Vec::new();
        let mut body = res.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| self.err(e))?;
            if bytes.len() as u64 + chunk.len() as u64 > MAX_MANIFEST {
                return Err(self.too_large(&url));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok((bytes, digest))
    }

    fn too_large(&self, url: &str) -> OciError {
        OciError::TooLarge {
            what: format!("{} ({url})", self.whole),
            reason: format!("a manifest of more than {MAX_MANIFEST} bytes"),
        }
    }
}

/// The most a token endpoint's answer may hold (a token is a few KiB).
pub(crate) const MAX_TOKEN_RESPONSE: u64 = 1 << 20;

/// A `Bearer realm="...",service="..."` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Challenge {
    /// Where tokens come from.
    pub(crate) realm: String,
    /// The registry's name for itself, passed back.
    pub(crate) service: Option<String>,
}

fn bearer_challenge(challenge: &str) -> Option<Challenge> {
    let (scheme, params) = challenge.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let param = |name: &str| {
        params.split(',').find_map(|p| {
            let (k, v) = p.trim().split_once('=')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().trim_matches('"').to_string())
        })
    };
    Some(Challenge {
        realm: param("realm")?,
        service: param("service"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_token_answer_past_the_cap_is_refused_without_reading_it_whole() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            // No length: the body goes on (4 MiB) until the client stops reading.
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{\"token\":\"");
            let chunk = vec![b'a'; 64 << 10];
            for _ in 0..64 {
                if s.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
        let reference: Reference = format!("{addr}/boxlet/busybox:latest").parse().unwrap();
        let http = RegistryHttp::new(&reference, true);
        let challenge = Challenge {
            realm: format!("http://{addr}/token"),
            service: Some("registry".into()),
        };
        let e = http
            .token(&challenge, &reference, &Auth::None)
            .await
            .unwrap_err();
        assert!(matches!(e, OciError::TooLarge { .. }), "{e}");
        assert!(e.to_string().contains("/token"), "{e}");
    }

    #[test]
    fn the_realm_of_a_bearer_challenge() {
        assert_eq!(
            bearer_challenge(r#"Bearer realm="https://auth.example/token",service="reg""#)
                .map(|c| c.realm)
                .as_deref(),
            Some("https://auth.example/token")
        );
        assert_eq!(bearer_challenge(r#"Basic realm="boxlet""#), None);
        assert_eq!(bearer_challenge("Bearer service=x"), None);
    }

    #[test]
    fn credentials_go_only_to_the_registrys_own_scheme_and_host() {
        let r: Reference = "registry.example:5000/a/b:1".parse().unwrap();
        let https = RegistryHttp::new(&r, false);
        assert!(https.realm_is_the_registrys("https://registry.example/token"));
        assert!(https.realm_is_the_registrys("https://registry.example:8443/token"));
        assert!(!https.realm_is_the_registrys("http://registry.example/token"));
        assert!(!https.realm_is_the_registrys("https://evil.example/token"));
        assert!(!https.realm_is_the_registrys("https://registry.example.evil/token"));
        assert!(!https.realm_is_the_registrys("not a url"));
        let plain = RegistryHttp::new(&r, true);
        assert!(plain.realm_is_the_registrys("http://registry.example:9000/token"));
    }
}
