//! rustls configuration for RFC 7250 raw public keys, Ed25519 only, TLS 1.3 only.
//!
//! The peer's "certificate" is the DER SubjectPublicKeyInfo of its Ed25519
//! key. That encoding has exactly one valid form for Ed25519, so it is parsed
//! by comparing a fixed prefix rather than with a general ASN.1 parser.

use std::fmt;
use std::sync::Arc;

use ed25519_dalek::pkcs8::EncodePrivateKey;
use ed25519_dalek::{Signature, SigningKey, VerifyingKey};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::{LinkError, NodeKey, PeerSet};

/// ALPN protocol identifier of Shoal links.
pub const ALPN: &[u8] = b"shoal/1";

/// DER prefix of an Ed25519 SubjectPublicKeyInfo: SEQUENCE(42) { SEQUENCE(5)
/// { OID 1.3.101.112 }, BIT STRING(33) with no unused bits }.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Encode an Ed25519 public key as the SubjectPublicKeyInfo DER that RFC 7250 puts on the wire.
pub fn ed25519_spki(key: &NodeKey) -> [u8; 44] {
    let mut out = [0u8; 44];
    out[..12].copy_from_slice(&ED25519_SPKI_PREFIX);
    out[12..].copy_from_slice(key);
    out
}

/// Parse an Ed25519 SubjectPublicKeyInfo DER; `None` for anything else.
pub fn parse_ed25519_spki(der: &[u8]) -> Option<NodeKey> {
    let key = der.strip_prefix(&ED25519_SPKI_PREFIX)?;
    key.try_into().ok()
}

/// The node's own raw public key with its signer, loaded once per endpoint.
#[derive(Clone)]
pub(crate) struct Identity {
    provider: Arc<CryptoProvider>,
    key: Arc<CertifiedKey>,
}

// The signer holds the private key; print nothing about it.
impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Identity")
    }
}

impl Identity {
    /// Load `identity` into the ring provider (TLS 1.3 is enforced at the config builders).
    pub(crate) fn new(identity: &SigningKey) -> Result<Self, LinkError> {
        let config_err = |detail: String| LinkError::Config {
            context: "load node identity",
            detail,
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let pkcs8 = identity
            .to_pkcs8_der()
            .map_err(|e| config_err(e.to_string()))?;
        // `pkcs8` is a `SecretDocument`, zeroized on drop. Borrow it rather than copy it
        // into an owned `PrivateKeyDer` (which `load_private_key` would take and free
        // without zeroizing). The loaded ring key pair keeps its own copy: see
        // docs/threat-model.md, "Secrets in memory".
        let signer =
            rustls::crypto::ring::sign::any_eddsa_type(&PrivatePkcs8KeyDer::from(pkcs8.as_bytes()))
                .map_err(|e| config_err(e.to_string()))?;
        let spki = ed25519_spki(&identity.verifying_key().to_bytes());
        let key = Arc::new(CertifiedKey::new(
            vec![CertificateDer::from(spki.to_vec())],
            signer,
        ));
        Ok(Self { provider, key })
    }
}

/// Server side of every link: presents our key, requires a client key in `accept_from`.
pub(crate) fn server_config(
    identity: &Identity,
    accept_from: PeerSet,
) -> Result<rustls::ServerConfig, LinkError> {
    let mut config = rustls::ServerConfig::builder_with_provider(identity.provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| LinkError::Config {
            context: "TLS server versions",
            detail: e.to_string(),
        })?
        .with_client_cert_verifier(Arc::new(PeerSetVerifier { accept_from }))
        .with_cert_resolver(Arc::new(
            rustls::server::AlwaysResolvesServerRawPublicKeys::new(identity.key.clone()),
        ));
    config.alpn_protocols = vec![ALPN.to_vec()];
    // No resumption: every handshake proves the keys again, so a PeerSet update
    // applies to every new connection.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// Client side of one dial: presents our key, requires the server to prove `expected`.
pub(crate) fn client_config(
    identity: &Identity,
    expected: NodeKey,
) -> Result<rustls::ClientConfig, LinkError> {
    let mut config = rustls::ClientConfig::builder_with_provider(identity.provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| LinkError::Config {
            context: "TLS client versions",
            detail: e.to_string(),
        })?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedVerifier { expected }))
        .with_client_cert_resolver(Arc::new(
            rustls::client::AlwaysResolvesClientRawPublicKeys::new(identity.key.clone()),
        ));
    config.alpn_protocols = vec![ALPN.to_vec()];
    // All servers share one placeholder name, so a resumption cache keyed by
    // name could resume a session with a server other than the pinned one.
    config.resumption = rustls::client::Resumption::disabled();
    config.enable_sni = false;
    config.enable_early_data = false;
    Ok(config)
}

