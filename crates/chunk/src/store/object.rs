//! S3, GCS and Azure stores through the `object_store` crate.
//!
//! object_store is async; the chunk engine's I/O threads are plain threads,
//! so this backend owns a small tokio runtime and blocks on it per call,
//! which lets as many requests be in flight as there are calling threads.
//! A read runs whole as a task on the runtime's threads, beside the
//! connection receiving its body, and wakes its caller once at the end.
//!
//! A store that does not answer must not look like slow progress forever,
//! and a slow link must not look like a dead store: a request fails once it
//! makes no progress for the stall limit ([`super::http`]), however long
//! it has run. Each call here is one request: passing failures (5xx
//! answers such as 503 SlowDown, 429, timeouts, connections reset or cut
//! short) come back typed, and [`super::RetryPolicy`] alone tries them
//! again.
//!
//! Create-if-absent uses the service's conditional put where it has one.
//! Where it does not (S3 without conditional-put support, most S3-compatible
//! servers), chunks fall back to HEAD-then-PUT: the name is the hash of the
//! content, so a racing writer can only write the same bytes. Indexes carry
//! a nanosecond timestamp and the tag in their name, so two writers never
//! choose the same one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures::TryStreamExt;
use object_store::client::{HttpError, HttpErrorKind};
use object_store::path::Path;
use object_store::{
    GetOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
};

use super::{check_marker_name, Bytes, Id, Kind, Marker, Store, StoreError};

/// A cloud store.
pub struct ObjectStoreBackend {
    url: String,
    prefix: String,
    inner: Arc<dyn ObjectStore>,
    runtime: tokio::runtime::Runtime,
    conditional_put: AtomicBool,
}

/// An S3 client for `bucket` from the usual environment (`AWS_*`): plain
/// http allowed for an `http://` endpoint, and unsigned payloads where the
/// endpoint is not AWS's (or `AWS_UNSIGNED_PAYLOAD` says so).
fn s3_builder(
    bucket: &str,
    http: super::http::ProgressConnector,
    retry: object_store::RetryConfig,
    anonymous: bool,
) -> object_store::aws::AmazonS3Builder {
    let mut b = object_store::aws::AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_http_connector(http)
        .with_retry(retry)
        .with_skip_signature(anonymous);
    let endpoint = std::env::var("AWS_ENDPOINT_URL")
        .or_else(|_| std::env::var("AWS_ENDPOINT"))
        .unwrap_or_default();
    if endpoint.starts_with("http://") {
        b = b.with_allow_http(true);
    }
    let explicit = std::env::var_os("AWS_UNSIGNED_PAYLOAD").is_some();
    if unsigned_by_default(&endpoint, explicit) {
        b = b.with_unsigned_payload(true);
    }
    b
}

/// object_store's own retries: none. Every attempt of a call is made by
/// [`super::RetryPolicy`], above this backend, so that a call makes at
/// most its attempts and not its attempts times object_store's; the HTTP
/// client answers a 5xx or 429 as a failure ([`super::http`]) so that
/// object_store hands it up unrepeated.
fn retry_config() -> RetryConfig {
    RetryConfig {
        max_retries: 0,
        ..RetryConfig::default()
    }
}

/// `e` as a store error. What may pass if tried again is `Temporary`: the
/// server said it is busy or failing for now, or the connection broke
/// (every store call may be repeated: objects are named by their content,
/// index puts compare what they find). A request that made no progress,
/// or a server that could not be connected to, is `Unreachable`, tried
/// again as well. The rest is final.
fn classify(what: &str, e: object_store::Error) -> StoreError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(c) = cause {
        if let Some(http) = c.downcast_ref::<HttpError>() {
            return match http.kind() {
                HttpErrorKind::Timeout | HttpErrorKind::Connect => StoreError::Unreachable {
                    what: what.to_owned(),
                    detail: e.to_string(),
                },
                _ => StoreError::Temporary {
                    what: what.to_owned(),
                    detail: e.to_string(),
                },
            };
        }
        cause = c.source();
    }
    match e {
        object_store::Error::NotFound { .. } => StoreError::NotFound(what.to_owned()),
        object_store::Error::Generic { source, .. } => StoreError::Permanent {
            what: what.to_owned(),
            detail: source.to_string(),
        },
        e => StoreError::Permanent {
            what: what.to_owned(),
            detail: e.to_string(),
        },
    }
}

