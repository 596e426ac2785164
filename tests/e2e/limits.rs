//! Endless data and slow retrieval, from the attacker's seat: an artifact object swapped for
//! a much larger one or for a valid archive of the same size, archive bombs, an oversized manifest, a store that hangs or trickles,
//! and a `file://` store whose `status/` is a symlink out of it. In every case the host keeps
//! running what it ran, nothing half-done is left behind, and the honest path still works.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use deploy_manifest::archive::UnpackLimits;
use deploy_manifest::model::ArchiveRef;
use deploy_manifest::store::ObjectStore;
use deployer_tests::{OutputExt, bin, free_port};
use serde_json::{Value, json};

use crate::agent::{App, Host, body, declare_hello, hello_v1_running};
use crate::fixture::Fixture;

/// The archive the current manifest names for hello.
fn hello_archive(fx: &Fixture) -> ArchiveRef {
    let m: Value = serde_json::from_slice(&fx.dm(&["show"]).ok().stdout).unwrap();
    serde_json::from_value(m["services"][0]["artifact"]["archive"].clone()).unwrap()
}

/// What `<state>/store` holds: installed artifacts and leftovers.
fn installed(host: &Host) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(host.state_dir().join("store"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn store_dir(fx: &Fixture) -> PathBuf {
    PathBuf::from(fx.url.strip_prefix("file://").unwrap())
}

/// hello v1 running, v2 pushed but not deployed: the host, the app, the port, v1's state
/// record, what `<state>/store` holds, and v2's archive (for the attacker to swap).
fn v1_running_v2_pushed(fx: &Fixture) -> (Host, App, u16, Value, Vec<String>, ArchiveRef) {
    let (host, app, port) = hello_v1_running(fx);
    let before = host.state()["services"]["hello"]["current"].clone();
    let v1_installed = installed(&host);
    app.set_version("v2", false);
    app.push(fx);
    let v2 = hello_archive(fx);
    (host, app, port, before, v1_installed, v2)
}

#[test]
fn an_artifact_swapped_for_a_larger_object_is_refused_by_its_declared_size() {
    let fx = Fixture::s3();
    let (host, app, port, before, v1_installed, v2) = v1_running_v2_pushed(&fx);

    // The attacker overwrites v2's object with 32 MiB (the manifest says ~1 KB).
    let junk = tempfile::NamedTempFile::new().unwrap();
    junk.as_file().set_len(32 << 20).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        fx.store()
            .await
            .put_file(&v2.key(), junk.path(), &())
            .await
            .unwrap()
    });

    let out = host.run_once(&fx);
    assert_eq!(out.code(), 8, "{}", out.stderr_str());
    let expected = format!(
        "{} at {} is larger than its declared {} bytes ({} bytes in the store)",
        v2.key(),
        fx.url,
        v2.size,
        32 << 20
    );
    assert!(out.stderr_str().contains(&expected), "{}", out.stderr_str());
    assert_eq!(body(port).as_deref(), Some("hello from v1\n"));
    assert_eq!(host.state()["services"]["hello"]["current"], before);
    assert_eq!(installed(&host), v1_installed, "nothing installed or left");

    // An honest push of the same build puts the right object back; the next run converges.
    app.push(&fx);
    host.run_once(&fx).ok();
    assert_eq!(body(port).as_deref(), Some("hello from v2\n"));
}

