//! Object storage: `s3://`, `gs://` and `az://` URLs and globs for the file
//! source, through the `object_store` crate.
//!
//! A glob is listed from the literal prefix before its first glob
//! character, page by page as the reader goes (a prefix with 100,000
//! objects is never held as a list), and each key is matched against the
//! rest with the same rules as local globs. Stores list keys in
//! lexicographic order, so a run reads objects in a stable order, as it
//! sorts local files.
//!
//! An object streams: a GET whose body is read chunk by chunk into the same
//! line, CSV or JSON readers as a local file. A read that fails halfway is
//! resumed from the byte it stopped at with a ranged GET, on the condition
//! that the object is still the one begun (`If-Match` its ETag), so a
//! resumed read never splices two versions of an object. Credentials come
//! from each cloud's environment (and `AWS_PROFILE`); they never reach a
//! message or a log line.

use std::io::{self, Read};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectMeta, ObjectStore};
use tokio::runtime::Handle;

use crate::error::{Error, Result};

/// How many times a read that broke off is resumed before the run fails.
const RESUMES: u32 = 5;

/// The schemes the file source reads from object storage.
pub fn is_object_url(text: &str) -> bool {
    ["s3://", "gs://", "az://"]
        .iter()
        .any(|scheme| text.starts_with(scheme))
}

/// Which cloud an URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cloud {
    S3,
    Gcs,
    Azure,
}

/// `s3://bucket/prefix/*.jsonl`: a bucket and a key or key glob.
#[derive(Debug, Clone)]
pub struct ObjectUrl {
    cloud: Cloud,
    /// `s3://bucket`, the start of every reference to one of its objects.
    base: String,
    bucket: String,
    /// The key, or the key glob.
    key: String,
}

impl ObjectUrl {
    /// Parses an object URL; an URL without a bucket or key is a
    /// configuration error.
    pub fn parse(url: &str) -> Result<ObjectUrl> {
        let (cloud, rest) = if let Some(rest) = url.strip_prefix("s3://") {
            (Cloud::S3, rest)
        } else if let Some(rest) = url.strip_prefix("gs://") {
            (Cloud::Gcs, rest)
        } else if let Some(rest) = url.strip_prefix("az://") {
            (Cloud::Azure, rest)
        } else {
            return Err(Error::config(format!(
                "{url}: not an object URL: use s3://BUCKET/KEY, gs://BUCKET/KEY or az://CONTAINER/KEY"
            )));
        };
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() || key.is_empty() {
            return Err(Error::config(format!(
                "{url}: an object URL names a bucket and a key or glob, as s3://BUCKET/exports/*.jsonl"
            )));
        }
        Ok(ObjectUrl {
            cloud,
            base: url[..url.len() - key.len() - 1].to_string(),
            bucket: bucket.to_string(),
            key: key.to_string(),
        })
    }

    /// The URL as written.
    pub fn url(&self) -> String {
        format!("{}/{}", self.base, self.key)
    }

    /// The key (or glob) within the bucket.
    pub fn key(&self) -> &str {
        &self.key
    }

    fn is_glob(&self) -> bool {
        self.key.contains(['*', '?', '['])
    }

    /// The key up to the first glob character.
    fn literal_prefix(&self) -> &str {
        let end = self.key.find(['*', '?', '[']).unwrap_or(self.key.len());
        &self.key[..end]
    }

    /// The reference of an object of this bucket: `s3://bucket/key`.
    fn object_url(&self, key: &str) -> String {
        format!("{}/{key}", self.base)
    }
}

/// What is known of one object, for a manifest of files loaded: its URL,
/// size, ETag, version and last-modified time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub url: String,
    pub size: u64,
    pub e_tag: Option<String>,
    pub version: Option<String>,
    pub last_modified: DateTime<Utc>,
}

/// A bucket (or container) and the client that reads it.
#[derive(Clone)]
pub struct Bucket {
    url: ObjectUrl,
    store: Arc<dyn ObjectStore>,
}

impl std::fmt::Debug for Bucket {
    // The store holds credentials: only the URL is shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bucket")
            .field("url", &self.url.url())
            .finish()
    }
}

