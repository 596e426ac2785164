//! `deploy-manifest`: show, list, edit and roll back manifest versions. A thin layer over
//! the library: parse arguments, open the store, call, print.

use std::io::Read;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use deploy_manifest::repo::default_author;
use deploy_manifest::sign::{PublicKey, SecretKey};
use deploy_manifest::store::{DEFAULT_STORE, Store};
use deploy_manifest::{
    Error, Manifest, diff, edit, exit, history, render, rollout, status, validate,
};

#[derive(Parser)]
#[command(
    name = "deploy-manifest",
    version,
    about = "Show, list, edit and roll back deployer manifest versions",
    after_help = "Exit codes: 0 ok, 1 failure, 2 usage, 3 invalid manifest or argument, \
                  4 not found, 5 store unusable (unreachable, credentials, access), 6 conflict, \
                  11 signing key unusable"
)]
struct Cli {
    /// Where manifests live: file:///path or s3://bucket/prefix.
    #[arg(long, global = true, env = "DEPLOY_STORE", default_value = DEFAULT_STORE)]
    store: String,
    #[command(flatten)]
    trust: deploy_manifest::cli::WriterTrust,
    /// Machine-readable output (read commands).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the store's first, empty manifest (does nothing if one exists).
    Init,
    /// Make an ed25519 signing key: the secret goes to FILE (mode 600, keep it off the
    /// store), the public key (NAME:BASE64, for agents' --trusted-keys) is printed.
    Keygen {
        name: String,
        #[arg(long, value_name = "FILE")]
        out: std::path::PathBuf,
    },
    /// Print the current manifest, or VERSION, as JSON.
    Show { version: Option<String> },
    /// List versions, newest first.
    List {
        /// Show at most N versions.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Add a service: a JSON object (or - to read it from stdin).
    AddService {
        #[arg(value_name = "JSON")]
        service: String,
    },
    /// Change a service with a JSON merge patch (null removes a field).
    UpdateService { name: String, patch: String },
    /// Remove a service from the manifest (hosts stop it; data is kept).
    RemoveService { name: String },
    /// Replace the shared infrastructure (the manifest's "infrastructure"), e.g.
    /// '{"services": {"db": {"preset": "postgres"}}}'; null removes it.
    SetInfrastructure {
        #[arg(value_name = "JSON")]
        infrastructure: String,
    },
    /// Replace the staged-rollout settings (the manifest's "rollout": host labels and the
    /// fleet's default policy), e.g. '{"policy": {"waves": [{"labels": ["canary"]},
    /// {"percent": 50}], "bake": "10m"}, "labels": {"canary": ["web-1"]}}'; null removes it.
    SetRollout {
        #[arg(value_name = "JSON")]
        rollout: String,
    },
    /// Point a service at a new artifact: a /nix/store path or archive JSON.
    SetArtifact { service: String, artifact: String },
    /// Make VERSION current again (default: the version before the current one).
    Rollback { version: Option<String> },
    /// What changed from version A to version B (default: the current one).
    Diff { a: String, b: Option<String> },
    /// Validate FILE (- for stdin), or the current manifest when no file is given.
    Validate { file: Option<String> },
    /// Which version runs where: every host's last report, hosts × services, and every
    /// host the manifest names that never reported. With HOST, that host in full: each
    /// service's last deploy phases and, when it failed, the log its unit left.
    Status {
        /// Show this host in full.
        host: Option<String>,
        /// With HOST: only this service.
        #[arg(long, requires = "host")]
        service: Option<String>,
        /// Refresh in place (on a terminal; elsewhere, print each change) until every host
        /// is settled (none still converging), then exit.
        #[arg(long)]
        watch: bool,
        /// Check each report's signature against the hosts' public keys in FILE (one
        /// HOST:BASE64 per line, as `deployer-agent host-key` prints; `#` comments). Without
        /// it, reports are shown as "unchecked".
        #[arg(long, env = "DEPLOY_HOST_KEYS", value_name = "FILE")]
        host_keys: Option<std::path::PathBuf>,
    },
    /// What the hosts did, newest first: each deploy, rollback, removal and failure, with
    /// the version and who pushed it, when the host applied it, how long each phase took.
    History {
        /// Only this host's events.
        #[arg(long)]
        host: Option<String>,
        /// Only this service's events.
        #[arg(long)]
        service: Option<String>,
        /// Show at most N events.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Also print the log each failed deploy left (secrets masked on the host).
        #[arg(long)]
        logs: bool,
        /// Count only records their host signed (see `status --host-keys`); the others
        /// are left out and named on stderr.
        #[arg(long, env = "DEPLOY_HOST_KEYS", value_name = "FILE")]
        host_keys: Option<std::path::PathBuf>,
    },
    /// Staged rollouts of the current version of services with a rollout policy.
    Rollout {
        #[command(subcommand)]
        action: RolloutCommand,
    },
    /// Check the current version (or, with --all, every version) against the trusted keys.
    /// Exit 0 when the current version verifies and has not expired, 11 otherwise.
    Verify {
        #[arg(long)]
        all: bool,
    },
    /// Sign the current content again as a new version with a fresh expiry (run it from a
    /// timer well within --expires, so agents never see an expired manifest).
    Refresh {
        /// Adopt a current manifest that does not verify, as it is: the one-time step when
        /// signing is enabled on an existing store. Review `deploy-manifest show` first.
        #[arg(long)]
        accept_unverified: bool,
    },
}

#[derive(Subcommand)]
enum RolloutCommand {
    /// Per service (or SERVICE): the version, each wave's hosts and their outcomes, time
    /// left in the bake, the abort reason.
    Status { service: Option<String> },
    /// Skip the bake of the wave deploying or baking now: the next wave starts as soon as
    /// this one has its healthy hosts.
    Promote { service: String },
    /// Stop the rollout: no further wave starts, hosts that run the version return to the
    /// one they ran before.
    Abort {
        service: String,
        /// Recorded in the abort marker and shown by `rollout status`.
        #[arg(long, default_value = "aborted by hand")]
        reason: String,
    },
    /// Go on after an abort: failures so far are forgiven and the progress deadline counts
    /// again from now.
    Resume { service: String },
}

fn main() -> ExitCode {
    deploy_manifest::cli::init_tracing("warn");
    let cli = Cli::parse();
    match deploy_manifest::cli::runtime().block_on(run(cli)) {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("deploy-manifest: error: {e:#}");
            let code = e
                .downcast_ref::<Error>()
                .map(Error::exit_code)
                .unwrap_or(exit::FAILURE);
            ExitCode::from(code as u8)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<i32> {
    if let Command::Validate { file: Some(file) } = &cli.command {
        return validate_file(file, cli.json);
    }
    if let Command::Keygen { name, out } = &cli.command {
        return keygen(name, out);
    }
    let store = Store::open(&cli.store).await.map_err(Error::from)?;
    let repo = cli.trust.repo(store, default_author())?;
    match cli.command {
        Command::Init => match repo.init().await? {
            Some(m) => println!("initialised {} with {}", cli.store, version(&m)),
            None => println!("{} already has a manifest; nothing to do", cli.store),
        },
        Command::Show { version } => {
            let m = match version {
                Some(v) => repo.version(&v).await?,
                None => repo.current().await?.manifest,
            };
            println!("{}", serde_json::to_string_pretty(&m)?);
        }
        Command::List { limit } => {
            let list = repo.list(limit).await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print!("{}", render::versions(&list));
            }
        }
        Command::AddService { service } => {
            let service = edit::parse_json_arg(&arg_or_stdin(&service)?, "the service")?;
            report(
                repo.update(|m| edit::add_service(m, &service)).await?,
                cli.json,
            )?;
        }
        Command::UpdateService { name, patch } => {
            let patch = edit::parse_json_arg(&arg_or_stdin(&patch)?, "the patch")?;
            report(
                repo.update(|m| edit::update_service(m, &name, &patch))
                    .await?,
                cli.json,
            )?;
        }
        Command::SetInfrastructure { infrastructure } => {
            let value =
                edit::parse_json_arg(&arg_or_stdin(&infrastructure)?, "the infrastructure")?;
            report(
                repo.update(|m| edit::set_infrastructure(m, &value)).await?,
                cli.json,
            )?;
        }
        Command::SetRollout { rollout } => {
            let value = edit::parse_json_arg(&arg_or_stdin(&rollout)?, "the rollout")?;
            report(
                repo.update(|m| edit::set_rollout(m, &value)).await?,
                cli.json,
            )?;
        }
        Command::RemoveService { name } => {
            report(
                repo.update(|m| edit::remove_service(m, &name)).await?,
                cli.json,
            )?;
        }
        Command::SetArtifact { service, artifact } => {
            report(
                repo.update(|m| edit::set_artifact(m, &service, &artifact))
                    .await?,
                cli.json,
            )?;
        }
        Command::Rollback { version } => {
            report(repo.rollback(version.as_deref()).await?, cli.json)?;
        }
        Command::Refresh { accept_unverified } => {
            let m = repo.refresh(accept_unverified).await?;
            if m.signature.is_none() {
                eprintln!(
                    "deploy-manifest: warning: no signing key (DEPLOY_SIGNING_KEY): the new version is unsigned and has no expiry"
                );
            }
            report(m, cli.json)?;
        }
        Command::Verify { all } => {
            if repo.trusted_keys().is_empty() {
                return Err(Error::BadArgument(
                    "nothing to verify against: give --trusted-keys FILE (or DEPLOY_TRUSTED_KEYS, or a signing key)".into(),
                )
                .into());
            }
            let current = repo.verify_current().await?;
            let rows = if all {
                repo.verify_all().await?
            } else {
                vec![current.clone()]
            };
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", render::verified(&rows));
            }
            if !current.verified || current.expired {
                return Ok(exit::UNTRUSTED);
            }
        }
        Command::Diff { a, b } => {
            let old = repo.version(&a).await?;
            let new = repo.version(b.as_deref().unwrap_or("current")).await?;
            let d = diff::diff(&old, &new);
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&d)?);
            } else {
                print!("{}", render::diff(&d));
            }
        }
        Command::Validate { file: None } => {
            let m = repo.current().await?.manifest;
            println!("{}: valid ({} services)", version(&m), m.services.len());
        }
        Command::Validate { file: Some(_) } | Command::Keygen { .. } => {
            unreachable!("handled before opening the store")
        }
        Command::Rollout { action } => {
            let manifest = repo.current().await?.manifest;
            let store = repo.store();
            let now = std::time::SystemTime::now();
            match action {
                RolloutCommand::Status { service } => {
                    let statuses =
                        rollout::statuses(store, &manifest, service.as_deref(), now).await?;
                    if cli.json {
                        println!("{}", serde_json::to_string_pretty(&statuses)?);
                    } else if statuses.is_empty() {
                        println!("no service of {} has a rollout policy", version(&manifest));
                    } else {
                        let last_reports = status::read_reports(store)
                            .await?
                            .into_iter()
                            .map(|r| (r.host, r.reported_at))
                            .collect();
                        print!("{}", render::rollouts(&statuses, &last_reports, now));
                    }
                }
                RolloutCommand::Promote { service } => {
                    let wave = rollout::promote(store, &manifest, &service, now).await?;
                    println!(
                        "{service}: wave {} (and those before it) skip the bake",
                        wave + 1
                    );
                }
                RolloutCommand::Abort { service, reason } => {
                    let marker =
                        rollout::abort(store, &manifest, &service, &default_author(), &reason, now)
                            .await?;
                    println!(
                        "{service}: rollout aborted by {} at {}: {}",
                        render::escape(&marker.by),
                        render::escape(&marker.at),
                        render::escape(&marker.reason)
                    );
                }
                RolloutCommand::Resume { service } => {
                    rollout::resume(store, &manifest, &service, now).await?;
                    println!("{service}: rollout resumed");
                }
            }
        }
        Command::Status {
            host,
            service,
            watch,
            host_keys,
        } => {
            let host_keys = load_host_keys(host_keys.as_deref())?;
            let show = Show {
                host: host.as_deref(),
                service: service.as_deref(),
                json: cli.json,
                store: &cli.store,
            };
            if watch {
                watch_status(&repo, host_keys.as_deref(), &show).await?;
            } else {
                show.print(&repo, host_keys.as_deref()).await?;
            }
        }
        Command::History {
            host,
            service,
            limit,
            logs,
            host_keys,
        } => {
            let host_keys = load_host_keys(host_keys.as_deref())?;
            let filter = history::Filter {
                host,
                service,
                limit,
            };
            let found = history::read(repo.store(), &filter, host_keys.as_deref()).await?;
            for skipped in &found.skipped {
                eprintln!("deploy-manifest: skipped {}", render::escape(skipped));
            }
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&found.events)?);
            } else if found.events.is_empty() {
                println!("no history in {} matches", cli.store);
            } else {
                print!("{}", history::render(&found.events));
                for s in found
                    .events
                    .iter()
                    .filter(|s| logs && !s.event.log.is_empty())
                {
                    let e = &s.event;
                    println!(
                        "\n{} {} {} at {}:",
                        render::escape(&e.host),
                        render::escape(&e.service),
                        e.kind,
                        render::escape(&e.at)
                    );
                    print!("{}", render::log_lines(&e.log, "    "));
                }
            }
        }
    }
    Ok(exit::OK)
}

