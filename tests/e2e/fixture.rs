//! A store to test against: a `file://` directory or a bucket on a real moto server.

use std::process::Output;

use deploy_manifest::store::{S3Options, S3Store, Store};
use deployer_tests::{S3Server, run};

pub struct Fixture {
    pub url: String,
    pub env: Vec<(String, String)>,
    _dir: tempfile::TempDir,
    /// Keeps the server alive for the fixture's lifetime.
    _s3: Option<S3Server>,
}

impl Fixture {
    pub fn file() -> Fixture {
        Self::file_in(&std::env::temp_dir())
    }

    /// A `file://` store in a new directory under `parent` (e.g. where a sandboxed systemd
    /// can see it too).
    pub fn file_in(parent: &std::path::Path) -> Fixture {
        let dir = tempfile::tempdir_in(parent).unwrap();
        let url = format!("file://{}/store", dir.path().display());
        Fixture {
            env: vec![
                ("DEPLOY_STORE".into(), url.clone()),
                writer_state(dir.path()),
            ],
            url,
            _dir: dir,
            _s3: None,
        }
    }

    pub fn s3() -> Fixture {
        let server = S3Server::start();
        server.create_bucket("deploy");
        let url = "s3://deploy/prod".to_owned();
        let dir = tempfile::tempdir().unwrap();
        let mut env = server.env();
        env.push(("DEPLOY_STORE".into(), url.clone()));
        env.push(writer_state(dir.path()));
        Fixture {
            url,
            env,
            _dir: dir,
            _s3: Some(server),
        }
    }

    /// The requests the S3 server has answered so far (`GET /deploy/prod/...`).
    pub fn s3_requests(&self) -> Vec<String> {
        self._s3.as_ref().expect("an S3 fixture").requests()
    }

    /// Stop the S3 server (the store becomes unreachable).
    pub fn stop_s3(&mut self) {
        self._s3 = None;
    }

    /// The same store, opened through the library (to look at objects directly).
    pub async fn store(&self) -> Store {
        match &self._s3 {
            None => Store::open(&self.url).await.unwrap(),
            Some(server) => Store::S3(
                S3Store::connect(
                    &self.url,
                    S3Options {
                        endpoint_url: Some(server.endpoint()),
                        region: Some("us-east-1".into()),
                        path_style: Some(true),
                        credentials: Some(("test".into(), "test".into())),
                        multipart_threshold: None,
                    },
                )
                .await
                .unwrap(),
            ),
        }
    }

    /// Run `deploy-manifest ARGS` against this store (through `DEPLOY_STORE`).
    pub fn dm(&self, args: &[&str]) -> Output {
        run("deploy-manifest", args, &self.env, None)
    }

    pub fn dm_stdin(&self, args: &[&str], input: &str) -> Output {
        run("deploy-manifest", args, &self.env, Some(input))
    }

    /// A shell pipeline with the workspace's binaries first on PATH, as an operator types it.
    pub fn sh(&self, script: &str) -> Output {
        let bin_dir = deployer_tests::bin("deploy-manifest")
            .parent()
            .unwrap()
            .to_path_buf();
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut env = self.env.clone();
        env.push(("PATH".into(), path));
        std::process::Command::new("sh")
            .args(["-c", script])
            .env_clear()
            .env("HOME", std::env::temp_dir())
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .envs(env)
            .output()
            .expect("sh runs")
    }
}

/// The writers' local state (what they have seen of the store): one per fixture, as each
/// fixture stands for one team's store.
fn writer_state(dir: &std::path::Path) -> (String, String) {
    (
        "DEPLOY_STATE_DIR".into(),
        dir.join("writer-state").display().to_string(),
    )
}

/// Both backends, for tests that must hold for each.
pub fn both() -> [Fixture; 2] {
    [Fixture::file(), Fixture::s3()]
}
