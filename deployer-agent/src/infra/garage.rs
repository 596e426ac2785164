//! The `garage` preset (Garage, a self-hosted S3 server) and each `s3` service's bucket:
//! a key of the service's own (`deployer:<service>`), and a bucket known to that key only,
//! under the name the service asked for (a local alias: another service's bucket of the
//! same name is another bucket, and no other key reaches it), with its quota.
//!
//! The server is driven through its admin API (JSON over HTTP, a bearer token the agent
//! generated), with a small client of our own: the calls are few, synchronous like the rest
//! of the app layer, and each has a deadline. The preset's admin API listens on a Unix
//! socket in a root-only directory, not on a port: whatever held a port first would be
//! handed the token.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use deploy_manifest::model::{InfraService, S3Need};
use serde_json::{Value, json};

use super::{AppLayer, Endpoint, err};
use crate::AgentError;

/// Its ports unless the manifest says otherwise: the S3 API and the cluster RPC (the admin
/// API is a socket; an `external` server's is its `admin` port).
pub fn default_ports() -> BTreeMap<String, u16> {
    [("s3", 3900), ("rpc", 3901)]
        .map(|(k, p)| (k.to_owned(), p))
        .into()
}

/// The preset's admin API socket, in a directory only root enters.
pub fn admin_socket(root: &Path) -> PathBuf {
    root.join("admin").join("admin.sock")
}

/// What the unit says of the server's config (no secret): a change to it restarts the
/// server, which reads its ports from its config file only.
pub fn unit_environment(spec: &InfraService) -> BTreeMap<String, String> {
    let ports = match spec.ports.is_empty() {
        true => default_ports(),
        false => spec.ports.clone(),
    };
    let text: Vec<String> = ports.iter().map(|(k, p)| format!("{k}={p}")).collect();
    [("DEPLOYER_PORTS".to_owned(), text.join(","))].into()
}

/// The region a Garage preset answers as.
pub const REGION: &str = "garage";

/// The `garage` program: `$DEPLOYER_GARAGE_BIN`, else the first of /usr/local/bin,
/// /usr/bin and NixOS's system profile that has it.
pub fn tool() -> Result<PathBuf, AgentError> {
    if let Some(p) = std::env::var_os("DEPLOYER_GARAGE_BIN") {
        return Ok(PathBuf::from(p));
    }
    let dirs = ["/usr/local/bin", "/usr/bin", "/run/current-system/sw/bin"];
    dirs.iter()
        .map(|d| Path::new(d).join("garage"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            err(
                "garage",
                format!(
                    "garage not found in {}; install it (pkgs.garage, or cargo install garage) or set DEPLOYER_GARAGE_BIN",
                    dirs.join(", ")
                ),
            )
        })
}

/// The server's config file, in its directory (root's alone: it holds the RPC secret and
/// the admin token).
pub fn conf_path(root: &Path) -> PathBuf {
    root.join("garage.toml")
}

/// The argv of the preset's server.
pub fn server_argv(root: &Path) -> Result<Vec<String>, AgentError> {
    Ok(vec![
        tool()?.display().to_string(),
        "-c".into(),
        conf_path(root).display().to_string(),
        "server".into(),
    ])
}

/// Where the agent keeps a Garage preset's RPC secret and admin token.
pub fn secrets_path(secrets_dir: &Path, name: &str) -> PathBuf {
    super::app::generated_dir(secrets_dir).join(format!("infra-{name}.garage"))
}

/// The RPC secret and admin token of the preset `name`: kept in the secrets directory,
/// made once; if that file was lost, taken back from the server's config (so that the
/// server and the agent keep agreeing).
struct Secrets {
    rpc: String,
    admin: String,
}

fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        let v = v.trim().trim_matches('"');
        (k.trim() == key && !v.is_empty() && v.bytes().all(|b| b.is_ascii_hexdigit())).then_some(v)
    })
}

