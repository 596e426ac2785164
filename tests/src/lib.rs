//! Test kit for the end-to-end tests: starts real servers on loopback (each test its own,
//! stopped by PID when the handle drops) and runs the workspace's binaries.
//!
//! Nothing here is a fake: an S3 test talks to a real moto server over HTTP.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The repository root. `cargo test` sets `CARGO_MANIFEST_DIR` when it runs a test binary;
/// that runtime value wins over the compile-time one, which a shared target directory may
/// have baked in from another checkout.
pub fn repo_root() -> PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir
        .parent()
        .expect("tests/ is inside the repository")
        .to_path_buf()
}

/// A workspace binary, built by `cargo build --workspace` (the test script does this first).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary has a path");
    // target/<profile>/deps/e2e-<hash> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary is in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (scripts/test.sh does: cargo build --workspace)",
        path.display()
    );
    path
}

/// A free TCP port on 127.0.0.1 (bound, read and released; the caller binds it next).
pub fn free_port() -> u16 {
    free_ports(1)
}

/// The first of `n` consecutive free TCP ports on 127.0.0.1 (each bound, read and released).
///
/// Taken from 10000-19999: below the kernel's ephemeral range (32768-60999), where an
/// outgoing connection (an agent polling the store every second) can take a port between
/// this call and the service's bind, and below the agent's default range for side-by-side
/// generations (20000-29999). No two calls in this process get the same port, nor two
/// processes of one test run: a test that runs in a child process (the system-manager
/// sandbox) gets a block of its parent's sequence ([`port_block`], `PORTS_ENV`). Without
/// that, each sandboxed child, PID 54 of its own PID namespace, walked the same sequence,
/// and two system-manager tests at once served on each other's ports.
pub fn free_ports(n: u16) -> u16 {
    let (first, len) = port_range();
    for _ in 0..len {
        let base = first + (next_ports(n) % len) as u16;
        if u32::from(base) + u32::from(n) <= u32::from(first) + len
            && (base..base + n).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok())
        {
            return base;
        }
    }
    panic!(
        "no {n} free loopback ports in {first}-{}",
        u32::from(first) + len - 1
    )
}

/// Where a child test process takes its ports: `<first>-<last>`, from [`port_block`].
pub const PORTS_ENV: &str = "DEPLOYER_TEST_PORTS";

/// Reserve `len` consecutive port numbers of this process's sequence for a child test
/// process (whether they are free is checked there, as they are used); the value for
/// [`PORTS_ENV`].
pub fn port_block(len: u16) -> String {
    let (first, range) = port_range();
    loop {
        let base = u32::from(first) + next_ports(len) % range;
        if base + u32::from(len) <= u32::from(first) + range {
            return format!("{base}-{}", base + u32::from(len) - 1);
        }
    }
}

/// This process's port numbers: [`PORTS_ENV`]'s block, or 10000-19999 (first, length).
fn port_range() -> (u16, u32) {
    std::env::var(PORTS_ENV)
        .ok()
        .and_then(|v| {
            let (a, b) = v.split_once('-')?;
            let (a, b): (u16, u16) = (a.parse().ok()?, b.parse().ok()?);
            (a <= b).then_some((a, u32::from(b - a) + 1))
        })
        .unwrap_or((10_000, 10_000))
}

/// The next `n` numbers of this process's sequence (offset by its PID, so that two test
/// processes started apart do not start at the same place).
fn next_ports(n: u16) -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = if std::env::var_os(PORTS_ENV).is_some() {
        0
    } else {
        std::process::id().wrapping_mul(7919)
    };
    start.wrapping_add(NEXT.fetch_add(u32::from(n), Ordering::Relaxed))
}

fn wait_for_port(port: u16, child: &mut Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited before listening on port {port}: {status}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not listen on port {port} within 30 s");
}