impl Bucket {
    /// The client for the URL's bucket: credentials from the cloud's
    /// environment, `endpoint` (else `AWS_ENDPOINT_URL`) for an
    /// S3-compatible store or an Azure emulator. An explicit `http://`
    /// endpoint is allowed without TLS.
    pub fn connect(url: &ObjectUrl, endpoint: Option<&str>) -> Result<Bucket> {
        let bad = |e: object_store::Error| {
            Error::config(format!(
                "{}: cannot set up the client: {}",
                url.url(),
                crate::redact::redact(&e.to_string())
            ))
        };
        let store: Arc<dyn ObjectStore> = match url.cloud {
            Cloud::S3 => {
                let mut builder = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(&url.bucket)
                    .with_retry(retry_config());
                builder = super::aws_profile::apply(builder);
                let endpoint = endpoint
                    .map(str::to_string)
                    .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
                    .or_else(|| std::env::var("AWS_ENDPOINT").ok())
                    .filter(|e| !e.is_empty());
                if let Some(endpoint) = endpoint {
                    builder = builder
                        .with_allow_http(endpoint.starts_with("http://"))
                        .with_endpoint(endpoint);
                }
                if std::env::var_os("AWS_REGION").is_none()
                    && std::env::var_os("AWS_DEFAULT_REGION").is_none()
                {
                    if let Some(region) = super::aws_profile::region() {
                        builder = builder.with_region(region);
                    }
                }
                Arc::new(builder.build().map_err(bad)?)
            }
            Cloud::Gcs => {
                if endpoint.is_some() {
                    return Err(Error::config(format!(
                        "{}: `endpoint` is for S3-compatible stores and Azure emulators; a GCS emulator is set with `gcs_base_url` in GOOGLE_SERVICE_ACCOUNT_KEY",
                        url.url()
                    )));
                }
                Arc::new(
                    object_store::gcp::GoogleCloudStorageBuilder::from_env()
                        .with_bucket_name(&url.bucket)
                        .with_retry(retry_config())
                        .build()
                        .map_err(bad)?,
                )
            }
            Cloud::Azure => {
                let mut builder = object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_container_name(&url.bucket)
                    .with_retry(retry_config());
                if let Some(endpoint) = endpoint {
                    builder = builder
                        .with_allow_http(endpoint.starts_with("http://"))
                        .with_endpoint(endpoint.to_string());
                }
                Arc::new(builder.build().map_err(bad)?)
            }
        };
        Ok(Bucket {
            url: url.clone(),
            store,
        })
    }

    /// The objects the URL names, listed as they are read: one object for
    /// a key, every matching key for a glob.
    pub fn list(&self) -> Result<Listing> {
        let url = &self.url;
        if !url.is_glob() {
            return Ok(Listing {
                bucket: self.clone(),
                stream: None,
                exact: Some(object_path(&url.key)?),
                pattern: None,
                literal: String::new(),
                matched: 0,
            });
        }
        let pattern = glob::Pattern::new(&url.key)
            .map_err(|e| Error::config(format!("{}: bad glob: {e}", url.url())))?;
        let literal = url.literal_prefix().to_string();
        // Listing is by whole path segments: list the literal prefix's
        // folder, starting after the keys that sort before the prefix.
        let folder = literal.rsplit_once('/').map(|(folder, _)| folder);
        let folder = folder.map(object_path).transpose()?;
        let stream = match literal
            .rsplit_once('/')
            .map_or(literal.as_str(), |(_, f)| f)
        {
            "" => self.store.list(folder.as_ref()),
            _ => {
                // Keys greater than the prefix less its last character
                // include every key that starts with the prefix.
                let mut before = literal.clone();
                before.pop();
                self.store
                    .list_with_offset(folder.as_ref(), &ObjectPath::from(before))
            }
        };
        Ok(Listing {
            bucket: self.clone(),
            stream: Some(stream),
            exact: None,
            pattern: Some(pattern),
            literal,
            matched: 0,
        })
    }

    /// Opens an object for reading from its start.
    pub fn open(&self, meta: &ObjectMeta, rt: &Handle) -> io::Result<ObjectRead> {
        self.open_at(meta, 0, rt)
    }

