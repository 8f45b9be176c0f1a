//! S3, GCS and Azure stores through the `object_store` crate.
//!
//! object_store is async; the chunk engine's workers are plain threads, so
//! this backend owns a small tokio runtime and blocks on it per call, which
//! lets many workers have requests in flight at once.
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
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use super::{check_marker_name, chunk_path, Marker, Store, StoreError};
use crate::chunk::index::ChunkHash;

/// A cloud store.
pub struct ObjectStoreBackend {
    url: String,
    prefix: String,
    inner: Arc<dyn ObjectStore>,
    runtime: tokio::runtime::Runtime,
    conditional_put: AtomicBool,
}

fn classify(what: &str, e: object_store::Error) -> StoreError {
    match e {
        object_store::Error::NotFound { .. } => StoreError::NotFound(what.to_owned()),
        // object_store has already retried transient HTTP failures with
        // backoff before returning; what reaches us is final.
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

impl ObjectStoreBackend {
    /// Open `s3://bucket/prefix`, `gs://bucket/prefix` or
    /// `az://container/prefix` with credentials from the environment.
    pub fn open(url: &str) -> Result<Self, StoreError> {
        let invalid = |detail: String| StoreError::InvalidUrl {
            url: url.to_owned(),
            detail,
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| invalid("no scheme".into()))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(invalid("no bucket or container name".into()));
        }
        let inner: Arc<dyn ObjectStore> = match scheme {
            "s3" => {
                let mut b = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
                let endpoint = std::env::var("AWS_ENDPOINT_URL")
                    .or_else(|_| std::env::var("AWS_ENDPOINT"))
                    .unwrap_or_default();
                if endpoint.starts_with("http://") {
                    b = b.with_allow_http(true);
                }
                Arc::new(b.build().map_err(|e| invalid(e.to_string()))?)
            }
            "gs" => Arc::new(
                object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_bucket_name(bucket)
                    .build()
                    .map_err(|e| invalid(e.to_string()))?,
            ),
            "az" => Arc::new(
                object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_container_name(bucket)
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
    fn create(&self, rel: &str, data: &[u8], what: &str) -> Result<bool, StoreError> {
        let path = self.path(rel);
        if self.conditional_put.load(Ordering::Relaxed) {
            let opts = PutOptions {
                mode: PutMode::Create,
                ..PutOptions::default()
            };
            let payload = PutPayload::from(data.to_vec());
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
            .block_on(self.inner.put(&path, PutPayload::from(data.to_vec())))
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

    fn delete(&self, rel: &str) -> Result<(), StoreError> {
        match self.runtime.block_on(self.inner.delete(&self.path(rel))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(classify(rel, e)),
        }
    }

    fn read(&self, rel: &str, what: String) -> Result<Vec<u8>, StoreError> {
        let path = self.path(rel);
        self.runtime
            .block_on(async {
                let got = self.inner.get(&path).await?;
                got.bytes().await
            })
            .map(|b| b.to_vec())
            .map_err(|e| classify(&what, e))
    }
}

impl Store for ObjectStoreBackend {
    fn describe(&self) -> String {
        self.url.clone()
    }

    fn put_chunk(&self, hash: &ChunkHash, data: &[u8]) -> Result<(), StoreError> {
        self.create(&chunk_path(hash), data, &format!("chunk {hash}"))
            .map(|_| ())
    }

    fn get_chunk(&self, hash: &ChunkHash) -> Result<Vec<u8>, StoreError> {
        self.read(&chunk_path(hash), format!("chunk {hash}"))
    }

    fn list_chunks(&self) -> Result<Vec<ChunkHash>, StoreError> {
        Ok(self
            .list_names("chunks")?
            .into_iter()
            .filter_map(|n| n.parse().ok())
            .collect())
    }

    fn delete_chunk(&self, hash: &ChunkHash) -> Result<(), StoreError> {
        self.delete(&chunk_path(hash))
    }

    fn put_index(&self, name: &str, data: &[u8]) -> Result<(), StoreError> {
        let what = format!("index {name}");
        if self.create(&format!("indexes/{name}"), data, &what)? {
            Ok(())
        } else {
            Err(StoreError::Permanent {
                what,
                detail: "an index with this name already exists".into(),
            })
        }
    }

    fn get_index(&self, name: &str) -> Result<Vec<u8>, StoreError> {
        self.read(&format!("indexes/{name}"), format!("backup {name}"))
    }

    fn list_indexes(&self) -> Result<Vec<String>, StoreError> {
        self.list_names("indexes")
    }

    fn delete_index(&self, name: &str) -> Result<(), StoreError> {
        self.delete(&format!("indexes/{name}"))
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
        self.read(name, name.to_owned())
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
        self.delete(name)
    }
}
