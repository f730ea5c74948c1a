//! TLS client configuration for the HTTP transport: strict unless told otherwise in writing.
//!
//! [`client_config`] turns a [`TlsOptions`] into an `Arc<rustls::ClientConfig>` that the HTTP
//! transport hands to its HTTP stack (`reqwest::ClientBuilder::use_preconfigured_tls`, or a
//! hyper-rustls connector). This module owns every trust decision; the transport owns none.
//!
//! # Defaults
//! - **Protocol**: TLS 1.3 and TLS 1.2 only; SNI on; the server name is verified against the
//!   certificate (rustls' webpki verifier: chain to a trusted root, validity period, hostname,
//!   key usage).
//! - **Crypto**: rustls with the `ring` provider, chosen explicitly (never the process-wide
//!   default), so the same code compiles and behaves alike on Linux, macOS and Windows, and a
//!   dependency that enables `aws-lc-rs` elsewhere cannot change it. `ring` cross-builds for
//!   Windows without cmake or nasm.
//! - **Roots** ([`RootSource`]): the operating system's trust store, read with
//!   `rustls-native-certs` (Linux: the distribution bundle, honouring `SSL_CERT_FILE` /
//!   `SSL_CERT_DIR`; macOS: the keychains' trust settings; Windows: the system certificate store).
//!   If that store yields no usable certificate the bundled Mozilla roots (`webpki-roots`) are
//!   used instead, with a log line. The platform store is read once per process and cached.
//!
//! # Options
//! - Extra CA files (PEM, one or more certificates each) are trusted *in addition* to the roots;
//!   [`RootSource::None`] trusts only them (a private PKI).
//! - A client identity (certificate chain + private key, PEM) for servers that demand mutual
//!   TLS. The key must match the first certificate; a mismatch is an error at build time, not a
//!   confusing handshake failure later.
//! - [`TlsOptions::danger_accept_invalid_certs`] turns certificate verification off. Every
//!   handshake made with such a configuration reports a warning through the warning sink
//!   (stderr by default), naming the server. TLS session resumption is disabled in that mode so
//!   that no connection can skip the check, and thus the warning. Handshake signatures are
//!   still verified (against whatever certificate the server sent), which protects nothing
//!   against an active attacker: the name says so.
//!
//! # Errors
//! Configuration errors ([`TlsError`]) name the file and what was wrong with it. Handshake
//! failures surface later through the HTTP stack; [`TlsRejection::find`] digs the
//! `rustls::Error` out of any error chain and turns it into a one-line explanation with a hint.
//!
//! # Limits
//! No certificate revocation checks (no CRL or OCSP fetching: this client has no reliable way to
//! reach them); no certificate pinning; encrypted private keys are not supported (decrypt them
//! first).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, InconsistentKeys,
    RootCertStore, SignatureScheme,
};

/// Where the trusted root certificates come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum RootSource {
    /// The operating system's trust store; the bundled Mozilla roots if it holds none.
    #[default]
    Platform,
    /// The Mozilla roots compiled into the binary (`webpki-roots`), ignoring the OS store.
    Bundled,
    /// No roots at all: only the extra CA files are trusted.
    None,
}

/// Receives the warnings of the dangerous no-verification mode. The default writes to stderr.
pub type WarningSink = Arc<dyn Fn(&str) + Send + Sync>;

/// A client certificate chain and its private key, both PEM files, for mutual TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientIdentity {
    /// PEM file with the client certificate first, then any intermediates.
    pub cert_file: PathBuf,
    /// PEM file with the private key (PKCS#8, PKCS#1 RSA or SEC1 EC; not encrypted).
    pub key_file: PathBuf,
}

impl ClientIdentity {
    /// A client identity from a certificate file and a key file.
    pub fn new(cert_file: impl Into<PathBuf>, key_file: impl Into<PathBuf>) -> Self {
        Self {
            cert_file: cert_file.into(),
            key_file: key_file.into(),
        }
    }
}

