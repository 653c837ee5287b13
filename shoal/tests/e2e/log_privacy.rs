//! Log privacy: `shoal demo --keep` with every process at `debug`, then every log line
//! (the demo's own stderr and each node's log in the kept directory) is searched for
//! - keys and mailbox ids: any 64-hex-digit token that is not a public key derived
//!   from a key file in the kept directory or named in a config (node identities,
//!   Sphinx and authority keys are published in the directory), any secret key file's
//!   contents, and any 32-byte array printed with `{:?}`;
//! - payload bytes: the demo's message bodies ("hello #…", "group hello from …");
//! - client addresses: any `127.0.0.1:PORT` whose port is not a node's listening port
//!   (clients are the only other endpoints on loopback).
//!
//! The run is made once with text logs and once with `SHOAL_LOG_FORMAT=json` (every
//! process inherits it). In JSON, every node log line must be one JSON object with a
//! level, a timestamp and a message, and the searches run on both the raw line and its
//! unescaped string values.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");

/// One demo at a time: two whole networks at once on a loaded 2-core runner starve
/// each other, and a demo cut short by its timeout leaves fewer log lines to search.
static ONE_NETWORK: Mutex<()> = Mutex::new(());

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// Runs of exactly 64 hex digits.
fn hex64_tokens(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut run = String::new();
    for ch in text.chars().chain(std::iter::once(' ')) {
        if ch.is_ascii_hexdigit() {
            run.push(ch.to_ascii_lowercase());
        } else {
            if run.len() == 64 {
                out.push(std::mem::take(&mut run));
            }
            run.clear();
        }
    }
    out
}

/// Ports after every "127.0.0.1:".
fn loopback_ports(text: &str) -> Vec<u16> {
    text.match_indices("127.0.0.1:")
        .filter_map(|(i, m)| {
            let digits: String = text[i + m.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        })
        .collect()
}

/// `[1, 2, …]` with 32 or more numbers: a key printed with `{:?}`.
fn has_byte_array(text: &str) -> bool {
    text.split('[').skip(1).any(|rest| {
        let inner = rest.split(']').next().unwrap_or("");
        let parts: Vec<&str> = inner.split(", ").collect();
        parts.len() >= 32 && parts.iter().all(|p| p.parse::<u8>().is_ok())
    })
}

/// Every string value in `v`, unescaped, joined by spaces.
fn json_strings(v: &serde_json::Value, out: &mut String) {
    match v {
        serde_json::Value::String(s) => {
            out.push_str(s);
            out.push(' ');
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| json_strings(x, out)),
        serde_json::Value::Object(o) => o.iter().for_each(|(k, x)| {
            out.push_str(k);
            out.push(' ');
            json_strings(x, out);
        }),
        _ => {}
    }
}

/// Checks that `line` is one log event in JSON and returns the text to search: the
/// raw line and its unescaped string values.
fn json_event(name: &str, line: &str) -> Result<String, String> {
    let v: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("{name}: not JSON ({e}): {line}"))?;
    for field in ["timestamp", "level", "target"] {
        if !v.get(field).is_some_and(serde_json::Value::is_string) {
            return Err(format!("{name}: no {field:?} string: {line}"));
        }
    }
    let mut text = format!("{line} ");
    json_strings(&v, &mut text);
    Ok(text)
}

#[test]
fn debug_logs_hold_no_keys_payloads_or_client_addresses() {
    check_demo_logs(false);
}

#[test]
fn json_debug_logs_parse_and_hold_no_keys_payloads_or_client_addresses() {
    check_demo_logs(true);
}

