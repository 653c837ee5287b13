//! End-to-end seal of message bodies to the recipient's X25519 key.
//!
//! ```text
//! sealed body (BODY_SIZE)
//! | ephemeral X25519 public key (32) | ChaCha20-Poly1305 ciphertext (INNER_BODY_SIZE) | tag (16) |
//! ```
//! The key is `HKDF-SHA256(salt = ephemeral pub || recipient pub, ikm = X25519(e, R),
//! info = "shoal seal v1")`. A fresh ephemeral key per seal makes every key single-use,
//! so the nonce is fixed at zero. Binding both public keys into the salt stops a
//! sealed body from being re-targeted at another recipient with the same shared secret.
//!
//! The seal is anonymous: it says nothing about the sender. Sender authentication is
//! the job of the layer above (MLS credentials, a gateway's signed admin answer).
//! It lives in this crate, not the client's, because gateways open bodies too: their
//! admin endpoint takes subnet commands as sealed messages (`shoal-gateway`).

use chacha20poly1305::aead::AeadInOut;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit, Nonce, Tag};
use hkdf::Hkdf;
use rand::CryptoRng;
use sha2_0_11::Sha256;

use crate::payload::{BODY_SIZE, INNER_BODY_SIZE};
use x25519_dalek::{PublicKey, StaticSecret};

/// Bytes of the ephemeral public key at the front of a sealed body.
const EPHEMERAL_SIZE: usize = 32;
/// Bytes of the AEAD tag at the end of a sealed body.
const TAG_SIZE: usize = 16;
const INFO: &[u8] = b"shoal seal v1";

/// Why a body could not be sealed or opened. Deliberately coarse on opening: the
/// caller learns only that the body was not for it or was damaged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// The input had the wrong length.
    #[error("{what}: expected {expected} bytes, got {got}")]
    Length {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    /// The recipient key is a low-order point: every sender would share the same secret.
    #[error("recipient key is not a usable X25519 public key")]
    WeakKey,
    /// Authentication failed: the wrong key, or damaged bytes.
    #[error("sealed body does not open with this key")]
    Open,
}

fn derive_key(shared: &[u8; 32], ephemeral: &PublicKey, recipient: &PublicKey) -> ChaCha20Poly1305 {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(ephemeral.as_bytes());
    salt[32..].copy_from_slice(recipient.as_bytes());
    let hk = Hkdf::<Sha256>::new(Some(&salt), shared);
    // The derived key is wiped here and, inside the cipher, when the cipher is dropped
    // (chacha20poly1305's `zeroize` feature).
    let mut key = zeroize::Zeroizing::new([0u8; 32]);
    // 32 bytes is far below HKDF-SHA256's 8160-byte limit, so expand cannot fail.
    if hk.expand(INFO, &mut *key).is_err() {
        *key = [0u8; 32];
    }
    ChaCha20Poly1305::new((&*key).into())
}

/// Seals an inner body (exactly [`INNER_BODY_SIZE`] bytes) to `recipient`, giving exactly
/// [`BODY_SIZE`] bytes.
pub fn seal<R: CryptoRng + ?Sized>(
    rng: &mut R,
    recipient: &PublicKey,
    inner: &[u8],
) -> Result<Vec<u8>, SealError> {
    seal_with_ephemeral(&StaticSecret::random_from_rng(rng), recipient, inner)
}

/// [`seal`] with a caller-chosen ephemeral secret, for test vectors.
pub(crate) fn seal_with_ephemeral(
    ephemeral: &StaticSecret,
    recipient: &PublicKey,
    inner: &[u8],
) -> Result<Vec<u8>, SealError> {
    if inner.len() != INNER_BODY_SIZE {
        return Err(SealError::Length {
            what: "inner body",
            expected: INNER_BODY_SIZE,
            got: inner.len(),
        });
    }
    let shared = ephemeral.diffie_hellman(recipient);
    if !shared.was_contributory() {
        return Err(SealError::WeakKey);
    }
    let epk = PublicKey::from(ephemeral);
    let cipher = derive_key(shared.as_bytes(), &epk, recipient);
    let mut out = Vec::with_capacity(BODY_SIZE);
    out.extend_from_slice(epk.as_bytes());
    out.extend_from_slice(inner);
    let tag = cipher
        .encrypt_inout_detached(&Nonce::default(), &[], (&mut out[EPHEMERAL_SIZE..]).into())
        .map_err(|_| SealError::Length {
            what: "inner body",
            expected: INNER_BODY_SIZE,
            got: inner.len(),
        })?;
    out.extend_from_slice(&tag);
    Ok(out)
}

