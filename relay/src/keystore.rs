//! Keys on disk: the Ed25519 identity and one file per epoch's Sphinx key.
//!
//! Every file is hex text, mode 0600, written to a temporary name, fsync'd, renamed
//! into place and the directory fsync'd, so a crash leaves either the old or the new
//! file and a restarted relay unwraps with the keys it published.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use x25519_dalek::StaticSecret;
use zeroize::Zeroizing;

use crate::{KeyRing, RelayError};

/// File name of the identity key inside the data directory.
pub const IDENTITY_FILE: &str = "identity.key";
/// The operator's certificate for this node (`shoal operator certify`), beside its key.
pub const CERTIFICATE_FILE: &str = "operator.cert";
/// Subdirectory holding Sphinx keys, one `epoch-<n>.key` per epoch.
pub const SPHINX_DIR: &str = "sphinx";

fn io(context: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RelayError {
    let path = path.to_owned();
    move |source| RelayError::Io {
        context,
        path,
        source,
    }
}

/// Creates `dir` (and parents) with owner-only access if it does not exist.
pub fn create_private_dir(dir: &Path) -> Result<(), RelayError> {
    let mut b = fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir).map_err(io("cannot create directory", dir))
}

/// Writes `contents` to `path` atomically and durably, readable by the owner only.
/// With `exclusive`, fails if `path` exists.
pub fn write_private(path: &Path, contents: &[u8], exclusive: bool) -> Result<(), RelayError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    if exclusive && path.exists() {
        return Err(RelayError::AlreadyExists {
            path: path.to_owned(),
        });
    }
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp"));
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp).map_err(io("cannot create", &tmp))?;
    f.write_all(contents).map_err(io("cannot write", &tmp))?;
    f.sync_all().map_err(io("cannot sync", &tmp))?;
    drop(f);
    if exclusive {
        // hard_link fails if the target exists, so two racing inits cannot both win.
        fs::hard_link(&tmp, path).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                RelayError::AlreadyExists {
                    path: path.to_owned(),
                }
            } else {
                io("cannot create", path)(e)
            }
        })?;
        fs::remove_file(&tmp).map_err(io("cannot remove", &tmp))?;
    } else {
        fs::rename(&tmp, path).map_err(io("cannot rename into", path))?;
    }
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), RelayError> {
    #[cfg(unix)]
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("cannot sync directory", dir))?;
    Ok(())
}

/// Reads a 32-byte secret written as hex. The text and the bytes are wiped when dropped;
/// callers turn the bytes straight into a key type that wipes itself.
fn read_hex32(path: &Path) -> Result<Zeroizing<[u8; 32]>, RelayError> {
    let text = Zeroizing::new(fs::read_to_string(path).map_err(io("cannot read", path))?);
    let mut out = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(text.trim(), &mut *out).map_err(|_| RelayError::KeyFile {
        path: path.to_owned(),
        reason: "expected 64 hex digits",
    })?;
    Ok(out)
}

/// Generates an identity key and writes it to `dir/identity.key`; refuses to overwrite.
pub fn create_identity<R: rand::CryptoRng + ?Sized>(
    dir: &Path,
    rng: &mut R,
) -> Result<SigningKey, RelayError> {
    create_private_dir(dir)?;
    let key = SigningKey::generate(rng);
    let text = secret_text(key.as_bytes());
    write_private(&dir.join(IDENTITY_FILE), &text, true)?;
    Ok(key)
}

/// Replaces the identity key in `dir` with a fresh one and deletes every Sphinx key, so
/// nothing of the old identity is left to steal. The node must be stopped; it generates
/// Sphinx keys again when it starts and enters the directory as a new node.
pub fn rotate_identity<R: rand::CryptoRng + ?Sized>(
    dir: &Path,
    rng: &mut R,
) -> Result<SigningKey, RelayError> {
    let epochs = load_sphinx_keys(dir)?.epochs();
    remove_sphinx_keys(dir, &epochs)?;
    let path = dir.join(IDENTITY_FILE);
    match fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("cannot remove", &path)(e)),
    }
    create_identity(dir, rng)
}