fn check_demo_logs(json: bool) {
    let _one = ONE_NETWORK.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let mut demo = Command::new(SHOAL);
    demo.args(["demo", "--json", "--keep", "--clients-per-gateway", "2"])
        .args(["--messages", "3"])
        .env("SHOAL_LOG", "debug")
        .env("TMPDIR", tmp.path());
    if json {
        demo.env("SHOAL_LOG_FORMAT", "json");
    } else {
        demo.env_remove("SHOAL_LOG_FORMAT");
    }
    let out = demo.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    // The demo's own tests check what it delivers; here a failure late in the run (an
    // admin step, say) still leaves every log line up to it to be searched.
    if !out.status.success() {
        println!(
            "note: the demo exited with an error; searching its logs anyway: {}",
            stderr.lines().last().unwrap_or("")
        );
    }
    let kept = stderr
        .lines()
        .find_map(|l| l.strip_prefix("network directory kept: "))
        .map(PathBuf::from)
        .expect("the demo printed its kept directory");
    let mut files = Vec::new();
    walk(&kept, &mut files);

    // Logs: the demo's stderr (its in-process clients) and every node's log file.
    let mut logs = vec![("demo stderr".to_string(), stderr.clone())];
    // Public identities (allowed in logs), secrets and node ports from the kept files.
    let mut public = HashSet::new();
    let mut secrets = HashSet::new();
    let mut node_ports = HashSet::new();
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        let bytes = std::fs::read(f).unwrap();
        if name.ends_with(".log") {
            logs.push((name, String::from_utf8_lossy(&bytes).into_owned()));
            continue;
        }
        if name.ends_with(".key") || name.ends_with("key") {
            secrets.insert(hex::encode(&bytes));
            if let Ok(t) = std::str::from_utf8(&bytes) {
                secrets.extend(hex64_tokens(t));
            }
            if bytes.len() >= 32 {
                secrets.insert(hex::encode(&bytes[..32]));
            }
        }
        if name.ends_with(".toml") {
            let t = String::from_utf8_lossy(&bytes);
            node_ports.extend(loopback_ports(&t));
        }
    }
    let doc = files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "toml" || e == "json"))
        .map(|f| std::fs::read_to_string(f).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    // Public keys named in configs (authority keys, gateway identities) are public.
    public.extend(hex64_tokens(&doc));
    for s in &secrets {
        public.remove(s);
    }
    // Key files are hex text: their public halves (node identities, Sphinx keys) are
    // published in the directory, so they may appear in logs; the secrets may not.
    for s in secrets.clone() {
        let mut b = [0u8; 32];
        if s.len() == 64 && hex::decode_to_slice(&s, &mut b).is_ok() {
            let ed = ed25519_dalek::SigningKey::from_bytes(&b).verifying_key();
            public.insert(hex::encode(ed.to_bytes()));
            let x = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(b));
            public.insert(hex::encode(x.to_bytes()));
        }
    }
    assert!(!secrets.is_empty(), "the kept directory has key files");
    assert!(
        logs.len() > 5,
        "node logs were kept: {:?}",
        logs.iter().map(|l| &l.0).collect::<Vec<_>>()
    );

    let mut leaks = Vec::new();
    let mut lines = 0usize;
    let mut json_lines = 0usize;
    for (name, text) in &logs {
        for raw in text.lines() {
            lines += 1;
            // The demo's own stderr mixes its progress lines with its clients' logs;
            // a node's log is nothing but log events.
            let is_event = name != "demo stderr" || raw.starts_with('{');
            let searched = if json && is_event && !raw.trim().is_empty() {
                match json_event(name, raw) {
                    Ok(t) => {
                        json_lines += 1;
                        t
                    }
                    Err(e) => {
                        leaks.push(e);
                        continue;
                    }
                }
            } else {
                raw.to_owned()
            };
            let line = searched.as_str();
            for tok in hex64_tokens(line) {
                if secrets.contains(&tok) {
                    leaks.push(format!("{name}: secret key: {line}"));
                } else if !public.contains(&tok) {
                    leaks.push(format!("{name}: unlisted 32-byte hex value: {line}"));
                }
            }
            for s in &secrets {
                if s.len() >= 32 && line.contains(s.as_str()) {
                    leaks.push(format!("{name}: key file bytes: {line}"));
                }
            }
            if has_byte_array(line) {
                leaks.push(format!("{name}: byte array: {line}"));
            }
            if line.contains("hello #") || line.contains("group hello from") {
                leaks.push(format!("{name}: message body: {line}"));
            }
            for port in loopback_ports(line) {
                if !node_ports.contains(&port) {
                    leaks.push(format!("{name}: client address 127.0.0.1:{port}: {line}"));
                }
            }
        }
    }
    println!(
        "log privacy ({}): {} log files, {lines} lines at debug ({json_lines} parsed as JSON), \
         {} secrets and {} public keys known, {} node ports; problems found: {}",
        if json { "json" } else { "text" },
        logs.len(),
        secrets.len(),
        public.len(),
        node_ports.len(),
        leaks.len()
    );
    let _ = std::fs::remove_dir_all(&kept);
    if json {
        assert!(
            json_lines > 100,
            "only {json_lines} JSON log lines of {lines}"
        );
    }
    assert!(
        leaks.is_empty(),
        "{} leaking lines, first 20:\n{}",
        leaks.len(),
        leaks[..leaks.len().min(20)].join("\n")
    );
}

/// The searches above find what they look for (so the main test can fail).
#[test]
fn detectors_flag_keys_arrays_and_addresses() {
    let key = "ab".repeat(32);
    assert_eq!(hex64_tokens(&format!("id={key} x")), vec![key.clone()]);
    assert!(
        hex64_tokens(&format!("id={key}ff")).is_empty(),
        "only exact 32-byte runs"
    );
    assert_eq!(
        loopback_ports("peer=127.0.0.1:4242, 127.0.0.1:7"),
        vec![4242, 7]
    );
    let arr = format!("{:?}", [7u8; 32]);
    assert!(has_byte_array(&format!("key {arr}")));
    assert!(!has_byte_array("[1, 2, 3]"));
    // A JSON event's escaped strings are searched unescaped; a text line is no event.
    let line = r#"{"timestamp":"t","level":"DEBUG","target":"x","message":"say \"hello #1\""}"#;
    assert!(json_event("l", line).unwrap().contains("say \"hello #1\""));
    assert!(json_event("l", "2026-01-01 DEBUG x: hi").is_err());
    assert!(json_event("l", r#"{"level":"DEBUG"}"#).is_err());
}

/// `--log-format json` holds for the fatal error too, and an unknown
/// `SHOAL_LOG_FORMAT` is refused rather than silently giving text lines to a collector
/// that expects JSON.
#[test]
fn log_format_flag_and_variable() {
    let missing = std::env::temp_dir().join("shoal-log-format-no-such-config.toml");
    let out = Command::new(SHOAL)
        .args(["gateway", "run", "--log-format", "json", "--config"])
        .arg(&missing)
        .env_remove("SHOAL_LOG_FORMAT")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    let event: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(event["level"], "ERROR");
    assert!(
        event["error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot read config")),
        "{stderr}"
    );

    let out = Command::new(SHOAL)
        .args(["gateway", "run", "--config"])
        .arg(&missing)
        .env("SHOAL_LOG_FORMAT", "xml")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("SHOAL_LOG_FORMAT"), "{stderr}");
    // The flag wins over the variable.
    let out = Command::new(SHOAL)
        .args(["gateway", "run", "--log-format", "text", "--config"])
        .arg(&missing)
        .env("SHOAL_LOG_FORMAT", "json")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("shoal: cannot read config"), "{stderr}");
}
