//! Compare-and-swap under contention: 20 writers at once, as 20 separate processes, and no
//! update is lost.

use std::process::{Command, Stdio};

use deployer_tests::{OutputExt, bin};
use serde_json::Value;

use crate::fixture::Fixture;

fn twenty_concurrent_edits(fx: &Fixture) {
    fx.dm(&["init"]).ok();
    let children: Vec<_> = (0..20)
        .map(|i| {
            let service = format!(
                r#"{{"name": "svc-{i:02}", "artifact": {{"storePath": "/nix/store/placeholder"}}, "hosts": ["biz"]}}"#
            );
            Command::new(bin("deploy-manifest"))
                .args(["add-service", &service])
                .env_clear()
                .env("HOME", std::env::temp_dir())
                .env("USER", format!("writer{i}"))
                .env("AWS_EC2_METADATA_DISABLED", "true")
                .envs(fx.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        child.wait_with_output().unwrap().ok();
    }

    let current: Value = serde_json::from_slice(&fx.dm(&["show"]).ok().stdout).unwrap();
    let mut names: Vec<&str> = current["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    names.sort();
    let want: Vec<String> = (0..20).map(|i| format!("svc-{i:02}")).collect();
    assert_eq!(
        names, want,
        "every one of the 20 edits is in the current manifest"
    );

    // `list` parses every version object; each writer's version is on the one chain and
    // versions that lost a race were removed.
    let list: Vec<Value> = serde_json::from_slice(&fx.dm(&["list", "--json"]).ok().stdout).unwrap();
    assert_eq!(list.len(), 21, "init + 20 edits: {list:#?}");
    for pair in list.windows(2) {
        assert_eq!(pair[0]["parent"], pair[1]["version"]);
        assert_eq!(
            pair[0]["services"].as_u64().unwrap(),
            pair[1]["services"].as_u64().unwrap() + 1
        );
    }
    assert!(list.iter().all(|v| v["orphan"] == Value::Bool(false)));
}

#[test]
fn twenty_concurrent_edits_on_s3() {
    twenty_concurrent_edits(&Fixture::s3());
}

#[test]
fn twenty_concurrent_edits_on_file_store() {
    twenty_concurrent_edits(&Fixture::file());
}
