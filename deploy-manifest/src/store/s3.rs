//! `s3://bucket/prefix`: any S3-compatible server through aws-sdk-s3.
//!
//! Region, endpoint and credentials come from the standard AWS environment (`AWS_REGION`,
//! `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`, …).
//! Path-style addressing is on when `DEPLOY_S3_PATH_STYLE=true`, or by default whenever a
//! custom endpoint is set (MinIO-like servers rarely serve virtual-host buckets).
//! Conditional writes use `If-Match` / `If-None-Match: *`; reads use `If-None-Match`.

use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_credential_types::provider::ProvideCredentials;
use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::{Credentials, Region, RequestChecksumCalculation};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use aws_smithy_types::timeout::TimeoutConfig;

use std::path::Path;

use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use futures_util::{StreamExt, TryStreamExt, stream};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::{
    Downloaded, Fetched, Listed, ObjectStore, Precondition, Progress, StoreError, TimeoutBound,
    Transfer, check_key, copy_hashed, max_object_bytes, read_capped, too_large,
};

/// Connecting to the endpoint (TCP and TLS).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// From sending a request to the response's headers, per attempt (an upload's body is sent
/// within it). Bodies streamed afterwards are bounded by the store's idle timeout instead.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// One attempt of a request that is not an upload.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(20);
/// All attempts of a request that is not an upload, retries and backoff included: a store
/// that accepts connections and never answers costs at most this per request.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts per request (the SDK's standard retry mode: transient errors and throttling).
const MAX_ATTEMPTS: u32 = 3;

/// Files larger than this go up in parts, several at once (`DEPLOY_S3_MULTIPART_MIB`).
const DEFAULT_MULTIPART_THRESHOLD: u64 = 64 << 20;
/// The size of one part (grown for files over 9,000 parts).
const PART_SIZE: u64 = 16 << 20;
/// The chunks a single-request upload reads its file in.
const UPLOAD_CHUNK: usize = 256 << 10;

/// Parts in flight at once for one multipart upload.
const PART_CONCURRENCY: usize = 4;

/// Settings that the URL does not carry. `None` means: take it from the AWS environment.
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    pub endpoint_url: Option<String>,
    pub region: Option<String>,
    pub path_style: Option<bool>,
    /// Static access key id and secret, instead of the credential chain.
    pub credentials: Option<(String, String)>,
    /// Files larger than this many bytes are uploaded in parts.
    pub multipart_threshold: Option<u64>,
}

impl S3Options {
    /// The options an operator sets through the environment beyond the AWS SDK's own:
    /// `DEPLOY_S3_PATH_STYLE=true|false`.
    pub fn from_env() -> S3Options {
        S3Options {
            path_style: std::env::var("DEPLOY_S3_PATH_STYLE")
                .ok()
                .map(|v| matches!(v.as_str(), "1" | "true" | "yes")),
            multipart_threshold: std::env::var("DEPLOY_S3_MULTIPART_MIB")
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .map(|mib| mib << 20),
            ..S3Options::default()
        }
    }
}

#[derive(Debug, Clone)]
pub struct S3Store {
    url: String,
    bucket: String,
    prefix: String,
    client: Client,
    multipart_threshold: u64,
}