/// What to trust and how to identify ourselves. `TlsOptions::default()` is the strict default.
#[derive(Clone, Default)]
#[non_exhaustive]
pub struct TlsOptions {
    /// Where the trusted roots come from.
    pub roots: RootSource,
    /// PEM files whose certificates are trusted as roots in addition to [`Self::roots`].
    pub extra_ca_files: Vec<PathBuf>,
    /// Client certificate and key for servers that require mutual TLS.
    pub client_identity: Option<ClientIdentity>,
    /// Accept any server certificate. Dangerous: see the module docs.
    pub danger_accept_invalid_certs: bool,
    /// ALPN protocols to offer (e.g. `h2`, `http/1.1`); empty offers none.
    pub alpn_protocols: Vec<Vec<u8>>,
    /// Where the no-verification warnings go; `None` means stderr.
    pub warning_sink: Option<WarningSink>,
}

impl fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsOptions")
            .field("roots", &self.roots)
            .field("extra_ca_files", &self.extra_ca_files)
            .field("client_identity", &self.client_identity)
            .field(
                "danger_accept_invalid_certs",
                &self.danger_accept_invalid_certs,
            )
            .field("alpn_protocols", &self.alpn_protocols)
            .field(
                "warning_sink",
                &self.warning_sink.as_ref().map(|_| "custom"),
            )
            .finish()
    }
}

impl TlsOptions {
    /// The strict default: platform roots, hostname verification, no client certificate.
    pub fn new() -> Self {
        Self::default()
    }

    /// Use these roots instead of the platform store.
    pub fn with_roots(mut self, roots: RootSource) -> Self {
        self.roots = roots;
        self
    }

    /// Also trust the CA certificates in this PEM file.
    pub fn with_extra_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.extra_ca_files.push(path.into());
        self
    }

    /// Present this client certificate when the server asks for one.
    pub fn with_client_identity(mut self, identity: ClientIdentity) -> Self {
        self.client_identity = Some(identity);
        self
    }

    /// Offer these ALPN protocols.
    pub fn with_alpn_protocols(mut self, protocols: Vec<Vec<u8>>) -> Self {
        self.alpn_protocols = protocols;
        self
    }

    /// Send the no-verification warnings here instead of stderr.
    pub fn with_warning_sink(mut self, sink: WarningSink) -> Self {
        self.warning_sink = Some(sink);
        self
    }

    /// Turn server certificate verification off (or back on). Every handshake then warns.
    pub fn danger_accept_invalid_certs(mut self, accept: bool) -> Self {
        self.danger_accept_invalid_certs = accept;
        self
    }
}

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {what} {}", path.display())]
    Read {
        /// Which file it was ("CA file", "client certificate", "client key").
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file is not valid PEM.
    #[error("{what} {} is not valid PEM", path.display())]
    Pem {
        /// Which file it was.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The PEM decoding error.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// A file holds no certificate.
    #[error("{what} {} holds no PEM certificate (expected a '-----BEGIN CERTIFICATE-----' block)", path.display())]
    NoCertificate {
        /// Which file it was.
        what: &'static str,
        /// Its path.
        path: PathBuf,
    },
    /// The key file holds no private key.
    #[error("client key {} holds no PEM private key (expected PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY; encrypted keys are not supported)", path.display())]
    NoPrivateKey {
        /// Its path.
        path: PathBuf,
    },
    /// A CA certificate cannot serve as a trust anchor.
    #[error("CA file {} holds a certificate that cannot be used as a trusted root", path.display())]
    BadCaCertificate {
        /// Its path.
        path: PathBuf,
        /// Why rustls refused it.
        #[source]
        source: Box<rustls::Error>,
    },
    /// The private key does not belong to the certificate.
    #[error("client key {} does not match client certificate {}", key.display(), cert.display())]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The client certificate or key is unusable for another reason (unsupported key type...).
    #[error("client certificate {} with key {} is not usable", cert.display(), key.display())]
    ClientIdentity {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// Why rustls refused it.
        #[source]
        source: Box<rustls::Error>,
    },
    /// Nothing would be trusted.
    #[error("no trusted root certificates: the chosen root source is empty and no CA file was given (add one with --ca-file)")]
    NoRoots,
    /// rustls refused the protocol settings (not expected with this module's fixed choices).
    #[error("cannot set up TLS")]
    Setup(#[source] Box<rustls::Error>),
}

/// The crypto provider every configuration of this module uses.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the rustls client configuration for `opts`.
///
/// Reads every file named in `opts` now, so a bad path fails here with a clear error rather
/// than at the first connection.
pub fn client_config(opts: &TlsOptions) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Setup(Box::new(e)))?;

    let builder = if opts.danger_accept_invalid_certs {
        let sink = opts
            .warning_sink
            .clone()
            .unwrap_or_else(|| Arc::new(|msg: &str| eprintln!("vmcp: {msg}")));
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyServerCert {
                provider: provider.clone(),
                sink,
            }))
    } else {
        builder.with_root_certificates(root_store(opts)?)
    };

    let mut config = match &opts.client_identity {
        None => builder.with_no_client_auth(),
        Some(id) => {
            let certs = load_certificates("client certificate", &id.cert_file)?;
            let key = load_private_key(&id.key_file)?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|source| match source {
                    rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch) => {
                        TlsError::KeyMismatch {
                            cert: id.cert_file.clone(),
                            key: id.key_file.clone(),
                        }
                    }
                    source => TlsError::ClientIdentity {
                        cert: id.cert_file.clone(),
                        key: id.key_file.clone(),
                        source: Box::new(source),
                    },
                })?
        }
    };
    config.alpn_protocols = opts.alpn_protocols.clone();
    if opts.danger_accept_invalid_certs {
        // A resumed session skips certificate verification, and with it the warning.
        config.resumption = Resumption::disabled();
    }
    Ok(Arc::new(config))
}