fn load_host_keys(path: Option<&std::path::Path>) -> anyhow::Result<Option<Vec<PublicKey>>> {
    Ok(path
        .map(PublicKey::load_all)
        .transpose()
        .map_err(Error::from)?)
}

/// `status::scan` over the store as `status` sees it: the current manifest, the host
/// keys, and on `s3://` the ETag report cache (a file:// store is read directly).
async fn scan_fleet(
    repo: &deploy_manifest::Repo<Store>,
    host_keys: Option<&[PublicKey]>,
    store_url: &str,
    each: impl FnMut(status::HostView) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let manifest = repo.read_current().await?.map(|c| c.manifest);
    let cache = store_url
        .starts_with("s3://")
        .then(|| {
            // The same bucket name on another endpoint is another store.
            let endpoint = std::env::var("AWS_ENDPOINT_URL_S3")
                .or_else(|_| std::env::var("AWS_ENDPOINT_URL"))
                .unwrap_or_default();
            status::ReportCache::open(&format!("{store_url}\n{endpoint}"))
        })
        .flatten();
    status::scan(
        repo.store(),
        host_keys,
        manifest.as_ref(),
        std::time::SystemTime::now(),
        cache.as_ref(),
        each,
    )
    .await
}

/// The whole fleet view in memory (`status --watch`).
async fn fleet_view(
    repo: &deploy_manifest::Repo<Store>,
    host_keys: Option<&[PublicKey]>,
    store_url: &str,
) -> anyhow::Result<Vec<status::HostView>> {
    let mut view = Vec::new();
    scan_fleet(repo, host_keys, store_url, |h| {
        view.push(h);
        Ok(())
    })
    .await?;
    Ok(view)
}

