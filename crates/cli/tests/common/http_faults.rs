//! An HTTP/1.1 proxy in front of a test store server (s3s-fs, Azurite)
//! that makes the network bad on purpose: answers of its own (503
//! SlowDown, 500), a request forwarded and then answered 500 as if the
//! answer were lost, connections reset, answers cut short, requests that
//! stall, and every connection throttled to a rate. What it did is logged,
//! so a test can check that each fault really happened.

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// What to do to a request.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// Answer with this status (and an S3-style error body), unforwarded.
    Answer(u16),
    /// Forward it, throw the real answer away, and answer this status.
    CommitThenAnswer(u16),
    /// Close the connection with a reset, unanswered.
    Reset,
    /// Forward it, then send the answer's head and half its body, and
    /// close.
    Truncate,
    /// Read no more than its head, wait this long, and close.
    Stall(Duration),
    /// Forward it and its answer untouched (a rule that lets the first
    /// requests through before the next rule applies).
    Pass,
    /// Forward it, and flip every byte of the answer's body (a mirror
    /// serving damaged copies).
    Flip,
}

/// A fault for the next `times` requests with this method whose path
/// contains `path`.
#[derive(Debug, Clone)]
pub struct Rule {
    pub method: &'static str,
    pub path: &'static str,
    pub fault: Fault,
    pub times: u32,
}

struct Shared {
    upstream: u16,
    /// Bytes a second each connection may move each way; 0: no limit.
    rate: u64,
    /// Added before every request is forwarded: a store far away.
    latency: Duration,
    rules: Mutex<Vec<Rule>>,
    log: Mutex<Vec<String>>,
    stop: AtomicBool,
    /// PUTs to paths containing one of these go upstream one at a time,
    /// each with its answer, under `serial`.
    one_at_a_time: Mutex<Vec<&'static str>>,
    serial: Mutex<()>,
}

/// The proxy, stopped on drop.
pub struct FaultProxy {
    pub port: u16,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FaultProxy {
    /// A proxy on a free loopback port in front of `upstream` (a loopback
    /// port), throttled to `rate` bytes a second per connection and
    /// direction (0: not throttled).
    pub fn start(upstream: u16, rate: u64) -> Self {
        Self::start_far(upstream, rate, Duration::ZERO)
    }

    /// As [`FaultProxy::start`], with `latency` added to every request.
    pub fn start_far(upstream: u16, rate: u64, latency: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let shared = Arc::new(Shared {
            upstream,
            rate,
            latency,
            rules: Mutex::new(Vec::new()),
            log: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            one_at_a_time: Mutex::new(Vec::new()),
            serial: Mutex::new(()),
        });
        let s = Arc::clone(&shared);
        let thread = std::thread::spawn(move || {
            while !s.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let s = Arc::clone(&s);
                        std::thread::spawn(move || {
                            let _ = client.set_nonblocking(false);
                            let _ = serve(&s, client);
                        });
                    }
                    Err(_) => sleep(Duration::from_millis(2)),
                }
            }
        });
        FaultProxy {
            port,
            shared,
            thread: Some(thread),
        }
    }

    /// Add a rule; rules are tried in the order added.
    pub fn add(&self, rule: Rule) {
        self.shared.rules.lock().expect("rules").push(rule);
    }

    /// Forward PUTs to paths containing `path` one at a time, each until
    /// its answer: a server whose conditional write checks and then
    /// writes (s3s-fs) is then as atomic as S3 itself.
    pub fn one_put_at_a_time(&self, path: &'static str) {
        self.shared.one_at_a_time.lock().expect("paths").push(path);
    }

    /// The faults injected so far, one line each ("Reset GET /btm/...").
    pub fn injected(&self) -> Vec<String> {
        self.shared.log.lock().expect("log").clone()
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A request or answer head: its lines, and how its body is framed.
struct Head {
    raw: Vec<u8>,
    first: String,
    length: Option<u64>,
    chunked: bool,
    close: bool,
}

fn read_head(r: &mut impl BufRead) -> std::io::Result<Option<Head>> {
    let mut raw = Vec::new();
    let mut first = String::new();
    let (mut length, mut chunked, mut close) = (None, false, false);
    loop {
        let mut line = Vec::new();
        if r.read_until(b'\n', &mut line)? == 0 {
            return Ok(None);
        }
        raw.extend_from_slice(&line);
        let text = String::from_utf8_lossy(&line).trim_end().to_owned();
        if text.is_empty() {
            if first.is_empty() {
                continue;
            }
            break;
        }
        if first.is_empty() {
            first = text;
            continue;
        }
        let lower = text.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().ok();
        } else if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
        } else if lower.starts_with("connection:") && lower.contains("close") {
            close = true;
        }
    }
    Ok(Some(Head {
        raw,
        first,
        length,
        chunked,
        close,
    }))
}