impl S3Store {
    /// Connect to `s3://bucket[/prefix]`. Fails early, with a message saying what to set,
    /// when no credentials can be found.
    pub async fn connect(url: &str, options: S3Options) -> Result<S3Store, StoreError> {
        let (bucket, prefix) = parse_url(url)?;
        let http_client = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http_client)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .read_timeout(READ_TIMEOUT)
                    .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                    .operation_timeout(OPERATION_TIMEOUT)
                    .build(),
            )
            .retry_config(
                aws_smithy_types::retry::RetryConfig::standard().with_max_attempts(MAX_ATTEMPTS),
            );
        if let Some(endpoint) = &options.endpoint_url {
            loader = loader.endpoint_url(endpoint);
        }
        if let Some(region) = &options.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some((id, secret)) = &options.credentials {
            loader =
                loader.credentials_provider(Credentials::new(id, secret, None, None, "deployer"));
        }
        let sdk = loader.load().await;
        let credentials_error = |detail: String| StoreError::Credentials {
            url: url.to_owned(),
            detail,
        };
        let provider = sdk
            .credentials_provider()
            .ok_or_else(|| credentials_error("no credential provider configured".to_owned()))?;
        provider.provide_credentials().await.map_err(|e| {
            credentials_error(match e {
                CredentialsError::CredentialsNotLoaded(_) => "none found in the environment, \
                    the AWS profile, web identity, container or instance metadata"
                    .to_owned(),
                other => first_line(&DisplayErrorContext(&other).to_string()),
            })
        })?;
        let path_style = options
            .path_style
            .unwrap_or_else(|| sdk.endpoint_url().is_some());
        let mut config = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(path_style)
            // Artifacts are verified by sha256 end to end; a CRC32 of every body on top cost
            // a third of the upload time in bench/upload.sh.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired);
        if sdk.region().is_none() {
            // Custom endpoints rarely care; AWS itself redirects a wrong region with a clear error.
            config = config.region(Region::new("us-east-1"));
        }
        Ok(S3Store {
            url: url.to_owned(),
            bucket,
            prefix,
            client: Client::from_conf(config.build()),
            multipart_threshold: options
                .multipart_threshold
                .unwrap_or(DEFAULT_MULTIPART_THRESHOLD)
                .max(PART_SIZE),
        })
    }

    fn object_key(&self, key: &str) -> Result<String, StoreError> {
        check_key(key)?;
        Ok(format!("{}{key}", self.prefix))
    }

    /// Map an SDK error to what an operator can act on.
    fn error<E>(
        &self,
        op: &'static str,
        key: &str,
        err: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
    ) -> StoreError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let detail = DisplayErrorContext(&err).to_string();
        let status = err.raw_response().map(|r| r.status().as_u16());
        let code = err.code().map(str::to_owned);
        match (&err, status, code.as_deref()) {
            (SdkError::TimeoutError(_), _, _) => StoreError::Timeout {
                op,
                url: self.url.clone(),
                key: key.to_owned(),
                secs: OPERATION_TIMEOUT.as_secs(),
                bound: TimeoutBound::Operation,
            },
            (SdkError::DispatchFailure(_), _, _) => StoreError::Unreachable {
                url: self.url.clone(),
                detail: first_line(&detail),
            },
            (_, Some(412), _)
            | (_, _, Some("PreconditionFailed" | "ConditionalRequestConflict")) => {
                StoreError::PreconditionFailed {
                    key: key.to_owned(),
                }
            }
            (_, _, Some("NoSuchBucket")) => StoreError::NoSuchBucket {
                url: self.url.clone(),
                bucket: self.bucket.clone(),
            },
            (_, _, Some("InvalidAccessKeyId" | "SignatureDoesNotMatch" | "ExpiredToken")) => {
                StoreError::Credentials {
                    url: self.url.clone(),
                    detail: code.unwrap_or_default(),
                }
            }
            (_, Some(403), _) | (_, _, Some("AccessDenied")) => StoreError::AccessDenied {
                url: self.url.clone(),
                key: key.to_owned(),
                detail: code.unwrap_or_else(|| "403 Forbidden".to_owned()),
            },
            _ => StoreError::Other {
                op,
                url: self.url.clone(),
                key: key.to_owned(),
                detail: first_line(&detail),
            },
        }
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().to_owned()
}