/// The trusted roots for `opts` (not used in the no-verification mode).
pub fn root_store(opts: &TlsOptions) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    match opts.roots {
        RootSource::Platform => store.roots.extend(platform_roots().roots.iter().cloned()),
        RootSource::Bundled => store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        RootSource::None => {}
    }
    for path in &opts.extra_ca_files {
        for cert in load_certificates("CA file", path)? {
            store
                .add(cert)
                .map_err(|source| TlsError::BadCaCertificate {
                    path: path.clone(),
                    source: Box::new(source),
                })?;
        }
    }
    if store.is_empty() {
        return Err(TlsError::NoRoots);
    }
    Ok(store)
}

/// The platform's roots, read once per process; the bundled roots if the platform has none.
fn platform_roots() -> &'static RootCertStore {
    static ROOTS: OnceLock<RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let loaded = rustls_native_certs::load_native_certs();
        for err in &loaded.errors {
            tracing::debug!("platform trust store: {err}");
        }
        let mut store = RootCertStore::empty();
        let (added, ignored) = store.add_parsable_certificates(loaded.certs);
        tracing::debug!("platform trust store: {added} roots, {ignored} unusable");
        if store.is_empty() {
            tracing::warn!(
                "the platform trust store holds no usable root certificate; using the bundled Mozilla roots"
            );
            store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
        store
    })
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Every certificate in the PEM file at `path`, in file order; at least one.
pub fn load_certificates(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            what,
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The first private key in the PEM file at `path`.
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_file("client key", path)?;
    match PrivateKeyDer::from_pem_slice(&pem) {
        Ok(key) => Ok(key),
        Err(rustls::pki_types::pem::Error::NoItemsFound) => Err(TlsError::NoPrivateKey {
            path: path.to_path_buf(),
        }),
        Err(source) => Err(TlsError::Pem {
            what: "client key",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The verifier of the dangerous mode: accepts any certificate, warns on every handshake.
struct AcceptAnyServerCert {
    provider: Arc<CryptoProvider>,
    sink: WarningSink,
}

impl fmt::Debug for AcceptAnyServerCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AcceptAnyServerCert")
    }
}

impl ServerCertVerifier for AcceptAnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let name = server_name.to_str();
        (self.sink)(&format!(
            "WARNING: TLS certificate verification is OFF: accepting the certificate of {name} unchecked \
             (danger-accept-invalid-certs); anyone on the network path can read and change this connection"
        ));
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Why a TLS handshake was rejected, in terms a user can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TlsRejection {
    /// The server's certificate does not chain to a trusted root.
    UnknownIssuer,
    /// The server's certificate has expired.
    Expired,
    /// The server's certificate is not valid yet (or the local clock is wrong).
    NotValidYet,
    /// The server's certificate is not valid for the name we connected to.
    WrongHostname,
    /// The server's certificate has been revoked.
    Revoked,
    /// The server's certificate is unusable for another reason.
    BadCertificate(String),
    /// The server requires a client certificate and we sent none.
    ClientCertificateRequired,
    /// The server rejected our client certificate.
    ClientCertificateRejected,
    /// No TLS version or cipher suite in common with the server.
    Incompatible(String),
    /// The server ended the handshake without saying why (alert `handshake_failure`): servers
    /// send it when a required client certificate is missing, or when nothing is in common.
    HandshakeRefused,
    /// Another TLS failure.
    Other(String),
}

impl fmt::Display for TlsRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownIssuer => f.write_str(
                "TLS: the server certificate is signed by an unknown authority (trust its CA with --ca-file)",
            ),
            Self::Expired => f.write_str("TLS: the server certificate has expired"),
            Self::NotValidYet => f.write_str(
                "TLS: the server certificate is not valid yet (check this machine's clock)",
            ),
            Self::WrongHostname => f.write_str(
                "TLS: the server certificate is not valid for this host name (connect with a name the certificate lists)",
            ),
            Self::Revoked => f.write_str("TLS: the server certificate has been revoked"),
            Self::BadCertificate(why) => write!(f, "TLS: the server certificate is unusable: {why}"),
            Self::ClientCertificateRequired => f.write_str(
                "TLS: the server requires a client certificate (give --client-cert and --client-key)",
            ),
            Self::ClientCertificateRejected => {
                f.write_str("TLS: the server rejected our client certificate")
            }
            Self::Incompatible(why) => {
                write!(f, "TLS: no protocol version or cipher in common with the server: {why}")
            }
            Self::HandshakeRefused => f.write_str(
                "TLS: the server refused the handshake (it may require a client certificate: give --client-cert and --client-key)",
            ),
            Self::Other(why) => write!(f, "TLS: {why}"),
        }
    }
}