/// Reads `dir/operator.cert` and checks that it is a good certificate for the node
/// `identity` in `role`.
pub fn load_certificate(
    dir: &Path,
    identity: &[u8; 32],
    role: shoal_topology::Role,
) -> Result<shoal_topology::NodeCertificate, RelayError> {
    let path = dir.join(CERTIFICATE_FILE);
    let bytes = fs::read(&path).map_err(|_| RelayError::KeyFile {
        path: path.clone(),
        reason: "no operator certificate: have your operator run `shoal operator certify` for \
                 this node's identity and put the file here",
    })?;
    let cert =
        shoal_topology::NodeCertificate::from_json(&bytes).map_err(|_| RelayError::KeyFile {
            path: path.clone(),
            reason: "not an operator certificate",
        })?;
    if cert.node.0 != *identity || cert.role != role || !cert.verify() {
        return Err(RelayError::KeyFile {
            path,
            reason: "the operator certificate is not for this node's identity and role, or its \
                     signature is bad",
        });
    }
    Ok(cert)
}

/// Writes `dir/operator.cert`, replacing any earlier one.
pub fn save_certificate(
    dir: &Path,
    cert: &shoal_topology::NodeCertificate,
) -> Result<(), RelayError> {
    let path = dir.join(CERTIFICATE_FILE);
    fs::write(&path, cert.to_json()).map_err(io("cannot write", &path))
}

/// Certifies the node in `dir` as its own operator (test networks): writes the
/// certificate and returns the operator to admit.
pub fn self_certify(
    dir: &Path,
    role: shoal_topology::Role,
) -> Result<shoal_topology::AdmittedOperator, RelayError> {
    let identity = load_identity(&dir.join(IDENTITY_FILE))?;
    let operator = shoal_topology::operator::solo_operator_key(&identity);
    let cert = shoal_topology::NodeCertificate::issue(
        &operator,
        identity.verifying_key().to_bytes(),
        role,
    );
    save_certificate(dir, &cert)?;
    Ok(shoal_topology::AdmittedOperator::solo(
        &operator,
        hex::encode(&identity.verifying_key().to_bytes()[..4]),
    ))
}

/// Reads the identity key from `path`.
pub fn load_identity(path: &Path) -> Result<SigningKey, RelayError> {
    Ok(SigningKey::from_bytes(&*read_hex32(path)?))
}

/// A secret as the hex line written to its file, in one buffer sized up front (a
/// growing `String` would leave unwiped copies behind) that is wiped when dropped.
fn secret_text(bytes: &[u8; 32]) -> Zeroizing<Vec<u8>> {
    let mut text = Zeroizing::new(vec![b'\n'; 65]);
    // Cannot fail: 64 bytes is exactly the hex length of 32.
    let _ = hex::encode_to_slice(bytes, &mut text[..64]);
    text
}

fn sphinx_path(data_dir: &Path, epoch: u64) -> PathBuf {
    data_dir.join(SPHINX_DIR).join(format!("epoch-{epoch}.key"))
}

