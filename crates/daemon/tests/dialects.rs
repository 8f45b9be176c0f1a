//! Every RPC dialect against a small server that answers as the real RPC
//! does, per its documentation: the normal answer, a node still syncing
//! (behind the height asked for), an answer about another height than the
//! one asked, garbage, and no answer at all (a timeout). (Bitcoin Core is
//! also tested against a real `litecoind` in the CLI's chain tests.)

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use btm::family::Dialect;
use btm_daemon::height::{Auth, HeightError, NodeRpc};
use serde_json::{json, Value};

/// How the fake node behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Normal,
    Syncing,
    WrongHeight,
    Garbage,
    Silent,
    /// Answers what a height needs and nothing that describes the node
    /// (an RPC without the web3, system or version namespaces).
    Bare,
}

/// The height the fake node's tip is at (when synced), and the height the
/// tests ask about.
const TIP: u64 = 1_000;
const ASKED: u64 = 900;
/// A syncing node's tip.
const BEHIND: u64 = 12;

/// One HTTP request: the path and the body.
struct Request {
    path: String,
    body: String,
    auth: Option<String>,
}

fn read_request(stream: &mut TcpStream) -> Option<Request> {
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let path = line.split_whitespace().nth(1)?.to_owned();
    let mut len = 0usize;
    let mut auth = None;
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        match k.to_ascii_lowercase().as_str() {
            "content-length" => len = v.trim().parse().ok()?,
            "authorization" => auth = Some(v.trim().to_owned()),
            _ => {}
        }
    }
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()?;
    Some(Request {
        path,
        body: String::from_utf8(body).ok()?,
        auth,
    })
}

/// A fake node of `dialect` on a loopback port, answering in `mode`.
struct FakeNode {
    url: String,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeNode {
    fn start(dialect: Dialect, mode: Mode) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false).expect("blocking");
                        if let Some(req) = read_request(&mut s) {
                            if mode == Mode::Silent {
                                // Hold the connection without a word.
                                std::thread::sleep(Duration::from_secs(1));
                                continue;
                            }
                            let (status, body) = answer(dialect, mode, &req);
                            let _ = write!(
                                s,
                                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                                body.len()
                            );
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        FakeNode {
            url,
            stop,
            thread: Some(thread),
        }
    }