impl TlsRejection {
    /// Classifies a rustls error.
    pub fn from_rustls(err: &rustls::Error) -> Self {
        use rustls::Error as E;
        match err {
            E::InvalidCertificate(cert) => match cert {
                CertificateError::UnknownIssuer => Self::UnknownIssuer,
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    Self::Expired
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    Self::NotValidYet
                }
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => Self::WrongHostname,
                CertificateError::Revoked => Self::Revoked,
                other => Self::BadCertificate(format!("{other:?}")),
            },
            E::AlertReceived(AlertDescription::CertificateRequired) => {
                Self::ClientCertificateRequired
            }
            E::AlertReceived(
                AlertDescription::BadCertificate
                | AlertDescription::UnknownCA
                | AlertDescription::CertificateUnknown
                | AlertDescription::CertificateExpired
                | AlertDescription::CertificateRevoked
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::AccessDenied,
            ) => Self::ClientCertificateRejected,
            E::AlertReceived(AlertDescription::HandshakeFailure) => Self::HandshakeRefused,
            E::AlertReceived(
                alert
                @ (AlertDescription::ProtocolVersion | AlertDescription::InsufficientSecurity),
            ) => Self::Incompatible(format!("server sent alert {alert:?}")),
            E::PeerIncompatible(why) => Self::Incompatible(format!("{why:?}")),
            other => Self::Other(other.to_string()),
        }
    }

    /// Finds a rustls error anywhere in `err`'s source chain (including inside `std::io::Error`
    /// wrappers, which hide their payload from `source()`) and classifies it.
    pub fn find(err: &(dyn std::error::Error + 'static)) -> Option<Self> {
        let mut next = Some(err);
        while let Some(e) = next {
            if let Some(tls) = e.downcast_ref::<rustls::Error>() {
                return Some(Self::from_rustls(tls));
            }
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                if let Some(inner) = io.get_ref() {
                    if let Some(found) = Self::find(inner) {
                        return Some(found);
                    }
                }
            }
            next = e.source();
        }
        None
    }

    /// Whether retrying cannot help: the peer's certificate or ours was judged, not the network.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::UnknownIssuer
            | Self::Expired
            | Self::NotValidYet
            | Self::WrongHostname
            | Self::Revoked
            | Self::BadCertificate(_)
            | Self::ClientCertificateRequired
            | Self::ClientCertificateRejected
            | Self::Incompatible(_)
            | Self::HandshakeRefused => true,
            Self::Other(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_options_are_strict() {
        let opts = TlsOptions::new();
        assert_eq!(opts.roots, RootSource::Platform);
        assert!(!opts.danger_accept_invalid_certs);
        assert!(opts.client_identity.is_none());
        let config = client_config(&opts).unwrap();
        assert!(config.enable_sni);
        assert!(config.alpn_protocols.is_empty());
    }

    #[test]
    fn no_roots_is_an_error() {
        let err = root_store(&TlsOptions::new().with_roots(RootSource::None)).unwrap_err();
        assert!(matches!(err, TlsError::NoRoots), "{err}");
    }

    #[test]
    fn bundled_roots_are_not_empty() {
        let store = root_store(&TlsOptions::new().with_roots(RootSource::Bundled)).unwrap();
        assert!(store.len() > 50, "{}", store.len());
    }

    #[test]
    fn missing_ca_file_names_the_path() {
        let err = client_config(&TlsOptions::new().with_extra_ca_file("/nonexistent/ca.pem"))
            .unwrap_err();
        let msg = err.to_string();
        assert_eq!(msg, "cannot read CA file /nonexistent/ca.pem");
    }

    #[test]
    fn rejection_display_is_one_line() {
        for r in [
            TlsRejection::UnknownIssuer,
            TlsRejection::Expired,
            TlsRejection::NotValidYet,
            TlsRejection::WrongHostname,
            TlsRejection::Revoked,
            TlsRejection::BadCertificate("x".into()),
            TlsRejection::ClientCertificateRequired,
            TlsRejection::ClientCertificateRejected,
            TlsRejection::Incompatible("y".into()),
            TlsRejection::HandshakeRefused,
            TlsRejection::Other("z".into()),
        ] {
            let s = r.to_string();
            assert!(s.starts_with("TLS: ") && !s.contains('\n'), "{s}");
            assert_eq!(r.is_permanent(), !matches!(r, TlsRejection::Other(_)));
        }
    }

    #[test]
    fn find_digs_through_io_errors() {
        let inner = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, inner);
        #[derive(Debug, thiserror::Error)]
        #[error("request failed")]
        struct Outer(#[source] std::io::Error);
        let outer = Outer(io);
        assert_eq!(
            TlsRejection::find(&outer),
            Some(TlsRejection::UnknownIssuer)
        );
        for (alert, expected) in [
            (
                AlertDescription::HandshakeFailure,
                TlsRejection::HandshakeRefused,
            ),
            (
                AlertDescription::CertificateRequired,
                TlsRejection::ClientCertificateRequired,
            ),
            (
                AlertDescription::UnknownCA,
                TlsRejection::ClientCertificateRejected,
            ),
            (
                AlertDescription::ProtocolVersion,
                TlsRejection::Incompatible("server sent alert ProtocolVersion".into()),
            ),
        ] {
            assert_eq!(
                TlsRejection::from_rustls(&rustls::Error::AlertReceived(alert)),
                expected
            );
        }
        let plain = std::io::Error::other("nothing to see");
        assert_eq!(TlsRejection::find(&plain), None);
    }
}
