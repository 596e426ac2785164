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
pub(crate) fn build(dir: &Path, version: &str, broken_migration: bool) {
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
    psql_at(&host.state_dir().join("infra/db/run"), pg, db, sql)
}

/// `sql` in database `db` of the preset cluster whose socket is in `socket_dir`, as the
/// cluster's administrator.
pub(crate) fn psql_at(socket_dir: &Path, pg: u16, db: &str, sql: &str) -> Output {
    Command::new("runuser")
        .args(["-u", "postgres", "--", "psql", "-h"])
        .arg(socket_dir)
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

pub(crate) fn main_pid(host: &Host, unit: &str) -> String {
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
    // Preset settings (seed 001): named databases, extensions and the major version;
    // Redis's memory policy.
    let infra = json!({"services": {
        "db": {"preset": "postgres", "ports": {"tcp": pg},
               "config": {"databases": {"main": {}, "ledger": {}}, "extensions": ["pgcrypto"], "version": "15"}},
        "cache": {"preset": "redis", "ports": {"tcp": rp},
                  "config": {"maxmemory": "64mb", "maxmemoryPolicy": "allkeys-lru"}}
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
            "infrastructure": {"redis": true, "database": true}
        });
        if db {
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
    let query = |db: &str, sql: &str| psql(&host, pg, db, sql).ok().stdout_str().trim().to_owned();
    assert_eq!(
        query(
            "postgres",
            "select string_agg(datname, ',' order by datname) from pg_database where datname in ('main', 'ledger')"
        ),
        "ledger,main"
    );
    assert_eq!(
        query(
            "app",
            "select extname from pg_extension where extname = 'pgcrypto'"
        ),
        "pgcrypto"
    );
    // The service uses it unqualified, as its own role; it can create nothing where the
    // extensions live (their install scripts run as superuser).
    let env = std::fs::read_to_string(host.dir.path().join("secrets/deployer/app.env")).unwrap();
    let url = env
        .lines()
        .find_map(|l| l.strip_prefix("DATABASE_URL="))
        .unwrap()
        .trim_matches('"')
        .to_owned();
    let as_app = |sql: &str| {
        Command::new("psql")
            .args(["-X", "-tA", &url, "-c", sql])
            .output()
            .unwrap()
    };
    assert_eq!(
        as_app("select length(digest('x', 'sha256'))")
            .ok()
            .stdout_str()
            .trim(),
        "32"
    );
    let planted = as_app(
        "create function deployer_extensions.gen_salt(text) returns text language sql as 'select 1::text'",
    );
    assert!(
        !planted.status.success() && planted.stderr_str().contains("permission denied"),
        "{}",
        planted.stderr_str()
    );
    assert_eq!(
        query("postgres", "show server_version_num").get(..2),
        Some("15")
    );
    let config_get = |key: &str| {
        Command::new("redis-cli")
            .args(["-p", &rp.to_string(), "config", "get", key])
            .output()
            .unwrap()
            .stdout_str()
            .lines()
            .nth(1)
            .unwrap_or_default()
            .to_owned()
    };
    // app2's role cannot even connect to app's database (nor app's to app2's).
    let app2_password = std::fs::read_to_string(
        host.dir
            .path()
            .join("secrets/deployer/app2.postgres-password"),
    )
    .unwrap();
    let other = Command::new("psql")
        .env("PGPASSWORD", app2_password.trim())
        .args(["-X", "-h", "127.0.0.1", "-p", &pg.to_string(), "-U", "app2"])
        .args(["-d", "app", "-tAc", "select count(*) from visits"])
        .output()
        .unwrap();
    assert!(
        !other.status.success()
            && other
                .stderr_str()
                .contains("permission denied for database"),
        "{}",
        other.stderr_str()
    );
    assert_eq!(config_get("maxmemory-policy"), "allkeys-lru");
    assert_eq!(config_get("maxmemory"), (64 * 1024 * 1024).to_string());
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

    // An extension added to the preset's config: the services that use that server are
    // deployed again, once, and their databases get it.
    let (app_pid, app2_pid) = (
        main_pid(&host, "app.service"),
        main_pid(&host, "app2.service"),
    );
    let mut more = infra.clone();
    more["services"]["db"]["config"]["extensions"] = json!(["pgcrypto", "citext"]);
    fx.dm(&["set-infrastructure", &more.to_string()]).ok();
    host.run_once(&fx).ok();
    assert_eq!(
        psql(
            &host,
            pg,
            "app",
            "select extname from pg_extension where extname = 'citext'"
        )
        .ok()
        .stdout_str()
        .trim(),
        "citext"
    );
    assert_eq!(
        psql(
            &host,
            pg,
            "app2",
            "select extname from pg_extension where extname = 'citext'"
        )
        .ok()
        .stdout_str()
        .trim(),
        "citext"
    );
    assert_ne!(main_pid(&host, "app.service"), app_pid);
    assert_ne!(main_pid(&host, "app2.service"), app2_pid);
    let app_pid = main_pid(&host, "app.service");
    fx.dm(&["update-service", "app2", r#"{"env": {"AGAIN": "1"}}"#])
        .ok();
    host.run_once(&fx).ok();
    assert_eq!(main_pid(&host, "app.service"), app_pid, "once");

    // A failing migration: the deploy stops, v1 keeps serving.
    build(repo.path(), "v2", true);
    run_in(repo.path(), "push.sh", &["Biz/App.py"], &fx.env).ok();
    let out = host.run_once(&fx);
    out.fails_with(8, "release command failed");
    assert_eq!(body(p1).as_deref(), Some("hello from v1\n"));
    let failed = &host.state()["services"]["app"]["failed"];
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("release command failed"),
        "{failed}"
    );

    // Removed (both): the units go, the databases stay and are reported as orphaned.
    // Postgres, needed by no other service here, is stopped; its data stays.
    let m: Value = serde_json::from_slice(&fx.dm(&["show"]).ok().stdout).unwrap();
    let app_spec = m["services"][0].clone();
    assert_eq!(app_spec["name"], json!("app"));
    fx.dm(&["remove-service", "app"]).ok();
    fx.dm(&["remove-service", "app2"]).ok();
    host.run_once(&fx).ok();
    assert!(!host.unit_file("app").exists());
    let orphans = host.state()["orphans"].to_string();
    assert!(orphans.contains("database app "), "{orphans}");
    assert!(orphans.contains("database app2"), "{orphans}");
    assert!(orphans.contains(&format!("redis index {i1}")), "{orphans}");
    assert!(orphans.contains("infrastructure db"), "{orphans}");
    assert_ne!(
        host.sandbox
            .systemctl(&["is-active", "deployer-infra-db.service"])
            .stdout_str()
            .trim(),
        "active"
    );
    // Declared again, it starts on the data it had.
    fx.dm(&["add-service", &app_spec.to_string()]).ok();
    host.run_once(&fx);
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
    // The service's own secret: <secrets>/<service>/<file>, mode 600.
    put_secret(&host, "app2/search_key", "s3cr3t-search-key\n");
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
    assert!(!host.unit_file("deployer-infra-cache").exists());
    // The custom daemon runs as its own unit, and its templates resolved into the app's env.
    assert_eq!(host.is_active("deployer-infra-app2-search"), "active");
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

/// A hello service named `name` on `port` (the artifact is set later or given).
pub(crate) fn hello(name: &str, port: u16, artifact: &Value) -> Value {
    json!({
        "name": name, "namespace": "Examples/Hello.py",
        "artifact": artifact, "hosts": ["biz"],
        "exec": {"command": "bin/hello"},
        "env": {"PORT": port.to_string()},
        "http": {"domain": format!("{}.test", name.replace('_', "-")), "internalPort": port},
        "health": {"http": {"path": "/healthz"}, "timeout": "30s", "interval": "200ms"}
    })
}

fn placeholder() -> Value {
    json!({"storePath": "/nix/store/placeholder"})
}

/// The artifact of the first service in the current manifest.
pub(crate) fn first_artifact(fx: &Fixture) -> Value {
    let m: Value = serde_json::from_slice(&fx.dm(&["show"]).ok().stdout).unwrap();
    m["services"][0]["artifact"].clone()
}

/// The store's `manifest.json` (a `file://` fixture), as a bucket writer sees it.
fn head_path(fx: &Fixture) -> std::path::PathBuf {
    Path::new(fx.url.strip_prefix("file://").unwrap()).join("manifest.json")
}

/// Write `manifest.json` straight into the store, bypassing deploy-manifest's validation.
fn tamper(fx: &Fixture, edit: impl FnOnce(&mut Value)) {
    let path = head_path(fx);
    let mut m: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut m);
    std::fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
}

/// A secret file of the operator's: mode 600 (its directory 700).
fn put_secret(host: &Host, rel: &str, text: &str) -> std::path::PathBuf {
    let path = host.dir.path().join("secrets").join(rel);
    let dir = path.parent().unwrap();
    if !dir.exists() {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

fn read_or_empty(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A bucket writer adds service `b` reaching for service `a`'s secrets (its env file, its
/// secret files, its generated env file) or the infrastructure's admin credentials, through
/// `envFile` or `${secret:…}`: each is refused (by validation where the manifest shows it,
/// else by the agent), nothing of `a`'s reaches `b`, `a` keeps running, and `b` with its own
/// secrets deploys.
#[test]
fn a_service_reads_only_its_own_secrets() {
    let fx = Fixture::file();
    let host = Host::new();
    let app = crate::agent::App::new();
    let secrets = host.dir.path().join("secrets");
    put_secret(&host, "a.env", "A_TOKEN=a-env-secret-4f1d\n");
    put_secret(&host, "a/token", "a-file-secret-77c2\n");
    put_secret(
        &host,
        "infra-db.env",
        "PGUSER=postgres\nPGPASSWORD=admin-secret-9e3b\n",
    );
    put_secret(&host, "b/token", "b-own-token-51aa\n");
    let stolen = [
        "a-env-secret-4f1d",
        "a-file-secret-77c2",
        "admin-secret-9e3b",
    ];
    let (pa, pb) = (free_port(), free_port());
    fx.dm(&["init"]).ok();
    let mut a = hello("a", pa, &placeholder());
    a["env"]["A_FILE"] = json!("${secret:token}");
    fx.dm(&["add-service", &a.to_string()]).ok();
    app.set_version("v1", false);
    app.push(&fx);
    host.run_once(&fx).ok();
    assert_eq!(body(pa).as_deref(), Some("hello from v1\n"));
    // The honest path: a's own secret file resolved into a's generated env.
    let a_env = read_or_empty(&secrets.join("deployer/a.env"));
    assert!(a_env.contains("A_FILE=\"a-file-secret-77c2\""), "{a_env}");
    let artifact = first_artifact(&fx);
    let good = std::fs::read(head_path(&fx)).unwrap();

    // A file outside the secrets dir with a name that fits b (a copy of a's secrets).
    let outside = host.dir.path().join("elsewhere/b.env");
    std::fs::create_dir_all(outside.parent().unwrap()).unwrap();
    std::fs::write(&outside, "A_TOKEN=a-env-secret-4f1d\n").unwrap();
    std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o600)).unwrap();
    let path = |p: &Path| p.display().to_string();
    let with_env_file = |file: String| {
        let mut b = hello("b", pb, &artifact);
        b["envFile"] = json!(file);
        b
    };
    let with_template = |template: &str| {
        let mut b = hello("b", pb, &artifact);
        b["env"]["STOLEN"] = json!(template);
        b
    };
    let mut through_map = hello("b", pb, &artifact);
    through_map["infrastructure"] = json!({"services": {"sidecar": {
        "command": ["/bin/sleep", "600"],
        "env": {"STOLEN": "${secret:k}"},
        "secrets": {"k": "../a.env"}
    }}});
    // (b, the field validation names, or None when only the agent can tell)
    let cases: Vec<(Value, Option<&str>)> = vec![
        (
            with_env_file(path(&secrets.join("a.env"))),
            Some("services[1] (b).envFile"),
        ),
        (
            with_env_file(path(&secrets.join("a/token"))),
            Some("services[1] (b).envFile"),
        ),
        (
            with_env_file(path(&secrets.join("infra-db.env"))),
            Some("services[1] (b).envFile"),
        ),
        (
            with_env_file(path(&secrets.join("deployer/a.env"))),
            Some("services[1] (b).envFile"),
        ),
        (
            with_env_file("/etc/shadow".into()),
            Some("services[1] (b).envFile"),
        ),
        (
            with_template("${secret:../a.env}"),
            Some("services[1] (b).env.STOLEN"),
        ),
        (
            with_template("${secret:../a/token}"),
            Some("services[1] (b).env.STOLEN"),
        ),
        (
            through_map,
            Some("services[1] (b).infrastructure.services.sidecar.secrets.k"),
        ),
        (with_template("${secret:infra-db.env}"), None),
        (with_template("${secret:a.env}"), None),
        (with_env_file(path(&outside)), None),
    ];
    for (b, field) in cases {
        let what = b.to_string();
        tamper(&fx, |m| {
            m["services"].as_array_mut().unwrap().push(b.clone())
        });
        let out = host.run_once(&fx);
        match field {
            // The whole manifest is refused before anything acts on it.
            Some(field) => {
                assert_ne!(out.code(), 0, "{what}");
                assert!(
                    out.stderr_str().contains(field),
                    "{field}: {}",
                    out.stderr_str()
                );
            }
            // The agent refuses service b; a is left as it is.
            None => {
                assert_eq!(out.code(), 8, "{what}: {}", out.stderr_str());
                let error = host.state()["services"]["b"]["lastError"].to_string();
                assert!(
                    error.contains(&path(&secrets.join("b"))),
                    "says where b's secrets live: {error}"
                );
            }
        }
        assert!(!host.unit_file("b").exists(), "{what}");
        let texts = [
            read_or_empty(&host.unit_file("b")),
            read_or_empty(&secrets.join("deployer/b.env")),
            read_or_empty(&host.state_dir().join("state.json")),
            out.stdout_str(),
            out.stderr_str(),
        ];
        for secret in stolen {
            deployer_tests::assert_not_leaked(secret, &texts);
        }
        assert!(!out.stderr_str().contains("chmod"), "{}", out.stderr_str());
        assert_eq!(body(pa).as_deref(), Some("hello from v1\n"), "{what}");
        assert_eq!(host.is_active("a"), "active");
        // The same service through an honest writer's command: refused, naming the field.
        std::fs::write(head_path(&fx), &good).unwrap();
        if let Some(field) = field {
            let out = fx.dm(&["add-service", &what]);
            assert_ne!(out.code(), 0, "{what}");
            assert!(
                out.stderr_str().contains(field),
                "{field}: {}",
                out.stderr_str()
            );
            assert_eq!(
                std::fs::read(head_path(&fx)).unwrap(),
                good,
                "nothing written"
            );
        }
    }

    // b with its own secret file deploys, and gets only its own.
    let mut b = hello("b", pb, &artifact);
    b["env"]["B_TOKEN"] = json!("${secret:token}");
    fx.dm(&["add-service", &b.to_string()]).ok();
    host.run_once(&fx).ok();
    assert_eq!(body(pb).as_deref(), Some("hello from v1\n"));
    let b_env = read_or_empty(&secrets.join("deployer/b.env"));
    assert!(b_env.contains("B_TOKEN=\"b-own-token-51aa\""), "{b_env}");
    for secret in stolen {
        deployer_tests::assert_not_leaked(secret, std::slice::from_ref(&b_env));
    }
    assert_eq!(body(pa).as_deref(), Some("hello from v1\n"));
}

/// `psql` as `user` with `password` over TCP (the preset's scram-sha-256 host auth).
fn login(pg: u16, user: &str, password: &str) -> Output {
    Command::new("psql")
        .env("PGPASSWORD", password)
        .args(["-X", "-h", "127.0.0.1", "-p", &pg.to_string(), "-U", user])
        .args(["-d", "postgres", "-tAc", "select 1"])
        .output()
        .unwrap()
}

/// The operator's own role `alice` and database `bob`, and Postgres's superuser: a service of
/// that name with `database: true` is refused (by validation for reserved names, else by the
/// agent, before it changes anything); the operator's passwords still work. A role and
/// database an earlier agent made (unmarked) are adopted.
#[test]
fn the_database_layer_touches_only_what_it_created() {
    let fx = Fixture::file();
    let host = Host::new();
    let app = crate::agent::App::new();
    let (pg, pw) = (free_port(), free_port());
    fx.dm(&["init"]).ok();
    fx.dm(&[
        "set-infrastructure",
        &json!({"services": {"db": {"preset": "postgres", "ports": {"tcp": pg}}}}).to_string(),
    ])
    .ok();
    let with_db = |mut s: Value| {
        s["infrastructure"] = json!({"database": true});
        s
    };
    fx.dm(&[
        "add-service",
        &with_db(hello("web", pw, &placeholder())).to_string(),
    ])
    .ok();
    app.set_version("v1", false);
    app.push(&fx);
    host.run_once(&fx).ok();
    assert_eq!(body(pw).as_deref(), Some("hello from v1\n"));
    let sql = |q: &str| {
        psql(&host, pg, "postgres", q)
            .ok()
            .stdout_str()
            .trim()
            .to_owned()
    };
    let marks = || {
        (
            sql("select shobj_description(oid, 'pg_authid') from pg_roles where rolname = 'web'"),
            sql(
                "select shobj_description(oid, 'pg_database') from pg_database where datname = 'web'",
            ),
        )
    };
    assert_eq!(marks(), ("deployer:web".into(), "deployer:web".into()));
    let secrets = host.dir.path().join("secrets");
    let web_password =
        std::fs::read_to_string(secrets.join("deployer/web.postgres-password")).unwrap();
    assert_eq!(
        login(pg, "web", &web_password).ok().stdout_str().trim(),
        "1"
    );
    let artifact = first_artifact(&fx);

    // The operator's own role and database, and a password for the superuser.
    sql("CREATE ROLE alice LOGIN PASSWORD 'alice-operator-pw'");
    sql("CREATE DATABASE bob");
    sql("ALTER ROLE postgres PASSWORD 'pg-admin-pw'");
    for name in ["alice", "bob"] {
        fx.dm(&[
            "add-service",
            &with_db(hello(name, free_port(), &artifact)).to_string(),
        ])
        .ok();
    }
    let out = host.run_once(&fx);
    assert_eq!(out.code(), 8, "{}", out.stderr_str());
    for needle in [
        "role \"alice\" exists and was not created by deployer",
        "database \"bob\" exists and was not created by deployer",
        "Rename the service",
    ] {
        assert!(
            out.stderr_str().contains(needle),
            "{needle}: {}",
            out.stderr_str()
        );
    }
    // alice still logs in with the operator's password; no role bob was made on the way.
    assert_eq!(
        login(pg, "alice", "alice-operator-pw")
            .ok()
            .stdout_str()
            .trim(),
        "1"
    );
    assert_eq!(
        sql("select count(*) from pg_roles where rolname = 'bob'"),
        "0"
    );
    assert_eq!(
        sql("select shobj_description(oid, 'pg_authid') from pg_roles where rolname = 'alice'"),
        ""
    );
    for name in ["alice", "bob"] {
        assert!(
            !secrets
                .join(format!("deployer/{name}.postgres-password"))
                .exists()
        );
        assert!(
            !read_or_empty(&secrets.join(format!("deployer/{name}.env"))).contains("DATABASE_URL")
        );
        assert!(!host.unit_file(name).exists());
    }
    assert_eq!(body(pw).as_deref(), Some("hello from v1\n"));
    fx.dm(&["remove-service", "alice"]).ok();
    fx.dm(&["remove-service", "bob"]).ok();
    host.run_once(&fx).ok();
    let good = std::fs::read(head_path(&fx)).unwrap();

    // postgres (and template*, pg_*): refused by validation when written...
    for name in ["postgres", "template1", "pg_monitor"] {
        let out = fx.dm(&[
            "add-service",
            &with_db(hello(name, free_port(), &artifact)).to_string(),
        ]);
        assert_ne!(out.code(), 0);
        let field = format!("services[1] ({name}).infrastructure.database");
        assert!(
            out.stderr_str().contains(&field),
            "{field}: {}",
            out.stderr_str()
        );
        assert_eq!(
            std::fs::read(head_path(&fx)).unwrap(),
            good,
            "nothing written"
        );
    }
    // ... and by the agent when written straight into the store.
    tamper(&fx, |m| {
        m["services"].as_array_mut().unwrap().push(with_db(hello(
            "postgres",
            free_port(),
            &artifact,
        )))
    });
    let out = host.run_once(&fx);
    assert_ne!(out.code(), 0);
    assert!(
        out.stderr_str()
            .contains("services[1] (postgres).infrastructure.database"),
        "{}",
        out.stderr_str()
    );
    // The superuser's password is the operator's: no ALTER ran, no URL was handed out.
    assert_eq!(
        login(pg, "postgres", "pg-admin-pw")
            .ok()
            .stdout_str()
            .trim(),
        "1"
    );
    assert!(!secrets.join("deployer/postgres.postgres-password").exists());
    assert!(!secrets.join("deployer/postgres.env").exists());
    assert!(!host.unit_file("postgres").exists());
    assert_eq!(body(pw).as_deref(), Some("hello from v1\n"));
    std::fs::write(head_path(&fx), &good).unwrap();

    // An earlier agent's role and database (no marks, the password kept here): adopted.
    sql("COMMENT ON ROLE web IS NULL");
    sql("COMMENT ON DATABASE web IS NULL");
    assert_eq!(marks(), (String::new(), String::new()));
    fx.dm(&["update-service", "web", r#"{"env": {"AGAIN": "1"}}"#])
        .ok();
    let out = host.run_once(&fx).ok();
    assert_eq!(marks(), ("deployer:web".into(), "deployer:web".into()));
    assert_eq!(
        std::fs::read_to_string(secrets.join("deployer/web.postgres-password")).unwrap(),
        web_password
    );
    assert_eq!(
        login(pg, "web", &web_password).ok().stdout_str().trim(),
        "1"
    );
    assert_eq!(body(pw).as_deref(), Some("hello from v1\n"));
    // The password never reached the server's log, a unit file, the state or the output.
    deployer_tests::assert_not_leaked(
        &web_password,
        &[
            read_or_empty(&host.state_dir().join("logs/infra-db.log")),
            read_or_empty(&host.unit_file("web")),
            read_or_empty(&host.state_dir().join("state.json")),
            out.stdout_str(),
            out.stderr_str(),
        ],
    );
}

/// `REDIS_URL` from a service's generated env file.
fn redis_url(host: &Host, service: &str) -> String {
    let env = read_or_empty(
        &host
            .dir
            .path()
            .join(format!("secrets/deployer/{service}.env")),
    );
    env.lines()
        .find_map(|l| l.strip_prefix("REDIS_URL="))
        .unwrap_or_else(|| panic!("no REDIS_URL for {service}: {env}"))
        .trim_matches('"')
        .to_owned()
}

fn redis_cli(args: &[&str]) -> String {
    Command::new("redis-cli")
        .args(args)
        .output()
        .unwrap()
        .ok()
        .stdout_str()
        .trim()
        .to_owned()
}

/// Two services with `redis: true`; the operator moves `state.json` aside and the manifest
/// changes (reordering them): each keeps its index (kept in Redis), so neither sees the
/// other's data. Assignments only an older agent's state knows are written back to Redis.
#[test]
fn redis_indexes_survive_the_loss_of_state() {
    let fx = Fixture::file();
    let host = Host::new();
    let app = crate::agent::App::new();
    let (rp, pz, pa) = (free_port(), free_port(), free_port());
    fx.dm(&["init"]).ok();
    fx.dm(&[
        "set-infrastructure",
        &json!({"services": {"cache": {"preset": "redis", "ports": {"tcp": rp}}}}).to_string(),
    ])
    .ok();
    let with_redis = |mut s: Value| {
        s["infrastructure"] = json!({"redis": true});
        s
    };
    // zed first, then abe: zed gets the lower index.
    fx.dm(&[
        "add-service",
        &with_redis(hello("zed", pz, &placeholder())).to_string(),
    ])
    .ok();
    app.set_version("v1", false);
    app.push(&fx);
    host.run_once(&fx).ok();
    let artifact = first_artifact(&fx);
    fx.dm(&[
        "add-service",
        &with_redis(hello("abe", pa, &artifact)).to_string(),
    ])
    .ok();
    host.run_once(&fx).ok();
    let (zed, abe) = (redis_url(&host, "zed"), redis_url(&host, "abe"));
    assert_ne!(zed, abe);
    redis_cli(&["-u", &zed, "set", "owner", "zed"]);
    redis_cli(&["-u", &abe, "set", "owner", "abe"]);
    let index = |url: &str| url.rsplit('/').next().unwrap().to_owned();
    let recorded = || {
        redis_cli(&["-p", &rp.to_string(), "hgetall", "deployer:db-index"])
            .lines()
            .map(str::to_owned)
            .collect::<Vec<_>>()
            .chunks(2)
            .map(|kv| (kv[0].clone(), kv[1].clone()))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let expected: std::collections::BTreeMap<String, String> = [
        ("abe".to_owned(), index(&abe)),
        ("zed".to_owned(), index(&zed)),
    ]
    .into();
    assert_eq!(recorded(), expected);

    // The operator moves a corrupt state aside; the manifest changes and reorders them.
    let state = host.state_dir().join("state.json");
    std::fs::rename(&state, host.state_dir().join("state.json.corrupt")).unwrap();
    fx.dm(&["remove-service", "zed"]).ok();
    let mut zed2 = with_redis(hello("zed", pz, &artifact));
    zed2["env"]["CHANGED"] = json!("1");
    fx.dm(&["add-service", &zed2.to_string()]).ok();
    host.run_once(&fx).ok();
    assert!(
        read_or_empty(&host.unit_file("zed")).contains("CHANGED"),
        "zed was deployed again"
    );
    assert_eq!(
        redis_url(&host, "zed"),
        zed,
        "same index after losing state.json"
    );
    assert_eq!(
        redis_url(&host, "abe"),
        abe,
        "same index after losing state.json"
    );
    assert_eq!(redis_cli(&["-u", &zed, "get", "owner"]), "zed");
    assert_eq!(redis_cli(&["-u", &abe, "get", "owner"]), "abe");
    let copy = host.state()["redisIndexes"].clone();
    assert_eq!(copy["zed"].to_string(), index(&zed));
    assert_eq!(copy["abe"].to_string(), index(&abe));
    assert_eq!(body(pz).as_deref(), Some("hello from v1\n"));

    // An older agent's assignments (in state.json only) are written to Redis first.
    redis_cli(&["-p", &rp.to_string(), "del", "deployer:db-index"]);
    fx.dm(&["update-service", "abe", r#"{"env": {"AGAIN": "1"}}"#])
        .ok();
    host.run_once(&fx).ok();
    assert_eq!(recorded(), expected);
    assert_eq!(redis_url(&host, "abe"), abe);
    assert_eq!(redis_cli(&["-u", &abe, "get", "owner"]), "abe");
}

/// Seed 001's stack settings on real units: `infrastructure.overrides` makes one service's
/// requirement external on this host (no unit, its env points at the existing server), and
/// the host's mode (`--mode`) picks a requirement's command variant: the daemon that runs is
/// that variant's. The same manifest on a host in another mode, or with no override, would
/// run the other (the decision tables cover those).
#[test]
fn overrides_and_variants_pick_what_the_host_says() {
    let fx = Fixture::file();
    let mut host = Host::new();
    host.flags = vec!["--mode".into(), "regtest".into()];
    let repo = tempfile::tempdir().unwrap();
    let (np, sp, port) = (free_port(), free_port(), free_port());
    // What each variant serves says which one runs.
    let served = tempfile::tempdir().unwrap();
    for mode in ["regtest", "mainnet"] {
        std::fs::create_dir(served.path().join(mode)).unwrap();
        std::fs::write(served.path().join(mode).join("mode"), mode).unwrap();
    }
    let variant = |mode: &str| {
        let dir = served.path().join(mode).display().to_string();
        json!({"command": ["/usr/bin/python3", "-m", "http.server", np.to_string(),
                           "--bind", "127.0.0.1", "--directory", dir]})
    };
    fx.dm(&["init"]).ok();
    let service = json!({
        "name": "app", "namespace": "Biz/App.py",
        "artifact": {"storePath": "/nix/store/placeholder"}, "hosts": ["biz"],
        "exec": {"command": "bin/hello"}, "env": {"PORT": port.to_string()},
        "health": {"http": {"path": "/healthz"}, "timeout": "30s", "interval": "200ms"},
        "infrastructure": {"services": {
            "node": {"ports": {"rpc": np}, "env": {"NODE_URL": "http://${host}:${port:rpc}"},
                     "variants": {"regtest": variant("regtest"), "mainnet": variant("mainnet")},
                     "healthCheck": {"http": {"path": "/mode"}}},
            "search": {"command": ["/usr/bin/python3", "-m", "http.server", sp.to_string()],
                       "ports": {"http": sp}, "env": {"SEARCH_URL": "http://${host}:${port:http}"}}
        }}
    });
    fx.dm(&["add-service", &service.to_string()]).ok();
    // An override names what exists (a typo would silently not apply).
    let infra = json!({"services": {}, "overrides": [{"hosts": ["biz"], "services": {
        "app/search": {"external": {"host": "127.0.0.1", "ports": {"http": sp}}}}}]});
    fx.dm(&["set-infrastructure", &infra.to_string()]).ok();
    build(repo.path(), "v1", false);
    run_in(repo.path(), "push.sh", &["Biz/App.py"], &fx.env).ok();
    host.run_once(&fx).ok();
    assert_eq!(body(port).as_deref(), Some("hello from v1\n"));

    // The regtest variant runs, and the service was told where.
    assert_eq!(host.is_active("deployer-infra-app-node"), "active");
    let mode = deployer_tests::http_get(np, "/mode").map(|(_, b)| b);
    assert_eq!(mode.as_deref(), Some("regtest"));
    let env = std::fs::read_to_string(host.dir.path().join("secrets/deployer/app.env")).unwrap();
    assert!(
        env.contains(&format!("NODE_URL=\"http://127.0.0.1:{np}\"")),
        "{env}"
    );
    // search is external on this host: no unit, the existing server's address.
    assert!(!host.unit_file("deployer-infra-app-search").exists());
    assert_ne!(host.is_active("deployer-infra-app-search"), "active");
    assert!(
        env.contains(&format!("SEARCH_URL=\"http://127.0.0.1:{sp}\"")),
        "{env}"
    );

    // The host's mode changes, the manifest does not: the other variant replaces it.
    host.flags = vec!["--mode".into(), "mainnet".into()];
    host.run_once(&fx).ok();
    let mode = deployer_tests::eventually(10, || {
        deployer_tests::http_get(np, "/mode")
            .map(|(_, b)| b)
            .filter(|b| b == "mainnet")
    });
    assert_eq!(mode.as_deref(), Some("mainnet"));

    // A mode no variant names starts nothing and says so; what runs keeps running.
    host.flags = vec!["--mode".into(), "testnet".into()];
    let out = host.run_once(&fx);
    out.fails_with(8, "no variant for it");
    assert_eq!(body(port).as_deref(), Some("hello from v1\n"));
}
