//! Pull from a registry with `oci-client`: the manifest (or index, resolved to
//! linux/amd64), the config and the layers, each verified by digest as it streams into
//! the store; blobs the store holds already are not fetched again.

use std::sync::Arc;

use boxlet_cas::{Algorithm, Digest, Expected, ImageRecord, Lease, Store};
use futures_util::{StreamExt, TryStreamExt};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use oci_spec::image::Descriptor;

use crate::error::{OciError, Result};
use crate::fetch::{Auth, RegistryHttp};
use crate::image::record_image;
use crate::manifest::{
    check_bounds, choose_platform, digest_of, parse_document, Document, ACCEPTED,
};

/// Credentials for a registry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Credentials {
    /// None: anonymous, with a bearer token when the registry asks for one.
    #[default]
    Anonymous,
    /// A user name and password (basic auth, or exchanged for a bearer token).
    Basic {
        /// User name.
        user: String,
        /// Password.
        password: String,
    },
    /// A bearer token given as is.
    Bearer(String),
}

/// How to pull.
#[derive(Clone, Debug, Default)]
pub struct PullOptions {
    /// Talk plain HTTP to the registry (a local or test registry).
    pub insecure: bool,
    /// Credentials.
    pub credentials: Credentials,
    /// Layers fetched at once (0: 3).
    pub parallel: usize,
    /// Send credentials over plain HTTP (`insecure`), where anyone on the way reads them.
    pub credentials_over_http: bool,
    /// Send a user's password to a token realm on another scheme or host than the
    /// registry's, when the registry names one.
    pub credentials_to_any_realm: bool,
}

/// Hears how a pull goes (for progress bars).
pub trait PullProgress: Send + Sync {
    /// A blob of `size` bytes starts downloading.
    fn started(&self, _digest: &Digest, _size: u64) {}
    /// `n` more bytes of a blob arrived.
    fn advanced(&self, _digest: &Digest, _n: u64) {}
    /// A blob is stored; `reused` when the store held it already.
    fn finished(&self, _digest: &Digest, _reused: bool) {}
}

/// A [`PullProgress`] that hears nothing.
#[derive(Debug)]
pub struct Quiet;

impl PullProgress for Quiet {}

/// What a pull did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PullReport {
    /// The recorded image.
    pub image: ImageRecord,
    /// Blobs downloaded.
    pub fetched: usize,
    /// Their bytes.
    pub fetched_bytes: u64,
    /// Blobs the store held already.
    pub reused: usize,
}

struct Puller<'a> {
    store: &'a Store,
    client: Client,
    http: RegistryHttp,
    reference: Reference,
    auth: RegistryAuth,
    lease: Lease,
    progress: Arc<dyn PullProgress + 'a>,
}

/// Pull `reference` into the store.
pub async fn pull(
    store: &Store,
    reference: &str,
    opts: &PullOptions,
    progress: Arc<dyn PullProgress + '_>,
) -> Result<PullReport> {
    let parsed: Reference = reference.parse().map_err(
        |e: oci_spec::distribution::ParseError| OciError::Reference {
            input: reference.to_string(),
            reason: e.to_string(),
        },
    )?;
    let protocol = if opts.insecure {
        ClientProtocol::HttpsExcept(vec![parsed.resolve_registry().to_string()])
    } else {
        ClientProtocol::Https
    };
    let client = Client::new(ClientConfig {
        protocol,
        platform_resolver: None,
        ..ClientConfig::default()
    });
    let http = RegistryHttp::new(&parsed, opts.insecure);
    let refused = |reason: &str| OciError::Refused {
        what: format!("pulling {}", parsed.whole()),
        reason: reason.to_string(),
    };
    if opts.credentials != Credentials::Anonymous && opts.insecure && !opts.credentials_over_http {
        return Err(refused(
            "credentials over plain HTTP could be read by anyone on the way              (allow it with --credentials-over-http)",
        ));
    }
    // The token exchange is boxlet's own, on the one challenge it checked: a password
    // goes only to a realm on the registry's scheme and host (unless asked), and the
    // answer is read with a cap. oci-client is then handed the token.
    let auth = match &opts.credentials {
        Credentials::Bearer(token) => RegistryAuth::Bearer(token.clone()),
        creds => match http.bearer_challenge().await? {
            Some(challenge) => {
                let basic = match creds {
                    Credentials::Basic { user, password } => {
                        if !opts.credentials_to_any_realm
                            && !http.realm_is_the_registrys(&challenge.realm)
                        {
                            return Err(refused(&format!(
                                "the registry sends credentials to {}, not to its own scheme \
                                 and host (allow it with --credentials-to-any-realm)",
                                challenge.realm
                            )));
                        }
                        Auth::Basic(user.clone(), password.clone())
                    }
                    _ => Auth::None,
                };
                RegistryAuth::Bearer(http.token(&challenge, &parsed, &basic).await?)
            }
            None => match creds {
                Credentials::Basic { user, password } => {
                    RegistryAuth::Basic(user.clone(), password.clone())
                }
                _ => RegistryAuth::Anonymous,
            },
        },
    };
    let puller = Puller {
        store,
        client,
        http,
        reference: parsed.clone(),
        auth,
        lease: store.lease(),
        progress,
    };
    puller.run(&parsed.whole(), opts.parallel.max(1)).await
}

