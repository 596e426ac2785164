//! `deployer-agent`: run (once or in a loop), plan, status. A thin layer over the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use deploy_manifest::repo::hostname;
use deploy_manifest::store::{Counted, DEFAULT_STORE, Deadline, Store};
use deploy_manifest::{exit, render};
use deployer_agent::config::{
    AgentConfig, ConfigFile, DEFAULT_STORE_DEADLINE, default_unit_dir, parse_bytes,
    parse_port_range,
};
use deployer_agent::host::system::SystemHost;
use deployer_agent::proxy::ProxyConfig;
use deployer_agent::reconcile::Agent;
use deployer_agent::state::State;
use deployer_agent::systemd::Systemd;
use deployer_agent::unit::split_command;
use deployer_agent::{AgentError, EXIT_SERVICES_FAILED};

#[derive(Parser)]
#[command(
    name = "deployer-agent",
    version,
    about = "Converge this host to the deployer manifest: systemd units, health, rollback",
    after_help = "Exit codes: 0 ok, 1 failure, 2 usage, 3 invalid manifest, 4 no manifest, \
                  5 store unusable or too slow, 8 some services failed (rolled back, or retried next run), 9 another run holds the lock, \
                  11 manifest refused: unsigned, wrongly signed or older than the applied one"
)]
struct Cli {
    /// Where manifests and artifacts live: file:///path or s3://bucket/prefix.
    #[arg(long, global = true, env = "DEPLOY_STORE")]
    store: Option<String>,
    /// This host's name in the manifest's "hosts" (default: the hostname).
    #[arg(long, global = true, env = "DEPLOYER_HOST")]
    host: Option<String>,
    #[arg(long, global = true, env = "DEPLOYER_STATE_DIR")]
    state_dir: Option<PathBuf>,
    #[arg(long, global = true, env = "DEPLOYER_SECRETS_DIR")]
    secrets_dir: Option<PathBuf>,
    /// Where unit files go (default /run/systemd/system; with --user $XDG_RUNTIME_DIR/systemd/user).
    #[arg(long, global = true, env = "DEPLOYER_UNIT_DIR")]
    unit_dir: Option<PathBuf>,
    /// Drive the user's systemd manager on the session bus.
    #[arg(long, global = true, env = "DEPLOYER_USER_MANAGER")]
    user: bool,
    /// Settings file (TOML, the same names as the flags); flags win.
    #[arg(long, global = true, env = "DEPLOYER_CONFIG")]
    config: Option<PathBuf>,
    /// The reverse proxy to route HTTP services through: none, caddy or openresty.
    #[arg(long, global = true, env = "DEPLOYER_PROXY", value_parser = ["none", "caddy", "openresty"])]
    proxy: Option<String>,
    /// Caddy's admin API.
    #[arg(long, global = true, env = "DEPLOYER_CADDY_ADMIN")]
    caddy_admin: Option<String>,
    /// The Caddy server (apps.http.servers.NAME) the routes go into; created if missing.
    #[arg(long, global = true)]
    caddy_server: Option<String>,
    /// Listen address for that server when the agent creates it.
    #[arg(long, global = true)]
    caddy_listen: Option<String>,
    /// The generated nginx/OpenResty config file (included by the main config).
    #[arg(long, global = true, env = "DEPLOYER_NGINX_CONFIG")]
    nginx_config: Option<PathBuf>,
    /// `listen` of the generated server blocks.
    #[arg(long, global = true)]
    nginx_listen: Option<String>,
    /// The command that reloads nginx after a new config passed `nginx -t`.
    #[arg(long, global = true)]
    nginx_reload: Option<String>,
    /// Ports for zero-downtime generations, FIRST-LAST.
    #[arg(long, global = true)]
    port_range: Option<String>,
    /// How long the old generation keeps serving after the route switched, e.g. 2s.
    #[arg(long, global = true)]
    drain: Option<String>,
    /// Write Prometheus metrics here after every run (node_exporter textfile collector),
    /// e.g. /var/lib/prometheus/node-exporter/deployer.prom.
    #[arg(long, global = true, env = "DEPLOYER_METRICS_FILE")]
    metrics_file: Option<PathBuf>,
    /// Accept only manifests signed by a key in FILE (one NAME:BASE64 per line), and never
    /// one older than the manifest already applied.
    #[arg(long, global = true, env = "DEPLOYER_TRUSTED_KEYS")]
    trusted_keys: Option<PathBuf>,
    /// Import Nix closures only if their narinfos are signed by a key in FILE (Nix's
    /// trusted-public-keys format).
    #[arg(long, global = true, env = "DEPLOYER_NIX_TRUSTED_KEYS")]
    nix_trusted_keys: Option<PathBuf>,
    /// The most one archive may unpack to on this host, e.g. 16GiB (default). Each archive
    /// gets max(256 MiB, 200 × its size) within this.
    #[arg(long, global = true, env = "DEPLOYER_MAX_UNPACKED_BYTES")]
    max_unpacked_bytes: Option<String>,
    /// The most entries one archive may hold on this host (default 1000000). Each archive
    /// gets max(20000, its size / 16) within this.
    #[arg(long, global = true, env = "DEPLOYER_MAX_ARCHIVE_ENTRIES")]
    max_archive_entries: Option<u64>,
    /// The most time one run may spend waiting on the store, all requests and downloads
    /// together, e.g. 10m (default); then the run stops and the host keeps what it runs.
    #[arg(long, global = true, env = "DEPLOYER_STORE_DEADLINE")]
    store_deadline: Option<String>,
    /// How many history records of this host the store keeps (`deploy-manifest
    /// history`); older ones are deleted. Default 200.
    #[arg(long, global = true, env = "DEPLOYER_HISTORY_KEEP")]
    history_keep: Option<usize>,
    /// This host's mode, e.g. regtest: picks the command variant of infrastructure that
    /// declares `variants` (seed 001's networkMode).
    #[arg(long, global = true, env = "DEPLOYER_MODE")]
    mode: Option<String>,
    /// Run this shell command for each event (deploy, rollback, failure, removal, rollout
    /// abort), the event's JSON on its stdin; killed after 30 s. Never delays a deploy.
    #[arg(long, global = true, env = "DEPLOYER_NOTIFY_COMMAND")]
    notify_command: Option<String>,
    /// POST each event's JSON to this http(s) URL, retried with backoff for about 30 s.
    /// Never delays a deploy.
    #[arg(long, global = true, env = "DEPLOYER_NOTIFY_URL")]
    notify_url: Option<String>,
    /// Machine-readable output (plan, status, run).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Reconcile: once (what deployer.service runs) or every --interval.
    Run {
        #[arg(long)]
        once: bool,
        /// Time between runs, e.g. 5m.
        #[arg(long, value_parser = humantime::parse_duration)]
        interval: Option<Duration>,
    },
    /// Print what a run would do; acts on nothing.
    Plan,
    /// Download and verify the artifacts of this host's services ahead of a deploy;
    /// installs nothing else (no unit, no restart).
    Fetch,
    /// What state.json says this host runs.
    Status,
    /// Print the public half of this host's report signing key, HOST:BASE64 (for readers'
    /// --host-keys); makes the key, <state-dir>/host.key, if it does not exist yet.
    HostKey,
}

