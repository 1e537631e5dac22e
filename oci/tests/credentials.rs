//! Issue #9: the Docker config file is untrusted input that must not take arbord down, and
//! credentials written or rotated later are picked up without a restart.

use std::path::Path;
use std::time::{Duration, SystemTime};

use arbor_oci::auth::CredentialStore;
use arbor_oci::registry::{ClientOptions, RegistryClient};
use base64::Engine as _;

fn write_auth(path: &Path, user: &str, pass: &str, mtime: u64) {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    write_raw(
        path,
        &format!(r#"{{"auths":{{"reg.example:5000":{{"auth":"{auth}"}}}}}}"#),
        mtime,
    );
}

/// Writes `text` and sets a distinct modification time (writes within one clock tick would
/// otherwise keep the same mtime).
fn write_raw(path: &Path, text: &str, mtime: u64) {
    std::fs::write(path, text).unwrap();
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + mtime))
        .unwrap();
}

fn user(s: &CredentialStore) -> Option<String> {
    s.lookup_blocking("reg.example:5000")
        .unwrap()
        .map(|c| c.username)
}

#[test]
fn bad_docker_config_runs_anonymous() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("config.json");
    for bad in [
        "{not json",
        "",
        "[]",
        r#"{"auths": 42}"#,
        r#"{"credHelpers": {"reg.example:5000": 7}}"#,
    ] {
        std::fs::write(&p, bad).unwrap();
        let s = CredentialStore::from_file(&p).expect("a bad config must not fail a start");
        assert_eq!(user(&s), None, "{bad:?}");
        // A registry client (arbord's) can be made with it and works anonymously.
        RegistryClient::new(ClientOptions::default(), s).unwrap();
    }
    // Not a file, or missing.
    let s = CredentialStore::from_file(dir.path()).expect("a directory must not fail a start");
    assert_eq!(user(&s), None);
    let s = CredentialStore::from_file(&dir.path().join("missing.json")).unwrap();
    assert_eq!(user(&s), None);
    // Absurdly large.
    std::fs::write(&p, vec![b' '; 5 << 20]).unwrap();
    let s = CredentialStore::from_file(&p).unwrap();
    assert_eq!(user(&s), None);
}

#[test]
fn auth_file_change_is_reloaded() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("config.json");
    // Missing at start: anonymous, then picked up when it appears.
    let s = CredentialStore::from_file(&p).unwrap();
    assert_eq!(user(&s), None);
    write_auth(&p, "alice", "one", 1);
    assert_eq!(user(&s).as_deref(), Some("alice"));
    // Rotated.
    write_auth(&p, "bob", "two", 2);
    assert_eq!(user(&s).as_deref(), Some("bob"));
    // Clones (the registry client's) share the reloads.
    let clone = s.clone();
    write_auth(&p, "carol", "three", 3);
    assert_eq!(user(&clone).as_deref(), Some("carol"));
    assert_eq!(user(&s).as_deref(), Some("carol"));
    // Half written: the previous credentials stay.
    write_raw(&p, r#"{"auths":{"reg.exa"#, 4);
    assert_eq!(user(&s).as_deref(), Some("carol"));
    // Deleted: no credentials.
    std::fs::remove_file(&p).unwrap();
    assert_eq!(user(&s), None);
    // Same content again, same mtime as before: still reloaded (the file was replaced).
    write_auth(&p, "dave", "four", 3);
    assert_eq!(user(&s).as_deref(), Some("dave"));
}

#[test]
fn lookup_runs_off_the_async_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("config.json");
    write_auth(&p, "erin", "five", 1);
    let s = CredentialStore::from_file(&p).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let c = rt.block_on(s.lookup("reg.example:5000")).unwrap().unwrap();
    assert_eq!(c.username, "erin");
}