fn load_secrets(
    name: &str,
    root: &Path,
    (secrets_dir, owner_uid): (&Path, u32),
) -> Result<Secrets, AgentError> {
    let path = secrets_path(secrets_dir, name);
    let read = |text: &str| {
        Some(Secrets {
            rpc: field(text, "rpc_secret")?.to_owned(),
            admin: field(text, "admin_token")?.to_owned(),
        })
    };
    if let Some(s) = super::app::read_password(&path, owner_uid)?.and_then(|t| read(&t)) {
        return Ok(s);
    }
    let s = match std::fs::read_to_string(conf_path(root))
        .ok()
        .and_then(|t| read(&t))
    {
        Some(s) => s,
        None => Secrets {
            // 32 bytes, hex: what Garage asks of an RPC secret.
            rpc: super::app::random_secret(32)?,
            admin: super::app::new_password()?,
        },
    };
    let text = format!("rpc_secret={}\nadmin_token={}\n", s.rpc, s.admin);
    super::app::keep_generated(&path, &text, name)?;
    Ok(s)
}

/// The admin token of preset `name`, for the app layer.
fn admin_token(name: &str, state_dir: &Path, secrets: (&Path, u32)) -> Result<String, AgentError> {
    let root = crate::names::infra_dir(state_dir, name);
    Ok(load_secrets(name, &root, secrets)?.admin)
}

/// Prepare the preset's directory before it starts: its metadata and data directories, and
/// its config (rewritten when it differs), loopback only, one node, one copy.
pub fn prepare(
    name: &str,
    spec: &InfraService,
    root: &Path,
    secrets: (&Path, u32),
) -> Result<(), AgentError> {
    let data = root.join("data");
    for dir in [data.join("meta"), data.join("blocks")] {
        std::fs::create_dir_all(&dir).map_err(|e| err(name, format!("{}: {e}", dir.display())))?;
    }
    let socket = admin_socket(root);
    let admin_dir = socket.parent().expect("in its directory");
    std::fs::create_dir_all(admin_dir)
        .and_then(|()| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(admin_dir, std::fs::Permissions::from_mode(0o700))
        })
        .map_err(|e| err(name, format!("{}: {e}", admin_dir.display())))?;
    let s = load_secrets(name, root, secrets)?;
    let ports = match spec.ports.is_empty() {
        true => default_ports(),
        false => spec.ports.clone(),
    };
    let port = |k: &str| {
        ports.get(k).copied().ok_or_else(|| {
            err(
                name,
                format!("a garage preset needs ports s3 and rpc; {k:?} is missing"),
            )
        })
    };
    let text = format!(
        "# Written by deployer-agent.\n\
         metadata_dir = \"{meta}\"\n\
         data_dir = \"{blocks}\"\n\
         db_engine = \"lmdb\"\n\
         replication_factor = 1\n\
         rpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
         rpc_public_addr = \"127.0.0.1:{rpc}\"\n\
         rpc_secret = \"{rpc_secret}\"\n\
         \n\
         [s3_api]\n\
         s3_region = \"{REGION}\"\n\
         api_bind_addr = \"127.0.0.1:{s3}\"\n\
         root_domain = \".s3.garage.localhost\"\n\
         \n\
         [admin]\n\
         api_bind_addr = \"{socket}\"\n\
         admin_token = \"{admin_token}\"\n",
        meta = data.join("meta").display(),
        blocks = data.join("blocks").display(),
        rpc = port("rpc")?,
        s3 = port("s3")?,
        socket = socket.display(),
        rpc_secret = s.rpc,
        admin_token = s.admin,
    );
    super::app::write_if_changed(&conf_path(root), &text, name)
}

/// Where an admin API answers: the preset's socket, or an external server's port.
#[derive(Debug, Clone)]
enum Target {
    Socket(PathBuf),
    Tcp(String, u16),
}

/// The most an answer may be.
const MAX_ANSWER: usize = 4 << 20;