/// How `status` prints a fleet view.
struct Show<'a> {
    host: Option<&'a str>,
    service: Option<&'a str>,
    json: bool,
    store: &'a str,
}

impl Show<'_> {
    /// The fleet view, printed as the reports stream in: JSON host by host, the table's
    /// rows kept compact until its widths are known, one host's views only for `status
    /// HOST`. Memory stays bounded by the table's text, not by the reports.
    async fn print(
        &self,
        repo: &deploy_manifest::Repo<Store>,
        host_keys: Option<&[PublicKey]>,
    ) -> anyhow::Result<()> {
        use std::io::Write;
        let stdout = std::io::stdout();
        let mut out = std::io::BufWriter::new(stdout.lock());
        if let Some(host) = self.host {
            let mut views = Vec::new();
            scan_fleet(repo, host_keys, self.store, |h| {
                if h.host == host {
                    views.push(h);
                }
                Ok(())
            })
            .await?;
            out.write_all(self.render(&views)?.as_bytes())?;
        } else if self.json {
            let mut first = true;
            scan_fleet(repo, host_keys, self.store, |h| {
                // As serde_json's pretty array: `[`, elements indented and separated by `,`
                // at the end of the previous one's last line, `]`.
                let text = serde_json::to_string_pretty(&h)?;
                out.write_all(if first { b"[\n  " } else { b",\n  " })?;
                first = false;
                out.write_all(text.replace('\n', "\n  ").as_bytes())?;
                Ok(())
            })
            .await?;
            out.write_all(if first { b"[]\n" } else { b"\n]\n" })?;
        } else {
            let mut table = status::fleet_table();
            scan_fleet(repo, host_keys, self.store, |h| {
                status::table_rows(&h, &mut table);
                Ok(())
            })
            .await?;
            if table.rows() == 0 {
                writeln!(out, "no host has reported to {} yet", self.store)?;
            } else {
                table.write_to(&mut out)?;
            }
        }
        out.flush()?;
        Ok(())
    }

    fn render(&self, view: &[status::HostView]) -> anyhow::Result<String> {
        let Some(host) = self.host else {
            return Ok(if self.json {
                format!("{}\n", serde_json::to_string_pretty(&view)?)
            } else if view.is_empty() {
                format!("no host has reported to {} yet\n", self.store)
            } else {
                status::render(view)
            });
        };
        // The report at the host's own object first: one planted elsewhere in its name
        // must not stand in for it.
        let own = status::report_key(host);
        let found = view
            .iter()
            .find(|h| h.host == host && h.object == own)
            .or_else(|| view.iter().find(|h| h.host == host));
        let Some(h) = found else {
            return Err(Error::UnknownHost {
                host: host.to_owned(),
            }
            .into());
        };
        Ok(if self.json {
            let mut h = h.clone();
            if let Some(want) = self.service {
                h.services.retain(|s| s.service == want);
            }
            format!("{}\n", serde_json::to_string_pretty(&h)?)
        } else {
            status::render_host(h, self.service)
        })
    }
}

