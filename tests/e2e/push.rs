//! `push.sh <namespace>`: build, upload content-addressed artifacts, update the manifest.
//! Real builds (sh, real Nix), a real S3 server and file://.

use std::path::Path;
use std::process::Output;

use deploy_manifest::model::{ArchiveFormat, Artifact};
use deploy_manifest::store::ObjectStore;
use deployer_tests::{OutputExt, run_in};
use serde_json::{Value, json};

use crate::fixture::{Fixture, both};

/// A pushing repository: a deploy.toml and whatever the builds need.
struct Repo {
    dir: tempfile::TempDir,
}

impl Repo {
    fn new(config: &str) -> Repo {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("deploy.toml"), config).unwrap();
        Repo { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `push.sh ARGS` from the repository's directory, as a developer runs it.
    fn push(&self, fx: &Fixture, args: &[&str]) -> Output {
        self.push_with(fx, args, &[])
    }

    fn push_with(&self, fx: &Fixture, args: &[&str], extra: &[(String, String)]) -> Output {
        let mut env = fx.env.clone();
        env.extend_from_slice(extra);
        env.push((
            "DEPLOY_NIX_STAGING".into(),
            self.path().join(".nix-staging").display().to_string(),
        ));
        // This machine has no network: build locally instead of asking cache.nixos.org.
        env.push(("NIX_CONFIG".into(), "substituters =".into()));
        run_in(self.path(), "push.sh", args, &env)
    }
}

const APP_CONFIG: &str = r#"
[namespaces."Biz/App.py"]
builder = "command"
command = "mkdir -p out/bin && printf '#!/bin/sh\necho %s\n' \"$(cat version)\" > out/bin/app && chmod +x out/bin/app"
output = "out"
"#;

fn add_service(fx: &Fixture, name: &str, namespace: &str) {
    let service = json!({"name": name, "namespace": namespace,
        "artifact": {"storePath": "/nix/store/placeholder"}, "hosts": ["biz"]});
    fx.dm(&["add-service", &service.to_string()]).ok();
}

fn report(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", out.stdout_str(), out.stderr_str()))
}

fn version_count(fx: &Fixture) -> usize {
    let list: Value = serde_json::from_slice(&fx.dm(&["list", "--json"]).ok().stdout).unwrap();
    list.as_array().unwrap().len()
}

fn current_artifact(fx: &Fixture, service: &str) -> Artifact {
    let m: Value = serde_json::from_slice(&fx.dm(&["show"]).ok().stdout).unwrap();
    let s = m["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == json!(service))
        .unwrap();
    serde_json::from_value(s["artifact"].clone()).unwrap()
}

/// Download the archive the manifest names, check its sha256, unpack it, return bin/app.
fn fetch_app(fx: &Fixture, artifact: &Artifact) -> String {
    let Artifact::Archive(a) = artifact else {
        panic!("expected an archive, got {artifact:?}")
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a");
    let got = rt
        .block_on(async {
            fx.store()
                .await
                .get_to_file(&a.key(), &file, &(), None)
                .await
        })
        .unwrap()
        .expect("the archive is in the store");
    assert_eq!((got.sha256.as_str(), got.size), (a.sha256.as_str(), a.size));
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let format = a.format.unwrap_or_default();
    deploy_manifest::archive::unpack(
        std::fs::File::open(&file).unwrap(),
        format,
        &out,
        Default::default(),
    )
    .unwrap();
    std::fs::read_to_string(out.join("bin/app")).unwrap()
}

fn archive_push(fx: &Fixture) {
    let repo = Repo::new(APP_CONFIG);
    std::fs::write(repo.path().join("version"), "v1").unwrap();
    fx.dm(&["init"]).ok();
    add_service(fx, "app", "Biz/App.py");
    let before = version_count(fx);

    let first = report(&repo.push(fx, &["Biz/App.py", "--json"]).ok());
    assert_eq!(first["uploaded"]["objects"], json!(1), "{first}");
    assert_eq!(first["service"], json!("app"));
    assert!(first["version"].as_str().unwrap().starts_with("manifest-"));
    let v1 = current_artifact(fx, "app");
    assert!(
        matches!(&v1, Artifact::Archive(a) if a.format == Some(ArchiveFormat::TarZst) && a.name == "app")
    );
    assert_eq!(fetch_app(fx, &v1), "#!/bin/sh\necho v1\n");
    assert_eq!(version_count(fx), before + 1);

    // The same output again: nothing uploaded, no new version.
    let again = report(&repo.push(fx, &["Biz/App.py", "--json"]).ok());
    assert_eq!(again["uploaded"]["objects"], json!(0), "{again}");
    assert_eq!(again["uploaded"]["skippedObjects"], json!(1));
    assert_eq!(again["unchanged"], json!(true));
    assert_eq!(again["version"], Value::Null);
    assert_eq!(version_count(fx), before + 1);

    // A new build: a new artifact and a new version whose summary says what happened.
    std::fs::write(repo.path().join("version"), "v2").unwrap();
    let human = repo.push(fx, &["Biz/App.py"]).ok();
    assert!(
        human.stdout_str().contains("app -> app@"),
        "{}",
        human.stdout_str()
    );
    let v2 = current_artifact(fx, "app");
    assert_ne!(v1, v2);
    assert_eq!(fetch_app(fx, &v2), "#!/bin/sh\necho v2\n");
    let list: Value = serde_json::from_slice(&fx.dm(&["list", "--json"]).ok().stdout).unwrap();
    assert!(
        list[0]["summary"]
            .as_str()
            .unwrap()
            .starts_with("push Biz/App.py: app -> app@")
    );
    assert_eq!(
        list[0]["createdBy"].as_str().unwrap().split('@').next(),
        Some("tester")
    );
}

#[test]
fn archive_push_on_file_store() {
    archive_push(&Fixture::file());
}

#[test]
fn archive_push_on_s3() {
    archive_push(&Fixture::s3());
}

/// The store's nix-cache/, downloaded into a directory Nix can read as a binary cache.
fn download_nix_cache(fx: &Fixture) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = fx.store().await;
        for key in store.list("nix-cache/").await.unwrap() {
            let rel = key.strip_prefix("nix-cache/").unwrap();
            let dest = dir.path().join(rel);
            std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
            store
                .get_to_file(&key, &dest, &(), None)
                .await
                .unwrap()
                .unwrap();
        }
    });
    dir
}