/// Where the moto server is: `$DEPLOYER_MOTO`, the repository's `.venv-s3`, or `PATH`.
fn moto_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("DEPLOYER_MOTO") {
        return PathBuf::from(p);
    }
    let venv = repo_root().join(".venv-s3/bin/moto_server");
    if venv.exists() {
        return venv;
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("moto_server"))
        .find(|p| p.exists());
    on_path.unwrap_or_else(|| {
        panic!("moto_server not found: run scripts/test.sh (it installs moto into .venv-s3)")
    })
}

/// A real S3-compatible server (moto, in memory) on a loopback port; killed on drop. Its
/// access log is kept, so tests can count the HTTP requests it answered.
pub struct S3Server {
    child: Child,
    pub port: u16,
    log: tempfile::NamedTempFile,
}

impl S3Server {
    pub fn start() -> S3Server {
        let port = free_port();
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut child = Command::new(moto_binary())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .expect("moto_server starts");
        wait_for_port(port, &mut child, "moto_server");
        S3Server { child, port, log }
    }

    /// The request lines (`GET /bucket/key HTTP/1.1`) the server has logged so far.
    pub fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(self.log.path())
            .unwrap()
            .lines()
            .filter_map(|l| {
                // 127.0.0.1 - - [date] "<colour>GET /b/k HTTP/1.1<reset>" 200 -
                let quoted = l.split_once('"')?.1;
                let request = quoted.split_once(" HTTP/1.")?.0;
                // Past the colour codes (ESC [ ... m) moto puts before the method.
                let start = request.rfind('\x1b').map_or(0, |i| {
                    request[i..].find('m').map_or(request.len(), |m| i + m + 1)
                });
                Some(request[start..].to_owned())
            })
            .collect()
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Create a bucket (moto accepts an unsigned `PUT /<bucket>`).
    pub fn create_bucket(&self, bucket: &str) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to moto");
        write!(
            s,
            "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )
        .unwrap();
        let mut response = String::new();
        s.read_to_string(&mut response).unwrap();
        assert!(
            response.starts_with("HTTP/1.1 200"),
            "creating bucket {bucket}: {response}"
        );
    }

    /// The environment a deployer binary needs to use this server.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_REGION", "us-east-1".to_owned()),
            ("AWS_ACCESS_KEY_ID", "test".to_owned()),
            ("AWS_SECRET_ACCESS_KEY", "test".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run a binary with a clean, explicit environment (no AWS settings leak in from the
/// caller's shell) plus `env`.
pub fn run(binary: &str, args: &[&str], env: &[(String, String)], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(bin(binary));
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", std::env::temp_dir())
        .env("USER", "tester")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("{binary} starts: {e}"));
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    child.wait_with_output().expect("the binary runs")
}

/// Output helpers.
pub trait OutputExt {
    fn stdout_str(&self) -> String;
    fn stderr_str(&self) -> String;
    fn code(&self) -> i32;
    /// Panic with both streams unless the command succeeded.
    fn ok(self) -> Self;
    /// Panic with both streams unless the command exited with `code` and its stderr says
    /// `needle` (how a failing command is expected to fail).
    fn fails_with(&self, code: i32, needle: &str);
}

impl OutputExt for Output {
    fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
    fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }
    fn ok(self) -> Self {
        assert!(
            self.status.success(),
            "command failed ({}):\nstdout:\n{}\nstderr:\n{}",
            self.status,
            self.stdout_str(),
            self.stderr_str()
        );
        self
    }
    fn fails_with(&self, code: i32, needle: &str) {
        let (stdout, stderr) = (self.stdout_str(), self.stderr_str());
        assert_eq!(self.code(), code, "stdout:\n{stdout}\nstderr:\n{stderr}");
        assert!(
            stderr.contains(needle),
            "stderr does not say {needle:?}:\n{stderr}\nstdout:\n{stdout}"
        );
    }
}

/// Run `program` (a path or a name on PATH) in `dir` with a clean environment plus `env`;
/// the workspace's binaries and `push/push.sh` come first on PATH.
pub fn run_in(dir: &Path, program: &str, args: &[&str], env: &[(String, String)]) -> Output {
    let bin_dir = bin("deploy-manifest").parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}:{}",
        bin_dir.display(),
        repo_root().join("push").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Command::new(program)
        .args(args)
        .current_dir(dir)
        .env_clear()
        .env("PATH", path)
        .env("HOME", std::env::temp_dir())
        .env("USER", "tester")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{program} starts: {e}"))
}