    /// Opens an object for reading from byte `offset`.
    fn open_at(&self, meta: &ObjectMeta, offset: u64, rt: &Handle) -> io::Result<ObjectRead> {
        let mut read = ObjectRead {
            rt: rt.clone(),
            store: self.store.clone(),
            info: self.info(meta),
            path: meta.location.clone(),
            offset,
            stream: None,
            chunk: Bytes::new(),
            resumes: 0,
        };
        read.request()?;
        Ok(read)
    }

    /// What a manifest keeps of an object.
    pub fn info(&self, meta: &ObjectMeta) -> ObjectInfo {
        ObjectInfo {
            url: self.url.object_url(meta.location.as_ref()),
            size: meta.size,
            e_tag: meta.e_tag.clone(),
            version: meta.version.clone(),
            last_modified: meta.last_modified,
        }
    }

    /// The bytes `range` of an object (for Parquet's footer), retried as a
    /// streamed read is.
    pub fn get_range(
        &self,
        path: &ObjectPath,
        range: std::ops::Range<u64>,
        rt: &Handle,
    ) -> io::Result<Bytes> {
        self.retrying(path, rt, || self.store.get_range(path, range.clone()))
    }

    /// The bytes of several ranges of an object (a Parquet row group's
    /// column chunks): ranges close to each other are fetched by one GET,
    /// and the GETs run side by side.
    pub fn get_ranges(
        &self,
        path: &ObjectPath,
        ranges: &[std::ops::Range<u64>],
        rt: &Handle,
    ) -> io::Result<Vec<Bytes>> {
        self.retrying(path, rt, || self.store.get_ranges(path, ranges))
    }

    /// Runs a request, again after a transient failure.
    fn retrying<T, F, Fut>(&self, path: &ObjectPath, rt: &Handle, request: F) -> io::Result<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = object_store::Result<T>>,
    {
        let mut attempt = 0;
        loop {
            match rt.block_on(request()) {
                Ok(value) => return Ok(value),
                Err(e) if attempt < RESUMES && is_transient(&e) => {
                    attempt += 1;
                    tracing::warn!(object = %self.url.object_url(path.as_ref()), attempt, error = %e, "Ranged read failed; retrying.");
                    std::thread::sleep(backoff(attempt));
                }
                Err(e) => return Err(io::Error::other(message(&e))),
            }
        }
    }

    /// The reference of an object of this bucket: `s3://bucket/key`.
    pub fn object_url(&self, meta: &ObjectMeta) -> String {
        self.url.object_url(meta.location.as_ref())
    }
}

/// The client's own retries of a request that failed before its body.
fn retry_config() -> object_store::RetryConfig {
    object_store::RetryConfig {
        max_retries: 5,
        retry_timeout: Duration::from_secs(60),
        ..Default::default()
    }
}

fn object_path(key: &str) -> Result<ObjectPath> {
    ObjectPath::parse(key).map_err(|e| Error::config(format!("{key}: not a valid object key: {e}")))
}

/// The objects of a URL, as the listing yields them.
pub struct Listing {
    bucket: Bucket,
    stream: Option<BoxStream<'static, object_store::Result<ObjectMeta>>>,
    /// The one key of an URL without glob characters.
    exact: Option<ObjectPath>,
    pattern: Option<glob::Pattern>,
    literal: String,
    matched: usize,
}

impl Listing {
    /// The bucket the objects are in.
    pub fn bucket(&self) -> &Bucket {
        &self.bucket
    }

