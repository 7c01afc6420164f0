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

    /// The realm a `Bearer` challenge on `/v2/` names, if the registry asks for one.
    pub(crate) async fn bearer_realm(&self) -> Result<Option<String>> {
        let url = format!("{}://{}/v2/", self.scheme, self.registry);
        let res = self.http.get(&url).send().await.map_err(|e| self.err(e))?;
        let Some(header) = res.headers().get(reqwest::header::WWW_AUTHENTICATE) else {
            return Ok(None);
        };
        Ok(header.to_str().ok().and_then(bearer_realm))
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

/// The `realm` of a `Bearer realm="...",service="..."` challenge.
fn bearer_realm(challenge: &str) -> Option<String> {
    let (scheme, params) = challenge.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    params.split(',').find_map(|p| {
        let (k, v) = p.trim().split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("realm")
            .then(|| v.trim().trim_matches('"').to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_realm_of_a_bearer_challenge() {
        assert_eq!(
            bearer_realm(r#"Bearer realm="https://auth.example/token",service="reg""#).as_deref(),
            Some("https://auth.example/token")
        );
        assert_eq!(bearer_realm(r#"Basic realm="boxlet""#), None);
        assert_eq!(bearer_realm("Bearer service=x"), None);
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