/// A stream to talk HTTP over.
trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// One admin API call: `method` `/v2/<call>` with a JSON body, the token as bearer; the
/// status and the answer. The whole call has 15 s (each read and write 10 s); an answer
/// over 4 MiB is refused.
fn call(
    target: &Target,
    token: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, Value), String> {
    const TIMEOUT: Duration = Duration::from_secs(10);
    let deadline = Instant::now() + Duration::from_secs(15);
    let body = body.map(Value::to_string).unwrap_or_default();
    let host = match target {
        Target::Socket(_) => "localhost".to_owned(),
        Target::Tcp(h, p) if h.contains(':') => format!("[{h}]:{p}"),
        Target::Tcp(h, p) => format!("{h}:{p}"),
    };
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let exchange = |stream: &mut dyn ReadWrite| -> Result<Vec<u8>, String> {
        stream
            .write_all(request.as_bytes())
            .map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        let mut buf = [0u8; 16 << 10];
        loop {
            if Instant::now() > deadline {
                return Err("no whole answer within 15 s".into());
            }
            match stream.read(&mut buf) {
                Ok(0) => return Ok(raw),
                Ok(n) => raw.extend_from_slice(&buf[..n]),
                Err(e) => return Err(e.to_string()),
            }
            if raw.len() > MAX_ANSWER {
                return Err("an answer over 4 MiB".into());
            }
        }
    };
    let raw = match target {
        Target::Socket(path) => {
            let mut s = std::os::unix::net::UnixStream::connect(path)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            s.set_read_timeout(Some(TIMEOUT)).ok();
            s.set_write_timeout(Some(TIMEOUT)).ok();
            exchange(&mut s).map_err(|e| format!("{}: {e}", path.display()))?
        }
        Target::Tcp(h, p) => {
            let addr = std::net::ToSocketAddrs::to_socket_addrs(&(h.as_str(), *p))
                .map_err(|e| format!("{host}: {e}"))?
                .next()
                .ok_or_else(|| format!("{host}: no address"))?;
            let mut s =
                TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| format!("{host}: {e}"))?;
            s.set_read_timeout(Some(TIMEOUT)).ok();
            s.set_write_timeout(Some(TIMEOUT)).ok();
            exchange(&mut s).map_err(|e| format!("{host}: {e}"))?
        }
    };
    parse_response(&raw)
}

/// An HTTP/1.1 response: its status and JSON body (`Content-Length` or chunked).
fn parse_response(raw: &[u8]) -> Result<(u16, Value), String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("an incomplete HTTP answer")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut body = raw[split + 4..].to_vec();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("no HTTP status")?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let end = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .ok_or("a bad chunk")?;
            let size = usize::from_str_radix(String::from_utf8_lossy(&rest[..end]).trim(), 16)
                .map_err(|_| "a bad chunk size")?;
            rest = &rest[end + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(rest.get(..size).ok_or("a short chunk")?);
            rest = rest.get(size + 2..).ok_or("a short chunk")?;
        }
        body = out;
    }
    let value = match body.iter().all(u8::is_ascii_whitespace) {
        true => Value::Null,
        false => serde_json::from_slice(&body).unwrap_or_else(|_| {
            Value::String(String::from_utf8_lossy(&body).chars().take(300).collect())
        }),
    };
    Ok((status, value))
}

/// The admin API of one Garage server.
struct Admin {
    target: Target,
    token: String,
    what: String,
    /// Ours (the preset): the agent gives it its layout and waits for it to be healthy.
    local: bool,
}