    /// The next object, `None` after the last one. An URL that names no
    /// object, or a glob that matches none, is a configuration error.
    pub fn next(&mut self, rt: &Handle) -> Result<Option<ObjectMeta>> {
        let url = self.bucket.url.url();
        if let Some(path) = self.exact.take() {
            return match rt.block_on(self.bucket.store.head(&path)) {
                Ok(meta) => Ok(Some(meta)),
                Err(object_store::Error::NotFound { .. }) => {
                    Err(Error::config(format!("{url}: no such object")))
                }
                Err(e) => Err(source_error(&url, &e)),
            };
        }
        let Some(stream) = self.stream.as_mut() else {
            return Ok(None);
        };
        let options = glob::MatchOptions {
            case_sensitive: true,
            require_literal_separator: true,
            require_literal_leading_dot: false,
        };
        loop {
            let meta = match rt.block_on(stream.next()) {
                Some(Ok(meta)) => meta,
                Some(Err(e)) => return Err(source_error(&url, &e)),
                None => break,
            };
            let key = meta.location.as_ref();
            if !key.starts_with(&self.literal) {
                if key > self.literal.as_str() {
                    // Keys come in order: none after this one matches.
                    break;
                }
                continue;
            }
            let matches = self
                .pattern
                .as_ref()
                .is_some_and(|p| p.matches_with(key, options));
            if matches {
                self.matched += 1;
                return Ok(Some(meta));
            }
        }
        self.stream = None;
        if self.matched == 0 {
            return Err(Error::config(format!("{url}: no object matches")));
        }
        Ok(None)
    }
}

fn is_transient(e: &object_store::Error) -> bool {
    !matches!(
        e,
        object_store::Error::NotFound { .. }
            | object_store::Error::Precondition { .. }
            | object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. }
            | object_store::Error::NotSupported { .. }
    )
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(200 << attempt.min(5))
}

/// An error's text, redacted: the store's messages carry URLs, never
/// credentials, but a user-info part of an endpoint is cut all the same.
fn message(e: &object_store::Error) -> String {
    crate::redact::redact(&e.to_string())
}

fn source_error(url: &str, e: &object_store::Error) -> Error {
    let hint = match e {
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => {
            "; check the credentials in the environment (AWS_ACCESS_KEY_ID, AWS_PROFILE, GOOGLE_SERVICE_ACCOUNT, AZURE_STORAGE_ACCOUNT_KEY)"
        }
        _ => "",
    };
    Error::Source {
        location: url.to_string(),
        message: format!("{}{hint}", message(e)),
    }
}

/// An object read as a byte stream, resumed from its offset when the
/// connection breaks off.
pub struct ObjectRead {
    rt: Handle,
    store: Arc<dyn ObjectStore>,
    path: ObjectPath,
    info: ObjectInfo,
    /// Bytes handed out so far.
    offset: u64,
    stream: Option<BoxStream<'static, object_store::Result<Bytes>>>,
    /// Bytes received and not yet handed out.
    chunk: Bytes,
    resumes: u32,
}

impl ObjectRead {
    /// The object's URL, size, ETag and last-modified time, as the GET
    /// that began the read saw them.
    pub fn info(&self) -> &ObjectInfo {
        &self.info
    }

    /// Starts (or resumes) the GET at `offset`.
    fn request(&mut self) -> io::Result<()> {
        let resuming = self.resumes > 0;
        let options = GetOptions {
            range: (self.offset > 0).then_some(GetRange::Offset(self.offset)),
            // A resumed read must read on in the same version.
            if_match: if resuming {
                self.info.e_tag.clone()
            } else {
                None
            },
            ..Default::default()
        };
        let result = self
            .rt
            .block_on(self.store.get_opts(&self.path, options))
            .map_err(|e| match e {
                object_store::Error::Precondition { .. } => io::Error::other(format!(
                    "the object changed while it was read (its ETag is no longer {}); run again to read the new version",
                    self.info.e_tag.as_deref().unwrap_or("?")
                )),
                e => io::Error::other(message(&e)),
            })?;
        if !resuming {
            self.info.size = result.meta.size;
            self.info.e_tag = result.meta.e_tag.clone();
            self.info.version = result.meta.version.clone();
            self.info.last_modified = result.meta.last_modified;
        }
        self.stream = Some(result.into_stream());
        Ok(())
    }

    /// Resumes after `error`, or gives up with it.
    fn resume(&mut self, error: String) -> io::Result<()> {
        self.stream = None;
        if self.resumes >= RESUMES {
            return Err(io::Error::other(format!(
                "{error} (at byte {}, after {} resumed reads)",
                self.offset, self.resumes
            )));
        }
        self.resumes += 1;
        tracing::warn!(object = %self.info.url, offset = self.offset, attempt = self.resumes, %error, "Object read broke off; resuming from its offset.");
        std::thread::sleep(backoff(self.resumes));
        self.request()
    }
}

