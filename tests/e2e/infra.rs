//! Declared infrastructure with real PostgreSQL and Redis run by the agent as systemd units
//! (user manager sandbox): a service with `database: true` and `redis: true` connects and
//! writes; the same manifest again changes nothing; two services never share a Redis
//! index; a failing migration keeps the old version; removal keeps the data.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use deployer_tests::{OutputExt, free_port, run_in};
use serde_json::{Value, json};

use crate::agent::{Host, body};
use crate::fixture::Fixture;

const HELLO: &str = include_str!("../../examples/hello/bin/hello");

fn write_exec(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// The app: a migration that creates a table, a start script that writes to Postgres and
/// Redis and then serves HTTP.
fn build(dir: &Path, version: &str, broken_migration: bool) {
    let app = dir.join("app");
    write_exec(&app.join("bin/hello"), HELLO);
    std::fs::write(app.join("VERSION"), version).unwrap();
    write_exec(
        &app.join("bin/migrate"),
        if broken_migration {
            "#!/bin/sh\necho 'migration 0002 failed' >&2\nexit 1\n"
        } else {
            "#!/bin/sh\nset -e\npsql \"$DATABASE_URL\" -v ON_ERROR_STOP=1 -q -c 'create table if not exists visits (version text)'\n"
        },
    );
    write_exec(
        &app.join("bin/app"),
        "#!/bin/sh\nset -e\nv=$(cat VERSION)\nredis-cli -u \"$REDIS_URL\" set greeting \"hi from $v\" >/dev/null\npsql \"$DATABASE_URL\" -v ON_ERROR_STOP=1 -q -c \"insert into visits values ('$v')\"\nexec python3 bin/hello\n",
    );
    write_exec(
        &app.join("bin/app2"),
        "#!/bin/sh\nset -e\nredis-cli -u \"$REDIS_URL\" set greeting other >/dev/null\nexec python3 bin/hello\n",
    );
    std::fs::write(
        dir.join("deploy.toml"),
        "[namespaces.\"Biz/App.py\"]\ncommand = \"true\"\noutput = \"app\"\n",
    )
    .unwrap();
}

fn psql(host: &Host, pg: u16, db: &str, sql: &str) -> Output {
    Command::new("runuser")
        .args(["-u", "postgres", "--", "psql", "-h"])
        .arg(host.state_dir().join("infra/db/run"))
        .args(["-p", &pg.to_string(), "-d", db, "-tAc", sql])
        .output()
        .unwrap()
}
use std::process::Output;

fn redis_get(port: u16, index: u64, key: &str) -> String {
    Command::new("redis-cli")
        .args([
            "-p",
            &port.to_string(),
            "-n",
            &index.to_string(),
            "get",
            key,
        ])
        .output()
        .unwrap()
        .stdout_str()
        .trim()
        .to_owned()
}

fn main_pid(host: &Host, unit: &str) -> String {
    host.sandbox
        .systemctl(&["show", "-p", "MainPID", unit])
        .ok()
        .stdout_str()
        .trim()
        .to_owned()
}

#[test]
fn postgres_and_redis_for_services() {
    let fx = Fixture::file();
    let host = Host::new();
    let repo = tempfile::tempdir().unwrap();
    let (pg, rp, p1, p2) = (free_port(), free_port(), free_port(), free_port());
    fx.dm(&["init"]).ok();
    let infra = json!({"services": {
        "db": {"preset": "postgres", "ports": {"tcp": pg}},
        "cache": {"preset": "redis", "ports": {"tcp": rp}}
    }});
    fx.dm(&["set-infrastructure", &infra.to_string()]).ok();
    for (name, port, cmd, db) in [
        ("app", p1, "bin/app", true),
        ("app2", p2, "bin/app2", false),
    ] {
        let mut s = json!({
            "name": name, "namespace": if db { "Biz/App.py" } else { "Biz/App2.py" },
            "artifact": {"storePath": "/nix/store/placeholder"}, "hosts": ["biz"],
            "exec": {"command": cmd},
            "env": {"PORT": port.to_string()},
            "http": {"domain": format!("{name}.test"), "internalPort": port},
            "health": {"http": {"path": "/healthz"}, "timeout": "30s", "interval": "200ms"},
            "infrastructure": {"redis": true}
        });
        if db {
            s["infrastructure"]["database"] = json!(true);
            s["release"] = json!({"command": "bin/migrate"});
        }
        fx.dm(&["add-service", &s.to_string()]).ok();
    }
    build(repo.path(), "v1", false);
    run_in(repo.path(), "push.sh", &["Biz/App.py"], &fx.env).ok();
    let m: Value = serde_json::from_slice(&fx.dm(&["show"]).ok().stdout).unwrap();
    let artifact = m["services"][0]["artifact"].to_string();
    fx.dm(&["set-artifact", "app2", &artifact]).ok();

    let out = host.run_once(&fx).ok();
    assert_eq!(body(p1).as_deref(), Some("hello from v1\n"));
    assert_eq!(body(p2).as_deref(), Some("hello from v1\n"));
    // The migration made the table, the app wrote to it.
    assert_eq!(
        psql(&host, pg, "app", "select version from visits")
            .ok()
            .stdout_str()
            .trim(),
        "v1"
    );
    let state = host.state();
    let (i1, i2) = (
        state["redisIndexes"]["app"].as_u64().unwrap(),
        state["redisIndexes"]["app2"].as_u64().unwrap(),
    );
    assert_ne!(i1, i2, "two services never share a Redis index");
    assert_eq!(redis_get(rp, i1, "greeting"), "hi from v1");
    assert_eq!(redis_get(rp, i2, "greeting"), "other");

    // The password: generated once, mode 600, only in the secrets dir.
    let pw_file = host
        .dir
        .path()
        .join("secrets/deployer/app.postgres-password");
    let password = std::fs::read_to_string(&pw_file).unwrap();
    assert_eq!(
        std::fs::metadata(&pw_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let env_file = host.dir.path().join("secrets/deployer/app.env");
    assert!(
        std::fs::read_to_string(&env_file)
            .unwrap()
            .contains(&format!(
                "DATABASE_URL=\"postgres://app:{password}@127.0.0.1:{pg}/app\""
            ))
    );
    let unit = std::fs::read_to_string(host.unit_file("app")).unwrap();
    assert!(
        unit.contains(&format!("EnvironmentFile={}", env_file.display())),
        "{unit}"
    );
    deployer_tests::assert_not_leaked(
        &password,
        &[
            unit,
            std::fs::read_to_string(host.state_dir().join("state.json")).unwrap(),
            out.stdout_str(),
            out.stderr_str(),
        ],
    );

    // Apply again (a change elsewhere in the service): same role, password, index, and the
    // infrastructure units keep running untouched.
    let (db_pid, cache_pid) = (
        main_pid(&host, "deployer-infra-db.service"),
        main_pid(&host, "deployer-infra-cache.service"),
    );
    fx.dm(&["update-service", "app", r#"{"env": {"GREETING": "again"}}"#])
        .ok();
    host.run_once(&fx).ok();
    assert_eq!(std::fs::read_to_string(&pw_file).unwrap(), password);
    let state = host.state();
    assert_eq!(state["redisIndexes"]["app"].as_u64(), Some(i1));
    assert_eq!(state["redisIndexes"]["app2"].as_u64(), Some(i2));
    assert_eq!(main_pid(&host, "deployer-infra-db.service"), db_pid);
    assert_eq!(main_pid(&host, "deployer-infra-cache.service"), cache_pid);
    assert_eq!(
        psql(
            &host,
            pg,
            "app",
            "select count(*) from pg_roles where rolname = 'app'"
        )
        .ok()
        .stdout_str()
        .trim(),
        "1"
    );

    // A failing migration: the deploy stops, v1 keeps serving.
    build(repo.path(), "v2", true);
    run_in(repo.path(), "push.sh", &["Biz/App.py"], &fx.env).ok();
    let out = host.run_once(&fx);
    assert_eq!(out.code(), 8, "{}", out.stderr_str());
    assert!(
        out.stderr_str().contains("release command failed"),
        "{}",
        out.stderr_str()
    );
    assert_eq!(body(p1).as_deref(), Some("hello from v1\n"));
    let failed = &host.state()["services"]["app"]["failed"];
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("release command failed"),
        "{failed}"
    );

    // Removed: the unit goes, the database stays and is reported as orphaned.
    fx.dm(&["remove-service", "app"]).ok();
    host.run_once(&fx).ok();
    assert!(!host.unit_file("app").exists());
    let orphans = host.state()["orphans"].to_string();
    assert!(orphans.contains("database app"), "{orphans}");
    assert!(orphans.contains(&format!("redis index {i1}")), "{orphans}");
    assert_eq!(
        psql(&host, pg, "app", "select count(*) > 0 from visits")
            .ok()
            .stdout_str()
            .trim(),
        "t"
    );
}

#[test]
fn external_servers_and_custom_requirements_with_templates() {
    let fx = Fixture::file();
    let host = Host::new();
    let repo = tempfile::tempdir().unwrap();
    // An existing Redis the agent must not provision, only use.
    let rp = free_port();
    let redis_dir = tempfile::tempdir().unwrap();
    let mut redis = Command::new("redis-server")
        .args([
            "--port",
            &rp.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
        ])
        .arg(redis_dir.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    deployer_tests::eventually(10, || std::net::TcpStream::connect(("127.0.0.1", rp)).ok())
        .unwrap();
    std::fs::write(
        host.dir.path().join("secrets/search_key"),
        "s3cr3t-search-key\n",
    )
    .unwrap();
    let (sp, p2) = (free_port(), free_port());
    fx.dm(&["init"]).ok();
    fx.dm(&[
        "set-infrastructure",
        &json!({"services": {"cache": {"preset": "redis", "external": {"host": "127.0.0.1", "ports": {"tcp": rp}}}}}).to_string(),
    ])
    .ok();
    let service = json!({
        "name": "app2", "namespace": "Biz/App.py",
        "artifact": {"storePath": "/nix/store/placeholder"}, "hosts": ["biz"],
        "exec": {"command": "bin/app2"}, "env": {"PORT": p2.to_string()},
        "http": {"domain": "app2.test", "internalPort": p2},
        "health": {"http": {"path": "/healthz"}, "timeout": "30s", "interval": "200ms"},
        "infrastructure": {"redis": true, "services": {"search": {
            "type": "daemon",
            "command": ["/usr/bin/python3", "-m", "http.server", sp.to_string(), "--bind", "127.0.0.1"],
            "ports": {"http": sp},
            "env": {"SEARCH_URL": "http://${host}:${port:http}", "SEARCH_API_KEY": "${secret:apiKey}"},
            "secrets": {"apiKey": "search_key"},
            "healthCheck": {"http": {"path": "/"}}
        }}}
    });
    fx.dm(&["add-service", &service.to_string()]).ok();
    build(repo.path(), "v1", false);
    run_in(repo.path(), "push.sh", &["Biz/App.py"], &fx.env).ok();
    let out = host.run_once(&fx).ok();
    assert_eq!(body(p2).as_deref(), Some("hello from v1\n"));
    // The external Redis got the write; no unit was made for it.
    let index = host.state()["redisIndexes"]["app2"].as_u64().unwrap();
    assert_eq!(redis_get(rp, index, "greeting"), "other");
    assert!(!host.unit_file("infra-cache").exists());
    // The custom daemon runs as its own unit, and its templates resolved into the app's env.
    assert_eq!(host.is_active("infra-app2-search"), "active");
    let env = std::fs::read_to_string(host.dir.path().join("secrets/deployer/app2.env")).unwrap();
    assert!(
        env.contains(&format!("SEARCH_URL=\"http://127.0.0.1:{sp}\"")),
        "{env}"
    );
    assert!(
        env.contains("SEARCH_API_KEY=\"s3cr3t-search-key\""),
        "{env}"
    );
    deployer_tests::assert_not_leaked(
        "s3cr3t-search-key",
        &[
            std::fs::read_to_string(host.unit_file("app2")).unwrap(),
            std::fs::read_to_string(host.state_dir().join("state.json")).unwrap(),
            out.stderr_str(),
        ],
    );

    // An unknown placeholder is refused, naming the service and the key; nothing changes.
    fx.dm(&[
        "update-service",
        "app2",
        r#"{"env": {"BROKEN": "${port:nope}"}}"#,
    ])
    .ok();
    let out = host.run_once(&fx);
    assert_eq!(out.code(), 8);
    assert!(
        out.stderr_str().contains("app2: env BROKEN"),
        "{}",
        out.stderr_str()
    );
    assert_eq!(body(p2).as_deref(), Some("hello from v1\n"));
    let _ = redis.kill();
    let _ = redis.wait();
}
