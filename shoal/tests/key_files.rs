//! Every `init` leaves its secrets owner-only: key files and stores 0600, and the
//! directories that hold them 0700 where the command creates them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn shoal(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "shoal {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn every_init_writes_secrets_owner_only() {
    let tmp = tempfile::tempdir().unwrap();
    let d = |name: &str| tmp.path().join(name).to_string_lossy().into_owned();
    let authority_key = shoal(&[
        "authority",
        "init",
        "--dir",
        &d("authority"),
        "--listen",
        "127.0.0.1:8000",
    ]);
    let authority_key = authority_key.lines().next().unwrap().trim().to_owned();
    let authority = format!("127.0.0.1:8000={authority_key}");
    shoal(&[
        "relay",
        "init",
        "--dir",
        &d("relay"),
        "--authority",
        &authority,
    ]);
    shoal(&[
        "gateway",
        "init",
        "--dir",
        &d("gateway"),
        "--authority",
        &authority,
    ]);
    shoal(&["admin", "init", "--dir", &d("admin"), "--name", "acme"]);
    let gateway_id = std::fs::read_to_string(tmp.path().join("gateway/identity.key")).unwrap();
    let gateway_public = ed25519_dalek::SigningKey::from_bytes(
        &hex::decode(gateway_id.trim()).unwrap().try_into().unwrap(),
    )
    .verifying_key();
    shoal(&[
        "client",
        "init",
        "--dir",
        &d("client"),
        "--gateway",
        &format!("127.0.0.1:7101={}", hex::encode(gateway_public.to_bytes())),
        "--gateway-client-addr",
        "127.0.0.1:7102",
        "--authority",
        &authority,
    ]);

    let secrets = [
        "authority/authority.key",
        "relay/identity.key",
        "gateway/identity.key",
        "admin/admin.key",
        "client/client.redb",
    ];
    for s in secrets {
        let p = tmp.path().join(s);
        assert_eq!(mode(&p), 0o600, "{s} is {:o}", mode(&p));
    }
    for dir in ["relay", "gateway", "admin", "client"] {
        let p = tmp.path().join(dir);
        assert_eq!(mode(&p), 0o700, "{dir}/ is {:o}", mode(&p));
    }
}