/// Loads every persisted Sphinx key. Files that are not `epoch-<n>.key` are ignored.
pub fn load_sphinx_keys(data_dir: &Path) -> Result<KeyRing, RelayError> {
    let dir = data_dir.join(SPHINX_DIR);
    let mut ring = KeyRing::new();
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ring),
        Err(e) => return Err(io("cannot list", &dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io("cannot list", &dir))?;
        let name = entry.file_name();
        let Some(epoch) = name
            .to_str()
            .and_then(|n| n.strip_prefix("epoch-"))
            .and_then(|n| n.strip_suffix(".key"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        ring.insert(epoch, StaticSecret::from(*read_hex32(&entry.path())?));
    }
    Ok(ring)
}

/// Persists the keys of `epochs` from `ring`.
pub fn save_sphinx_keys(data_dir: &Path, ring: &KeyRing, epochs: &[u64]) -> Result<(), RelayError> {
    let dir = data_dir.join(SPHINX_DIR);
    create_private_dir(&dir)?;
    for &e in epochs {
        if let Some(secret) = ring.get(e) {
            let text = secret_text(secret.as_bytes());
            write_private(&sphinx_path(data_dir, e), &text, false)?;
        }
    }
    Ok(())
}

/// Deletes the files of retired epochs.
pub fn remove_sphinx_keys(data_dir: &Path, epochs: &[u64]) -> Result<(), RelayError> {
    // A node that never ran has no Sphinx directory: nothing to remove or sync.
    if epochs.is_empty() && !data_dir.join(SPHINX_DIR).exists() {
        return Ok(());
    }
    for &e in epochs {
        let p = sphinx_path(data_dir, e);
        match fs::remove_file(&p) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(io("cannot remove", &p)(err)),
        }
    }
    sync_dir(&data_dir.join(SPHINX_DIR))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
pub(crate) mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    /// A fresh empty directory under the system temp dir.
    pub(crate) fn temp_dir(tag: &str) -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "shoal-relay-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        p
    }

    #[test]
    fn rotate_replaces_identity_and_deletes_sphinx_keys() {
        let dir = temp_dir("rotate");
        let mut rng = StdRng::seed_from_u64(2);
        let old = create_identity(&dir, &mut rng).unwrap();
        let mut ring = KeyRing::new();
        ring.ensure(&mut rng, 3..=4);
        save_sphinx_keys(&dir, &ring, &[3, 4]).unwrap();
        assert_eq!(load_sphinx_keys(&dir).unwrap().epochs(), vec![3, 4]);

        let new = rotate_identity(&dir, &mut rng).unwrap();
        assert_ne!(old.to_bytes(), new.to_bytes());
        let on_disk = load_identity(&dir.join(IDENTITY_FILE)).unwrap();
        assert_eq!(on_disk.to_bytes(), new.to_bytes());
        assert!(load_sphinx_keys(&dir).unwrap().epochs().is_empty());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.join(IDENTITY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let _ = fs::remove_dir_all(&dir);
    }

    /// Regression: `keys rotate` on a node that was initialised but never started failed
    /// with "cannot sync directory .../sphinx" (no Sphinx key had been made yet).
    #[test]
    fn rotate_before_the_first_start() {
        let dir = temp_dir("rotate-fresh");
        let mut rng = StdRng::seed_from_u64(3);
        let old = create_identity(&dir, &mut rng).unwrap();
        let new = rotate_identity(&dir, &mut rng).unwrap();
        assert_ne!(old.to_bytes(), new.to_bytes());
        assert_eq!(
            load_identity(&dir.join(IDENTITY_FILE)).unwrap().to_bytes(),
            new.to_bytes()
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn identity_roundtrip_and_no_overwrite() {
        let dir = temp_dir("identity");
        let mut rng = StdRng::seed_from_u64(1);
        let key = create_identity(&dir, &mut rng).unwrap();
        let back = load_identity(&dir.join(IDENTITY_FILE)).unwrap();
        assert_eq!(key.to_bytes(), back.to_bytes());
        assert!(matches!(
            create_identity(&dir, &mut rng),
            Err(RelayError::AlreadyExists { .. })
        ));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.join(IDENTITY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        fs::write(dir.join(IDENTITY_FILE), "zz").unwrap();
        let e = load_identity(&dir.join(IDENTITY_FILE))
            .unwrap_err()
            .to_string();
        assert!(e.contains("identity.key"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Key files keep their format (64 hex digits and a newline); the secrets read
    /// back are types that wipe themselves; Debug of a key ring names epochs only.
    #[test]
    fn secrets_are_wiped_and_not_printed() {
        fn zeroize_on_drop<T: zeroize::ZeroizeOnDrop>() {}
        zeroize_on_drop::<SigningKey>();
        zeroize_on_drop::<StaticSecret>();
        zeroize_on_drop::<Zeroizing<[u8; 32]>>();
        let secret = [0xab; 32];
        assert_eq!(
            &*secret_text(&secret),
            format!("{}\n", "ab".repeat(32)).as_bytes()
        );

        let mut ring = KeyRing::new();
        ring.ensure(&mut StdRng::seed_from_u64(3), 1..=2);
        let shown = format!("{ring:?}");
        for e in [1, 2] {
            let key = ring.get(e).unwrap().to_bytes();
            assert!(!shown.contains(&hex::encode(key)), "{shown}");
            assert!(!shown.contains(format!("{key:?}").trim_matches(['[', ']'])));
        }
        assert_eq!(shown, "KeyRing { epochs: [1, 2] }");
    }

    #[test]
    fn sphinx_keys_survive_a_restart() {
        let dir = temp_dir("sphinx");
        let mut rng = StdRng::seed_from_u64(2);
        let mut ring = KeyRing::new();
        let made = ring.ensure(&mut rng, 5..=7);
        save_sphinx_keys(&dir, &ring, &made).unwrap();
        let back = load_sphinx_keys(&dir).unwrap();
        assert_eq!(back.epochs(), vec![5, 6, 7]);
        assert_eq!(back.public(6), ring.public(6));
        remove_sphinx_keys(&dir, &[5]).unwrap();
        assert_eq!(load_sphinx_keys(&dir).unwrap().epochs(), vec![6, 7]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