/// Copies at most `rate` bytes a second (0: as fast as it goes).
struct Pace {
    rate: u64,
    started: Instant,
    moved: u64,
}

impl Pace {
    fn new(rate: u64) -> Self {
        Pace {
            rate,
            started: Instant::now(),
            moved: 0,
        }
    }

    fn write(&mut self, to: &mut dyn Write, data: &[u8]) -> std::io::Result<()> {
        let piece = if self.rate == 0 {
            data.len().max(1)
        } else {
            16 << 10
        };
        for part in data.chunks(piece) {
            to.write_all(part)?;
            self.moved += part.len() as u64;
            if self.rate > 0 {
                let due = Duration::from_secs_f64(self.moved as f64 / self.rate as f64);
                if let Some(wait) = due.checked_sub(self.started.elapsed()) {
                    sleep(wait);
                }
            }
        }
        to.flush()
    }
}

/// Copy a body framed as `head` says from `from` to `to`, at most `limit`
/// bytes of it (the rest is read and dropped). `until_close`: no length,
/// not chunked, the body runs to the end of the connection.
fn copy_body(
    head: &Head,
    until_close: bool,
    from: &mut impl BufRead,
    to: &mut dyn Write,
    pace: &mut Pace,
    limit: u64,
) -> std::io::Result<()> {
    let mut sent = 0u64;
    let mut pass = |data: &[u8], to: &mut dyn Write| -> std::io::Result<()> {
        let n = (limit.saturating_sub(sent)).min(data.len() as u64) as usize;
        sent += data.len() as u64;
        if n > 0 {
            pace.write(to, &data[..n])?;
        }
        Ok(())
    };
    if head.chunked {
        loop {
            let mut line = Vec::new();
            from.read_until(b'\n', &mut line)?;
            let size = usize::from_str_radix(
                String::from_utf8_lossy(&line)
                    .trim()
                    .split(';')
                    .next()
                    .unwrap_or(""),
                16,
            )
            .unwrap_or(0);
            let mut chunk = vec![0u8; size + 2];
            from.read_exact(&mut chunk)?;
            pass(&line, to)?;
            pass(&chunk, to)?;
            if size == 0 {
                // The final chunk's CRLF was read as `chunk`: no trailers.
                return Ok(());
            }
        }
    }
    let mut left = if until_close {
        u64::MAX
    } else {
        head.length.unwrap_or(0)
    };
    let mut buf = vec![0u8; 64 << 10];
    while left > 0 {
        let n = from.read(&mut buf[..(left.min(64 << 10)) as usize])?;
        if n == 0 {
            break;
        }
        pass(&buf[..n], to)?;
        left -= n as u64;
    }
    Ok(())
}

fn answer(to: &mut TcpStream, status: u16) -> std::io::Result<()> {
    let (code, message) = match status {
        503 => ("SlowDown", "Please reduce your request rate."),
        _ => (
            "InternalError",
            "We encountered an internal error. Please try again.",
        ),
    };
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>{message}</Message></Error>"
    );
    write!(
        to,
        "HTTP/1.1 {status} Injected\r\ncontent-type: application/xml\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )?;
    to.flush()
}