/// `s3://bucket/some/prefix` → (`bucket`, `some/prefix/`).
fn parse_url(url: &str) -> Result<(String, String), StoreError> {
    let invalid = |reason: &str| StoreError::invalid_url(url, reason);
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| invalid("expected s3://bucket/prefix"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !bucket_ok {
        return Err(invalid(
            "the bucket name must be 3-63 lower-case letters, digits, '-' or '.'",
        ));
    }
    let prefix = prefix.trim_matches('/');
    if !prefix.is_empty() {
        check_key(prefix).map_err(|e| invalid(&e.to_string()))?;
    }
    let prefix = if prefix.is_empty() {
        String::new()
    } else {
        format!("{prefix}/")
    };
    Ok((bucket.to_owned(), prefix))
}

impl ObjectStore for S3Store {
    fn url(&self) -> &str {
        &self.url
    }

    async fn get(&self, key: &str, if_none_match: Option<&str>) -> Result<Fetched, StoreError> {
        let object_key = self.object_key(key)?;
        let result = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&object_key)
            .set_if_none_match(if_none_match.map(str::to_owned))
            .send()
            .await;
        let output = match result {
            Ok(output) => output,
            Err(err) => {
                let status = err.raw_response().map(|r| r.status().as_u16());
                if status == Some(304) {
                    return Ok(Fetched::NotModified);
                }
                if status == Some(404) && err.code() != Some("NoSuchBucket") {
                    return Ok(Fetched::NotFound);
                }
                return Err(self.error("get", key, err));
            }
        };
        let etag = output.e_tag().unwrap_or_default().to_owned();
        let limit = max_object_bytes();
        if let Some(size) = output.content_length().filter(|n| *n as u64 > limit) {
            return Err(too_large(&self.url, key, limit, size as u64, true));
        }
        let bytes = read_capped(output.body.into_async_read(), &self.url, key, limit).await?;
        Ok(Fetched::Found { bytes, etag })
    }

    async fn put(
        &self,
        key: &str,
        bytes: Vec<u8>,
        precondition: Precondition,
    ) -> Result<String, StoreError> {
        let object_key = self.object_key(key)?;
        let mut request = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(&object_key)
            .body(ByteStream::from(bytes));
        request = match precondition {
            Precondition::None => request,
            Precondition::IfAbsent => request.if_none_match("*"),
            Precondition::IfMatch(etag) => request.if_match(etag),
        };
        let output = request
            .send()
            .await
            .map_err(|e| self.error("put", key, e))?;
        Ok(output.e_tag().unwrap_or_default().to_owned())
    }

    async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let object_key = self.object_key(key)?;
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&object_key)
            .send()
            .await
        {
            Ok(output) => Ok(Some(output.content_length().unwrap_or(0).max(0) as u64)),
            Err(err) if err.raw_response().map(|r| r.status().as_u16()) == Some(404) => {
                // HEAD has no body, so a missing bucket also answers a bare 404: ask once more.
                self.check_bucket().await?;
                Ok(None)
            }
            Err(err) => Err(self.error("head", key, err)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let listed = self.list_etags(prefix).await?;
        Ok(listed.into_iter().map(|l| l.key).collect())
    }

    async fn list_etags(&self, prefix: &str) -> Result<Vec<Listed>, StoreError> {
        let mut keys = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(format!("{}{prefix}", self.prefix))
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.error("list", prefix, e))?;
            for object in page.contents() {
                if let Some(key) = object.key().and_then(|k| k.strip_prefix(&self.prefix)) {
                    keys.push(Listed {
                        key: key.to_owned(),
                        etag: object.e_tag().map(str::to_owned),
                    });
                }
            }
        }
        Ok(keys)
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let object_key = self.object_key(key)?;
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(&object_key)
            .send()
            .await
            .map_err(|e| self.error("delete", key, e))?;
        Ok(())
    }

    async fn put_file(
        &self,
        key: &str,
        path: &Path,
        progress: &dyn Progress,
    ) -> Result<(), StoreError> {
        let object_key = self.object_key(key)?;
        let size = tokio::fs::metadata(path)
            .await
            .map_err(io("stat", path))?
            .len();
        if size > self.multipart_threshold {
            return self
                .put_multipart(key, &object_key, path, size, progress)
                .await;
        }
        // Read in 256 KiB chunks (the SDK's default, 4 KiB, is one read and one body chunk
        // per page).
        let body = ByteStream::read_from()
            .path(path)
            .buffer_size(UPLOAD_CHUNK)
            .build()
            .await
            .map_err(|e| StoreError::Io {
                op: "read",
                path: path.display().to_string(),
                source: std::io::Error::other(e),
            })?;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(&object_key)
            .body(body)
            .customize()
            .config_override(upload_timeouts())
            .disable_payload_signing()
            .send()
            .await
            .map_err(|e| self.error("put", key, e))?;
        progress.advance(size);
        Ok(())
    }

    async fn get_into(
        &self,
        key: &str,
        out: &mut (dyn tokio::io::AsyncWrite + Unpin + Send),
        progress: &dyn Progress,
        max_bytes: Option<u64>,
    ) -> Result<Option<Downloaded>, StoreError> {
        let object_key = self.object_key(key)?;
        let output = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&object_key)
            .send()
            .await
        {
            Ok(o) => o,
            Err(err)
                if err.raw_response().map(|r| r.status().as_u16()) == Some(404)
                    && err.code() != Some("NoSuchBucket") =>
            {
                return Ok(None);
            }
            Err(err) => return Err(self.error("get", key, err)),
        };
        let transfer = Transfer {
            url: &self.url,
            key,
            max_bytes,
        };
        if let Some(size) = output.content_length() {
            transfer.check_announced(size.max(0) as u64)?;
        }
        // The server may lie about the length: copy_hashed stops at max_bytes + 1 anyway.
        copy_hashed(output.body.into_async_read(), out, progress, &transfer)
            .await
            .map(Some)
    }
}