/// A real `systemd --user` manager with a private session bus (scripts/systemd-sandbox.sh),
/// torn down on drop. The agent runs outside the sandbox's mount namespace and reaches the
/// manager through the bus socket, which lives in the sandbox directory.
pub struct SystemdSandbox {
    child: Child,
    pub env: Vec<(String, String)>,
    _dir: tempfile::TempDir,
}

impl SystemdSandbox {
    pub fn start() -> SystemdSandbox {
        let dir = tempfile::tempdir().expect("a temp dir");
        let env_file = dir.path().join("env");
        let script = format!(
            "env > {0}.tmp && mv {0}.tmp {0} && exec sleep infinity",
            env_file.display()
        );
        let child = Command::new("bash")
            .arg(repo_root().join("scripts/systemd-sandbox.sh"))
            .args(["--", "bash", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("systemd-sandbox.sh starts");
        let mut sandbox = SystemdSandbox {
            child,
            env: Vec::new(),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !env_file.exists() {
            if let Ok(Some(status)) = sandbox.child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = sandbox.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                panic!("systemd-sandbox.sh exited ({status}): {err}");
            }
            assert!(
                Instant::now() < deadline,
                "the systemd sandbox did not start in 60 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let text = std::fs::read_to_string(&env_file).unwrap();
        sandbox.env = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .filter(|(k, _)| {
                matches!(
                    *k,
                    "DBUS_SESSION_BUS_ADDRESS"
                        | "XDG_RUNTIME_DIR"
                        | "XDG_CONFIG_HOME"
                        | "SDSANDBOX_DIR"
                )
            })
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        sandbox
    }

    pub fn var(&self, key: &str) -> &str {
        self.env
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("{key} is not set by the sandbox"))
    }

    /// Run `systemctl --user ARGS` against the sandbox's manager (for assertions only; the
    /// agent itself never shells out to systemctl).
    pub fn systemctl(&self, args: &[&str]) -> Output {
        Command::new("systemctl")
            .arg("--user")
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .expect("systemctl runs")
    }
}

impl Drop for SystemdSandbox {
    fn drop(&mut self) {
        // SIGTERM: the sandbox script's trap stops the manager and cleans up.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// Poll `f` every 100 ms until it returns `Some`, for at most `secs` seconds.
pub fn eventually<T>(secs: u64, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// GET http://127.0.0.1:PORT/PATH with a plain socket; the status and body, or `None`.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    http_get_host(port, "127.0.0.1", path)
}

/// A real Caddy (Debian's package) with its admin API and one HTTP listener on loopback
/// ports, no routes; killed on drop.
pub struct Caddy {
    child: Child,
    pub admin_port: u16,
    pub http_port: u16,
    dir: tempfile::TempDir,
}

impl Caddy {
    pub fn start() -> Caddy {
        let dir = tempfile::tempdir().unwrap();
        let (admin_port, http_port) = (free_port(), free_port());
        let mut caddy = Caddy {
            child: Self::spawn(dir.path(), admin_port),
            admin_port,
            http_port,
            dir,
        };
        wait_for_port(admin_port, &mut caddy.child, "caddy");
        caddy
    }

    fn spawn(dir: &Path, admin_port: u16) -> Child {
        let config = dir.join("bootstrap.json");
        std::fs::write(
            &config,
            format!(r#"{{"admin": {{"listen": "127.0.0.1:{admin_port}"}}}}"#),
        )
        .unwrap();
        Command::new("caddy")
            .args(["run", "--config"])
            .arg(&config)
            .env("HOME", dir)
            .env("XDG_DATA_HOME", dir.join("data"))
            .env("XDG_CONFIG_HOME", dir.join("config"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("caddy starts (apt-get install caddy)")
    }

    /// Kill Caddy (as a crash would).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kill Caddy and start it again with an empty config (what `caddy run` without
    /// `--resume` does after a crash or reboot).
    pub fn restart_empty(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(self.dir.path(), self.admin_port);
        wait_for_port(self.admin_port, &mut self.child, "caddy");
    }

    pub fn admin(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }

    /// An admin API request; the status and body.
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let mut s = TcpStream::connect(("127.0.0.1", self.admin_port)).expect("caddy admin");
        let body = body.unwrap_or("");
        write!(
            s,
            "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.admin_port,
            body.len()
        )
        .unwrap();
        let mut response = String::new();
        s.read_to_string(&mut response).unwrap();
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }
}

impl Drop for Caddy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real nginx (Debian's package) on a loopback port, including `conf.d/*.conf` from its
/// own directory; stopped on drop.
pub struct Nginx {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Nginx {
    pub fn start() -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        std::fs::create_dir(dir.path().join("conf.d")).unwrap();
        std::fs::create_dir(dir.path().join("logs")).unwrap();
        std::fs::write(
            dir.path().join("nginx.conf"),
            format!(
                "daemon off;\npid {0}/nginx.pid;\nerror_log {0}/logs/error.log;\nevents {{}}\nhttp {{\n    access_log off;\n    include {0}/conf.d/*.conf;\n}}\n",
                dir.path().display()
            ),
        )
        .unwrap();
        // Its own process group, so that drop stops the workers with the master.
        let mut child = Command::new("nginx")
            .process_group(0)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx starts (apt-get install nginx)");
        let pid = dir.path().join("nginx.pid");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !pid.exists() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("nginx exited: {status}");
            }
            assert!(Instant::now() < deadline, "nginx did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Nginx { child, port, dir }
    }

    /// The file the agent generates.
    pub fn config_file(&self) -> PathBuf {
        self.dir.path().join("conf.d/deployer.conf")
    }

    /// The reload command the agent runs.
    pub fn reload_command(&self) -> String {
        format!(
            "nginx -p {0} -c {0}/nginx.conf -s reload",
            self.dir.path().display()
        )
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGKILL to the master alone leaves its workers listening.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET `path` from 127.0.0.1:`port` with a `Host` header; the status and body.
pub fn http_get_host(port: u16, host: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

/// Assert that `secret` appears in none of `texts` (unit files, state, logs, output).
pub fn assert_not_leaked(secret: &str, texts: &[String]) {
    for (i, text) in texts.iter().enumerate() {
        assert!(!text.contains(secret), "the secret leaked into text #{i}");
    }
}

/// Run `cmd` to completion, or kill it and fail the test if it has not returned within
/// `bound`: a liveness bound (the thing under test must not hang), never a timing assertion.
/// Output goes through files, so a chatty command cannot block on a full pipe.
pub fn output_within(cmd: &mut Command, bound: Duration, what: &str) -> Output {
    let logs = tempfile::tempdir().expect("a temp dir");
    let (out, err) = (logs.path().join("out"), logs.path().join("err"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).expect("a log file"))
        .stderr(std::fs::File::create(&err).expect("a log file"))
        .spawn()
        .unwrap_or_else(|e| panic!("{what} starts: {e}"));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting works") {
            break status;
        }
        if started.elapsed() > bound {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what} did not return within {} s\nstderr:\n{}",
                bound.as_secs(),
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Output {
        status,
        stdout: std::fs::read(&out).unwrap_or_default(),
        stderr: std::fs::read(&err).unwrap_or_default(),
    }
}
