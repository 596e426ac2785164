//! `deploy-manifest` as seed 004 uses it, on `file://` and on a real S3 server.

use deployer_tests::OutputExt;
use serde_json::{Value, json};

use crate::fixture::{Fixture, both};

/// The service of seed 004's "Adding New Service", verbatim.
const SEED_SERVICE: &str = r#"{
"name": "my-service",
"artifact": {"storePath": "/nix/store/placeholder"},
"hosts": ["biz"],
"exec": {"command": null, "user": "root", "group": "root"},
"env": {"PORT": "8080"},
"envFile": "/var/lib/deployer-secrets/my-service.env",
"http": {"domain": "my.example.com", "path": "/", "internalPort": 8080}
}"#;

const REAL_PATH: &str = "/nix/store/0c0hpb5bblw0gb2k1s2a5j7bn3ldf5r8-my-service";

fn json_out(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", out.stdout_str()))
}

fn versions(fx: &Fixture) -> Vec<Value> {
    json_out(&fx.dm(&["list", "--json"]).ok())
        .as_array()
        .unwrap()
        .clone()
}

fn first_word(out: &std::process::Output) -> String {
    out.stdout_str()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

fn seed_workflow(fx: &Fixture) {
    let init = fx.dm(&["init"]).ok();
    assert!(
        init.stdout_str().contains("initialised"),
        "{}",
        init.stdout_str()
    );
    let again = fx.dm(&["init"]).ok();
    assert!(again.stdout_str().contains("already has a manifest"));

    let added = fx.dm(&["add-service", SEED_SERVICE]).ok();
    let v_added = first_word(&added);
    assert!(v_added.starts_with("manifest-"), "{}", added.stdout_str());

    // Seed 004: `deploy-manifest show | jq '.services[] | select(.name == "ava")'`.
    let out = fx
        .sh(r#"deploy-manifest show | jq '.services[] | select(.name == "my-service")'"#)
        .ok();
    let seed: Value = serde_json::from_str(SEED_SERVICE).unwrap();
    assert_eq!(json_out(&out), seed);
    let out = fx
        .sh(r#"deploy-manifest show | jq '.services[] | .artifact.storePath'"#)
        .ok();
    assert_eq!(out.stdout_str().trim(), "\"/nix/store/placeholder\"");

    let set = fx.dm(&["set-artifact", "my-service", REAL_PATH]).ok();
    let v_set = first_word(&set);
    assert!(set.stdout_str().contains("set my-service artifact"));

    let list = versions(fx);
    assert_eq!(list.len(), 3, "{list:?}");
    assert_eq!(list[0]["version"], json!(v_set));
    assert_eq!(list[0]["current"], json!(true));
    assert_eq!(list[1]["version"], json!(v_added));
    assert_eq!(list[0]["parent"], json!(v_added));
    assert_eq!(list[2]["summary"], json!("init"));
    assert!(list.iter().all(|v| v["orphan"] == json!(false)));
    assert_eq!(
        list[1]["createdBy"].as_str().unwrap().split('@').next(),
        Some("tester")
    );
    let human = fx.dm(&["list"]).ok().stdout_str();
    assert!(
        human
            .lines()
            .nth(1)
            .unwrap()
            .starts_with(&format!("* {v_set}")),
        "{human}"
    );

    let diff = fx.dm(&["diff", &v_added, &v_set]).ok().stdout_str();
    assert!(
        diff.contains("~ service my-service") && diff.contains(REAL_PATH),
        "{diff}"
    );

    // Env values never show in a diff.
    fx.dm(&[
        "update-service",
        "my-service",
        r#"{"env": {"SECRET_TOKEN": "hunter2"}}"#,
    ])
    .ok();
    let diff = fx.dm(&["diff", &v_set]).ok().stdout_str();
    assert!(diff.contains("env.SECRET_TOKEN"), "{diff}");
    assert!(!diff.contains("hunter2"), "{diff}");
    let diff_json = fx
        .dm(&["diff", &v_set, "current", "--json"])
        .ok()
        .stdout_str();
    assert!(!diff_json.contains("hunter2"), "{diff_json}");

    // Seed 004: `deploy-manifest rollback manifest-YYYYMMDD.json`.
    let before = json_out(&fx.dm(&["show"]).ok());
    let rb = fx.dm(&["rollback", &format!("{v_added}.json")]).ok();
    assert!(rb.stdout_str().contains(&format!("rollback to {v_added}")));
    let now = json_out(&fx.dm(&["show"]).ok());
    let service = &now["services"][0];
    assert_eq!(
        service["artifact"]["storePath"],
        json!("/nix/store/placeholder")
    );
    assert!(service["env"].get("SECRET_TOKEN").is_none());
    assert_eq!(now["rolledBackFrom"], before["version"]);
    assert_eq!(now["rolledBackTo"], json!(v_added));
    assert_eq!(now["parent"], before["version"]);

    // No argument: back to the version before the current one.
    fx.dm(&["rollback"]).ok();
    let again = json_out(&fx.dm(&["show"]).ok());
    assert_eq!(again["services"], before["services"]);

    fx.dm(&["remove-service", "my-service"]).ok();
    assert_eq!(json_out(&fx.dm(&["show"]).ok())["services"], json!([]));

    // Every version is still there, parses, and forms one chain.
    let list = versions(fx);
    assert_eq!(list.len(), 7);
    for pair in list.windows(2) {
        assert_eq!(pair[0]["parent"], pair[1]["version"]);
    }
    for v in &list {
        let shown = json_out(&fx.dm(&["show", v["version"].as_str().unwrap()]).ok());
        assert_eq!(shown["version"], v["version"]);
    }
}

#[test]
fn seed_workflow_on_file_store() {
    seed_workflow(&Fixture::file());
}

#[test]
fn seed_workflow_on_s3() {
    seed_workflow(&Fixture::s3());
}

#[test]
fn bad_input_gets_a_clear_error_and_writes_nothing() {
    for fx in both() {
        fx.dm(&["init"]).ok();
        fx.dm(&["add-service", SEED_SERVICE]).ok();
        let before_list = versions(&fx);
        let before = fx.dm(&["show"]).ok().stdout;

        let mut bad_port: Value = serde_json::from_str(SEED_SERVICE).unwrap();
        bad_port["name"] = json!("other");
        bad_port["http"]["internalPort"] = json!(70000);
        let injected = SEED_SERVICE
            .replace("my-service", "other")
            .replace("\"8080\"", "\"8080\\nExecStartPre=/bin/sh\"");
        let cases: Vec<(Vec<String>, i32, &str)> = vec![
            (
                vec!["add-service".into(), "{not json".into()],
                3,
                "not valid JSON",
            ),
            (
                vec!["add-service".into(), bad_port.to_string()],
                3,
                "services[1] (other).http.internalPort",
            ),
            (
                vec!["add-service".into(), injected],
                3,
                "services[1] (other).env.PORT",
            ),
            (
                vec!["add-service".into(), SEED_SERVICE.into()],
                3,
                "already exists",
            ),
            (
                vec!["update-service".into(), "nope".into(), "{}".into()],
                4,
                "no service named \"nope\"",
            ),
            (
                vec![
                    "update-service".into(),
                    "my-service".into(),
                    r#"{"hosts": "biz"}"#.into(),
                ],
                3,
                ".hosts",
            ),
            (
                vec![
                    "set-artifact".into(),
                    "my-service".into(),
                    "relative/path".into(),
                ],
                2,
                "neither",
            ),
            (
                vec!["show".into(), "manifest-20200101T000000Z-00000000".into()],
                4,
                "unknown version",
            ),
            (
                vec![
                    "rollback".into(),
                    "manifest-20200101T000000Z-00000000.json".into(),
                ],
                4,
                "unknown version",
            ),
            (vec!["diff".into(), "garbage".into()], 4, "unknown version"),
        ];
        for (args, code, needle) in cases {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = fx.dm(&args);
            let err = out.stderr_str();
            assert_eq!(out.code(), code, "{args:?} on {}: {err}", fx.url);
            assert!(err.contains(needle), "{args:?}: {err:?} lacks {needle:?}");
            assert_eq!(err.lines().count(), 1, "one line: {err}");
        }
        assert_eq!(versions(&fx), before_list, "nothing was written");
        assert_eq!(fx.dm(&["show"]).ok().stdout, before);
    }
}

#[test]
fn add_service_reads_stdin() {
    let fx = Fixture::file();
    fx.dm(&["init"]).ok();
    fx.dm_stdin(&["add-service", "-"], SEED_SERVICE).ok();
    let shown = json_out(&fx.dm(&["show"]).ok());
    assert_eq!(shown["services"][0]["name"], json!("my-service"));
}

#[test]
fn uninitialised_store_says_to_run_init() {
    for fx in both() {
        let out = fx.dm(&["show"]);
        out.fails_with(4, "init` first");
    }
}

#[test]
fn validate_checks_files_and_the_current_manifest() {
    let fx = Fixture::file();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.json");
    let bad = dir.path().join("bad.json");
    std::fs::write(
        &good,
        format!(r#"{{"schemaVersion": 1, "services": [{SEED_SERVICE}]}}"#),
    )
    .unwrap();
    std::fs::write(
        &bad,
        r#"{"schemaVersion": 1, "services": [{"name": "x", "hosts": ["biz"], "evn": {}}]}"#,
    )
    .unwrap();
    let ok = fx.dm(&["validate", good.to_str().unwrap()]).ok();
    assert!(ok.stdout_str().contains("valid (1 services)"));
    let out = fx.dm(&["validate", bad.to_str().unwrap()]);
    assert_eq!(out.code(), 3);
    let err = out.stderr_str();
    assert!(
        err.contains("services[0] (x)") && err.contains("artifact") && err.contains("evn"),
        "{err}"
    );
    let out = fx.dm(&["validate", "--json", bad.to_str().unwrap()]);
    assert_eq!(out.code(), 3);
    let report = json_out(&out);
    assert_eq!(report["valid"], json!(false));
    assert!(
        report["problems"].as_array().unwrap().len() >= 2,
        "{report}"
    );
    let out = fx.dm_stdin(&["validate", "-"], "[]");
    assert_eq!(out.code(), 3);
    fx.dm(&["init"]).ok();
    assert!(
        fx.dm(&["validate"])
            .ok()
            .stdout_str()
            .contains("valid (0 services)")
    );
}

#[test]
fn unusable_s3_stores_fail_with_what_to_do() {
    let server = deployer_tests::S3Server::start();
    server.create_bucket("deploy");
    let closed = deployer_tests::free_port();
    let with = |changes: &[(&str, Option<String>)]| {
        let mut env: Vec<(String, String)> = server.env();
        for (k, v) in changes {
            env.retain(|(name, _)| name != k);
            if let Some(v) = v {
                env.push((k.to_string(), v.clone()));
            }
        }
        env
    };
    let cases = [
        (
            with(&[(
                "AWS_ENDPOINT_URL",
                Some(format!("http://127.0.0.1:{closed}")),
            )]),
            "s3://deploy",
            "cannot reach the store",
        ),
        (
            with(&[("AWS_ACCESS_KEY_ID", None), ("AWS_SECRET_ACCESS_KEY", None)]),
            "s3://deploy",
            "no usable AWS credentials",
        ),
        (with(&[]), "s3://no-such-bucket", "does not exist"),
        (with(&[]), "s3://Bad_Bucket", "invalid store URL"),
    ];
    for (env, url, needle) in cases {
        let out = deployer_tests::run("deploy-manifest", &["--store", url, "show"], &env, None);
        let err = out.stderr_str();
        assert!(err.contains(needle), "{url}: {err:?} lacks {needle:?}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        let want = if needle == "invalid store URL" { 2 } else { 5 };
        assert_eq!(out.code(), want, "{url}: {err}");
    }
}

#[test]
fn list_marks_versions_that_never_became_current_and_honours_limit() {
    let fx = Fixture::file();
    fx.dm(&["init"]).ok();
    fx.dm(&["add-service", SEED_SERVICE]).ok();
    // What a writer that crashed between its two writes leaves behind: a version object
    // that manifest.json never pointed at.
    let store_dir = fx.url.strip_prefix("file://").unwrap();
    let current = fx.dm(&["show"]).ok().stdout;
    let mut orphan: Value = serde_json::from_slice(&current).unwrap();
    orphan["version"] = json!("manifest-20991231T235959Z-deadbeef");
    orphan["summary"] = json!("crashed write");
    std::fs::write(
        format!("{store_dir}/manifests/manifest-20991231T235959Z-deadbeef.json"),
        orphan.to_string(),
    )
    .unwrap();
    let list = versions(&fx);
    assert_eq!(list.len(), 3);
    assert_eq!(
        list[0]["current"],
        json!(true),
        "the newest name is not the current one"
    );
    assert_eq!(
        list[2]["version"],
        json!("manifest-20991231T235959Z-deadbeef")
    );
    assert_eq!(list[2]["orphan"], json!(true));
    let human = fx.dm(&["list"]).ok().stdout_str();
    assert!(
        human.contains("! manifest-20991231T235959Z-deadbeef") && human.contains("(never current)"),
        "{human}"
    );
    let limited = json_out(&fx.dm(&["list", "--limit", "1", "--json"]).ok());
    assert_eq!(limited.as_array().unwrap().len(), 1);
    assert_eq!(limited[0]["version"], list[0]["version"]);
    // The orphan can still be inspected and even rolled back to on purpose.
    fx.dm(&["show", "manifest-20991231T235959Z-deadbeef"]).ok();
}

/// A manifest written before a validation rule existed (here: an `envFile` outside the
/// service's own secrets) is refused by readers, but a writer can still build on it, so
/// the edit that fixes it is possible; an edit that does not fix it writes nothing.
#[test]
fn a_head_that_breaks_a_newer_rule_can_be_fixed_by_an_edit() {
    let fx = Fixture::file();
    fx.dm(&["init"]).ok();
    fx.dm(&[
        "add-service",
        r#"{"name": "web", "artifact": {"storePath": "/nix/store/placeholder"}, "hosts": ["biz"]}"#,
    ])
    .ok();
    let store = std::path::PathBuf::from(fx.url.strip_prefix("file://").unwrap());
    let mut head: Value =
        serde_json::from_slice(&std::fs::read(store.join("manifest.json")).unwrap()).unwrap();
    head["services"][0]["envFile"] = json!("/run/keys/web-secrets");
    std::fs::write(store.join("manifest.json"), head.to_string()).unwrap();
    let out = fx.dm(&["show"]);
    out.fails_with(3, "envFile");

    let out = fx.dm(&["update-service", "web", r#"{"env": {"A": "1"}}"#]);
    assert_eq!(
        out.code(),
        3,
        "an edit that keeps the problem: {}",
        out.stderr_str()
    );
    let out = fx.dm(&["update-service", "web", r#"{"envFile": null}"#]);
    assert_eq!(out.code(), 0, "{}", out.stderr_str());
    assert!(
        out.stderr_str().contains("envFile"),
        "warned: {}",
        out.stderr_str()
    );
    let shown = json_out(&fx.dm(&["show"]).ok());
    assert!(shown["services"][0].get("envFile").is_none(), "{shown}");
}

/// A writer killed between making its version current and keeping the version's copy
/// under manifests/ (the store holds manifest.json only): reads still find the version, and
/// the next write keeps its copy, so it can be rolled back to.
#[test]
fn a_version_whose_copy_was_not_kept_is_found_and_kept_by_the_next_write() {
    let fx = Fixture::file();
    fx.dm(&["init"]).ok();
    fx.dm(&[
        "add-service",
        r#"{"name": "web", "artifact": {"storePath": "/nix/store/placeholder"}, "hosts": ["biz"]}"#,
    ])
    .ok();
    let store = std::path::PathBuf::from(fx.url.strip_prefix("file://").unwrap());
    let head = json_out(&fx.dm(&["show"]).ok())["version"]
        .as_str()
        .unwrap()
        .to_owned();
    let copy = store.join(format!("manifests/{head}.json"));
    let kept = std::fs::read(&copy).unwrap();
    std::fs::remove_file(&copy).unwrap();

    assert_eq!(
        json_out(&fx.dm(&["show", &head]).ok())["version"],
        json!(head)
    );
    assert_eq!(versions(&fx)[0]["version"], json!(head));
    fx.dm(&["update-service", "web", r#"{"env": {"A": "1"}}"#])
        .ok();
    assert_eq!(std::fs::read(&copy).unwrap(), kept, "the same bytes, kept");
    fx.dm(&["rollback", &head]).ok();
    assert!(
        json_out(&fx.dm(&["show"]).ok())["services"][0]
            .get("env")
            .is_none()
    );
}