fn nix_push(fx: &Fixture, config: &str) {
    let repo = Repo::new(config);
    std::fs::create_dir_all(repo.path().join("src/bin")).unwrap();
    // Unique content per test run, so the store path is new to this machine's Nix.
    let stamp = format!("{:?}", std::time::SystemTime::now());
    std::fs::write(
        repo.path().join("src/bin/app"),
        format!("#!/bin/sh\necho {stamp}\n"),
    )
    .unwrap();
    std::fs::write(
        repo.path().join("default.nix"),
        format!(
            r#"{{ app = derivation {{ name = "app"; system = builtins.currentSystem; builder = "/bin/sh";
                 args = [ "-c" "/bin/mkdir -p $out/bin; echo 'echo {stamp}' > $out/bin/app" ]; }}; }}"#
        ),
    )
    .unwrap();
    fx.dm(&["init"]).ok();
    add_service(fx, "app", "Biz/App.py");

    let first = report(&repo.push(fx, &["Biz/App.py", "--json"]).ok());
    let Artifact::StorePath(path) = current_artifact(fx, "app") else {
        panic!("expected a store path")
    };
    assert_eq!(first["artifact"]["storePath"], json!(path));
    assert!(
        first["uploaded"]["objects"].as_u64().unwrap() >= 3,
        "nix-cache-info, narinfo, nar: {first}"
    );

    // What is in the store is a binary cache Nix itself accepts, holding the closure.
    let cache = download_nix_cache(fx);
    let info = run_in(
        cache.path(),
        "nix",
        &[
            "--extra-experimental-features",
            "nix-command",
            "path-info",
            "--store",
            &format!("file://{}", cache.path().display()),
            &path,
        ],
        &[],
    )
    .ok();
    assert_eq!(info.stdout_str().trim(), path);

    let again = report(&repo.push(fx, &["Biz/App.py", "--json"]).ok());
    assert_eq!(again["uploaded"]["objects"], json!(0), "{again}");
    assert_eq!(again["unchanged"], json!(true));
}