    fn rpc(&self, dialect: Dialect) -> NodeRpc {
        NodeRpc {
            dialect,
            url: self.url.clone(),
            auth: Auth::None,
            timeout: Duration::from_millis(500),
        }
    }
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn hex32(n: u64) -> String {
    format!("0x{n:064x}")
}

fn base58(n: u64) -> String {
    // 44 characters of the base58 alphabet, distinct per n.
    format!("{:0>44}", n).replace('0', "z")
}

/// The fake node's answer to `req`.
fn answer(dialect: Dialect, mode: Mode, req: &Request) -> (u16, String) {
    if mode == Mode::Garbage {
        return (200, "<html>502 Bad Gateway</html>".into());
    }
    let tip = if mode == Mode::Syncing { BEHIND } else { TIP };
    // Which height an identity answer is about.
    let about = |h: u64| if mode == Mode::WrongHeight { h + 1 } else { h };
    let rpc: Value = serde_json::from_str(&req.body).unwrap_or(Value::Null);
    let method = rpc["method"].as_str().unwrap_or("");
    let params = &rpc["params"];
    let describing = [
        "eth_chainId",
        "web3_clientVersion",
        "getnetworkinfo",
        "system_name",
        "system_version",
        "getVersion",
    ]
    .contains(&method)
        || req.path.starts_with("/abci_info")
        || req.path == "/eth/v1/node/version";
    if mode == Mode::Bare && describing {
        return match dialect {
            Dialect::Cometbft | Dialect::Beacon => (404, "not found".into()),
            _ => (
                200,
                json!({"jsonrpc":"2.0","id":1,"error":{"code":-32601,"message":"the method does not exist"}}).to_string(),
            ),
        };
    }
    let ok = |result: Value| {
        (
            200,
            json!({"jsonrpc":"2.0","id":1,"result":result}).to_string(),
        )
    };
    let err = |code: i64, message: String| {
        (
            200,
            json!({"jsonrpc":"2.0","id":1,"error":{"code":code,"message":message}}).to_string(),
        )
    };
    match dialect {
        Dialect::Cometbft => {
            if req.path.starts_with("/status") {
                let mut status = json!({"sync_info": {
                    "latest_block_height": tip.to_string(),
                    "catching_up": mode == Mode::Syncing}});
                if mode != Mode::Bare {
                    status["node_info"] = json!({"network": "test-1", "version": "0.38.12"});
                }
                return ok(status);
            }
            if req.path.starts_with("/abci_info") {
                return ok(json!({"response": {"data": "GaiaApp", "version": "v19.0.0"}}));
            }
            let h: u64 = req
                .path
                .rsplit('=')
                .next()
                .and_then(|h| h.parse().ok())
                .unwrap_or(0);
            if h > tip {
                return (
                    500,
                    json!({"jsonrpc":"2.0","id":-1,"error":{"code":-32603,"message":"Internal error",
                        "data":format!("height {h} must be less than or equal to the current blockchain height {tip}")}})
                    .to_string(),
                );
            }
            ok(json!({"block_id":{"hash":format!("{:064X}", h)},
                "block":{"header":{"chain_id":"test-1","height":about(h).to_string(),"app_hash":format!("{:064X}", h + 7)}}}))
        }
        Dialect::Ethereum => match method {
            "eth_blockNumber" => ok(json!(format!("0x{tip:x}"))),
            "eth_chainId" => ok(json!("0x1")),
            "web3_clientVersion" => ok(json!("Geth/v1.14.0-stable/linux-amd64/go1.22.2")),
            "eth_getBlockByNumber" => {
                let h = u64::from_str_radix(
                    params[0].as_str().unwrap_or("0x0").trim_start_matches("0x"),
                    16,
                )
                .unwrap_or(0);
                if h > tip {
                    return ok(Value::Null);
                }
                ok(
                    json!({"number":format!("0x{:x}", about(h)),"hash":hex32(h),"stateRoot":hex32(h + 7)}),
                )
            }
            _ => err(-32601, "the method does not exist".into()),
        },
        Dialect::Bitcoin => match method {
            "getblockcount" => ok(json!(tip)),
            "getblockhash" => {
                let h = params[0].as_u64().unwrap_or(0);
                if h > tip {
                    // Bitcoin Core answers RPC errors with HTTP 500.
                    return (
                        500,
                        json!({"result":null,"error":{"code":-8,"message":"Block height out of range"},"id":1})
                            .to_string(),
                    );
                }
                ok(json!(format!("{:064x}", about(h))))
            }
            "getblockchaininfo" => ok(json!({"chain":"regtest","blocks":tip})),
            "getnetworkinfo" => ok(json!({"subversion":"/Satoshi:27.0.0/","version":270000})),
            "gettxoutsetinfo" => ok(json!({"height": tip, "bestblock": format!("{tip:064x}")})),
            _ => err(-32601, "Method not found".into()),
        },
        Dialect::Substrate => match method {
            "chain_getHeader" => {
                let h = match params.get(0).and_then(Value::as_str) {
                    None => tip,
                    Some(hash) => {
                        about(u64::from_str_radix(hash.trim_start_matches("0x"), 16).unwrap_or(0))
                    }
                };
                ok(
                    json!({"number":format!("0x{h:x}"),"stateRoot":hex32(h + 7),"parentHash":hex32(h.saturating_sub(1))}),
                )
            }
            "system_name" => ok(json!("Parity Polkadot")),
            "system_version" => ok(json!("1.14.0-7049c3c9883")),
            "chain_getBlockHash" => {
                let h = params[0].as_u64().unwrap_or(0);
                if h > tip {
                    return ok(Value::Null);
                }
                ok(json!(hex32(h)))
            }
            _ => err(-32601, "Method not found".into()),
        },
        Dialect::Solana => match method {
            "getSlot" => ok(json!(tip)),
            "getGenesisHash" => ok(json!(base58(1))),
            "getVersion" => ok(json!({"solana-core": "1.18.22", "feature-set": 3469865029u64})),
            "getBlock" => {
                let slot = params[0].as_u64().unwrap_or(0);
                if slot > tip {
                    return err(-32004, format!("Block not available for slot {slot}"));
                }
                let parent = if mode == Mode::WrongHeight {
                    slot + 5
                } else {
                    slot - 1
                };
                ok(
                    json!({"blockhash": base58(slot + 100), "parentSlot": parent, "blockHeight": slot - 10}),
                )
            }
            _ => err(-32601, "Method not found".into()),
        },
        Dialect::Beacon => {
            if req.path == "/eth/v1/node/syncing" {
                return (
                    200,
                    json!({"data":{"head_slot":tip.to_string(),"sync_distance":"0","is_syncing":mode == Mode::Syncing}})
                        .to_string(),
                );
            }
            if req.path == "/eth/v1/node/version" {
                return (
                    200,
                    json!({"data":{"version":"Lighthouse/v5.3.0-d6ba8c3/x86_64-linux"}})
                        .to_string(),
                );
            }
            if req.path == "/eth/v1/beacon/genesis" {
                return (
                    200,
                    json!({"data":{"genesis_time":"1606824023","genesis_validators_root":hex32(42)}}).to_string(),
                );
            }
            let slot: u64 = req
                .path
                .rsplit('/')
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            if slot > tip {
                return (
                    404,
                    json!({"code":404,"message":format!("NOT_FOUND: beacon block at slot {slot}")})
                        .to_string(),
                );
            }
            (
                200,
                json!({"data":{"root":hex32(slot),"canonical":true,"header":{"message":{
                    "slot":about(slot).to_string(),"state_root":hex32(slot + 7)}}}})
                .to_string(),
            )
        }
    }
}

#[test]
fn every_dialect_reads_the_tip_and_the_block_at_a_height() {
    for d in Dialect::ALL {
        let node = FakeNode::start(d, Mode::Normal);
        let rpc = node.rpc(d);
        let tip = rpc.tip().unwrap_or_else(|e| panic!("{}: {e}", d.name()));
        assert_eq!((tip.height, tip.syncing), (TIP, false), "{}", d.name());
        let a = rpc
            .identity(ASKED)
            .unwrap_or_else(|e| panic!("{}: {e}", d.name()));
        assert_eq!((a.kind, a.height), (d, ASKED));
        let b = rpc.identity(ASKED - 1).expect("identity");
        assert_ne!(a.block_hash, b.block_hash, "{}", d.name());
        // The same block asked twice is the same identity.
        assert!(
            btm_daemon::height::identity::compare(&a, &rpc.identity(ASKED).expect("again"))
                .is_empty()
        );
        // Above the tip, every dialect says the node has no such block.
        let e = rpc
            .identity(TIP + 50)
            .expect_err("above the tip")
            .to_string();
        assert!(!e.contains('\n'), "{e}");
    }
}

#[test]
fn a_syncing_node_is_behind() {
    for d in Dialect::ALL {
        let node = FakeNode::start(d, Mode::Syncing);
        let rpc = node.rpc(d);
        let tip = rpc.tip().expect("tip");
        assert_eq!(tip.height, BEHIND, "{}", d.name());
        // CometBFT and the beacon API say so; the others only show it.
        if matches!(d, Dialect::Cometbft | Dialect::Beacon) {
            assert!(tip.syncing, "{}", d.name());
        }
        assert!(
            rpc.identity(ASKED).is_err(),
            "{}: a block it lacks",
            d.name()
        );
    }
}

#[test]
fn an_answer_about_another_height_is_refused() {
    // Bitcoin Core's getblockhash answers with a bare hash: nothing to
    // compare the height with.
    for d in Dialect::ALL.into_iter().filter(|d| *d != Dialect::Bitcoin) {
        let node = FakeNode::start(d, Mode::WrongHeight);
        let e = node
            .rpc(d)
            .identity(ASKED)
            .expect_err("another height")
            .to_string();
        assert!(
            e.contains(&format!("asked for {ASKED}")),
            "{}: {e}",
            d.name()
        );
    }
}

#[test]
fn garbage_is_a_bad_response() {
    for d in Dialect::ALL {
        let node = FakeNode::start(d, Mode::Garbage);
        let rpc = node.rpc(d);
        match rpc.tip() {
            Err(HeightError::BadResponse { .. }) => {}
            other => panic!("{}: {other:?}", d.name()),
        }
        assert!(rpc.identity(ASKED).is_err(), "{}", d.name());
    }
}

#[test]
fn a_silent_node_times_out() {
    for d in Dialect::ALL {
        let node = FakeNode::start(d, Mode::Silent);
        let rpc = node.rpc(d);
        let started = Instant::now();
        match rpc.tip() {
            Err(HeightError::Unreachable { .. }) => {}
            other => panic!("{}: {other:?}", d.name()),
        }
        assert!(started.elapsed() < Duration::from_secs(2), "{}", d.name());
        let started = Instant::now();
        match rpc.flush(Duration::from_millis(300)) {
            Err(HeightError::Unreachable { .. }) => assert_eq!(d, Dialect::Bitcoin),
            Ok(None) => assert_ne!(d, Dialect::Bitcoin),
            other => panic!("{}: {other:?}", d.name()),
        }
        assert!(started.elapsed() < Duration::from_secs(2), "{}", d.name());
    }
}

#[test]
fn bitcoin_credentials_are_sent_and_their_absence_is_one_line() {
    let node = FakeNode::start(Dialect::Bitcoin, Mode::Normal);
    let mut rpc = node.rpc(Dialect::Bitcoin);
    assert_eq!(rpc.flush(Duration::from_secs(2)).expect("flush"), Some(TIP));
    let dir = tempfile::tempdir().expect("tmp");
    rpc.auth = Auth::Cookie(dir.path().join(".cookie"));
    let e = rpc.tip().expect_err("no cookie").to_string();
    assert!(
        e.contains("cannot read the RPC cookie") && !e.contains('\n'),
        "{e}"
    );
}

/// A node that wants credentials: 401 without them, as Bitcoin Core does.
#[test]
fn a_node_that_wants_credentials_says_which_keys_to_set() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let server = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for _ in 0..2 {
            let (mut s, _) = listener.accept().expect("accept");
            let req = read_request(&mut s).expect("request");
            seen.push(req.auth);
            let _ = write!(
                s,
                "HTTP/1.1 401 Unauthorized\r\nwww-authenticate: Basic realm=\"jsonrpc\"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            );
        }
        seen
    });
    let mut rpc = NodeRpc {
        dialect: Dialect::Bitcoin,
        url,
        auth: Auth::None,
        timeout: Duration::from_secs(2),
    };
    let e = rpc.tip().expect_err("401").to_string();
    assert!(e.contains("needs credentials: set rpc_cookie"), "{e}");
    rpc.auth = Auth::UserPassword {
        user: "u".into(),
        password: "wrong".into(),
    };
    let e = rpc.tip().expect_err("401").to_string();
    assert!(e.contains("refused the credentials"), "{e}");
    let seen = server.join().expect("server");
    assert_eq!(seen[0], None);
    assert_eq!(seen[1].as_deref(), Some("Basic dTp3cm9uZw=="));
}

