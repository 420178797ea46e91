//! mTLS between agents, as ztunnel does it: TLS 1.3 only, ALPN `h2`, no SNI,
//! no session resumption, both sides presenting an SVID. Peers are verified
//! against the node's trust bundle (read at every handshake, so a new bundle
//! applies to the next connection and never disturbs running ones) and by
//! SPIFFE ID: the client accepts only the identity the state says the
//! destination runs as; the server learns the client's identity from its
//! certificate, never from anything the client says.

use std::sync::Arc;

use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    server::{
        NoServerSessionStorage,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::identity::{Identity, manager::TrustBundle, svid::Svid};

pub const ALPN_H2: &[u8] = b"h2";

/// The crypto provider: aws-lc-rs, measured faster than ring on this
/// hardware for both handshakes and AES-GCM (docs/architecture.md).
///
/// Its TLS 1.3 suites are offered AES-128-GCM first (the default puts
/// AES-256 first): ten AES rounds instead of fourteen, about 1.4x the sealing
/// rate on this machine's CPU, and the suite TLS 1.3 requires every peer to support.
/// A peer that prefers another suite still gets it.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            use rustls::crypto::aws_lc_rs::{cipher_suite, default_provider};
            Arc::new(CryptoProvider {
                cipher_suites: vec![
                    cipher_suite::TLS13_AES_128_GCM_SHA256,
                    cipher_suite::TLS13_AES_256_GCM_SHA384,
                    cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
                ],
                ..default_provider()
            })
        })
        .clone()
}

/// The SPIFFE ID in a certificate's URI SAN (exactly one, as SPIFFE requires).
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<Identity, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?
        .ok_or("no subjectAltName")?;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let (Some(uri), None) = (uris.next(), uris.next()) else {
        return Err("not exactly one URI SAN".into());
    };
    uri.parse()
        .map_err(|e: crate::identity::IdentityError| e.to_string())
}

/// When a certificate expires.
pub fn not_after(cert: &CertificateDer<'_>) -> Option<std::time::SystemTime> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let secs = u64::try_from(parsed.validity().not_after.timestamp()).ok()?;
    Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

fn other(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct IdentityMismatch(String);

/// Verifies a peer's chain against the bundle, and its SPIFFE ID.
#[derive(Debug)]
struct SpiffeVerifier {
    bundle: TrustBundle,
    algorithms: WebPkiSupportedAlgorithms,
    /// Client side: the only identity the server may have.
    expected: Option<Identity>,
}

impl SpiffeVerifier {
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<Identity, Error> {
        let roots = self.bundle.roots();
        let anchors = roots
            .iter()
            .filter_map(|r| webpki::anchor_from_trusted_cert(r).ok())
            .collect::<Vec<_>>();
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|e| match e {
            webpki::Error::BadDer => Error::InvalidCertificate(CertificateError::BadEncoding),
            e => other(e),
        })?;
        cert.verify_for_usage(
            self.algorithms.all,
            &anchors,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(|e| match e {
            webpki::Error::UnknownIssuer => {
                Error::InvalidCertificate(CertificateError::UnknownIssuer)
            }
            webpki::Error::CertExpired { .. } => {
                Error::InvalidCertificate(CertificateError::Expired)
            }
            webpki::Error::CertNotValidYet { .. } => {
                Error::InvalidCertificate(CertificateError::NotValidYet)
            }
            e => other(e),
        })?;
        let identity = identity_of(end_entity).map_err(|e| other(IdentityMismatch(e)))?;
        if let Some(expected) = &self.expected
            && &identity != expected
        {
            return Err(other(IdentityMismatch(format!(
                "the peer is {identity}, expected {expected}"
            ))));
        }
        Ok(identity)
    }
}

/// The signature checks, the same on both sides: TLS 1.3 only.
macro_rules! tls13_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &CertificateDer<'_>,
            _dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            Err(Error::PeerIncompatible(
                rustls::PeerIncompatible::Tls12NotOffered,
            ))
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.algorithms.supported_schemes()
        }
    };
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        self.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        Ok(ServerCertVerified::assertion())
    }

    tls13_signatures!();
}

