//! The HTTP client under the S3, GCS and Azure stores: requests bounded by
//! their lack of progress, never by how long they take.
//!
//! A whole-request timeout is wrong for a store: a 16 MiB pack over a link
//! of 1 MB/s shared by four uploads takes a minute, so a 60 s limit fails
//! it every time, on every retry, while a limit long enough for the slowest
//! link lets a dead connection hang for as long. What a store call must
//! never do is make no progress for long. So each request here is failed
//! as timed out only when, for the stall limit:
//!
//! - no byte of its body was taken for sending (bodies are handed to the
//!   connection in 256 KiB pieces, so this follows the socket), and no
//!   answer came; or
//! - once answering, no byte of the answer arrived;
//!
//! and the kernel abandons a connection whose sent bytes go unacknowledged
//! that long (`TCP_USER_TIMEOUT`). A timed-out request is retried like any
//! other transient failure (`object_store`'s retries, then the engine's).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpRequestBody,
    HttpResponse, HttpResponseBody, HttpService,
};
use object_store::ClientOptions;
use tokio::time::{Instant, Sleep};

/// Request bodies are handed to the connection in pieces this large, so
/// that progress is seen while a large body is being sent.
const PIECE: usize = 256 << 10;

/// Builds the [`HttpClient`] of an object store: see the module
/// documentation.
#[derive(Debug, Clone, Copy)]
pub struct ProgressConnector {
    /// How long a request may go without progress.
    pub stall: Duration,
}

impl HttpConnector for ProgressConnector {
    fn connect(&self, _options: &ClientOptions) -> object_store::Result<HttpClient> {
        let client = reqwest::Client::builder()
            .user_agent(concat!("btm/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(self.stall.min(Duration::from_secs(10)))
            .tcp_user_timeout(self.stall)
            .tcp_keepalive(self.stall.min(Duration::from_secs(30)))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| object_store::Error::Generic {
                store: "HTTP",
                source: Box::new(e),
            })?;
        Ok(HttpClient::new(ProgressService {
            client,
            stall: self.stall,
        }))
    }
}

#[derive(Debug)]
struct ProgressService {
    client: reqwest::Client,
    stall: Duration,
}

/// When a request last moved: nanoseconds after `base`.
#[derive(Debug)]
struct LastMoved {
    base: Instant,
    nanos: AtomicU64,
}

impl LastMoved {
    fn new() -> Arc<Self> {
        Arc::new(LastMoved {
            base: Instant::now(),
            nanos: AtomicU64::new(0),
        })
    }

    fn touch(&self) {
        let n = self.base.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
        self.nanos.fetch_max(n, Ordering::Relaxed);
    }

    fn at(&self) -> Instant {
        self.base + Duration::from_nanos(self.nanos.load(Ordering::Relaxed))
    }
}

/// The error of a request that made no progress for `stall`.
fn stalled(stall: Duration, what: &str) -> HttpError {
    HttpError::new(
        HttpErrorKind::Timeout,
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no progress for {stall:?} {what}"),
        ),
    )
}

/// What kind of failure a client error is, for the retries above.
fn kind_of(e: &reqwest::Error) -> HttpErrorKind {
    if e.is_timeout() {
        return HttpErrorKind::Timeout;
    }
    if e.is_connect() {
        return HttpErrorKind::Connect;
    }
    if e.is_decode() {
        return HttpErrorKind::Decode;
    }
    // A connection reset or cut short underneath: the request may or may
    // not have been processed, so only idempotent ones are retried as is.
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as K;
            if matches!(
                io.kind(),
                K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof
            ) {
                return HttpErrorKind::Interrupted;
            }
            if io.kind() == K::TimedOut {
                return HttpErrorKind::Timeout;
            }
        }
        cause = c.source();
    }
    if e.is_request() || e.is_body() {
        HttpErrorKind::Interrupted
    } else {
        HttpErrorKind::Unknown
    }
}

fn http_error(e: reqwest::Error) -> HttpError {
    HttpError::new(kind_of(&e), e.without_url())
}

#[async_trait::async_trait]
impl HttpService for ProgressService {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        let moved = LastMoved::new();
        let (parts, body) = req.into_parts();
        let url = parts
            .uri
            .to_string()
            .parse()
            .map_err(|e| HttpError::new(HttpErrorKind::Request, e))?;
        let mut request = reqwest::Request::new(parts.method, url);
        *request.headers_mut() = parts.headers;
        *request.body_mut() = Some(reqwest::Body::wrap(Sending {
            body,
            piece: Bytes::new(),
            moved: Arc::clone(&moved),
        }));
        let answer = self.client.execute(request);
        tokio::pin!(answer);
        let response = loop {
            let deadline = moved.at() + self.stall;
            tokio::select! {
                r = &mut answer => break r.map_err(http_error)?,
                () = tokio::time::sleep_until(deadline) => {
                    if moved.at() + self.stall <= Instant::now() {
                        return Err(stalled(self.stall, "sending the request or waiting for its answer"));
                    }
                }
            }
        };
        let (parts, body) = http::Response::<reqwest::Body>::from(response).into_parts();
        let body = Receiving {
            body,
            stall: self.stall,
            timer: Box::pin(tokio::time::sleep(self.stall)),
        };
        Ok(HttpResponse::from_parts(parts, HttpResponseBody::new(body)))
    }
}

/// A request body, handed over in [`PIECE`]s, each noted as progress.
struct Sending {
    body: HttpRequestBody,
    /// What is left of the body's current frame.
    piece: Bytes,
    moved: Arc<LastMoved>,
}

impl Body for Sending {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        let this = &mut *self;
        if this.piece.is_empty() {
            match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => this.piece = data,
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                other => return other,
            }
        }
        let n = this.piece.len().min(PIECE);
        let out = this.piece.split_to(n);
        this.moved.touch();
        Poll::Ready(Some(Ok(Frame::data(out))))
    }

    fn is_end_stream(&self) -> bool {
        self.piece.is_empty() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.body.size_hint();
        let held = self.piece.len() as u64;
        match hint.exact() {
            Some(n) => SizeHint::with_exact(n + held),
            None => {
                hint.set_lower(hint.lower() + held);
                hint
            }
        }
    }
}

/// A response body that fails once no byte arrives for the stall limit.
struct Receiving {
    body: reqwest::Body,
    stall: Duration,
    timer: Pin<Box<Sleep>>,
}

impl Body for Receiving {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.timer.as_mut().reset(Instant::now() + this.stall);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(http_error(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.timer.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    Poll::Ready(Some(Err(stalled(this.stall, "receiving the answer"))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bodies_go_in_pieces_and_keep_their_length() {
        let data = Bytes::from(vec![7u8; PIECE * 2 + 10]);
        let moved = LastMoved::new();
        let mut body = Sending {
            body: HttpRequestBody::from(data.clone()),
            piece: Bytes::new(),
            moved: Arc::clone(&moved),
        };
        assert_eq!(body.size_hint().exact(), Some(data.len() as u64));
        let mut got = Vec::new();
        let mut pieces = 0;
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        {
            let d = frame.expect("frame").into_data().expect("data");
            assert!(d.len() <= PIECE);
            got.extend_from_slice(&d);
            pieces += 1;
            assert_eq!(
                body.size_hint().exact(),
                Some((data.len() - got.len()) as u64)
            );
        }
        assert_eq!(pieces, 3);
        assert_eq!(got, data);
        assert!(body.is_end_stream());
        assert!(moved.at() > moved.base);
    }
}