/// Every dialect says what client the node runs, and the genesis hash
/// where the chain is named by it or the node tells; a node that answers
/// only what a height needs still gives the block's identity.
#[test]
fn every_dialect_describes_the_chain_and_the_client() {
    let want = |d: Dialect| match d {
        Dialect::Cometbft => "GaiaApp v19.0.0 (CometBFT 0.38.12)",
        Dialect::Ethereum => "Geth/v1.14.0-stable/linux-amd64/go1.22.2",
        Dialect::Bitcoin => "/Satoshi:27.0.0/",
        Dialect::Substrate => "Parity Polkadot 1.14.0-7049c3c9883",
        Dialect::Solana => "solana-core 1.18.22",
        Dialect::Beacon => "Lighthouse/v5.3.0-d6ba8c3/x86_64-linux",
    };
    for d in Dialect::ALL {
        let node = FakeNode::start(d, Mode::Normal);
        let id = node
            .rpc(d)
            .identity(ASKED)
            .unwrap_or_else(|e| panic!("{}: {e}", d.name()));
        assert_eq!(id.client.as_deref(), Some(want(d)), "{}", d.name());
        let genesis = match d {
            Dialect::Ethereum | Dialect::Substrate => Some(hex32(0)),
            Dialect::Bitcoin => Some(format!("{:064x}", 0)),
            Dialect::Solana => Some(base58(1)),
            Dialect::Cometbft | Dialect::Beacon => None,
        };
        assert_eq!(id.genesis_hash, genesis, "{}", d.name());
        if d == Dialect::Ethereum {
            assert_eq!(id.chain_id.as_deref(), Some("1"));
        }

        let bare = FakeNode::start(d, Mode::Bare);
        let id = bare
            .rpc(d)
            .identity(ASKED)
            .unwrap_or_else(|e| panic!("{} bare: {e}", d.name()));
        assert_eq!(id.client, None, "{}", d.name());
        assert_eq!(id.height, ASKED);
    }
}
