//! The reverse proxy: one route per HTTP service, from `http.domain` + `http.path` to the
//! port its current generation listens on. The agent hands the proxy the whole set of routes
//! it owns on every run ([`Proxy::apply`]), so a proxy that lost its config (Caddy restarted
//! empty) heals within one poll, and a route of a removed service disappears.
//!
//! # Layout
//! - this module: the [`Route`] type, the proxy's configuration, [`Proxy::apply`].
//! - `caddy`: routes through Caddy's admin API, by `@id`; routes not ours are never touched.
//! - `nginx`: a generated config file, checked with `nginx -t` before it replaces the old one.

mod caddy;
mod nginx;

use std::path::PathBuf;
use std::time::Duration;

use nginx::install_nginx;
pub use nginx::nginx_config;

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
    /// Made on first use: building one loads the system's root certificates, which a run
    /// that does not touch Caddy should not pay for.
    http: std::sync::OnceLock<reqwest::Client>,
}

impl Proxy {
    pub fn new(config: ProxyConfig) -> Proxy {
        Proxy {
            config,
            http: std::sync::OnceLock::new(),
        }
    }

    fn http(&self) -> &reqwest::Client {
        self.http.get_or_init(|| {
            // No connection reuse: Caddy's admin endpoint may close connections when its
            // config changes, and a request on a stale pooled connection would fail.
            crate::http_client()
                .timeout(Duration::from_secs(10))
                .pool_max_idle_per_host(0)
                .no_proxy()
                .build()
                .expect("an HTTP client builds")
        })
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
}

#[cfg(test)]
pub(crate) fn route(service: &str, domain: &str, path: &str, port: u16) -> Route {
    Route {
        service: service.into(),
        domain: domain.into(),
        path: path.into(),
        port,
    }
}