/// Whether S3 uploads to `endpoint` (empty: AWS) go with
/// `UNSIGNED-PAYLOAD` when the environment does not say (`explicit`): over
/// TLS, yes. TLS protects the body in transit and every chunk is verified
/// by its BLAKE3 hash when read, so hashing each upload with SHA-256 for
/// the signature as well (a third of a remote backup's CPU) buys nothing;
/// the AWS SDKs make the same choice. Plain HTTP keeps the signed payload.
fn unsigned_by_default(endpoint: &str, explicit: bool) -> bool {
    !explicit && !endpoint.starts_with("http://")
}

impl ObjectStoreBackend {
    /// Open `s3://bucket/prefix`, `gs://bucket/prefix` or
    /// `az://container/prefix` with credentials from the environment.
    pub fn open(url: &str) -> Result<Self, StoreError> {
        Self::open_with(url, false)
    }

    /// Open a store to read it without credentials: a web server
    /// (`https://host/prefix`, `http://…`) or a public bucket (`s3://`,
    /// `gs://`, `az://`, with unsigned requests). Only reads are sent;
    /// writers refuse such a store above this layer.
    pub fn open_anonymous(url: &str) -> Result<Self, StoreError> {
        Self::open_with(url, true)
    }

    fn open_with(url: &str, anonymous: bool) -> Result<Self, StoreError> {
        let invalid = |detail: String| StoreError::InvalidUrl {
            url: url.to_owned(),
            detail,
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| invalid("no scheme".into()))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(invalid("no bucket, container or host name".into()));
        }
        let retry = retry_config();
        let http = super::http::ProgressConnector {
            stall: super::RetryPolicy::standard().stall,
        };
        // A web server's root is the whole URL: object_store's HTTP store
        // appends object paths to it and reads with GET and Range.
        let prefix = if scheme.starts_with("http") {
            ""
        } else {
            prefix
        };
        let inner: Arc<dyn ObjectStore> = match scheme {
            "http" | "https" => Arc::new(
                object_store::http::HttpBuilder::new()
                    .with_url(url.trim_end_matches('/'))
                    .with_http_connector(http)
                    .with_retry(retry)
                    .with_client_options(object_store::ClientOptions::new().with_allow_http(true))
                    .build()
                    .map_err(|e| invalid(e.to_string()))?,
            ),
            "s3" => Arc::new(
                s3_builder(bucket, http, retry, anonymous)
                    .build()
                    .map_err(|e| invalid(e.to_string()))?,
            ),
            "gs" => Arc::new(
                object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_bucket_name(bucket)
                    .with_http_connector(http)
                    .with_retry(retry.clone())
                    .with_skip_signature(anonymous)
                    .build()
                    .map_err(|e| invalid(e.to_string()))?,
            ),
            "az" => Arc::new(
                object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_container_name(bucket)
                    .with_http_connector(http)
                    .with_retry(retry.clone())
                    .with_skip_signature(anonymous)
                    .build()
                    .map_err(|e| invalid(e.to_string()))?,
            ),
            other => return Err(invalid(format!("unknown scheme '{other}'"))),
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("btm-store")
            .enable_all()
            .build()
            .map_err(|e| invalid(format!("cannot start I/O runtime: {e}")))?;
        Ok(ObjectStoreBackend {
            url: url.to_owned(),
            prefix: prefix.trim_matches('/').to_owned(),
            inner,
            runtime,
            conditional_put: AtomicBool::new(true),
        })
    }

    fn path(&self, rel: &str) -> Path {
        if self.prefix.is_empty() {
            Path::from(rel)
        } else {
            Path::from(format!("{}/{rel}", self.prefix))
        }
    }