impl Puller<'_> {
    fn registry_err(&self) -> impl Fn(oci_client::errors::OciDistributionError) -> OciError + '_ {
        |e| OciError::Registry {
            reference: self.reference.whole(),
            source: Box::new(e),
        }
    }

    /// Fetch a manifest or index by tag or digest (bounded), verify it, store it.
    async fn manifest(&self, reference: &Reference, auth: &Auth) -> Result<(Digest, Document)> {
        let (bytes, announced) = self.http.manifest(reference, auth, &ACCEPTED).await?;
        let actual = Digest::of(Algorithm::Sha256, &bytes);
        // A manifest asked for by digest must be that digest; by tag, the registry's
        // Docker-Content-Digest header is checked when it is sha256.
        let wanted = reference.digest().map(str::to_string).or(announced);
        if let Some(Ok(expected)) = wanted.map(|w| w.parse::<Digest>()) {
            if expected != actual {
                return Err(boxlet_cas::CasError::DigestMismatch { expected, actual }.into());
            }
        }
        self.store.ingest_bytes(
            &bytes,
            Algorithm::Sha256,
            Some(Expected::new(actual, bytes.len() as u64)),
            &self.lease,
        )?;
        let doc = parse_document(&bytes, &actual.to_string())?;
        Ok((actual, doc))
    }

    /// Fetch a blob unless the store holds it; true when it was fetched.
    async fn blob(&self, desc: &Descriptor) -> Result<(bool, u64)> {
        let digest = digest_of(desc, &self.reference.whole())?;
        let expected = Expected::new(digest, desc.size());
        if self.store.lease_stored(expected, &self.lease)?.is_some() {
            self.progress.finished(&digest, true);
            return Ok((false, 0));
        }
        self.progress.started(&digest, desc.size());
        let digest_text = digest.to_string();
        let mut stream = self
            .client
            .pull_blob_stream(&self.reference, digest_text.as_str())
            .await
            .map_err(self.registry_err())?
            .stream;
        let mut writer = self.store.writer(digest.algorithm(), Some(expected))?;
        while let Some(chunk) =
            stream
                .try_next()
                .await
                .map_err(|e| boxlet_cas::CasError::Source {
                    what: digest.to_string(),
                    source: e,
                })?
        {
            writer.push(&chunk)?;
            self.progress.advanced(&digest, chunk.len() as u64);
        }
        let info = writer.commit(&self.lease)?;
        self.progress.finished(&digest, false);
        Ok((true, info.size))
    }

    async fn run(&self, whole: &str, parallel: usize) -> Result<PullReport> {
        let token = self
            .client
            .auth(
                &self.reference,
                &self.auth,
                oci_client::RegistryOperation::Pull,
            )
            .await
            .map_err(self.registry_err())?;
        let auth = match (token, &self.auth) {
            (Some(token), _) => Auth::Bearer(token),
            (None, RegistryAuth::Basic(user, password)) => {
                Auth::Basic(user.clone(), password.clone())
            }
            (None, _) => Auth::None,
        };
        let (top, doc) = self.manifest(&self.reference, &auth).await?;
        let (index, manifest_digest, manifest) = match doc {
            Document::Manifest(m) => (None, top, m),
            Document::Index(index) => {
                let chosen = choose_platform(&index, whole)?;
                let by_digest = self
                    .reference
                    .clone_with_digest(chosen.digest().to_string());
                match self.manifest(&by_digest, &auth).await? {
                    (d, Document::Manifest(m)) => (Some(top), d, m),
                    (d, Document::Index(_)) => {
                        return Err(OciError::malformed(
                            d,
                            "an index where the platform's manifest belongs",
                        ))
                    }
                }
            }
        };
        // Nothing is fetched for an image past the bounds.
        check_bounds(&manifest, &manifest_digest.to_string())?;
        let mut blobs = vec![manifest.config().clone()];
        blobs.extend(manifest.layers().iter().cloned());
        let results: Vec<(bool, u64)> =
            futures_util::stream::iter(blobs.iter().map(|d| self.blob(d)))
                .buffered(parallel)
                .try_collect()
                .await?;
        let image = record_image(self.store, whole, index, manifest_digest)?;
        Ok(PullReport {
            image,
            fetched: results.iter().filter(|r| r.0).count(),
            fetched_bytes: results.iter().map(|r| r.1).sum(),
            reused: results.iter().filter(|r| !r.0).count(),
        })
    }
}
