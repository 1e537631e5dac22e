//! Issue #9: a `docker-credential-*` helper that hangs is killed after the timeout, the
//! lookup fails (the registry is then tried anonymously or reports the error) and the async
//! runtime keeps running meanwhile. One test in this binary: it sets PATH.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arbor_oci::auth::CredentialStore;

fn script(dir: &Path, name: &str, body: &str) {
    let p = dir.join(format!("docker-credential-{name}"));
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn hung_credential_helper_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let pidfile = dir.path().join("pid");
    script(
        &bin,
        "hang",
        &format!("echo $$ > {}\nexec sleep 300", pidfile.display()),
    );
    script(
        &bin,
        "good",
        r#"cat >/dev/null; echo '{"ServerURL":"x","Username":"helped","Secret":"s"}'"#,
    );
    let path = std::env::var("PATH").unwrap_or_default();
    // SAFETY: the only test of this binary, before any thread of its own is started.
    unsafe { std::env::set_var("PATH", format!("{}:{path}", bin.display())) };
    let cfg = dir.path().join("config.json");
    std::fs::write(
        &cfg,
        r#"{"credsStore":"hang","credHelpers":{"good.example":"good"}}"#,
    )
    .unwrap();
    let mut s = CredentialStore::from_file(&cfg).unwrap();
    s.set_helper_timeout(Duration::from_secs(1));

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ticks = Arc::new(AtomicU64::new(0));
    let t = Instant::now();
    let r = rt.block_on(async {
        let ticks2 = Arc::clone(&ticks);
        // On a one-thread runtime, this only ticks if the lookup does not block it.
        let ticker = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                ticks2.fetch_add(1, Ordering::Relaxed);
            }
        });
        let r = s.lookup("hung.example").await;
        ticker.abort();
        r
    });
    let took = t.elapsed();
    let err = r.expect_err("a hung helper must fail the lookup");
    assert!(err.to_string().contains("did not answer"), "{err}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert!(
        ticks.load(Ordering::Relaxed) >= 10,
        "the runtime was blocked"
    );
    // The helper was killed (and reaped).
    let pid = std::fs::read_to_string(&pidfile).unwrap();
    assert!(
        !Path::new(&format!("/proc/{}", pid.trim())).exists(),
        "the helper {pid} still runs"
    );
    // A helper that answers still works.
    let c = rt.block_on(s.lookup("good.example")).unwrap().unwrap();
    assert_eq!(c.username, "helped");
}