impl ClientCertVerifier for SpiffeVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        Ok(ClientCertVerified::assertion())
    }

    tls13_signatures!();
}

/// Making a TLS config from an SVID fails only if the SVID is unusable.
#[derive(Debug, thiserror::Error)]
#[error("the certificate of {identity} is unusable for TLS: {source}")]
pub struct ConfigError {
    identity: String,
    #[source]
    source: Error,
}

/// The client side of an HBONE connection from `svid`'s workload to a peer
/// that must be `expected`.
pub fn client_config(
    svid: &Svid,
    expected: Identity,
    bundle: &TrustBundle,
) -> Result<Arc<rustls::ClientConfig>, ConfigError> {
    client_config_with(provider(), svid, expected, bundle)
}

/// `client_config` with another provider (tests offer other suites).
fn client_config_with(
    provider: Arc<CryptoProvider>,
    svid: &Svid,
    expected: Identity,
    bundle: &TrustBundle,
) -> Result<Arc<rustls::ClientConfig>, ConfigError> {
    let verifier = Arc::new(SpiffeVerifier {
        bundle: bundle.clone(),
        algorithms: provider.signature_verification_algorithms,
        expected: Some(expected),
    });
    let fail = |source| ConfigError {
        identity: svid.identity.to_string(),
        source,
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(fail)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(svid.chain.clone(), svid.key())
        .map_err(fail)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// The server side, presenting `svid` (the dialled workload's) and
/// requiring a client certificate from the bundle's roots.
pub fn server_config(
    svid: &Svid,
    bundle: &TrustBundle,
) -> Result<Arc<rustls::ServerConfig>, ConfigError> {
    let provider = provider();
    let verifier = Arc::new(SpiffeVerifier {
        bundle: bundle.clone(),
        algorithms: provider.signature_verification_algorithms,
        expected: None,
    });
    let fail = |source| ConfigError {
        identity: svid.identity.to_string(),
        source,
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(fail)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(svid.chain.clone(), svid.key())
        .map_err(fail)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The verified client's identity, after a server handshake.
pub fn peer_identity(conn: &rustls::ServerConnection) -> Option<Identity> {
    conn.peer_certificates()
        .and_then(|c| c.first())
        .and_then(|leaf| identity_of(leaf).ok())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::identity::ca::Ca;

    fn id(sa: &str) -> Identity {
        Identity::new("cluster.local", "shop", sa)
    }

    /// A CA, its bundle, the client `web`'s SVID and the server config of `db`.
    fn web_calls_db() -> (Ca, TrustBundle, Svid, Arc<rustls::ServerConfig>) {
        let ca = Ca::in_memory("cluster.local").unwrap();
        let bundle = TrustBundle::new(ca.roots());
        let life = Duration::from_secs(3600);
        let now = SystemTime::now();
        let web = ca.issue(&id("web"), life, now).unwrap();
        let db = ca.issue(&id("db"), life, now).unwrap();
        let server = server_config(&db, &bundle).unwrap();
        (ca, bundle, web, server)
    }

    /// One handshake over an in-memory pipe; the server's view of the client.
    async fn handshake(
        client: Arc<rustls::ClientConfig>,
        server: Arc<rustls::ServerConfig>,
    ) -> (Result<(), String>, Result<Option<Identity>, String>) {
        let (c, s) = handshake_with_suite(client, server).await;
        (c, s.map(|(peer, _)| peer))
    }

    /// A handshake, and the suite the server chose.
    async fn handshake_with_suite(
        client: Arc<rustls::ClientConfig>,
        server: Arc<rustls::ServerConfig>,
    ) -> (
        Result<(), String>,
        Result<(Option<Identity>, Option<rustls::CipherSuite>), String>,
    ) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let connector = tokio_rustls::TlsConnector::from(client);
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        let (c, s) = tokio::join!(
            async {
                let mut s = connector
                    .connect(name, a)
                    .await
                    .map_err(|e| e.to_string())?;
                s.write_all(b"x").await.map_err(|e| e.to_string())?;
                s.flush().await.map_err(|e| e.to_string())?;
                let mut buf = [0u8; 1];
                s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
                Ok(())
            },
            async {
                let mut s = acceptor.accept(b).await.map_err(|e| e.to_string())?;
                let mut buf = [0u8; 1];
                s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
                s.write_all(b"y").await.map_err(|e| e.to_string())?;
                s.flush().await.map_err(|e| e.to_string())?;
                let (_, conn) = s.get_ref();
                assert_eq!(conn.alpn_protocol(), Some(ALPN_H2));
                assert_eq!(
                    conn.protocol_version(),
                    Some(rustls::ProtocolVersion::TLSv1_3)
                );
                let suite = conn.negotiated_cipher_suite().map(|s| s.suite());
                Ok((peer_identity(conn), suite))
            }
        );
        (c, s)
    }

    #[tokio::test]
    async fn agents_agree_on_aes_128_and_a_peer_preferring_another_suite_gets_it() {
        let (_, bundle, web, server) = web_calls_db();

        let (c, s) = handshake_with_suite(
            client_config(&web, id("db"), &bundle).unwrap(),
            server.clone(),
        )
        .await;
        assert_eq!(c, Ok(()));
        assert_eq!(
            s.unwrap().1,
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );

        // A client that prefers another suite: the server follows its order.
        let mut reversed = (*provider()).clone();
        reversed.cipher_suites.reverse();
        let other = client_config_with(Arc::new(reversed), &web, id("db"), &bundle).unwrap();
        let (c, s) = handshake_with_suite(other, server).await;
        assert_eq!(c, Ok(()));
        assert_eq!(
            s.unwrap().1,
            Some(rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256)
        );
    }

    #[tokio::test]
    async fn mutual_tls_checks_the_chain_and_the_expected_identity() {
        let (ca, bundle, web, server) = web_calls_db();
        let life = Duration::from_secs(3600);
        let now = SystemTime::now();

        // The expected identity: accepted, and the server sees the client's.
        let (c, s) = handshake(
            client_config(&web, id("db"), &bundle).unwrap(),
            server.clone(),
        )
        .await;
        assert_eq!(c, Ok(()));
        assert_eq!(s, Ok(Some(id("web"))));

        // Any other identity, though the chain is good: refused by the client.
        let (c, _) = handshake(
            client_config(&web, id("api"), &bundle).unwrap(),
            server.clone(),
        )
        .await;
        assert!(
            c.unwrap_err()
                .contains("expected spiffe://cluster.local/ns/shop/sa/api")
        );

        // A client from another CA: refused by the server.
        let other = Ca::in_memory("cluster.local").unwrap();
        let stranger = other.issue(&id("web"), life, now).unwrap();
        let (_, s) = handshake(
            client_config(&stranger, id("db"), &bundle).unwrap(),
            server.clone(),
        )
        .await;
        assert!(s.is_err(), "{s:?}");

        // An expired client certificate: refused.
        let old = ca
            .issue(
                &id("web"),
                Duration::from_secs(10),
                now - Duration::from_secs(3600),
            )
            .unwrap();
        let (_, s) = handshake(
            client_config(&old, id("db"), &bundle).unwrap(),
            server.clone(),
        )
        .await;
        assert!(s.unwrap_err().to_lowercase().contains("expired"));

        // A new bundle applies to the next handshake.
        bundle.replace(other.roots());
        let (c, _) = handshake(client_config(&web, id("db"), &bundle).unwrap(), server).await;
        assert!(c.is_err(), "the old root is no longer trusted");
    }
}