impl Read for ObjectRead {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            if self.offset >= self.info.size {
                return Ok(0);
            }
            let next = match self.stream.as_mut() {
                Some(stream) => self.rt.block_on(stream.next()),
                None => None,
            };
            match next {
                Some(Ok(bytes)) => self.chunk = bytes,
                Some(Err(e)) => self.resume(message(&e))?,
                None => self.resume(format!(
                    "the response ended at byte {} of {}",
                    self.offset, self.info.size
                ))?,
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        self.chunk = self.chunk.slice(n..);
        self.offset += n as u64;
        Ok(n)
    }
}

/// An object as Parquet reads it: the footer by ranged GETs, and each row
/// group's column chunks fetched together before the row group is read
/// (`prefetch`), so that a row group costs a few GETs, not one per page.
#[derive(Clone)]
pub struct ObjectChunks {
    bucket: Bucket,
    meta: ObjectMeta,
    rt: Handle,
    /// The fetched ranges: where each starts, and its bytes.
    fetched: Arc<Vec<(u64, Bytes)>>,
}

impl ObjectChunks {
    pub fn new(bucket: Bucket, meta: ObjectMeta, rt: Handle) -> ObjectChunks {
        ObjectChunks {
            bucket,
            meta,
            rt,
            fetched: Arc::default(),
        }
    }

    /// The same object with `ranges` in memory (replacing any fetched
    /// before): one row group's column chunks at a time.
    pub fn prefetch(&self, ranges: &[std::ops::Range<u64>]) -> io::Result<ObjectChunks> {
        if ranges.is_empty() {
            return Ok(self.clone());
        }
        let bytes = self
            .bucket
            .get_ranges(&self.meta.location, ranges, &self.rt)?;
        let fetched = ranges.iter().map(|r| r.start).zip(bytes).collect();
        Ok(ObjectChunks {
            fetched: Arc::new(fetched),
            ..self.clone()
        })
    }

    /// The fetched bytes from `start` to the end of the range holding it.
    fn fetched_from(&self, start: u64) -> Option<Bytes> {
        self.fetched.iter().find_map(|(begin, bytes)| {
            let skip = usize::try_from(start.checked_sub(*begin)?).ok()?;
            (skip < bytes.len()).then(|| bytes.slice(skip..))
        })
    }
}

impl parquet::file::reader::Length for ObjectChunks {
    fn len(&self) -> u64 {
        self.meta.size
    }
}

impl parquet::file::reader::ChunkReader for ObjectChunks {
    type T = Box<dyn Read + Send>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        if let Some(bytes) = self.fetched_from(start) {
            return Ok(Box::new(bytes::Buf::reader(bytes)));
        }
        self.bucket
            .open_at(&self.meta, start, &self.rt)
            .map(|read| Box::new(read) as Self::T)
            .map_err(|e| parquet::errors::ParquetError::External(Box::new(e)))
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        if let Some(bytes) = self.fetched_from(start).filter(|b| b.len() >= length) {
            return Ok(bytes.slice(..length));
        }
        self.bucket
            .get_range(&self.meta.location, start..start + length as u64, &self.rt)
            .map_err(|e| parquet::errors::ParquetError::External(Box::new(e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_object_url_splits_into_bucket_and_key_glob() {
        let url = ObjectUrl::parse("s3://exports/usage/2024-*.jsonl.gz").unwrap();
        assert_eq!(url.bucket, "exports");
        assert_eq!(url.key(), "usage/2024-*.jsonl.gz");
        assert_eq!(url.literal_prefix(), "usage/2024-");
        assert!(url.is_glob());
        assert_eq!(
            url.object_url("usage/a.jsonl"),
            "s3://exports/usage/a.jsonl"
        );
        assert_eq!(url.url(), "s3://exports/usage/2024-*.jsonl.gz");
        let url = ObjectUrl::parse("az://container/a.csv").unwrap();
        assert_eq!((url.cloud, url.is_glob()), (Cloud::Azure, false));
        for bad in ["s3://", "s3://bucket", "s3://bucket/", "gs:///key"] {
            let err = ObjectUrl::parse(bad).unwrap_err().to_string();
            assert!(err.starts_with(bad), "{err}");
        }
    }
}