/// `status --watch`: print the view every 2 s (in place on a terminal, otherwise only when
/// it changed) until every host shown is settled.
async fn watch_status(
    repo: &deploy_manifest::Repo<Store>,
    host_keys: Option<&[PublicKey]>,
    show: &Show<'_>,
) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let terminal = std::io::stdout().is_terminal() && !show.json;
    let mut last = String::new();
    loop {
        let view = fleet_view(repo, host_keys, show.store).await?;
        let shown: Vec<&status::HostView> = view
            .iter()
            .filter(|h| show.host.is_none_or(|want| h.host == want))
            .collect();
        let settled = shown.iter().all(|h| h.state.settled());
        let text = show.render(&view)?;
        if terminal {
            // Home, clear the screen, then the view: refreshed in place.
            print!("\x1b[H\x1b[2J{text}");
            let waiting = shown.iter().filter(|h| !h.state.settled()).count();
            if !settled {
                println!(
                    "\n{waiting} host(s) still converging; refreshing every 2 s (Ctrl-C to stop)"
                );
            }
        } else if text != last {
            print!("{text}");
            if !show.json {
                println!();
            }
        }
        use std::io::Write;
        std::io::stdout().flush()?;
        if settled {
            return Ok(());
        }
        last = text;
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
}

fn version(m: &Manifest) -> &str {
    m.version.as_deref().unwrap_or("(unversioned)")
}