    fn exists(&self, path: &Path, what: &str) -> Result<bool, StoreError> {
        match self.runtime.block_on(self.inner.head(path)) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(classify(what, e)),
        }
    }

    /// Put unless present; `Ok(false)` if it was present.
    fn create(&self, rel: &str, data: Bytes, what: &str) -> Result<bool, StoreError> {
        let path = self.path(rel);
        if self.conditional_put.load(Ordering::Relaxed) {
            let opts = PutOptions {
                mode: PutMode::Create,
                ..PutOptions::default()
            };
            let payload = PutPayload::from(data.clone());
            match self
                .runtime
                .block_on(self.inner.put_opts(&path, payload, opts))
            {
                Ok(_) => return Ok(true),
                Err(object_store::Error::AlreadyExists { .. })
                | Err(object_store::Error::Precondition { .. }) => return Ok(false),
                Err(object_store::Error::NotImplemented { .. })
                | Err(object_store::Error::NotSupported { .. }) => {
                    self.conditional_put.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(classify(what, e)),
            }
        }
        if self.exists(&path, what)? {
            return Ok(false);
        }
        self.runtime
            .block_on(self.inner.put(&path, PutPayload::from(data)))
            .map(|_| true)
            .map_err(|e| classify(what, e))
    }

    fn list_metas(&self, dir: &str) -> Result<Vec<object_store::ObjectMeta>, StoreError> {
        let prefix = self.path(dir);
        self.runtime
            .block_on(self.inner.list(Some(&prefix)).try_collect())
            .map_err(|e| classify(dir, e))
    }

    fn list_names(&self, dir: &str) -> Result<Vec<String>, StoreError> {
        Ok(self
            .list_metas(dir)?
            .into_iter()
            .filter_map(|m| m.location.filename().map(str::to_owned))
            .collect())
    }

    fn remove(&self, rel: &str) -> Result<(), StoreError> {
        match self.runtime.block_on(self.inner.delete(&self.path(rel))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(classify(rel, e)),
        }
    }

    fn read(&self, rel: &str, what: String) -> Result<Bytes, StoreError> {
        let path = self.path(rel);
        let inner = Arc::clone(&self.inner);
        self.on_runtime(&what, async move { inner.get(&path).await?.bytes().await })?
            .map_err(|e| classify(&what, e))
    }

    /// Run `request` as a task on the runtime's threads and wait for it.
    /// A body arrives in pieces (tens of KiB), each received by the
    /// connection's task on those threads: a future blocked on from the
    /// calling thread would be woken for each piece, a switch between
    /// threads each time (28,700 of them in a restore of 560 MiB, against
    /// 9,100 this way), while a task beside the connection takes each
    /// piece where it lands and wakes the caller once, at the end.
    fn on_runtime<T: Send + 'static>(
        &self,
        what: &str,
        request: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.runtime
            .block_on(self.runtime.spawn(request))
            .map_err(|e| StoreError::Permanent {
                what: what.to_owned(),
                detail: format!("the request's task ended without an answer: {e}"),
            })
    }
}

impl Store for ObjectStoreBackend {
    fn describe(&self) -> String {
        self.url.clone()
    }

    fn put(&self, kind: Kind, id: &Id, data: Bytes) -> Result<(), StoreError> {
        self.create(&kind.path(id), data, &kind.describe(id))
            .map(|_| ())
    }

    fn get(&self, kind: Kind, id: &Id) -> Result<Bytes, StoreError> {
        self.read(&kind.path(id), kind.describe(id))
    }

    fn get_range_into(
        &self,
        kind: Kind,
        id: &Id,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), StoreError> {
        let path = self.path(&kind.path(id));
        let what = kind.describe(id);
        let end = offset
            .checked_add(len)
            .ok_or_else(|| StoreError::Permanent {
                what: what.clone(),
                detail: "range overflows".into(),
            })?;
        let mut body = std::mem::take(buf);
        body.clear();
        // Capped: the length comes from an index, which may be damaged;
        // the buffer still grows to whatever the server sends.
        body.reserve(len.min(64 << 20) as usize);
        let options = GetOptions::new().with_range(Some(offset..end));
        let inner = Arc::clone(&self.inner);
        let (got, body) = self.on_runtime(&what, async move {
            let got = async {
                let mut stream = inner.get_opts(&path, options).await?.into_stream();
                while let Some(piece) = stream.try_next().await? {
                    body.extend_from_slice(&piece);
                }
                Ok(())
            }
            .await;
            (got, body)
        })?;
        *buf = body;
        got.map_err(|e| classify(&what, e))?;
        if buf.len() as u64 != len {
            // A body cut short: reading it again may work.
            return Err(StoreError::Temporary {
                what,
                detail: format!("asked for {len} bytes at {offset}, got {}", buf.len()),
            });
        }
        Ok(())
    }

    fn size(&self, kind: Kind, id: &Id) -> Result<u64, StoreError> {
        let path = self.path(&kind.path(id));
        self.runtime
            .block_on(self.inner.head(&path))
            .map(|m| m.size)
            .map_err(|e| classify(&kind.describe(id), e))
    }