impl Admin {
    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value), AgentError> {
        call(&self.target, &self.token, method, path, body.as_ref())
            .map_err(|e| err(&self.what, format!("admin API {path}: {e}")))
    }

    /// A call that must succeed with a JSON object or array: anything else (a proxy's
    /// page, a cut-off answer) is an error, never an empty list.
    fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, AgentError> {
        match self.call(method, path, body)? {
            (200, v @ (Value::Object(_) | Value::Array(_))) => Ok(v),
            (200, v) => Err(err(
                &self.what,
                format!("admin API {path} answered 200 without JSON: {v}"),
            )),
            (status, v) => Err(err(
                &self.what,
                format!("admin API {path} answered {status}: {v}"),
            )),
        }
    }

    /// A new server has no layout (it stores nothing until it has one): this one node
    /// gets a role, once. Then wait (30 s at most) until it says it is healthy.
    fn ensure_layout(&self) -> Result<(), AgentError> {
        let status = self.ok("GET", "/v2/GetClusterStatus", None)?;
        let node = status["nodes"]
            .as_array()
            .and_then(|n| n.first())
            .cloned()
            .unwrap_or_default();
        if node["role"].is_null() {
            let id = node["id"]
                .as_str()
                .ok_or_else(|| err(&self.what, format!("no node in {status}")))?;
            tracing::info!(infra = %self.what, "giving the new server its layout");
            let layout = self.ok(
                "POST",
                "/v2/UpdateClusterLayout",
                Some(json!({"roles": [{"id": id, "zone": "local", "capacity": 1_000_000_000_000u64, "tags": []}]})),
            )?;
            let version = layout["version"].as_u64().unwrap_or(0) + 1;
            self.ok(
                "POST",
                "/v2/ApplyClusterLayout",
                Some(json!({"version": version})),
            )?;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let health = self.ok("GET", "/v2/GetClusterHealth", None)?;
            if health["status"] == "healthy" {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(err(
                    &self.what,
                    format!("not healthy within 30 s: {health}"),
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// What to do for one service's bucket, given what the server holds (pure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketPlan {
    pub create_key: bool,
    /// The bucket's id, if the key has one under the service's name for it.
    pub bucket: Option<String>,
    /// The quota to set (bytes; `None`: none), when it differs.
    pub set_quota: Option<Option<u64>>,
}

/// Decide from the keys named `deployer:<service>` (`keys`: their info, each with its
/// buckets) what is to be made. More than one key of that name: refused (someone made one).
pub fn plan_bucket(
    service: &str,
    keys: &[Value],
    alias: &str,
    quota: Option<u64>,
    quota_now: impl Fn(&str) -> Option<Option<u64>>,
) -> Result<BucketPlan, String> {
    match keys {
        [] => Ok(BucketPlan {
            create_key: true,
            bucket: None,
            set_quota: quota.map(Some),
        }),
        [key] => {
            let bucket = key["buckets"].as_array().into_iter().flatten().find(|b| {
                b["localAliases"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x == alias))
            });
            let id = bucket.and_then(|b| b["id"].as_str()).map(str::to_owned);
            let set_quota = match &id {
                Some(id) => (quota_now(id) != Some(quota)).then_some(quota),
                None => quota.map(Some),
            };
            Ok(BucketPlan {
                create_key: false,
                bucket: id,
                set_quota,
            })
        }
        _ => Err(format!(
            "{} keys are named {:?}; the agent makes one per service and uses it alone: delete the others (garage key delete)",
            keys.len(),
            key_name(service)
        )),
    }
}

/// The name of `service`'s key.
pub fn key_name(service: &str) -> String {
    format!("deployer:{service}")
}

impl AppLayer<'_> {
    /// What `service` gets from the Garage preset `infra_name` at `ep`: its key (made
    /// once, `deployer:<service>`), its bucket under the name it asked for, known to its
    /// key only (made once, read and write), the quota set as asked, and the buckets the
    /// preset's config names. The env a service expects of S3.
    pub fn s3_env(
        &self,
        service: &str,
        need: &S3Need,
        spec: &InfraService,
        ep: &Endpoint,
        infra_name: &str,
    ) -> Result<BTreeMap<String, String>, AgentError> {
        let what = format!("{service}: s3");
        let ports = |k: &str| ep.ports.get(k).copied();
        let Some(s3) = ports("s3") else {
            return Err(err(&what, format!("{infra_name} has no s3 port")));
        };
        let (target, token) = match &ep.unit {
            Some(_) => {
                let root = crate::names::infra_dir(self.state_dir, infra_name);
                let token = admin_token(
                    infra_name,
                    self.state_dir,
                    (self.secrets_dir, self.owner_uid),
                )?;
                (Target::Socket(admin_socket(&root)), token)
            }
            None => {
                let Some(admin_port) = ports("admin") else {
                    return Err(err(
                        &what,
                        format!("the external {infra_name} has no admin port"),
                    ));
                };
                // External: its admin token in <secrets>/infra-<name>.env.
                let (path, admin) = self.admin_credentials(infra_name, "GARAGE_ADMIN_TOKEN=…")?;
                let token = admin
                    .into_iter()
                    .find_map(|(k, v)| (k == "GARAGE_ADMIN_TOKEN").then_some(v))
                    .ok_or_else(|| {
                        err(
                            infra_name,
                            format!("no GARAGE_ADMIN_TOKEN in {}", path.display()),
                        )
                    })?;
                (Target::Tcp(ep.host.clone(), admin_port), token)
            }
        };
        let admin = Admin {
            target,
            token,
            what: what.clone(),
            local: ep.unit.is_some(),
        };
        // An external cluster's layout is its operator's.
        if admin.local {
            admin.ensure_layout()?;
        }
        // The buckets the preset's config names: global names (checked: a-z, 0-9, '-',
        // '.'), no key.
        let config = spec.garage_config().map_err(|e| err(infra_name, e))?;
        for b in &config.buckets {
            match admin.call("GET", &format!("/v2/GetBucketInfo?globalAlias={b}"), None)? {
                (200, _) => {}
                (404, _) => {
                    admin.ok("POST", "/v2/CreateBucket", Some(json!({"globalAlias": b})))?;
                }
                (status, v) => {
                    return Err(err(
                        &what,
                        format!("bucket {b:?}: the admin API answered {status}: {v}"),
                    ));
                }
            }
        }
        let name = key_name(service);
        let listed = admin.ok("GET", "/v2/ListKeys", None)?;
        let mut keys = Vec::new();
        for k in listed
            .as_array()
            .into_iter()
            .flatten()
            .filter(|k| k["name"] == name.as_str())
        {
            let id = k["id"].as_str().unwrap_or_default();
            if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(err(
                    &what,
                    format!("the server lists a key with the id {id:?}"),
                ));
            }
            keys.push(admin.ok(
                "GET",
                &format!("/v2/GetKeyInfo?id={id}&showSecretKey=true"),
                None,
            )?);
        }
        let alias = need.bucket(service);
        let quota = match &need.quota {
            Some(q) => Some(
                deploy_manifest::model::parse_size(q)
                    .ok_or_else(|| err(&what, format!("quota {q:?} is not a size")))?,
            ),
            None => None,
        };
        let quota_now = |id: &str| {
            let info = admin
                .ok("GET", &format!("/v2/GetBucketInfo?id={id}"), None)
                .ok()?;
            Some(info["quotas"]["maxSize"].as_u64())
        };
        let plan =
            plan_bucket(service, &keys, &alias, quota, quota_now).map_err(|e| err(&what, e))?;
        let key = match plan.create_key {
            true => {
                tracing::info!(key = %name, "creating the service's key");
                admin.ok("POST", "/v2/CreateKey", Some(json!({"name": name})))?
            }
            false => keys.remove(0),
        };
        let (Some(key_id), Some(secret)) =
            (key["accessKeyId"].as_str(), key["secretAccessKey"].as_str())
        else {
            return Err(err(&what, "the key's id or secret was not given back"));
        };
        let bucket = match plan.bucket {
            Some(id) => id,
            None => {
                tracing::info!(bucket = %alias, "creating the service's bucket");
                let made = admin.ok(
                    "POST",
                    "/v2/CreateBucket",
                    Some(json!({"localAlias": {"accessKeyId": key_id, "alias": alias,
                        "allow": {"read": true, "write": true, "owner": true}}})),
                )?;
                made["id"].as_str().unwrap_or_default().to_owned()
            }
        };
        if let Some(max) = plan.set_quota {
            // A bucket id is hex; what else its quotas say (maxObjects) is kept.
            if !bucket.bytes().all(|b| b.is_ascii_hexdigit()) || bucket.is_empty() {
                return Err(err(
                    &what,
                    format!("the server gave the bucket the id {bucket:?}"),
                ));
            }
            let info = admin.ok("GET", &format!("/v2/GetBucketInfo?id={bucket}"), None)?;
            admin.ok(
                "POST",
                &format!("/v2/UpdateBucket?id={bucket}"),
                Some(
                    json!({"quotas": {"maxSize": max, "maxObjects": info["quotas"]["maxObjects"]}}),
                ),
            )?;
        }
        let url = match ep.host.contains(':') {
            true => format!("http://[{}]:{s3}", ep.host),
            false => format!("http://{}:{s3}", ep.host),
        };
        Ok([
            ("AWS_ENDPOINT_URL", url.clone()),
            ("AWS_ENDPOINT_URL_S3", url),
            ("AWS_ACCESS_KEY_ID", key_id.to_owned()),
            ("AWS_SECRET_ACCESS_KEY", secret.to_owned()),
            ("AWS_REGION", REGION.to_owned()),
            ("AWS_DEFAULT_REGION", REGION.to_owned()),
            ("S3_BUCKET", alias),
        ]
        .map(|(k, v)| (k.to_owned(), v))
        .into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Garage's secrets file moved aside: the RPC secret and admin token the server has, in
    /// its config, are taken back, so the agent can still talk to it.
    #[test]
    fn lost_secrets_are_taken_back_from_the_servers_config() {
        let dir = tempfile::tempdir().unwrap();
        let (root, secrets) = (dir.path().join("infra/s"), dir.path().join("secrets"));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&secrets).unwrap();
        let uid = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(dir.path()).unwrap());
        prepare("s", &InfraService::default(), &root, (&secrets, uid)).unwrap();
        let conf = std::fs::read_to_string(conf_path(&root)).unwrap();
        let first = load_secrets("s", &root, (&secrets, uid)).unwrap();
        assert_eq!(first.rpc.len(), 64, "32 bytes, hex");
        assert!(conf.contains(&first.admin) && conf.contains(&first.rpc));
        let path = secrets_path(&secrets, "s");
        std::fs::rename(&path, dir.path().join("aside")).unwrap();
        prepare("s", &InfraService::default(), &root, (&secrets, uid)).unwrap();
        let again = load_secrets("s", &root, (&secrets, uid)).unwrap();
        assert_eq!((again.rpc, again.admin), (first.rpc, first.admin));
        assert_eq!(std::fs::read_to_string(conf_path(&root)).unwrap(), conf);
    }

    #[test]
    fn answers_parse_with_a_length_or_in_chunks() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 9\r\n\r\n{\"a\": 1}\n";
        assert_eq!(parse_response(plain).unwrap(), (200, json!({"a": 1})));
        let chunked = b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n4\r\n: 2}\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), (404, json!({"a": 2})));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        let text = b"HTTP/1.1 503 x\r\n\r\nnot json";
        assert_eq!(parse_response(text).unwrap(), (503, json!("not json")));
    }

    #[test]
    fn a_bucket_is_made_once_and_its_quota_kept() {
        let key = |buckets: Value| json!({"accessKeyId": "GK1", "secretAccessKey": "s", "buckets": buckets});
        let none = |_: &str| None;
        // Nothing yet: a key, a bucket, the quota.
        let p = plan_bucket("shop", &[], "uploads", Some(10), none).unwrap();
        assert_eq!(
            p,
            BucketPlan {
                create_key: true,
                bucket: None,
                set_quota: Some(Some(10))
            }
        );
        // The key, its bucket under that name, the quota as asked: nothing to do.
        let k = key(json!([{"id": "b1", "localAliases": ["uploads"]}]));
        let p = plan_bucket(
            "shop",
            std::slice::from_ref(&k),
            "uploads",
            Some(10),
            |_| Some(Some(10)),
        )
        .unwrap();
        assert_eq!(
            p,
            BucketPlan {
                create_key: false,
                bucket: Some("b1".into()),
                set_quota: None
            }
        );
        // Another quota asked, or none any more.
        let p = plan_bucket("shop", std::slice::from_ref(&k), "uploads", None, |_| {
            Some(Some(10))
        })
        .unwrap();
        assert_eq!(p.set_quota, Some(None));
        // The key has no bucket of that name (another name asked): a new one.
        let p = plan_bucket("shop", std::slice::from_ref(&k), "media", None, none).unwrap();
        assert_eq!(p.bucket, None);
        // Two keys of the service's name: someone else made one; refused.
        let e = plan_bucket("shop", &[k.clone(), k], "uploads", None, none).unwrap_err();
        assert!(e.contains("2 keys are named \"deployer:shop\""), "{e}");
    }
}