#[test]
fn nix_store_add_push_on_s3() {
    nix_push(
        &Fixture::s3(),
        r#"
        [namespaces."Biz/App.py"]
        builder = "nix"
        command = "chmod +x src/bin/app"
        output = "src"
        "#,
    );
}

#[test]
fn nix_build_attribute_push_on_file_store() {
    nix_push(
        &Fixture::file(),
        r#"
        [defaults]
        builder = "nix"
        attribute = "app"
        "#,
    );
}

#[test]
fn bad_input_is_refused_and_the_manifest_is_unchanged() {
    for fx in both() {
        let repo = Repo::new(
            r#"
            [namespaces."Biz/App.py"]
            command = "touch built-marker; mkdir -p out"
            output = "out"
            [namespaces."Biz/Broken.py"]
            command = "echo compiler-says-no >&2; exit 3"
            output = "out"
            [namespaces."Biz/Orphan.py"]
            command = "touch built-marker; mkdir -p out"
            output = "out"
            "#,
        );
        fx.dm(&["init"]).ok();
        add_service(&fx, "app", "Biz/App.py");
        add_service(&fx, "broken", "Biz/Broken.py");
        let before = fx.dm(&["list", "--json"]).ok().stdout;

        let out = repo.push(&fx, &["Biz/Nope.py"]);
        assert_eq!(out.code(), 2, "{}", out.stderr_str());
        assert!(
            out.stderr_str()
                .contains("unknown namespace \"Biz/Nope.py\"")
        );

        let out = repo.push(&fx, &["Biz/Broken.py"]);
        assert_eq!(out.code(), 7, "{}", out.stderr_str());
        assert!(
            out.stderr_str().contains("compiler-says-no"),
            "the build's output is shown"
        );
        assert!(out.stderr_str().contains("build of Biz/Broken.py failed"));

        let out = repo.push(&fx, &["Biz/Orphan.py"]);
        assert_eq!(out.code(), 4, "{}", out.stderr_str());
        assert!(
            out.stderr_str()
                .contains("no service is built from namespace")
        );
        assert!(
            !repo.path().join("built-marker").exists(),
            "nothing is built for a missing service"
        );

        let out = repo.push(&fx, &["Biz/App.py", "--service", "ghost"]);
        assert_eq!(out.code(), 4, "{}", out.stderr_str());

        assert_eq!(
            fx.dm(&["list", "--json"]).ok().stdout,
            before,
            "manifest unchanged"
        );
    }
}

#[test]
fn unreachable_store_is_a_clear_error() {
    let repo = Repo::new(APP_CONFIG);
    std::fs::write(repo.path().join("version"), "v1").unwrap();
    let closed = deployer_tests::free_port();
    let env = vec![
        ("DEPLOY_STORE".to_owned(), "s3://deploy".to_owned()),
        (
            "AWS_ENDPOINT_URL".to_owned(),
            format!("http://127.0.0.1:{closed}"),
        ),
        ("AWS_ACCESS_KEY_ID".to_owned(), "x".to_owned()),
        ("AWS_SECRET_ACCESS_KEY".to_owned(), "x".to_owned()),
    ];
    let out = run_in(repo.path(), "push.sh", &["Biz/App.py"], &env);
    out.fails_with(5, "cannot reach the store");
}

#[test]
fn dry_run_uploads_and_writes_nothing() {
    let fx = Fixture::file();
    let repo = Repo::new(APP_CONFIG);
    std::fs::write(repo.path().join("version"), "v1").unwrap();
    fx.dm(&["init"]).ok();
    add_service(&fx, "app", "Biz/App.py");
    let before = fx.dm(&["list", "--json"]).ok().stdout;
    let r = report(&repo.push(&fx, &["Biz/App.py", "--dry-run", "--json"]).ok());
    assert_eq!(r["dryRun"], json!(true));
    assert_eq!(
        r["uploaded"]["objects"],
        json!(1),
        "it would upload the archive: {r}"
    );
    assert_eq!(r["version"], Value::Null);
    assert_eq!(fx.dm(&["list", "--json"]).ok().stdout, before);
    let store_dir = fx.url.strip_prefix("file://").unwrap();
    assert!(
        !Path::new(store_dir).join("artifacts").exists(),
        "nothing uploaded"
    );
}

