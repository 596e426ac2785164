//! The reverse proxy: one route per HTTP service, from `http.domain` + `http.path` to the
//! port its current generation listens on. The agent hands the proxy the whole set of routes
//! it owns on every run ([`Proxy::apply`]), so a proxy that lost its config (Caddy restarted
//! empty) heals within one poll, and a route of a removed service disappears.
//!
//! - Caddy: through the admin API, one route per service with `"@id": "deployer-<name>"`,
//!   upserted (`PATCH /id/…`, or created when missing) and deleted by id; routes without a
//!   `deployer-` id are never touched.
//! - OpenResty / nginx: a generated config file (an upstream and a location per route,
//!   grouped into a server block per domain), checked with `nginx -t` before it replaces the
//!   old one, then a reload. A file nginx refuses is never installed.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

/// One route: requests for `domain` under `path` go to 127.0.0.1:`port`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Route {
    pub service: String,
    pub domain: String,
    pub path: String,
    pub port: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("caddy admin API at {admin}: {detail}; routes are retried on the next run")]
    Caddy { admin: String, detail: String },
    #[error("nginx config {path}: {detail}; the previous config stays in place")]
    Nginx { path: String, detail: String },
}

/// Which proxy, and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyConfig {
    None,
    Caddy {
        /// e.g. `http://localhost:2019`
        admin: String,
        /// The server (in `apps.http.servers`) the routes go into; created if missing.
        server: String,
        /// Its listen address when the agent has to create it, e.g. `:80`.
        listen: String,
    },
    OpenResty {
        /// The generated file, included by the main nginx config.
        config: PathBuf,
        /// `listen` of the generated server blocks, e.g. `80`.
        listen: String,
        /// The nginx binary (`nginx -t`).
        nginx: String,
        /// The command that reloads the running nginx, e.g. `nginx -s reload`.
        reload: Vec<String>,
    },
}

impl ProxyConfig {
    pub fn is_none(&self) -> bool {
        matches!(self, ProxyConfig::None)
    }
}

pub struct Proxy {
    config: ProxyConfig,
    http: reqwest::Client,
}

impl Proxy {
    pub fn new(config: ProxyConfig) -> Proxy {
        // No connection reuse: Caddy's admin endpoint may close connections when its config
        // changes, and a request on a stale pooled connection would fail.
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(0)
            .no_proxy()
            .build()
            .expect("an HTTP client builds");
        Proxy { config, http }
    }

    pub fn is_none(&self) -> bool {
        self.config.is_none()
    }

    /// Make the proxy's owned routes exactly `routes`.
    pub async fn apply(&self, routes: &[Route]) -> Result<(), ProxyError> {
        match &self.config {
            ProxyConfig::None => Ok(()),
            ProxyConfig::Caddy {
                admin,
                server,
                listen,
            } => self.apply_caddy(admin, server, listen, routes).await,
            ProxyConfig::OpenResty {
                config,
                listen,
                nginx,
                reload,
            } => {
                let text = nginx_config(routes, listen);
                let (config, nginx, reload) = (config.clone(), nginx.clone(), reload.clone());
                tokio::task::spawn_blocking(move || install_nginx(&config, &text, &nginx, &reload))
                    .await
                    .expect("installing the nginx config does not panic")
            }
        }
    }

