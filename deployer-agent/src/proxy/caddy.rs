//! Caddy, through its admin API: one route per service with `"@id": "deployer-<name>"`,
//! upserted (`PATCH /id/…`, or created when missing) and deleted by id; routes without a
//! `deployer-` id are never touched.

use serde_json::{Value, json};

use super::{Proxy, ProxyError, Route};

impl Proxy {
    async fn caddy(
        &self,
        admin: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, String), ProxyError> {
        let url = format!("{}{path}", admin.trim_end_matches('/'));
        let mut attempt = 0;
        let resp = loop {
            let mut req = self.http().request(method.clone(), &url);
            if let Some(b) = body {
                req = req
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(b.to_string());
            }
            match req.send().await {
                Ok(resp) => break resp,
                // Not connected, so not sent: Caddy may be restarting its admin endpoint
                // after the config change just before. Tried again twice, 0.2 s and 0.4 s on.
                Err(e) if e.is_connect() && attempt < 2 => {
                    attempt += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(200 * attempt)).await;
                }
                Err(e) => {
                    return Err(ProxyError::Caddy {
                        admin: admin.to_owned(),
                        detail: format!("{method} {path}: {}", crate::error_chain(&e)),
                    });
                }
            }
        };
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        Ok((status, text))
    }

    pub(super) async fn apply_caddy(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::route;

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
}