/// Check a TLS 1.3 CertificateVerify signature made with a raw Ed25519 key.
fn verify_ed25519(
    message: &[u8],
    cert: &CertificateDer<'_>,
    scheme: SignatureScheme,
    signature: &[u8],
) -> Result<HandshakeSignatureValid, rustls::Error> {
    if scheme != SignatureScheme::ED25519 {
        return Err(rustls::Error::PeerMisbehaved(
            rustls::PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme,
        ));
    }
    let key = parse_ed25519_spki(cert).ok_or(rustls::Error::InvalidCertificate(
        CertificateError::BadEncoding,
    ))?;
    let bad_sig = || rustls::Error::InvalidCertificate(CertificateError::BadSignature);
    let key = VerifyingKey::from_bytes(&key).map_err(|_| bad_sig())?;
    let sig = Signature::from_slice(signature).map_err(|_| bad_sig())?;
    key.verify_strict(message, &sig).map_err(|_| bad_sig())?;
    Ok(HandshakeSignatureValid::assertion())
}

/// TLS 1.2 is never negotiated (the configs are TLS 1.3 only); refuse just in case.
fn refuse_tls12() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::PeerIncompatible(
        rustls::PeerIncompatible::Tls12NotOffered,
    ))
}

/// Accepts a single leaf, an Ed25519 SPKI, whose key passes `allowed`.
fn check_leaf(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    allowed: impl FnOnce(&NodeKey) -> bool,
) -> Result<(), rustls::Error> {
    if !intermediates.is_empty() {
        return Err(rustls::Error::InvalidCertificate(
            CertificateError::BadEncoding,
        ));
    }
    let key = parse_ed25519_spki(end_entity).ok_or(rustls::Error::InvalidCertificate(
        CertificateError::BadEncoding,
    ))?;
    if allowed(&key) {
        Ok(())
    } else {
        tracing::trace!("refusing a peer key that is not allowed");
        Err(rustls::Error::InvalidCertificate(
            CertificateError::ApplicationVerificationFailure,
        ))
    }
}

/// Server certificate verifier pinned to one key.
struct PinnedVerifier {
    expected: NodeKey,
}

// Hand-written so that the pinned key never appears in debug output.
impl fmt::Debug for PinnedVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PinnedVerifier")
    }
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        check_leaf(end_entity, intermediates, |k| *k == self.expected)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        refuse_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_ed25519(message, cert, dss.scheme, dss.signature())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

/// Client certificate verifier backed by a shared [`PeerSet`].
#[derive(Debug)]
struct PeerSetVerifier {
    accept_from: PeerSet,
}

impl ClientCertVerifier for PeerSetVerifier {
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
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        check_leaf(end_entity, intermediates, |k| self.accept_from.contains(k))?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        refuse_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_ed25519(message, cert, dss.scheme, dss.signature())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn spki_matches_ring_encoding() {
        // ring's signer knows its own SPKI; ours must be byte-identical.
        let sk = SigningKey::from_bytes(&[7; 32]);
        let id = Identity::new(&sk).unwrap();
        let ring_spki = id.key.key.public_key().unwrap();
        assert_eq!(
            ring_spki.as_ref(),
            &ed25519_spki(&sk.verifying_key().to_bytes())[..]
        );
    }

    #[test]
    fn spki_parse_rejects_other_shapes() {
        let key = [5u8; 32];
        let good = ed25519_spki(&key);
        assert_eq!(parse_ed25519_spki(&good), Some(key));
        assert_eq!(parse_ed25519_spki(&good[..43]), None);
        let mut long = good.to_vec();
        long.push(0);
        assert_eq!(parse_ed25519_spki(&long), None);
        let mut other_oid = good;
        other_oid[8] = 0x71; // Ed448
        assert_eq!(parse_ed25519_spki(&other_oid), None);
        assert_eq!(parse_ed25519_spki(&[]), None);
    }

    #[test]
    fn ed25519_signature_checked() {
        use ed25519_dalek::Signer;
        let sk = SigningKey::from_bytes(&[3; 32]);
        let cert = CertificateDer::from(ed25519_spki(&sk.verifying_key().to_bytes()).to_vec());
        let sig = sk.sign(b"transcript").to_bytes();
        let ed = SignatureScheme::ED25519;
        assert!(verify_ed25519(b"transcript", &cert, ed, &sig).is_ok());
        assert!(verify_ed25519(b"other", &cert, ed, &sig).is_err());
        assert!(verify_ed25519(b"transcript", &cert, ed, &sig[..10]).is_err());
        let p256 = SignatureScheme::ECDSA_NISTP256_SHA256;
        assert!(verify_ed25519(b"transcript", &cert, p256, &sig).is_err());
        let wrong = CertificateDer::from(ed25519_spki(&[9; 32]).to_vec());
        assert!(verify_ed25519(b"transcript", &wrong, ed, &sig).is_err());
        assert!(
            verify_ed25519(
                b"transcript",
                &CertificateDer::from(vec![0u8; 44]),
                ed,
                &sig
            )
            .is_err()
        );
    }

    #[test]
    fn tls12_refused() {
        assert!(refuse_tls12().is_err());
    }
}