    async fn caddy(
        &self,
        admin: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, String), ProxyError> {
        let url = format!("{}{path}", admin.trim_end_matches('/'));
        let mut req = self.http.request(method.clone(), &url);
        if let Some(b) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(b.to_string());
        }
        let resp = req.send().await.map_err(|e| ProxyError::Caddy {
            admin: admin.to_owned(),
            detail: format!("{method} {path}: {e}"),
        })?;
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        Ok((status, text))
    }

    async fn apply_caddy(
        &self,
        admin: &str,
        server: &str,
        listen: &str,
        routes: &[Route],
    ) -> Result<(), ProxyError> {
        use reqwest::Method;
        let fail = |detail: String| ProxyError::Caddy {
            admin: admin.to_owned(),
            detail,
        };
        let routes_path = format!("/config/apps/http/servers/{server}/routes");
        let (status, body) = self.caddy(admin, Method::GET, &routes_path, None).await?;
        let existing: Value = if status == 200 {
            serde_json::from_str(&body).unwrap_or(Value::Null)
        } else {
            Value::Null
        };
        if existing.is_null() {
            self.ensure_caddy_server(admin, server, listen).await?;
        }
        // What Caddy has, kept in step with every change below so positions stay right.
        let mut current: Vec<Value> = existing.as_array().cloned().unwrap_or_default();
        let id_of = |r: &Value| r.get("@id").and_then(Value::as_str).map(str::to_owned);
        let owned: Vec<String> = current
            .iter()
            .filter_map(id_of)
            .filter(|id| crate::names::is_caddy_route_id(id))
            .collect();
        for id in owned {
            if !routes
                .iter()
                .any(|r| crate::names::caddy_route_id(&r.service) == id)
            {
                let (status, body) = self
                    .caddy(admin, Method::DELETE, &format!("/id/{id}"), None)
                    .await?;
                if status != 200 && status != 404 {
                    return Err(fail(format!("DELETE /id/{id}: {status} {body}")));
                }
                current.retain(|r| id_of(r).as_deref() != Some(id.as_str()));
            }
        }
        for route in routes {
            let id = crate::names::caddy_route_id(&route.service);
            let desired = caddy_route(&id, route);
            let at = current
                .iter()
                .position(|r| id_of(r).as_deref() == Some(id.as_str()));
            if let Some(i) = at {
                if current[i] == desired {
                    continue;
                }
                // Same path: change it where it is. Another path: it may belong elsewhere.
                let method = if caddy_path(&current[i]) == route.path {
                    Method::PATCH
                } else {
                    Method::DELETE
                };
                let body = (method == Method::PATCH).then_some(&desired);
                let (status, text) = self
                    .caddy(admin, method.clone(), &format!("/id/{id}"), body)
                    .await?;
                if status == 200 && method == Method::PATCH {
                    current[i] = desired;
                    continue;
                }
                if status != 200 && status != 404 {
                    return Err(fail(format!("{method} /id/{id}: {status} {text}")));
                }
                current.remove(i);
            }
            // A longer path must come before a shorter one it is under (`/api/v1` before
            // `/api`): before our first route with a shorter path; else after our last
            // route; else first (specific paths before others' catch-alls) or, for `/`,
            // last.
            let ours = |r: &Value| id_of(r).is_some_and(|i| crate::names::is_caddy_route_id(&i));
            let shorter = current
                .iter()
                .position(|r| ours(r) && caddy_path(r).len() < route.path.len());
            let after_ours = current.iter().rposition(ours).map(|i| i + 1);
            let index = match (shorter, after_ours) {
                (Some(i), _) => Some(i),
                _ if route.path == "/" => None,
                (None, Some(i)) => Some(i),
                (None, None) => Some(0),
            };
            let (method, path) = match index {
                Some(i) if i < current.len() => (Method::PUT, format!("{routes_path}/{i}")),
                _ => (Method::POST, routes_path.clone()),
            };
            let (status, body) = self
                .caddy(admin, method.clone(), &path, Some(&desired))
                .await?;
            if status != 200 {
                return Err(fail(format!("{method} {path}: {status} {body}")));
            }
            let i = index.unwrap_or(current.len()).min(current.len());
            current.insert(i, desired);
        }
        Ok(())
    }

    /// Create `apps.http.servers.<server>` (and its parents) when Caddy has none.
    async fn ensure_caddy_server(
        &self,
        admin: &str,
        server: &str,
        listen: &str,
    ) -> Result<(), ProxyError> {
        use reqwest::Method;
        let server_json = json!({
            "listen": [listen],
            "routes": [],
            "automatic_https": {"disable": true},
        });
        let attempts = [
            (
                format!("/config/apps/http/servers/{server}"),
                server_json.clone(),
            ),
            (
                "/config/apps/http/servers".to_owned(),
                json!({ server: server_json.clone() }),
            ),
            (
                "/config/apps/http".to_owned(),
                json!({"servers": { server: server_json.clone() }}),
            ),
            (
                "/config/apps".to_owned(),
                json!({"http": {"servers": { server: server_json.clone() }}}),
            ),
        ];
        let mut last = String::new();
        for (path, body) in attempts {
            let (status, text) = self.caddy(admin, Method::PUT, &path, Some(&body)).await?;
            if status == 200 {
                return Ok(());
            }
            last = format!("PUT {path}: {status} {}", text.trim());
        }
        // The last resort: an empty config (`null`) takes a whole new root.
        let (status, text) = self
            .caddy(
                admin,
                Method::POST,
                "/config/",
                Some(&json!({"apps": {"http": {"servers": { server: server_json }}}})),
            )
            .await?;
        if status == 200 {
            return Ok(());
        }
        Err(ProxyError::Caddy {
            admin: admin.to_owned(),
            detail: format!(
                "cannot create server {server}: {last}; POST /config/: {status} {text}"
            ),
        })
    }
}

/// The path a Caddy route of ours matches (`/` when it has no path matcher).
fn caddy_path(route: &Value) -> &str {
    route["match"][0]["path"][0].as_str().unwrap_or("/")
}

/// A Caddy route for `r`.
fn caddy_route(id: &str, r: &Route) -> Value {
    let mut matcher = json!({"host": [r.domain]});
    if r.path != "/" {
        let base = r.path.trim_end_matches('/');
        matcher["path"] = json!([base, format!("{base}/*")]);
    }
    json!({
        "@id": id,
        "match": [matcher],
        "handle": [{
            "handler": "reverse_proxy",
            "upstreams": [{"dial": format!("127.0.0.1:{}", r.port)}],
        }],
        "terminal": true,
    })
}

