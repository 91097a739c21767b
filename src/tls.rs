//! TLS and mTLS on the data listener (rustls): the server certificate and the client CA are
//! held behind swappable pointers and reloaded when their files change (cert-manager rotates
//! them by swapping a symlink), so a rotation never drops a connection: handshakes after
//! the change use the new files, established connections keep theirs.
//!
//! With `tls.client_ca`, a client certificate is required and verified at the handshake
//! (chain, validity period, clientAuth usage); the tenant is read from the verified
//! certificate afterwards by the identify step, never from anything the client merely sends.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client CA: {0}")]
    Verifier(String),
    #[error("cannot watch the certificate files: {0}")]
    Watch(#[from] notify::Error),
}

/// Paths of `tls`.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

fn file_err(path: &Path, message: impl ToString) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

fn load_key(files: &TlsFiles, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let chain = read_certs(&files.cert)?;
    // The key file's content never goes into an error message.
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|_| file_err(&files.key, "no readable PEM private key in the file"))?;
    CertifiedKey::from_der(chain, key, provider).map_err(|e| {
        file_err(
            &files.cert,
            format!("certificate and key do not match: {e}"),
        )
    })
}

fn load_verifier(
    ca: &Path,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in read_certs(ca)? {
        roots.add(c).map_err(|e| file_err(ca, e))?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))
}

/// The server certificate, swapped on reload.
#[derive(Debug)]
struct Resolver(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// The client verifier, swapped on reload. It sends no CA hints (the hint list would have
/// to outlive a swap); clients then offer their one certificate, which is what sidecars have.
#[derive(Debug)]
struct Verifier(ArcSwap<Arc<dyn ClientCertVerifier>>);

impl ClientCertVerifier for Verifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0
            .load()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.load().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.load().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.load().supported_verify_schemes()
    }
}

/// A running TLS setup: the acceptor and the watcher that reloads it.
pub struct ServerTls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub mtls: bool,
    _watcher: Option<Box<dyn Watcher + Send>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("mtls", &self.mtls)
            .finish()
    }
}

/// Loads the files (an error here stops `serve`: a bad certificate at start is a config
/// error) and starts watching them; a bad file later is logged and the last good one kept.
pub fn server(
    files: &TlsFiles,
    on_reload: impl Fn(bool) + Send + 'static,
) -> Result<ServerTls, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let resolver = Arc::new(Resolver(ArcSwap::from_pointee(load_key(files, &provider)?)));
    let verifier = match &files.client_ca {
        Some(ca) => Some(Arc::new(Verifier(ArcSwap::from_pointee(load_verifier(
            ca, &provider,
        )?)))),
        None => None,
    };
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let mut config = match &verifier {
        Some(v) => builder
            .with_client_cert_verifier(v.clone())
            .with_cert_resolver(resolver.clone()),
        None => builder
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone()),
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    if verifier.is_some() {
        // A resumed session restores the client certificate of its first handshake without
        // verifying it again: an expired certificate, or one of a CA since removed, would
        // keep connecting. With client certificates, every connection is a full handshake.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    }

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if res.is_ok_and(|e| !matches!(e.kind, notify::EventKind::Access(_))) {
            let _ = tx.send(());
        }
    })?;
    // Watch the folders, not the files: Kubernetes secret volumes replace files by swapping
    // a `..data` symlink, which a watch on the old file would never see.
    let mut dirs: Vec<PathBuf> = [
        Some(&files.cert),
        Some(&files.key),
        files.client_ca.as_ref(),
    ]
    .into_iter()
    .flatten()
    .filter_map(|p| p.parent().map(Path::to_path_buf))
    .collect();
    dirs.sort();
    dirs.dedup();
    for d in &dirs {
        watcher.watch(d, RecursiveMode::NonRecursive)?;
    }
    let files = files.clone();
    let (r, v) = (resolver.clone(), verifier.clone());
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            // A rotation writes cert and key separately: wait for both.
            tokio::time::sleep(Duration::from_millis(200)).await;
            while rx.try_recv().is_ok() {}
            let key = load_key(&files, &provider);
            let ver = match (&files.client_ca, &v) {
                (Some(ca), Some(_)) => load_verifier(ca, &provider).map(Some),
                _ => Ok(None),
            };
            match (key, ver) {
                (Ok(k), Ok(ver)) => {
                    r.0.store(Arc::new(k));
                    if let (Some(slot), Some(new)) = (&v, ver) {
                        slot.0.store(Arc::new(new));
                    }
                    tracing::info!("TLS certificate and client CA reloaded");
                    on_reload(true);
                }
                (Err(e), _) | (_, Err(e)) => {
                    tracing::error!(error = %e, "TLS reload failed; keeping the previous certificate");
                    on_reload(false);
                }
            }
        }
    });
    Ok(ServerTls {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        mtls: verifier.is_some(),
        _watcher: Some(Box::new(watcher)),
    })
}

/// What a verified client certificate says, read once per connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientCert {
    pub uri_sans: Vec<String>,
    pub common_name: Option<String>,
}

/// Parses the end-entity certificate rustls already verified.
pub fn client_cert(der: &CertificateDer<'_>) -> Option<ClientCert> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let common_name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    let uri_sans = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Some(ClientCert {
        uri_sans,
        common_name,
    })
}