#[test]
fn an_artifact_swapped_for_a_valid_archive_of_the_same_size_is_unpacked_but_never_installed() {
    let fx = Fixture::file();
    let (host, app, port, before, v1_installed, v2) = v1_running_v2_pushed(&fx);

    // The attacker replaces v2's object with a well-formed archive of exactly the declared
    // size whose bin/hello leaves a mark: the one-pass fetch unpacks it (into its private
    // temp dir) before the hash is known, so only the hash stands between it and the host.
    let mark = tempfile::tempdir().unwrap();
    let marker = mark.path().join("pwned");
    let script = format!("#!/bin/sh\ntouch {}\nexec sleep 1000\n", marker.display());
    let mut evil = zstd_tar(3, |b| {
        let mut h = file_header(script.len() as u64);
        b.append_data(&mut h, "bin/hello", script.as_bytes())
            .unwrap();
    });
    assert!(evil.len() as u64 <= v2.size, "{} > {}", evil.len(), v2.size);
    // Padding after the archive's end: the hash must cover bytes the unpacker never needs.
    evil.resize(v2.size as usize, 0);
    let path = store_dir(&fx).join(v2.key());
    std::fs::write(&path, &evil).unwrap();

    let refused = |host: &Host| {
        let out = host.run_once(&fx);
        out.fails_with(8, &format!("{}: hash mismatch", v2.key()));
        assert!(
            out.stderr_str()
                .contains(&format!("delete {} from the store", v2.key())),
            "{}",
            out.stderr_str()
        );
        assert_eq!(body(port).as_deref(), Some("hello from v1\n"));
        assert_eq!(host.state()["services"]["hello"]["current"], before);
        assert_eq!(installed(host), v1_installed, "nothing installed or left");
        assert!(!marker.exists(), "the attacker's bin/hello never ran");
    };
    refused(&host);
    // An honest re-push of the same build finds an object of the right size and keeps it:
    // the host still refuses it, and says what to do.
    app.push(&fx);
    refused(&host);
    // Doing what the message says converges.
    std::fs::remove_file(&path).unwrap();
    app.push(&fx);
    host.run_once(&fx).ok();
    assert_eq!(body(port).as_deref(), Some("hello from v2\n"));
    assert!(!marker.exists());
}