/// The nginx fragment for `routes` (http context): an upstream per service, a server block
/// per domain, a location per path (longest first, as nginx prefers anyway).
pub fn nginx_config(routes: &[Route], listen: &str) -> String {
    let mut out = String::from("# Generated by deployer-agent; changes are overwritten.\n");
    let mut by_domain: BTreeMap<&str, Vec<&Route>> = BTreeMap::new();
    for r in routes {
        let upstream = crate::names::upstream(&r.service);
        let _ = writeln!(
            out,
            "upstream {upstream} {{\n    server 127.0.0.1:{};\n    keepalive 16;\n}}",
            r.port
        );
        by_domain.entry(r.domain.as_str()).or_default().push(r);
    }
    for (domain, mut rs) in by_domain {
        rs.sort_by_key(|r| std::cmp::Reverse(r.path.len()));
        let _ = writeln!(
            out,
            "server {{\n    listen {listen};\n    server_name {domain};"
        );
        for r in rs {
            // `/api` is `/api` and what is under `/api/`, as with Caddy; not `/apiary`.
            let locations = if r.path == "/" {
                vec!["/".to_owned()]
            } else {
                vec![format!("= {}", r.path), format!("{}/", r.path)]
            };
            for location in locations {
                let _ = writeln!(
                    out,
                    "    location {location} {{\n        proxy_pass http://{};\n        proxy_http_version 1.1;\n        proxy_set_header Connection \"\";\n        proxy_set_header Host $host;\n        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n        proxy_next_upstream error timeout;\n    }}",
                    crate::names::upstream(&r.service)
                );
            }
        }
        let _ = writeln!(out, "}}");
    }
    out
}

/// Check `text` with `nginx -t` (inside a throwaway main config), then swap it in and reload.
/// On any failure the file in place is the previous one.
fn install_nginx(
    path: &Path,
    text: &str,
    nginx: &str,
    reload: &[String],
) -> Result<(), ProxyError> {
    let fail = |detail: String| ProxyError::Nginx {
        path: path.display().to_string(),
        detail,
    };
    if std::fs::read_to_string(path).ok().as_deref() == Some(text) {
        return Ok(());
    }
    let dir = tempfile::tempdir().map_err(|e| fail(e.to_string()))?;
    let candidate = dir.path().join("deployer.conf");
    std::fs::write(&candidate, text).map_err(|e| fail(e.to_string()))?;
    let wrapper = dir.path().join("nginx.conf");
    std::fs::write(
        &wrapper,
        format!(
            "pid {0}/nginx.pid;\nerror_log {0}/error.log;\nevents {{}}\nhttp {{\n    include {1};\n}}\n",
            dir.path().display(),
            candidate.display()
        ),
    )
    .map_err(|e| fail(e.to_string()))?;
    let out = std::process::Command::new(nginx)
        .args(["-t", "-q", "-p"])
        .arg(dir.path())
        .arg("-c")
        .arg(&wrapper)
        .output()
        .map_err(|e| fail(format!("cannot run {nginx}: {e}")))?;
    if !out.status.success() {
        return Err(fail(format!(
            "nginx -t refused the new config: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let previous = std::fs::read(path).ok();
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| fail(e.to_string()))?;
    }
    deploy_manifest::fsutil::write_atomically(path, text.as_bytes(), 0o644)
        .map_err(|e| fail(e.to_string()))?;
    let (program, args) = reload
        .split_first()
        .ok_or_else(|| fail("no reload command".into()))?;
    let reloaded = std::process::Command::new(program).args(args).output();
    match reloaded {
        Ok(o) if o.status.success() => Ok(()),
        other => {
            // Put the old file back so the running config and the file agree.
            match previous {
                Some(old) => {
                    let _ = deploy_manifest::fsutil::write_atomically(path, &old, 0o644);
                }
                None => {
                    let _ = std::fs::remove_file(path);
                }
            }
            let why = match other {
                Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_owned(),
                Err(e) => e.to_string(),
            };
            Err(fail(format!("reload ({}) failed: {why}", reload.join(" "))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(service: &str, domain: &str, path: &str, port: u16) -> Route {
        Route {
            service: service.into(),
            domain: domain.into(),
            path: path.into(),
            port,
        }
    }

    #[test]
    fn caddy_routes_match_host_and_path() {
        let r = caddy_route("deployer-a", &route("a", "a.test", "/", 8080));
        assert_eq!(r["match"], json!([{"host": ["a.test"]}]));
        assert_eq!(
            r["handle"][0]["upstreams"][0]["dial"],
            json!("127.0.0.1:8080")
        );
        let r = caddy_route("deployer-b", &route("b", "a.test", "/api/", 9090));
        assert_eq!(r["match"][0]["path"], json!(["/api", "/api/*"]));
    }

    #[test]
    fn nginx_config_groups_domains_and_orders_paths() {
        let text = nginx_config(
            &[
                route("web", "a.test", "/", 8080),
                route("api-v1", "a.test", "/api", 8081),
                route("b", "b.test", "/", 8082),
            ],
            "80",
        );
        assert!(text.contains("upstream deployer-api-v1 {\n    server 127.0.0.1:8081;"));
        let a = text.find("server_name a.test;").unwrap();
        let api = text[a..].find("location /api/ {").unwrap();
        assert!(text[a..].contains("location = /api {"));
        let root = text[a..].find("location / {").unwrap();
        assert!(api < root, "longer paths first:\n{text}");
        assert_eq!(text.matches("server {").count(), 2);
    }
}
