//! Where a store is, parsed once: from `-s`, `BTM_STORE`, `[export]
//! store` or a catalog's URL, into a local directory, a bucket or a web
//! server. What a store can be used for follows from it, in one place:
//! a web server is read-only, and reading one (or a bucket anonymously)
//! goes through its signed catalog.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use super::StoreError;

/// Why a web server cannot be written.
pub(super) const WEB_IS_READ_ONLY: &str = "a web server is read-only to btm; write to the directory or bucket it serves, and publish that (docs/publishing.md)";

/// A bucket's cloud.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cloud {
    /// `s3://bucket/prefix` (AWS or a compatible server).
    S3,
    /// `gs://bucket/prefix`.
    Gcs,
    /// `az://container/prefix`.
    Azure,
}

/// Where a store is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A directory: a path or `file://path`.
    Local(PathBuf),
    /// A bucket or container, with an optional prefix inside it.
    Bucket {
        /// Which cloud.
        cloud: Cloud,
        /// The URL as given.
        url: String,
    },
    /// A web server (`http://`, `https://`) serving a published store:
    /// read-only, through its catalog.
    Web(String),
}

/// How a store is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Open {
    /// To write: a local directory that does not exist yet is created on
    /// first write. A web server is refused.
    Write,
    /// To read or prune a store that exists: a missing local directory is
    /// an error (a mistyped path must not look like an empty store).
    Existing,
    /// To read only; with `anonymous`, a bucket is read without
    /// credentials. Web servers are read so too.
    Read {
        /// Unsigned requests (`--no-sign-request`).
        anonymous: bool,
    },
}

impl Location {
    /// A web server: a store that can only be read, through its catalog.
    pub fn is_web(&self) -> bool {
        matches!(self, Location::Web(_))
    }

    /// Whether a store here can be written at all.
    pub fn writable(&self) -> bool {
        !self.is_web()
    }

    /// A location to write to: a web server is refused, saying what to do
    /// instead.
    pub fn for_writing(self) -> Result<Self, StoreError> {
        match self {
            Location::Web(url) => Err(StoreError::InvalidUrl {
                url,
                detail: WEB_IS_READ_ONLY.into(),
            }),
            l => Ok(l),
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Local(p) => write!(f, "{}", p.display()),
            Location::Bucket { url, .. } | Location::Web(url) => f.write_str(url),
        }
    }
}

impl FromStr for Location {
    type Err = StoreError;

    fn from_str(url: &str) -> Result<Self, StoreError> {
        let invalid = |detail: String| StoreError::InvalidUrl {
            url: url.to_owned(),
            detail,
        };
        if url.is_empty() {
            return Err(invalid("it is empty".into()));
        }
        let Some((scheme, rest)) = url.split_once("://") else {
            return Ok(Location::Local(PathBuf::from(url)));
        };
        let cloud = match scheme {
            "file" if rest.is_empty() => return Err(invalid("no path after file://".into())),
            "file" => return Ok(Location::Local(PathBuf::from(rest))),
            "http" | "https" if rest.trim_matches('/').is_empty() => {
                return Err(invalid("no host name".into()))
            }
            "http" | "https" => return Ok(Location::Web(url.to_owned())),
            "s3" => Cloud::S3,
            "gs" => Cloud::Gcs,
            "az" => Cloud::Azure,
            other => {
                return Err(invalid(format!(
                    "unknown scheme '{other}://' (use a path, file://, s3://, gs://, az://, or https:// to read a published store)"
                )))
            }
        };
        if rest.split('/').next().is_none_or(str::is_empty) {
            return Err(invalid("no bucket or container name".into()));
        }
        Ok(Location::Bucket {
            cloud,
            url: url.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_parses_once_and_says_what_it_is() {
        let l: Location = "/srv/store".parse().expect("path");
        assert_eq!(l, Location::Local("/srv/store".into()));
        assert!(l.writable());
        let l: Location = "file:///srv/store".parse().expect("file");
        assert_eq!(l, Location::Local("/srv/store".into()));
        let l: Location = "s3://bucket/prefix".parse().expect("s3");
        assert!(matches!(
            l,
            Location::Bucket {
                cloud: Cloud::S3,
                ..
            }
        ));
        assert_eq!(l.to_string(), "s3://bucket/prefix");
        let l: Location = "https://snapshots.example/chain".parse().expect("web");
        assert!(l.is_web() && !l.writable());
        assert!(l.for_writing().is_err());
        for bad in ["", "s3://", "s3:///x", "ftp://h/x", "file://", "https://"] {
            assert!(bad.parse::<Location>().is_err(), "{bad:?}");
        }
    }
}