/// A tar.zst built entry by entry, the way an attacker crafts one.
fn zstd_tar(
    level: i32,
    add: impl FnOnce(&mut tar::Builder<zstd::Encoder<'static, Vec<u8>>>),
) -> Vec<u8> {
    let mut encoder = zstd::Encoder::new(Vec::new(), level).unwrap();
    encoder.long_distance_matching(true).unwrap();
    let mut builder = tar::Builder::new(encoder);
    add(&mut builder);
    builder.into_inner().unwrap().finish().unwrap()
}

fn file_header(size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(size);
    h.set_mode(0o755);
    h
}

/// Put `bytes` in the store as hello's artifact and point the manifest at it, as anyone
/// who can write the bucket can.
fn plant_artifact(fx: &Fixture, bytes: &[u8]) -> ArchiveRef {
    let mut hashing = deploy_manifest::archive::HashingWriter::new(std::io::sink());
    hashing.write_all(bytes).unwrap();
    let a = ArchiveRef {
        sha256: hashing.finish().0,
        name: "hello".into(),
        size: bytes.len() as u64,
        format: Some(deploy_manifest::model::ArchiveFormat::TarZst),
    };
    let path = store_dir(fx).join(a.key());
    std::fs::write(&path, bytes).unwrap();
    fx.dm(&["set-artifact", "hello", &serde_json::to_string(&a).unwrap()])
        .ok();
    a
}

#[test]
fn archive_bombs_are_refused_and_leave_nothing_behind() {
    let fx = Fixture::file();
    let (host, app, port) = hello_v1_running(&fx);
    let before = host.state()["services"]["hello"]["current"].clone();
    let v1_installed = installed(&host);
    // Planted as hello's artifact: refused with `<key>: <why>`, v1 untouched.
    let refused = |bomb: &[u8], why: String| {
        let a = plant_artifact(&fx, bomb);
        let out = host.run_once(&fx);
        out.fails_with(8, &format!("{}: {why}", a.key()));
        assert_eq!(body(port).as_deref(), Some("hello from v1\n"));
        assert_eq!(host.state()["services"]["hello"]["current"], before);
        assert_eq!(installed(&host), v1_installed);
    };

    // 2 GiB of zeros as bin/hello: the archive is tens of KB.
    let size = 2u64 << 30;
    let bomb = zstd_tar(3, |b| {
        let mut h = file_header(size);
        b.append_data(&mut h, "bin/hello", std::io::repeat(0).take(size))
            .unwrap();
    });
    assert!(bomb.len() < 200_000, "a real bomb: {} bytes", bomb.len());
    eprintln!(
        "bomb: {} bytes of tar.zst unpack to {size} bytes",
        bomb.len()
    );
    refused(
        &bomb,
        "the archive unpacks to more than 268435456 bytes".into(),
    );

    // 200,000 empty files: the archive is a few hundred KB.
    let bomb = zstd_tar(16, |b| {
        for i in 0..200_000 {
            let mut h = file_header(0);
            b.append_data(&mut h, format!("f/{i:06}"), std::io::empty())
                .unwrap();
        }
    });
    assert!(bomb.len() < 1_000_000, "a real bomb: {} bytes", bomb.len());
    eprintln!("bomb: {} bytes of tar.zst hold 200000 files", bomb.len());
    let cap = UnpackLimits::for_archive(bomb.len() as u64, UnpackLimits::HOST_DEFAULT).max_entries;
    assert!(cap < 200_000, "{cap}");
    refused(&bomb, format!("the archive holds more than {cap} entries"));

    // The honest path: a real v2 deploys.
    app.set_version("v2", false);
    app.push(&fx);
    host.run_once(&fx).ok();
    assert_eq!(body(port).as_deref(), Some("hello from v2\n"));
}

#[test]
fn a_manifest_over_the_size_cap_is_refused_before_it_is_read() {
    let fx = Fixture::file();
    let (host, _app, port) = hello_v1_running(&fx);
    let before = host.state()["services"].clone();
    let current = store_dir(&fx).join("manifest.json");
    let good = std::fs::read(&current).unwrap();

    // Valid JSON, 17 MiB of it.
    let mut big = good.clone();
    big.extend(std::iter::repeat_n(b' ', 17 << 20));
    std::fs::write(&current, &big).unwrap();
    let cap_message = format!(
        "manifest.json at {} is {} bytes, over the 16777216-byte cap",
        fx.url,
        big.len()
    );
    let out = host.run_once(&fx);
    out.fails_with(3, &cap_message);
    assert!(out.stderr_str().contains("DEPLOY_MAX_OBJECT_BYTES"));
    assert_eq!(host.state()["services"], before);
    assert!(
        host.state()["lastError"]
            .as_str()
            .unwrap()
            .contains("16777216-byte cap")
    );
    assert_eq!(body(port).as_deref(), Some("hello from v1\n"));

    let shown = fx.dm(&["show"]);
    shown.fails_with(3, &cap_message);
    assert_eq!(std::fs::read(&current).unwrap(), big, "nothing written");

    // Put back, the next run is a plain poll again.
    std::fs::write(&current, &good).unwrap();
    host.run_once(&fx).ok();
    assert_eq!(host.state()["services"], before);
}

/// An S3 endpoint that accepts connections and never answers; counts them.
fn hanging_endpoint() -> (u16, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicU64::new(0));
    let counter = accepted.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            counter.fetch_add(1, Ordering::SeqCst);
            held.push(stream);
        }
    });
    (port, accepted)
}

/// An S3 endpoint that answers every request with a 200 and a 1 MB Content-Length, then
/// sends the body one byte per second; counts the bytes sent.
fn trickling_endpoint() -> (u16, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let counter = counter.clone();
            std::thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                let mut request = Vec::new();
                let mut byte = [0u8; 1];
                while !request.ends_with(b"\r\n\r\n") {
                    match stream.read(&mut byte) {
                        Ok(1) => request.push(byte[0]),
                        _ => return,
                    }
                }
                let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                            Content-Length: 1000000\r\nETag: \"trickle\"\r\n\r\n";
                if stream.write_all(head.as_bytes()).is_err() {
                    return;
                }
                for _ in 0..600 {
                    if stream
                        .write_all(b" ")
                        .and_then(|()| stream.flush())
                        .is_err()
                    {
                        return;
                    }
                    counter.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_secs(1));
                }
            });
        }
    });
    (port, sent)
}