#[test]
fn two_pushes_at_once_both_land() {
    for fx in both() {
        let repo = Repo::new(
            r#"
            [namespaces."Biz/A.py"]
            command = "mkdir -p a && echo a > a/file"
            output = "a"
            [namespaces."Biz/B.py"]
            command = "mkdir -p b && echo b > b/file"
            output = "b"
            "#,
        );
        fx.dm(&["init"]).ok();
        add_service(&fx, "a", "Biz/A.py");
        add_service(&fx, "b", "Biz/B.py");
        let before = version_count(&fx);
        let (ra, rb) = std::thread::scope(|s| {
            let a = s.spawn(|| repo.push(&fx, &["Biz/A.py"]));
            let b = s.spawn(|| repo.push(&fx, &["Biz/B.py"]));
            (a.join().unwrap(), b.join().unwrap())
        });
        ra.ok();
        rb.ok();
        assert_eq!(version_count(&fx), before + 2);
        for name in ["a", "b"] {
            assert!(
                matches!(current_artifact(&fx, name), Artifact::Archive(_)),
                "{name} was pushed"
            );
        }
    }
}

#[test]
fn large_artifacts_go_up_in_parts_and_arrive_intact() {
    let fx = Fixture::s3();
    let repo = Repo::new(
        r#"
        [namespaces."Biz/Big.py"]
        command = "mkdir -p out && head -c 41943040 /dev/urandom > out/blob"
        output = "out"
        "#,
    );
    fx.dm(&["init"]).ok();
    add_service(&fx, "big", "Biz/Big.py");
    let mut env = fx.env.clone();
    env.push(("DEPLOY_S3_MULTIPART_MIB".into(), "16".into()));
    let out = run_in(repo.path(), "push.sh", &["Biz/Big.py", "--json"], &env).ok();
    let r = report(&out);
    assert!(r["uploaded"]["bytes"].as_u64().unwrap() > 40 << 20, "{r}");
    let Artifact::Archive(a) = current_artifact(&fx, "big") else {
        panic!("expected an archive")
    };
    // Three 16 MiB parts: download and check every byte against the recorded sha256.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let got = rt
        .block_on(async {
            fx.store()
                .await
                .get_to_file(&a.key(), &dir.path().join("a"), &(), None)
                .await
        })
        .unwrap()
        .unwrap();
    assert_eq!((got.sha256, got.size), (a.sha256, a.size));
}

