//! A TCP proxy that delays every byte by half of DELAY in each direction,
//! so that each request/response exchange takes DELAY longer: a store on
//! loopback made to look tens of milliseconds away, without kernel netem.
//! Bytes are delayed, not throttled: a large transfer streams at full
//! speed after the first DELAY/2.
//!
//! The proxy acknowledges what it reads at once (`TCP_QUICKACK`). Without
//! that, a server that writes a response's headers and body in two small
//! segments without `TCP_NODELAY` (s3s-fs does) waits for the proxy's
//! delayed acknowledgement, and every small GET took DELAY + 40 ms: an
//! artefact of the emulation, not of a cloud round trip.
//!
//! With RATE_MB (MB/s, optional), each connection also moves at most that
//! many bytes a second each way: one long-distance TCP flow is capped by
//! its window over the round trip, so a single stream (a tarball over
//! curl) cannot use the whole link, while parallel streams can.
//!
//! ```text
//! cargo run --release --example latency_proxy -- LISTEN UPSTREAM DELAY_MS [RATE_MB]
//! cargo run --release --example latency_proxy -- 127.0.0.1:9001 127.0.0.1:9000 20
//! ```
//! Used by `scripts/bench-remote.sh`, `scripts/bench-sizes.sh` and
//! `scripts/bench-public.sh`; it prints `listening` when ready.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
    rate: Option<u64>,
) {
    // When the link is next free, at `rate`: each piece leaves at its
    // delay, or when the pieces before it have drained, whichever is later.
    let mut free = Instant::now();
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let read = from.read(&mut buf).await;
        // Not permanent: the kernel may fall back to delayed ACKs after
        // any segment, so it is set again after every short read (a long
        // one is a bulk transfer, where full segments are acknowledged
        // promptly anyway and a system call per read would cost CPU that
        // the client and server share with the proxy).
        if matches!(read, Ok(n) if n < 64 << 10) {
            let _ = socket2::SockRef::from(from.as_ref()).set_tcp_quickack(true);
        }
        match read {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let mut due = Instant::now() + delay;
                if let Some(rate) = rate {
                    due = due.max(free);
                    free = due + Duration::from_nanos(n as u64 * 1_000_000_000 / rate);
                }
                if tx.send((due, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let number = |s: &str, what: &str| {
        s.parse::<u64>()
            .map_err(|e| std::io::Error::other(format!("{what}: {e}")))
    };
    let (listen, upstream, ms, rate) = match &args[..] {
        [_, l, u, d] => (l.clone(), u.clone(), number(d, "DELAY_MS")?, None),
        [_, l, u, d, r] => (
            l.clone(),
            u.clone(),
            number(d, "DELAY_MS")?,
            Some(number(r, "RATE_MB")?.max(1) * 1_000_000),
        ),
        _ => {
            eprintln!("usage: latency_proxy LISTEN UPSTREAM DELAY_MS [RATE_MB]");
            std::process::exit(2);
        }
    };
    let half = Duration::from_micros(ms * 500);
    let listener = TcpListener::bind(&listen).await?;
    println!("listening");
    loop {
        let (client, _) = listener.accept().await?;
        let upstream = upstream.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(&upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::join!(pump(cr, sw, half, rate), pump(sr, cw, half, rate));
        });
    }
}