/// Print what a write produced: the new version and its summary.
fn report(m: Manifest, json: bool) -> anyhow::Result<()> {
    if json {
        let out = serde_json::json!({
            "version": m.version, "parent": m.parent, "summary": m.summary,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "{}  {}",
            version(&m),
            m.summary.as_deref().unwrap_or_default()
        );
    }
    Ok(())
}

fn keygen(name: &str, out: &std::path::Path) -> anyhow::Result<i32> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let key = SecretKey::generate(name).context("reading /dev/urandom")?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| {
            format!(
                "creating {} (an existing key is never overwritten)",
                out.display()
            )
        })?;
    writeln!(file, "{}", key.to_text()).with_context(|| format!("writing {}", out.display()))?;
    println!("{}", key.public().to_text());
    Ok(exit::OK)
}

fn arg_or_stdin(arg: &str) -> anyhow::Result<String> {
    if arg != "-" {
        return Ok(arg.to_owned());
    }
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .context("reading standard input")?;
    Ok(s)
}

fn validate_file(file: &str, json: bool) -> anyhow::Result<i32> {
    let (bytes, origin) = if file == "-" {
        let mut b = Vec::new();
        std::io::stdin()
            .read_to_end(&mut b)
            .context("reading standard input")?;
        (b, "stdin".to_owned())
    } else {
        let b = std::fs::read(file).with_context(|| format!("reading {file}"))?;
        (b, file.to_owned())
    };
    match validate::parse_manifest(&bytes, &origin) {
        Ok(m) => {
            if json {
                println!("{}", serde_json::json!({"valid": true, "problems": []}));
            } else {
                println!("{origin}: valid ({} services)", m.services.len());
            }
            Ok(exit::OK)
        }
        Err(invalid) if json => {
            let problems: Vec<_> = invalid
                .problems
                .iter()
                .map(|p| serde_json::json!({"field": p.field, "message": p.message}))
                .collect();
            println!(
                "{}",
                serde_json::json!({"valid": false, "problems": problems})
            );
            Ok(exit::INVALID)
        }
        Err(invalid) => {
            for p in &invalid.problems {
                eprintln!("{origin}: {p}");
            }
            Ok(exit::INVALID)
        }
    }
}
