//! A run's cost grows with what changed, not with what exists (issue 18), counted against a
//! real systemd user manager: the calls a run makes to systemd and its writes of
//! `state.json` are the same for 3 deployed services and for 24.

use deployer_tests::{OutputExt, free_port};
use serde_json::{Value, json};

use crate::agent::{Host, hello_v1_running};
use crate::fixture::Fixture;
use crate::infra::{first_artifact, hello};

/// `[systemd calls, state writes, store requests]` of an idle run (nothing changed), then of a
/// run whose manifest changed elsewhere (every service kept).
fn costs(host: &Host, fx: &Fixture, touch: &str) -> [[u64; 3]; 2] {
    let counts = |r: &Value| {
        [
            r["systemdCalls"].as_u64().unwrap(),
            r["stateWrites"].as_u64().unwrap(),
            r["storeRequests"].as_u64().unwrap(),
        ]
    };
    let idle = host.run_report(fx);
    assert_eq!(idle["unchanged"], json!(true), "{idle}");
    fx.dm(&[
        "add-service",
        &json!({"name": touch, "artifact": {"storePath": "/nix/store/placeholder"}, "hosts": ["other"]}).to_string(),
    ])
    .ok();
    let kept = host.run_report(fx);
    let outcomes: Vec<&Value> = kept["services"].as_object().unwrap().values().collect();
    assert!(
        outcomes.iter().all(|o| o["outcome"] == json!("kept")),
        "{kept}"
    );
    assert_eq!(kept["systemdChanges"], json!(0), "{kept}");
    [counts(&idle), counts(&kept)]
}

#[test]
fn a_run_costs_the_same_for_3_services_and_for_24() {
    let fx = Fixture::file();
    let (host, _app, _) = hello_v1_running(&fx);
    let artifact = first_artifact(&fx);
    let add = |range: std::ops::Range<u32>| {
        for i in range {
            let s = hello(&format!("svc{i}"), free_port(), &artifact);
            fx.dm(&["add-service", &s.to_string()]).ok();
        }
        host.run_once(&fx).ok();
    };
    add(1..3);
    let small = costs(&host, &fx, "elsewhere-a");
    // Idle: one systemd call (every unit's state at once), one write (the poll's time), one
    // request (the conditional GET). Kept: the units listed and asked about (2); the state
    // and the report recorded (2); the manifest and the report written (2).
    assert_eq!(small, [[1, 1, 1], [2, 2, 2]], "3 services");
    add(3..24);
    let state = host.state();
    assert_eq!(state["services"].as_object().unwrap().len(), 24);
    assert_eq!(costs(&host, &fx, "elsewhere-b"), small, "24 services");
}
