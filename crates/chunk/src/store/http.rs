//! The HTTP client under the S3, GCS and Azure stores: requests bounded by
//! their lack of progress, never by how long they take.
//!
//! A whole-request timeout is wrong for a store: a 16 MiB pack over a link
//! of 1 MB/s shared by four uploads takes a minute, so a 60 s limit fails
//! it every time, on every retry, while a limit long enough for the slowest
//! link lets a dead connection hang for as long. What a store call must
//! never do is make no progress for long. So, with the stall limit `S`:
//!
//! - **Sending.** The body is handed to the connection in 256 KiB pieces;
//!   one must be taken every `S`. The kernel abandons a connection whose
//!   sent bytes go unacknowledged, or whose peer's window stays shut, for
//!   `S` (`TCP_USER_TIMEOUT`).
//! - **Waiting for the answer.** Pieces taken are in the kernel's buffers,
//!   not yet at the store: up to the socket's send buffer of them (4 MiB by
//!   default) may still be crossing a slow link when the last is taken.
//!   So the answer must come within `S` of the last piece plus the time
//!   that buffer needs at 32 KiB/s ([`DRAIN_FLOOR`]); the kernel still
//!   watches the link meanwhile. A request without a body gets `S`.
//! - **Receiving.** A byte of the answer must arrive every `S`.
//!
//! A timed-out request fails as a transport timeout, and an answer that
//! says the server is busy or failing for now (5xx, 429, 408) fails as a
//! transport error carrying that answer ([`Busy`]), so that `object_store`,
//! which retries nothing here, hands both up as they are and
//! [`super::RetryPolicy`] alone decides what is tried again.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
/// The slowest link the wait for an answer allows for, while what was
/// handed to the kernel drains: slower than this, a pack of 16 MiB split
/// over 4 connections takes over two minutes a piece.
const DRAIN_FLOOR: u64 = 32 << 10;

/// The most a socket's send buffer holds (`tcp_wmem`'s maximum), read once.
fn send_buffer_max() -> u64 {
    static MAX: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
            .ok()
            .and_then(|s| s.split_whitespace().nth(2)?.parse().ok())
            .unwrap_or(4 << 20)
    })
}

/// How long the answer to a request of `body` bytes may take after its
/// last piece was handed over, besides the stall limit.
fn drain_time(body: u64) -> Duration {
    Duration::from_secs(body.min(send_buffer_max()) / DRAIN_FLOOR)
}

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

/// When a request last moved: nanoseconds after `base`; and whether its
/// whole body has been handed over.
#[derive(Debug)]
struct LastMoved {
    base: Instant,
    nanos: AtomicU64,
    sent: AtomicBool,
}

impl LastMoved {
    fn new(sent: bool) -> Arc<Self> {
        Arc::new(LastMoved {
            base: Instant::now(),
            nanos: AtomicU64::new(0),
            sent: AtomicBool::new(sent),
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

/// An answer that says the server is busy or failing for now: its
/// status, and what its body says.
#[derive(Debug, thiserror::Error)]
#[error("the server answered {status}{}", if .says.is_empty() { String::new() } else { format!(": {}", .says) })]
pub struct Busy {
    /// The status.
    pub status: http::StatusCode,
    /// The start of the body, on one line.
    pub says: String,
}

/// Whether an answer with `status` may be different if asked again.
fn passing(status: http::StatusCode) -> bool {
    status.is_server_error()
        || status == http::StatusCode::TOO_MANY_REQUESTS
        || status == http::StatusCode::REQUEST_TIMEOUT
}

/// The error of a [`passing`] answer, with what its body says if it comes
/// within the stall limit.
async fn busy(response: reqwest::Response, stall: Duration) -> HttpError {
    let status = response.status();
    let body = tokio::time::timeout(stall, response.text())
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    let mut says: String = body.split_whitespace().collect::<Vec<_>>().join(" ");
    if let Some((cut, _)) = says.char_indices().nth(200) {
        says.truncate(cut);
    }
    HttpError::new(HttpErrorKind::Unknown, Busy { status, says })
}

fn http_error(e: reqwest::Error) -> HttpError {
    HttpError::new(kind_of(&e), e.without_url())
}

#[async_trait::async_trait]
impl HttpService for ProgressService {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        let (parts, body) = req.into_parts();
        let moved = LastMoved::new(body.is_end_stream());
        let drain = drain_time(body.content_length() as u64);
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
        let deadline = || {
            let allowed = match moved.sent.load(Ordering::Relaxed) {
                true => self.stall + drain,
                false => self.stall,
            };
            moved.at() + allowed
        };
        let response = loop {
            tokio::select! {
                r = &mut answer => break r.map_err(http_error)?,
                () = tokio::time::sleep_until(deadline()) => {
                    if deadline() <= Instant::now() {
                        let phase = match moved.sent.load(Ordering::Relaxed) {
                            true => "waiting for the answer",
                            false => "sending the request",
                        };
                        return Err(stalled(self.stall, phase));
                    }
                }
            }
        };
        if passing(response.status()) {
            return Err(busy(response, self.stall).await);
        }
        let (parts, body) = http::Response::<reqwest::Body>::from(response).into_parts();
        let body = Receiving {
            body,
            stall: self.stall,
            last: Instant::now(),
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
        if this.piece.is_empty() && this.body.is_end_stream() {
            this.moved.sent.store(true, Ordering::Relaxed);
        }
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
/// The timer is moved on only when it fires, not at every frame: a large
/// answer comes in tens of thousands of frames.
struct Receiving {
    body: reqwest::Body,
    stall: Duration,
    /// When the last frame arrived.
    last: Instant,
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
                this.last = Instant::now();
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(http_error(e)))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => {}
        }
        // Waiting: for the next frame, or for the timer, which is moved to
        // the stall limit after the last frame each time it fires early.
        loop {
            if this.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let due = this.last + this.stall;
            if due <= Instant::now() {
                return Poll::Ready(Some(Err(stalled(this.stall, "receiving the answer"))));
            }
            this.timer.as_mut().reset(due);
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
        let moved = LastMoved::new(false);
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
        assert!(
            moved.sent.load(Ordering::Relaxed),
            "the last piece was handed over"
        );
    }

    #[test]
    fn the_wait_for_an_answer_allows_the_send_buffer_to_drain() {
        assert_eq!(drain_time(0), Duration::ZERO);
        assert_eq!(drain_time(64 << 10), Duration::from_secs(2));
        let most = drain_time(u64::MAX);
        assert_eq!(most, Duration::from_secs(send_buffer_max() / DRAIN_FLOOR));
    }
}