/// Opens a sealed body (exactly [`BODY_SIZE`] bytes) with the recipient's secret.
pub fn open(secret: &StaticSecret, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
    if sealed.len() != BODY_SIZE {
        return Err(SealError::Length {
            what: "sealed body",
            expected: BODY_SIZE,
            got: sealed.len(),
        });
    }
    let mut epk = [0u8; EPHEMERAL_SIZE];
    epk.copy_from_slice(&sealed[..EPHEMERAL_SIZE]);
    let epk = PublicKey::from(epk);
    let shared = secret.diffie_hellman(&epk);
    if !shared.was_contributory() {
        return Err(SealError::Open);
    }
    let cipher = derive_key(shared.as_bytes(), &epk, &PublicKey::from(secret));
    let mut body = sealed[EPHEMERAL_SIZE..BODY_SIZE - TAG_SIZE].to_vec();
    let tag = Tag::try_from(&sealed[BODY_SIZE - TAG_SIZE..]).map_err(|_| SealError::Open)?;
    cipher
        .decrypt_inout_detached(&Nonce::default(), &[], (&mut body[..]).into(), &tag)
        .map_err(|_| SealError::Open)?;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::SEAL_OVERHEAD;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    /// The per-message cipher wipes its key on drop (fails to compile without the
    /// `zeroize` feature of chacha20poly1305).
    #[test]
    fn cipher_key_is_wiped_on_drop() {
        fn zeroize_on_drop<T: zeroize::ZeroizeOnDrop>() {}
        zeroize_on_drop::<ChaCha20Poly1305>();
    }

    fn inner(byte: u8) -> Vec<u8> {
        vec![byte; INNER_BODY_SIZE]
    }

    #[test]
    fn sizes() {
        assert_eq!(SEAL_OVERHEAD, EPHEMERAL_SIZE + TAG_SIZE);
        assert_eq!(INNER_BODY_SIZE + SEAL_OVERHEAD, BODY_SIZE);
    }

    /// Fixed keys, fixed output: a change here is a wire-format change. The expected
    /// bytes were cross-checked against an independent implementation (Python
    /// `cryptography`/OpenSSL: X25519, HKDF-SHA256, ChaCha20-Poly1305 with the same
    /// salt, info and zero nonce).
    #[test]
    fn testvec_seal() {
        let recipient = StaticSecret::from([0x11; 32]);
        let ephemeral = StaticSecret::from([0x22; 32]);
        let sealed =
            seal_with_ephemeral(&ephemeral, &PublicKey::from(&recipient), &inner(0x33)).unwrap();
        assert_eq!(sealed.len(), BODY_SIZE);
        assert_eq!(&sealed[..32], PublicKey::from(&ephemeral).as_bytes());
        assert_eq!(hex::encode(&sealed[32..48]), SEAL_VECTOR_CT_HEAD);
        assert_eq!(hex::encode(&sealed[BODY_SIZE - 16..]), SEAL_VECTOR_TAG);
        assert_eq!(open(&recipient, &sealed).unwrap(), inner(0x33));
    }

    const SEAL_VECTOR_CT_HEAD: &str = "faf28fb754d6f6bea8b49b63ab2e0e7c";
    const SEAL_VECTOR_TAG: &str = "7b3b37b860354408f145526e112b49a2";

    #[test]
    fn wrong_key_and_damage_fail_cleanly() {
        let mut rng = StdRng::seed_from_u64(1);
        let alice = StaticSecret::random_from_rng(&mut rng);
        let mallory = StaticSecret::random_from_rng(&mut rng);
        let sealed = seal(&mut rng, &PublicKey::from(&alice), &inner(7)).unwrap();
        assert_eq!(open(&mallory, &sealed), Err(SealError::Open));
        for i in [0, 31, 32, 500, BODY_SIZE - 1] {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert_eq!(open(&alice, &bad), Err(SealError::Open), "flipped byte {i}");
        }
        assert!(matches!(
            open(&alice, &sealed[1..]),
            Err(SealError::Length { .. })
        ));
        assert!(matches!(
            seal(&mut rng, &PublicKey::from(&alice), &[0; 3]),
            Err(SealError::Length { .. })
        ));
        // The all-zero point is low order: refused on sealing, and an all-zero
        // ephemeral key is refused on opening.
        assert_eq!(
            seal(&mut rng, &PublicKey::from([0u8; 32]), &inner(1)),
            Err(SealError::WeakKey)
        );
        let mut zero_epk = sealed.clone();
        zero_epk[..32].fill(0);
        assert_eq!(open(&alice, &zero_epk), Err(SealError::Open));
    }

    #[test]
    fn seals_differ_each_time() {
        let mut rng = StdRng::seed_from_u64(2);
        let alice = PublicKey::from(&StaticSecret::random_from_rng(&mut rng));
        let a = seal(&mut rng, &alice, &inner(0)).unwrap();
        let b = seal(&mut rng, &alice, &inner(0)).unwrap();
        assert_ne!(
            a, b,
            "a retransmitted body must not be linkable by its bytes"
        );
    }

    proptest! {
        #[test]
        fn roundtrip(seed: u64, body in proptest::collection::vec(any::<u8>(), INNER_BODY_SIZE..=INNER_BODY_SIZE)) {
            let mut rng = StdRng::seed_from_u64(seed);
            let secret = StaticSecret::random_from_rng(&mut rng);
            let sealed = seal(&mut rng, &PublicKey::from(&secret), &body).unwrap();
            prop_assert_eq!(sealed.len(), BODY_SIZE);
            prop_assert_eq!(open(&secret, &sealed).unwrap(), body);
        }

        #[test]
        fn open_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let secret = StaticSecret::from([9u8; 32]);
            let _ = open(&secret, &bytes);
        }
    }
}
