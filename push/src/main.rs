//! `push <namespace>`: build, upload, update the manifest. A thin layer over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use deploy_manifest::Error;
use deploy_manifest::repo::default_author;
use deploy_manifest::store::{DEFAULT_STORE, Store};
use deployer_push::config::Config;
use deployer_push::progress::human_bytes;
use deployer_push::{PushError, PushOptions, push, upload, wait_for};

#[derive(Parser)]
#[command(
    name = "push",
    version,
    about = "Build a namespace, upload its artifact, and point the manifest at it",
    after_help = "Exit codes: 0 ok, 1 failure, 2 usage or config, 3 invalid manifest, 4 no such service, \
                  5 store unusable, 6 conflict, 7 build failed, 8 (--wait) a host failed the deploy, \
                  10 (--wait) timed out (with --host-keys: also when a host's report is not verified), \
                  12 (--wait) the service's staged rollout was aborted, 13 (--wait) a wave missed its \
                  progress deadline and the rollout aborted"
)]
struct Cli {
    /// What to build, e.g. Biz/PodcastItLater/Web.py (a key of deploy.toml's [namespaces]).
    namespace: String,
    /// The service to update (default: the one whose "namespace" is NAMESPACE).
    #[arg(long)]
    service: Option<String>,
    /// Where manifests and artifacts live (default: deploy.toml's `store`, then file:///var/lib/deployer/store).
    #[arg(long, env = "DEPLOY_STORE")]
    store: Option<String>,
    /// deploy.toml to use (default: found in this directory or a parent).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Build and show what would be uploaded and changed; upload and write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Then wait until every host that runs the service reports the new artifact healthy.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits, e.g. 10m.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10m")]
    timeout: std::time::Duration,
    /// --wait counts only host reports signed by the host's own key in FILE (one
    /// HOST:BASE64 per line, as `deployer-agent host-key` prints; `#` comments).
    #[arg(long, env = "DEPLOY_HOST_KEYS", value_name = "FILE")]
    host_keys: Option<PathBuf>,
    #[command(flatten)]
    trust: deploy_manifest::cli::WriterTrust,
}

fn main() -> ExitCode {
    deploy_manifest::cli::init_tracing("warn");
    let cli = Cli::parse();
    match deploy_manifest::cli::runtime().block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("push: error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

async fn run(cli: Cli) -> Result<(), PushError> {
    let cwd = std::env::current_dir().map_err(|e| PushError::Io {
        what: "finding the current directory".into(),
        source: e,
    })?;
    let config = Config::load(cli.config.as_deref(), &cwd)?;
    // Read before anything is built or written: a bad key file changes nothing.
    let host_keys = cli
        .host_keys
        .as_deref()
        .map(deploy_manifest::sign::PublicKey::load_all)
        .transpose()
        .map_err(Error::from)?;
    let url = cli
        .store
        .or_else(|| config.file.store.clone())
        .unwrap_or_else(|| DEFAULT_STORE.to_owned());
    let store = Store::open(&url).await.map_err(Error::from)?;
    let repo = cli.trust.repo(store, default_author())?;
    let opts = PushOptions {
        namespace: cli.namespace,
        service: cli.service,
        dry_run: cli.dry_run,
        nix_staging: upload::default_staging(),
    };
    let report = push(&repo, &config, &opts).await?;
    let waited = if cli.wait && !cli.dry_run {
        eprintln!(
            "push: waiting up to {} for every host running {} to report it healthy{}",
            humantime::format_duration(cli.timeout),
            report.service,
            if host_keys.is_some() {
                " (counting only reports signed by the host's key)"
            } else {
                ""
            }
        );
        Some(
            wait_for(
                &repo,
                &report.service,
                &report.artifact,
                cli.timeout,
                host_keys.as_deref(),
            )
            .await,
        )
    } else {
        None
    };
    if cli.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("serialises")
        );
        return waited.map_or(Ok(()), |r| r.map(drop));
    }
    let u = &report.uploaded;
    let sent = format!(
        "uploaded {} objects ({}), {} already there",
        u.objects,
        human_bytes(u.bytes),
        u.skipped_objects
    );
    let label = report.artifact.label();
    match (&report.version, report.dry_run, report.unchanged) {
        (_, true, _) => println!(
            "dry run: {} -> {label}; would have {sent}; nothing written",
            report.service
        ),
        (_, false, true) => println!(
            "{} already runs {label}; {sent}; manifest unchanged",
            report.service
        ),
        (Some(v), false, false) => println!("{v}  {} -> {label}; {sent}", report.service),
        (None, false, false) => {
            unreachable!("a real push that changed the artifact writes a version")
        }
    }
    if let Some(result) = waited {
        println!("{}", result?);
    }
    Ok(())
}