/// `deployer-agent ARGS run --once` against `endpoint` instead of the fixture's S3 server;
/// killed (and the test failed) if it has not returned within 120 s.
fn run_against(host: &Host, fx: &Fixture, endpoint: u16, flags: &[&str]) -> Output {
    let mut args: Vec<&str> = flags.to_vec();
    args.extend(["run", "--once"]);
    let env: Vec<(String, String)> = host
        .env(fx)
        .into_iter()
        .map(|(k, v)| match k.as_str() {
            "AWS_ENDPOINT_URL" => (k, format!("http://127.0.0.1:{endpoint}")),
            _ => (k, v),
        })
        .collect();
    let started = Instant::now();
    let out = deployer_tests::output_within(
        Command::new(bin("deployer-agent"))
            .args(host.args(&args))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap())
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .envs(env),
        Duration::from_secs(120),
        "the agent",
    );
    eprintln!("agent {flags:?} returned after {:?}", started.elapsed());
    out
}

#[test]
fn a_store_that_hangs_or_trickles_ends_the_run_with_a_timeout() {
    let fx = Fixture::s3();
    let (host, _app, port) = hello_v1_running(&fx);
    let before = host.state()["services"].clone();
    let kept = |out: &Output, bound: &str| {
        out.fails_with(
            5,
            &format!("the store s3://deploy/prod did not answer get manifest.json within {bound}"),
        );
        assert_eq!(host.state()["services"], before, "nothing changed");
        assert_eq!(body(port).as_deref(), Some("hello from v1\n"));
    };

    // Accepts the connection, never answers: the S3 operation timeout ends each request
    // (the poll, then the host report), retries included.
    let (hanging, accepted) = hanging_endpoint();
    let out = run_against(&host, &fx, hanging, &[]);
    kept(&out, "30 s (the S3 operation timeout)");
    assert!(accepted.load(Ordering::SeqCst) > 0);
    // With a short --store-deadline, the run's budget ends it sooner.
    let out = run_against(&host, &fx, hanging, &["--store-deadline", "5s"]);
    kept(&out, "5 s (the run's --store-deadline is used up");

    // Answers, then sends a byte a second: never idle, so only the deadline ends it.
    let (trickling, sent) = trickling_endpoint();
    let out = run_against(&host, &fx, trickling, &["--store-deadline", "5s"]);
    kept(&out, "5 s (the run's --store-deadline is used up");
    assert!(sent.load(Ordering::SeqCst) > 0, "the body was trickling");

    // The real store again: a plain poll.
    host.run_once(&fx).ok();
    assert_eq!(host.state()["services"], before);
}

#[test]
fn a_symlinked_status_directory_in_a_file_store_is_not_written_through() {
    let fx = Fixture::file();
    let host = Host::new();
    let app = App::new();
    let port = free_port();
    declare_hello(&fx, port);
    app.set_version("v1", false);
    app.push(&fx);

    // The attacker points <store>/status at a directory the agent (root) may write.
    let outside = tempfile::tempdir().unwrap();
    let status = store_dir(&fx).join("status");
    let _ = std::fs::remove_dir_all(&status);
    std::os::unix::fs::symlink(outside.path(), &status).unwrap();

    let out = host.run_once(&fx).ok();
    assert_eq!(body(port).as_deref(), Some("hello from v1\n"), "deployed");
    assert!(
        out.stderr_str().contains("could not write status/biz.json")
            && out.stderr_str().contains("status is a symlink"),
        "{}",
        out.stderr_str()
    );
    assert_eq!(
        std::fs::read_dir(outside.path()).unwrap().count(),
        0,
        "nothing written outside the store"
    );
    assert_eq!(
        host.state()["services"]["hello"]["health"],
        json!("healthy")
    );

    // Once the link is gone, the next run writes the report where it belongs.
    std::fs::remove_file(&status).unwrap();
    host.run_once(&fx).ok();
    let report = std::fs::symlink_metadata(status.join("biz.json")).unwrap();
    assert!(report.is_file());
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
}