    fn list(&self, kind: Kind) -> Result<Vec<(Id, u64)>, StoreError> {
        Ok(self
            .list_metas(kind.dir())?
            .into_iter()
            .filter_map(|m| Some((m.location.filename()?.parse().ok()?, m.size)))
            .collect())
    }

    fn delete(&self, kind: Kind, id: &Id) -> Result<(), StoreError> {
        self.remove(&kind.path(id))
    }

    fn create_index(&self, name: &str, data: &[u8]) -> Result<bool, StoreError> {
        self.create(
            &format!("indexes/{name}"),
            Bytes::copy_from_slice(data),
            &format!("index {name}"),
        )
    }

    fn get_index(&self, name: &str) -> Result<Vec<u8>, StoreError> {
        self.read(&format!("indexes/{name}"), format!("backup {name}"))
            .map(|b| b.to_vec())
    }

    fn list_indexes(&self) -> Result<Vec<String>, StoreError> {
        self.list_names("indexes")
    }

    fn delete_index(&self, name: &str) -> Result<(), StoreError> {
        self.remove(&format!("indexes/{name}"))
    }

    fn put_marker(&self, name: &str, data: &[u8]) -> Result<(), StoreError> {
        check_marker_name(name)?;
        self.runtime
            .block_on(
                self.inner
                    .put(&self.path(name), PutPayload::from(data.to_vec())),
            )
            .map(|_| ())
            .map_err(|e| classify(name, e))
    }

    fn get_marker(&self, name: &str) -> Result<Vec<u8>, StoreError> {
        check_marker_name(name)?;
        self.read(name, name.to_owned()).map(|b| b.to_vec())
    }

    /// The marker is read with its ETag and written back with `If-Match`
    /// on it (`If-None-Match: *` when it must be absent): the service
    /// refuses the write if anyone replaced it in between.
    fn replace_marker_if(
        &self,
        name: &str,
        expected: Option<&[u8]>,
        data: &[u8],
    ) -> Result<bool, StoreError> {
        check_marker_name(name)?;
        let path = self.path(name);
        let unsupported = || StoreError::Unsupported {
            store: self.url.clone(),
            what: format!("replace {name} conditionally (no If-Match)"),
        };
        let mode = match expected {
            None => PutMode::Create,
            Some(expected) => {
                let read = self.runtime.block_on(async {
                    let got = self.inner.get(&path).await?;
                    let meta = got.meta.clone();
                    Ok::<_, object_store::Error>((meta, got.bytes().await?))
                });
                let (meta, holds) = match read {
                    Ok(r) => r,
                    Err(object_store::Error::NotFound { .. }) => return Ok(false),
                    Err(e) => return Err(classify(name, e)),
                };
                if holds.as_ref() != expected {
                    return Ok(false);
                }
                let e_tag = meta.e_tag.ok_or_else(unsupported)?;
                PutMode::Update(object_store::UpdateVersion {
                    e_tag: Some(e_tag),
                    version: meta.version,
                })
            }
        };
        let opts = PutOptions {
            mode,
            ..PutOptions::default()
        };
        let payload = PutPayload::from(data.to_vec());
        match self
            .runtime
            .block_on(self.inner.put_opts(&path, payload, opts))
        {
            Ok(_) => Ok(true),
            // Replaced meanwhile (S3 may also answer a concurrent If-Match
            // with 409).
            Err(object_store::Error::Precondition { .. })
            | Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(object_store::Error::NotImplemented { .. })
            | Err(object_store::Error::NotSupported { .. }) => Err(unsupported()),
            Err(e) => Err(classify(name, e)),
        }
    }

    fn list_markers(&self, dir: &str) -> Result<Vec<Marker>, StoreError> {
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        Ok(self
            .list_metas(dir.trim_end_matches('/'))?
            .into_iter()
            .filter_map(|m| {
                let full = m.location.to_string();
                let name = full.strip_prefix(&strip)?.to_owned();
                Some(Marker {
                    name,
                    modified: m.last_modified,
                })
            })
            .collect())
    }

    fn delete_marker(&self, name: &str) -> Result<(), StoreError> {
        check_marker_name(name)?;
        self.remove(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploads_are_unsigned_over_tls_unless_told() {
        assert!(unsigned_by_default("", false), "AWS itself is HTTPS");
        assert!(unsigned_by_default("https://minio.internal:9000", false));
        assert!(!unsigned_by_default("http://127.0.0.1:9000", false));
        assert!(!unsigned_by_default("https://minio.internal:9000", true));
        assert!(!unsigned_by_default("", true));
    }
}