/// Uploads send whole bodies (up to the multipart threshold) within one request: no
/// operation timeout for them, only the connect and read timeouts.
fn upload_timeouts() -> aws_sdk_s3::config::Builder {
    aws_sdk_s3::config::Builder::default().timeout_config(
        TimeoutConfig::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .disable_operation_timeout()
            .disable_operation_attempt_timeout()
            .build(),
    )
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.display().to_string();
    move |source| StoreError::Io { op, path, source }
}

impl S3Store {
    /// Upload `path` in parts, [`PART_CONCURRENCY`] at a time; abort the upload on failure
    /// so no parts are left billed in the bucket.
    async fn put_multipart(
        &self,
        key: &str,
        object_key: &str,
        path: &Path,
        size: u64,
        progress: &dyn Progress,
    ) -> Result<(), StoreError> {
        // At most 10,000 parts per upload: grow the part size for very large files.
        let part_size = PART_SIZE.max(size.div_ceil(9_000));
        let parts = size.div_ceil(part_size);
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(object_key)
            .send()
            .await
            .map_err(|e| self.error("put", key, e))?;
        let upload_id = created.upload_id().unwrap_or_default().to_owned();
        let result: Result<Vec<CompletedPart>, StoreError> = stream::iter(0..parts)
            .map(|i| {
                let upload_id = upload_id.clone();
                async move {
                    let offset = i * part_size;
                    let len = part_size.min(size - offset);
                    let mut buf = vec![0u8; len as usize];
                    let mut file = tokio::fs::File::open(path)
                        .await
                        .map_err(io("open", path))?;
                    file.seek(std::io::SeekFrom::Start(offset))
                        .await
                        .map_err(io("seek", path))?;
                    file.read_exact(&mut buf).await.map_err(io("read", path))?;
                    let number = i as i32 + 1;
                    let uploaded = self
                        .client
                        .upload_part()
                        .bucket(&self.bucket)
                        .key(object_key)
                        .upload_id(&upload_id)
                        .part_number(number)
                        .body(ByteStream::from(buf))
                        .customize()
                        .config_override(upload_timeouts())
                        .disable_payload_signing()
                        .send()
                        .await
                        .map_err(|e| self.error("put", key, e))?;
                    progress.advance(len);
                    Ok(CompletedPart::builder()
                        .part_number(number)
                        .set_e_tag(uploaded.e_tag().map(str::to_owned))
                        .build())
                }
            })
            .buffer_unordered(PART_CONCURRENCY)
            .try_collect()
            .await;
        let completed = match result {
            Ok(mut parts) => {
                parts.sort_by_key(|p| p.part_number());
                let done = self
                    .client
                    .complete_multipart_upload()
                    .bucket(&self.bucket)
                    .key(object_key)
                    .upload_id(&upload_id)
                    .multipart_upload(
                        CompletedMultipartUpload::builder()
                            .set_parts(Some(parts))
                            .build(),
                    )
                    .send()
                    .await;
                match done {
                    Ok(_) => Ok(()),
                    // Some S3-compatible servers (moto 5) answer 200 with a body the SDK
                    // cannot parse; the upload did complete. Believe it only if the object
                    // is there with the right size.
                    Err(e) if e.raw_response().map(|r| r.status().as_u16()) == Some(200) => {
                        match self.head(key).await? {
                            Some(n) if n == size => Ok(()),
                            _ => Err(self.error("put", key, e)),
                        }
                    }
                    Err(e) => Err(self.error("put", key, e)),
                }
            }
            Err(e) => Err(e),
        };
        if completed.is_err() {
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(object_key)
                .upload_id(&upload_id)
                .send()
                .await;
        }
        completed
    }
}

impl S3Store {
    async fn check_bucket(&self) -> Result<(), StoreError> {
        self.client
            .list_objects_v2()
            .bucket(&self.bucket)
            .max_keys(1)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.error("list", "", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_bucket_and_prefix() {
        assert_eq!(
            parse_url("s3://deploy").unwrap(),
            ("deploy".into(), "".into())
        );
        assert_eq!(
            parse_url("s3://deploy/prod/eu/").unwrap(),
            ("deploy".into(), "prod/eu/".into())
        );
        assert!(parse_url("s3://Bad_Bucket/x").is_err());
        assert!(parse_url("s3://deploy/../x").is_err());
    }
}