fn serve(s: &Shared, client: TcpStream) -> std::io::Result<()> {
    let mut writer = client.try_clone()?;
    let mut reader = BufReader::new(client.try_clone()?);
    let mut upstream: Option<(TcpStream, BufReader<TcpStream>)> = None;
    while let Some(req) = read_head(&mut reader)? {
        let mut parts = req.first.split_whitespace();
        let (method, target) = (
            parts.next().unwrap_or("").to_owned(),
            parts.next().unwrap_or("").to_owned(),
        );
        let fault = {
            let mut rules = s.rules.lock().expect("rules");
            let hit = rules
                .iter_mut()
                .find(|r| r.times > 0 && r.method == method && target.contains(r.path));
            hit.map(|r| {
                r.times -= 1;
                r.fault
            })
        };
        if let Some(f) = fault {
            s.log
                .lock()
                .expect("log")
                .push(format!("{f:?} {method} {target}"));
        }
        match fault {
            Some(Fault::Stall(d)) => {
                sleep(d);
                let _ = client.shutdown(Shutdown::Both);
                return Ok(());
            }
            Some(Fault::Reset) => {
                socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO))?;
                drop(reader);
                drop(writer);
                drop(client);
                return Ok(());
            }
            Some(Fault::Answer(status)) => {
                copy_body(
                    &req,
                    false,
                    &mut reader,
                    &mut std::io::sink(),
                    &mut Pace::new(0),
                    0,
                )?;
                answer(&mut writer, status)?;
                continue;
            }
            _ => {}
        }
        sleep(s.latency);
        if upstream.is_none() {
            let up = TcpStream::connect(("127.0.0.1", s.upstream))?;
            let r = BufReader::new(up.try_clone()?);
            upstream = Some((up, r));
        }
        let Some((up, up_reader)) = upstream.as_mut() else {
            return Ok(());
        };
        let serialized = method == "PUT"
            && s.one_at_a_time
                .lock()
                .expect("paths")
                .iter()
                .any(|p| target.contains(p));
        // Held until this request's answer is forwarded, below.
        let _one = serialized.then(|| s.serial.lock().unwrap_or_else(|p| p.into_inner()));
        up.write_all(&req.raw)?;
        copy_body(
            &req,
            false,
            &mut reader,
            up,
            &mut Pace::new(s.rate),
            u64::MAX,
        )?;
        let Some(res) = read_head(up_reader)? else {
            return Ok(());
        };
        let status: u16 = res
            .first
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let bodiless = method == "HEAD" || status == 204 || status == 304 || status < 200;
        let until_close = !bodiless && !res.chunked && res.length.is_none();
        let head = Head {
            length: if bodiless { Some(0) } else { res.length },
            chunked: res.chunked && !bodiless,
            ..res
        };
        match fault {
            Some(Fault::CommitThenAnswer(code)) => {
                copy_body(
                    &head,
                    until_close,
                    up_reader,
                    &mut std::io::sink(),
                    &mut Pace::new(0),
                    0,
                )?;
                answer(&mut writer, code)?;
            }
            Some(Fault::Flip) => {
                writer.write_all(&head.raw)?;
                let mut body = Vec::new();
                copy_body(
                    &head,
                    until_close,
                    up_reader,
                    &mut body,
                    &mut Pace::new(0),
                    u64::MAX,
                )?;
                body.iter_mut().for_each(|b| *b ^= 0xff);
                writer.write_all(&body)?;
                writer.flush()?;
            }
            Some(Fault::Truncate) => {
                writer.write_all(&head.raw)?;
                let half = head.length.unwrap_or(0) / 2;
                copy_body(
                    &head,
                    until_close,
                    up_reader,
                    &mut writer,
                    &mut Pace::new(0),
                    half,
                )?;
                let _ = client.shutdown(Shutdown::Both);
                return Ok(());
            }
            _ => {
                writer.write_all(&head.raw)?;
                copy_body(
                    &head,
                    until_close,
                    up_reader,
                    &mut writer,
                    &mut Pace::new(s.rate),
                    u64::MAX,
                )?;
            }
        }
        if head.close || until_close || req.close {
            let _ = client.shutdown(Shutdown::Both);
            return Ok(());
        }
    }
    Ok(())
}