fn main() -> ExitCode {
    deploy_manifest::cli::init_tracing("info");
    let cli = Cli::parse();
    match deploy_manifest::cli::runtime().block_on(run(cli)) {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("deployer-agent: error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

/// A setting: the flag, else the config file, else the default.
fn pick<T: Clone + From<&'static str>>(
    flag: &Option<T>,
    file: Option<T>,
    default: &'static str,
) -> T {
    flag.clone().or(file).unwrap_or_else(|| default.into())
}

fn config(cli: &Cli, interval: Option<Duration>) -> Result<AgentConfig, AgentError> {
    let file = match &cli.config {
        Some(p) => ConfigFile::load(p).map_err(|e| AgentError::State {
            path: p.display().to_string(),
            detail: e,
        })?,
        None => ConfigFile::default(),
    };
    let duration = |s: Option<&String>, default: Duration| -> Result<Duration, AgentError> {
        s.map(|s| humantime::parse_duration(s))
            .transpose()
            .map(|d| d.unwrap_or(default))
            .map_err(|e| AgentError::State {
                path: "config".into(),
                detail: e.to_string(),
            })
    };
    let user = cli.user || file.user.unwrap_or(false);
    let bad = |detail: String| AgentError::State {
        path: "config".into(),
        detail,
    };
    let proxy = match cli
        .proxy
        .clone()
        .or(file.proxy)
        .as_deref()
        .unwrap_or("none")
    {
        "none" => ProxyConfig::None,
        "caddy" => ProxyConfig::Caddy {
            admin: pick(&cli.caddy_admin, file.caddy_admin, "http://localhost:2019"),
            server: pick(&cli.caddy_server, file.caddy_server, "deployer"),
            listen: pick(&cli.caddy_listen, file.caddy_listen, ":80"),
        },
        "openresty" => ProxyConfig::OpenResty {
            config: pick(
                &cli.nginx_config,
                file.nginx_config,
                "/etc/nginx/conf.d/deployer.conf",
            ),
            listen: pick(&cli.nginx_listen, file.nginx_listen, "80"),
            nginx: "nginx".into(),
            reload: split_command(&pick(
                &cli.nginx_reload,
                file.nginx_reload,
                "nginx -s reload",
            ))
            .map_err(|e| bad(format!("--nginx-reload: {e}")))?,
        },
        other => {
            return Err(bad(format!(
                "proxy {other:?}: expected none, caddy or openresty"
            )));
        }
    };
    let host_default = deploy_manifest::archive::UnpackLimits::HOST_DEFAULT;
    let unpack_limits = deploy_manifest::archive::UnpackLimits {
        max_bytes: match (&cli.max_unpacked_bytes, &file.max_unpacked_bytes) {
            (Some(flag), _) => parse_bytes(flag),
            (None, Some(size)) => size.bytes(),
            (None, None) => Ok(host_default.max_bytes),
        }
        .map_err(|e| bad(format!("max-unpacked-bytes: {e}")))?,
        max_entries: cli
            .max_archive_entries
            .or(file.max_archive_entries)
            .unwrap_or(host_default.max_entries),
    };
    if unpack_limits.max_bytes == 0 || unpack_limits.max_entries == 0 {
        return Err(bad(
            "max-unpacked-bytes and max-archive-entries must be more than 0".into(),
        ));
    }
    let store_deadline = duration(
        cli.store_deadline.as_ref().or(file.store_deadline.as_ref()),
        DEFAULT_STORE_DEADLINE,
    )?;
    if store_deadline.is_zero() {
        return Err(bad("store-deadline must be more than 0".into()));
    }
    let port_range = parse_port_range(
        cli.port_range
            .as_deref()
            .or(file.port_range.as_deref())
            .unwrap_or("20000-29999"),
    )
    .map_err(bad)?;
    Ok(AgentConfig {
        store: cli
            .store
            .clone()
            .or(file.store)
            .unwrap_or_else(|| DEFAULT_STORE.to_owned()),
        host: cli.host.clone().or(file.host).unwrap_or_else(hostname),
        state_dir: pick(&cli.state_dir, file.state_dir, "/var/lib/deployer"),
        secrets_dir: pick(
            &cli.secrets_dir,
            file.secrets_dir,
            "/var/lib/deployer-secrets",
        ),
        unit_dir: cli
            .unit_dir
            .clone()
            .or(file.unit_dir)
            .unwrap_or_else(|| default_unit_dir(user)),
        user,
        interval: match interval {
            Some(i) => i,
            None => duration(file.interval.as_ref(), Duration::from_secs(300))?,
        },
        settle: duration(file.settle.as_ref(), Duration::from_secs(3))?,
        proxy,
        port_range,
        drain: duration(
            cli.drain.as_ref().or(file.drain.as_ref()),
            Duration::from_secs(2),
        )?,
        metrics_file: cli.metrics_file.clone().or(file.metrics_file),
        trusted_keys: match cli.trusted_keys.clone().or(file.trusted_keys) {
            Some(path) => deploy_manifest::sign::PublicKey::load_all(&path)
                .map_err(deploy_manifest::Error::from)?,
            None => Vec::new(),
        },
        nix_trusted_keys: match cli.nix_trusted_keys.clone().or(file.nix_trusted_keys) {
            Some(path) => {
                deploy_manifest::sign::load_nix_keys(&path).map_err(deploy_manifest::Error::from)?
            }
            None => Vec::new(),
        },
        unpack_limits,
        store_deadline,
        history_keep: match cli.history_keep.or(file.history_keep) {
            Some(0) => return Err(bad("history-keep must be more than 0".into())),
            Some(n) => n,
            None => deploy_manifest::history::DEFAULT_KEEP,
        },
        notify: deployer_agent::notify::Notify::new(
            cli.notify_command.clone().or(file.notify_command),
            cli.notify_url.clone().or(file.notify_url),
        )
        .map_err(bad)?,
        mode: match cli.mode.clone().or(file.mode) {
            Some(m) if !deployer_agent::config::valid_mode(&m) => {
                return Err(bad(format!(
                    "mode {m:?}: lower-case letters, digits, '_' and '-', at most 63"
                )));
            }
            m => m,
        },
    })
}

async fn run(cli: Cli) -> Result<i32, AgentError> {
    let interval = match &cli.command {
        Command::Run { interval, .. } => *interval,
        _ => None,
    };
    let config = config(&cli, interval)?;
    if let Command::HostKey = cli.command {
        let key = deployer_agent::report::host_key(&config.state_dir, &config.host)?;
        println!("{}", key.public().to_text());
        return Ok(exit::OK);
    }
    if let Command::Status = cli.command {
        let state = State::load(&config.state_dir, &config.host)?;
        print_status(&state, cli.json);
        return Ok(exit::OK);
    }
    // Every store call, connecting included, is bounded by --store-deadline.
    let store = tokio::time::timeout(config.store_deadline, Store::open(&config.store))
        .await
        .unwrap_or_else(|_| {
            Err(deploy_manifest::StoreError::Timeout {
                op: "connect to",
                url: config.store.clone(),
                key: "the bucket".into(),
                secs: config.store_deadline.as_secs(),
                bound: deploy_manifest::store::TimeoutBound::Deadline,
            })
        })
        .map_err(deploy_manifest::Error::from)?;
    let store = Deadline::new(store, config.store_deadline);
    if let Command::Fetch = cli.command {
        let agent = Agent {
            store,
            host: (),
            config,
        };
        for (service, path) in agent.prefetch().await? {
            println!("{service}\t{}", path.display());
        }
        return Ok(exit::OK);
    }
    let manager = Systemd::connect(config.user).await?;
    let agent = Agent {
        store: Counted::new(store),
        host: SystemHost::new(manager, &config),
        config,
    };
    match cli.command {
        Command::Run { once: true, .. } => {
            let result = agent.run_once().await;
            // The run is done and its lock released: wait for its notifications.
            agent.config.notify.flush().await;
            let report = result?;
            if cli.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("serialises")
                );
            }
            for failure in report.failures() {
                eprintln!("deployer-agent: {failure}");
            }
            if report.ok() {
                Ok(exit::OK)
            } else {
                Ok(EXIT_SERVICES_FAILED)
            }
        }
        Command::Run { once: false, .. } => agent.run_forever().await,
        Command::Plan => {
            let plan = agent.next_plan().await?;
            if cli.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&plan).expect("serialises")
                );
            } else {
                print!("{plan}");
            }
            Ok(exit::OK)
        }
        Command::Status | Command::Fetch | Command::HostKey => {
            unreachable!("handled above")
        }
    }
}

fn print_status(state: &State, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(state).expect("serialises")
        );
        return;
    }
    println!(
        "host {}  manifest {}  last poll {}  last success {}",
        state.host,
        state.manifest_version.as_deref().unwrap_or("-"),
        state.last_poll.as_deref().unwrap_or("-"),
        state.last_success.as_deref().unwrap_or("-"),
    );
    if let Some(e) = &state.last_error {
        println!("last error: {}", render::escape(e));
    }
    let rows: Vec<Vec<String>> = state
        .services
        .iter()
        .map(|(name, s)| {
            vec![
                name.clone(),
                s.current
                    .as_ref()
                    .map(|g| g.artifact.label())
                    .unwrap_or_else(|| "-".into()),
                format!("{:?}", s.health).to_lowercase(),
                s.current
                    .as_ref()
                    .map(|g| g.deployed_at.clone())
                    .unwrap_or_else(|| "-".into()),
                s.last_error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print!(
        "{}",
        render::table(
            &["SERVICE", "ARTIFACT", "HEALTH", "DEPLOYED", "LAST ERROR"],
            &rows
        )
    );
}