/// `push.sh` from a checkout, with no `push` on PATH: it uses the one the checkout built
/// (`$CARGO_TARGET_DIR` or `target/`), and when there is none says how to build it (exit
/// 127, as a missing command). `ship.sh` pushes and then waits for the hosts (`--wait`).
#[test]
fn push_sh_finds_the_checkouts_push_and_ship_sh_waits() {
    let fx = Fixture::file();
    fx.dm(&["init"]).ok();
    add_service(&fx, "app", "Biz/App.py");
    let repo = Repo::new(APP_CONFIG);
    std::fs::write(repo.path().join("version"), "v1").unwrap();
    let target = deployer_tests::bin("push")
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .to_path_buf();
    let sh = |script: &Path, args: &[&str], target: &Path| {
        let mut env = fx.env.clone();
        env.push(("PATH".into(), "/usr/bin:/bin".into()));
        env.push(("CARGO_TARGET_DIR".into(), target.display().to_string()));
        std::process::Command::new(script)
            .args(args)
            .current_dir(repo.path())
            .env_clear()
            .envs(env)
            .output()
            .unwrap()
    };
    let checkout = deployer_tests::repo_root().join("push");
    let out = sh(&checkout.join("push.sh"), &["Biz/App.py"], &target);
    assert!(out.status.success(), "{}", out.stderr_str());
    let shown: Value = serde_json::from_slice(&fx.dm(&["show"]).ok().stdout).unwrap();
    assert!(
        shown["services"][0]["artifact"]["archive"].is_object(),
        "{shown}"
    );

    // A checkout that built nothing.
    let bare = tempfile::tempdir().unwrap();
    std::fs::create_dir(bare.path().join("push")).unwrap();
    let copy = bare.path().join("push/push.sh");
    std::fs::copy(checkout.join("push.sh"), &copy).unwrap();
    let out = sh(&copy, &["Biz/App.py"], bare.path());
    assert_eq!(out.code(), 127, "{}", out.stderr_str());
    assert!(
        out.stderr_str().contains("cargo build --release -p push")
            && out.stderr_str().contains("DEPLOYER_PUSH"),
        "{}",
        out.stderr_str()
    );

    // ship.sh: the push lands, then it waits for hosts; none reports here, so it times out
    // (exit 10) after the push.
    std::fs::write(repo.path().join("version"), "v2").unwrap();
    let before = fx.dm(&["show"]).ok().stdout;
    let out = sh(
        &checkout.join("ship.sh"),
        &["Biz/App.py", "--timeout", "1s"],
        &target,
    );
    assert_eq!(out.code(), 10, "{}", out.stderr_str());
    assert_ne!(
        fx.dm(&["show"]).ok().stdout,
        before,
        "pushed before waiting"
    );
}

#[test]
fn an_unchanged_tree_is_not_packed_again_and_a_changed_one_always_is() {
    let fx = Fixture::file();
    fx.dm(&["init"]).ok();
    add_service(&fx, "app", "Biz/App.py");
    // The build leaves out/ alone, as an up-to-date make does.
    let repo = Repo::new(
        "[namespaces.\"Biz/App.py\"]\nbuilder = \"command\"\ncommand = \"true\"\noutput = \"out\"\n",
    );
    let app = repo.path().join("out/bin/app");
    std::fs::create_dir_all(app.parent().unwrap()).unwrap();
    std::fs::write(&app, "#!/bin/sh\necho v1\n").unwrap();
    let cache = tempfile::tempdir().unwrap();
    let env = [(
        "DEPLOY_CACHE_DIR".to_owned(),
        cache.path().display().to_string(),
    )];
    let push = || {
        let out = repo.push_with(&fx, &["Biz/App.py", "--json"], &env).ok();
        let repacked = !out
            .stderr_str()
            .contains("is unchanged since it was packed");
        (report(&out), repacked)
    };
    // Just written: a stamp taken now is not trusted later, so it is packed both times.
    let (first, repacked) = push();
    assert!(repacked);
    assert_eq!(first["uploaded"]["objects"], json!(1), "{first}");
    let (_, repacked) = push();
    assert!(repacked, "a tree changed within 2 s is never remembered");
    // Settled: the next push remembers it, the one after does not pack.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let (_, repacked) = push();
    assert!(repacked);
    let (again, repacked) = push();
    assert!(!repacked, "unchanged tree packed again");
    assert_eq!(again["unchanged"], json!(true), "{again}");
    let v1 = current_artifact(&fx, "app");

    // The store lost the archive: packed and uploaded again.
    let Artifact::Archive(a) = &v1 else {
        panic!("{v1:?}")
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async { fx.store().await.delete(&a.key()).await.unwrap() });
    let (third, repacked) = push();
    assert!(repacked);
    assert_eq!(third["uploaded"]["objects"], json!(1), "{third}");
    assert_eq!(fetch_app(&fx, &v1), "#!/bin/sh\necho v1\n");

    // Changed in place, same size, same second: its change time moved, so it is packed.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    push();
    std::fs::write(&app, "#!/bin/sh\necho v2\n").unwrap();
    let (fourth, repacked) = push();
    assert!(repacked);
    assert_eq!(fourth["uploaded"]["objects"], json!(1), "{fourth}");
    let v2 = current_artifact(&fx, "app");
    assert_ne!(v1, v2);
    assert_eq!(fetch_app(&fx, &v2), "#!/bin/sh\necho v2\n");
}
