//! The optional Prometheus text endpoint (`metrics_listen`): `GET /metrics`
//! renders the daemon's state in the text exposition format. The format
//! is written by the `prometheus` crate from a registry built per scrape
//! (names, help texts and labels exactly as below, which the shipped
//! alert rules and dashboard use); the endpoint is a few lines over a TCP
//! socket rather than an HTTP framework: one route, read-only, bounded
//! request size and time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use btm::protocol::Status;
use chrono::Utc;
use prometheus::core::Collector;
use prometheus::{Counter, CounterVec, Encoder, Gauge, GaugeVec, Opts, Registry, TextEncoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::shutdown::{self, Shutdown, Trigger};
use super::state::State;
use super::{Current, DaemonError};

/// Render `s` in the Prometheus text format.
pub fn render(s: &Status) -> String {
    let x = Exposition::default();
    let all = source_and_snapshot_metrics(s)
        .into_iter()
        .chain(volume_metrics(s))
        .chain(branch_metrics(s))
        .chain(export_metrics(s))
        .chain(export_count_metrics(s));
    for (name, help, kind, value) in all {
        if let Some(v) = value {
            x.series(name, help, kind, None, [(String::new(), v)]);
        }
    }
    let c = &s.counters;
    let errors = [
        ("source", c.source_errors),
        ("snapshot", c.snapshot_failures),
        ("prune", c.prune_failures),
        ("hook", c.hook_failures),
        ("export", c.export_failures),
        ("height", c.refused),
        ("gc", c.gc_failures),
        ("volume_timeout", c.volume_timeouts),
        ("flush", c.flush_failures),
    ];
    x.series(
        "btm_errors_total",
        "Errors since start, by kind.",
        Kind::Counter,
        Some("kind"),
        errors.map(|(kind, n)| (kind.to_owned(), n as f64)),
    );
    x.text()
}

/// Live restores running on this machine (`btm restore --live`), one
/// series per served directory.
pub fn render_live(live: &[btm_live::Status]) -> String {
    type Field = fn(&btm_live::Status) -> f64;
    let metrics: [(&str, &str, Kind, Field); 10] = [
        (
            "btm_live_present_bytes",
            "Bytes of the backup local now.",
            Kind::Gauge,
            |s| s.present_bytes as f64,
        ),
        (
            "btm_live_total_bytes",
            "Bytes of the backup's data.",
            Kind::Gauge,
            |s| s.total_bytes as f64,
        ),
        (
            "btm_live_files_left",
            "Files not wholly local yet.",
            Kind::Gauge,
            |s| s.files_left as f64,
        ),
        (
            "btm_live_demand_bytes_total",
            "Bytes fetched on demand by reads through the mount.",
            Kind::Counter,
            |s| s.demand_bytes as f64,
        ),
        (
            "btm_live_demand_latency_seconds_mean",
            "Mean time an on-demand fetch took.",
            Kind::Gauge,
            |s| s.demand_latency_ms / 1000.0,
        ),
        (
            "btm_live_demand_failures_total",
            "Reads through the mount that failed with EIO.",
            Kind::Counter,
            |s| s.demand_failures as f64,
        ),
        (
            "btm_live_background_bytes_total",
            "Bytes fetched by background hydration.",
            Kind::Counter,
            |s| s.background_bytes as f64,
        ),
        (
            "btm_live_waiting",
            "1 while hydration waits (for the store, or for room on a full disk).",
            Kind::Gauge,
            |s| f64::from(u8::from(s.waiting.is_some())),
        ),
        (
            "btm_live_resident_bytes",
            "The live-restore server's resident memory.",
            Kind::Gauge,
            |s| s.rss_bytes as f64,
        ),
        (
            "btm_live_open_files",
            "Descriptors the live-restore server holds.",
            Kind::Gauge,
            |s| s.open_files as f64,
        ),
    ];
    if live.is_empty() {
        return String::new();
    }
    let x = Exposition::default();
    for (name, help, kind, f) in metrics {
        let series = live.iter().map(|s| (s.dir.clone(), f(s)));
        x.series(name, help, kind, Some("dir"), series);
    }
    x.text()
}

/// What a metric is to Prometheus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A value that goes up and down.
    Gauge,
    /// A total since start: only goes up.
    Counter,
}

/// The metrics of one scrape: registered, then written out.
#[derive(Default)]
struct Exposition(Registry);

impl Exposition {
    /// Metric `name` with one series per `(label value, value)`; with no
    /// `label`, one series without labels (its label value unused).
    fn series(
        &self,
        name: &str,
        help: &str,
        kind: Kind,
        label: Option<&str>,
        values: impl IntoIterator<Item = (String, f64)>,
    ) {
        let opts = Opts::new(name, help);
        let labels: Vec<&str> = label.into_iter().collect();
        let registered = match kind {
            Kind::Gauge => GaugeVec::new(opts, &labels).and_then(|m| {
                for (v, x) in values {
                    gauge(&m, label.map(|_| v.as_str()))?.set(x);
                }
                self.register(m)
            }),
            Kind::Counter => CounterVec::new(opts, &labels).and_then(|m| {
                for (v, x) in values {
                    counter(&m, label.map(|_| v.as_str()))?.inc_by(x.max(0.0));
                }
                self.register(m)
            }),
        };
        // Names and labels are this file's constants, checked by the tests
        // below; a bad one loses that metric, not the scrape.
        if let Err(e) = registered {
            tracing::warn!(metric = name, error = %e, "cannot export a metric");
        }
    }

    fn register(&self, m: impl Collector + 'static) -> prometheus::Result<()> {
        self.0.register(Box::new(m))
    }

    /// The text exposition of everything registered.
    fn text(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.0.gather(), &mut out) {
            tracing::warn!(error = %e, "cannot encode the metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// The series of `m` for `label` (none: the one without labels).
fn gauge(m: &GaugeVec, label: Option<&str>) -> prometheus::Result<Gauge> {
    m.get_metric_with_label_values(&label.into_iter().collect::<Vec<_>>())
}

/// The series of `m` for `label` (none: the one without labels).
fn counter(m: &CounterVec, label: Option<&str>) -> prometheus::Result<Counter> {
    m.get_metric_with_label_values(&label.into_iter().collect::<Vec<_>>())
}

/// One sample: name, help, type, and the value (none: not exported).
type Metric = (&'static str, &'static str, Kind, Option<f64>);

/// The branches rollbacks kept, and a switch left half done.
fn branch_metrics(s: &Status) -> Vec<Metric> {
    vec![
        (
            "btm_branches",
            "Branches kept by rollbacks, apart from the active line.",
            Kind::Gauge,
            Some(s.branch_count as f64),
        ),
        (
            "btm_branch_bytes",
            "Bytes the branches hold, where the file system tells.",
            Kind::Gauge,
            s.branch_bytes.map(|b| b as f64),
        ),
        (
            "btm_switch_half_done",
            "1 while a rollback or undo is left half done.",
            Kind::Gauge,
            Some(if s.half_done.is_some() { 1.0 } else { 0.0 }),
        ),
    ]
}

fn source_and_snapshot_metrics(s: &Status) -> Vec<Metric> {
    let last = s.last_snapshot.as_ref();
    let secs = |ms: u64| ms as f64 / 1000.0;
    vec![
        (
            "btm_last_height",
            "Last block height seen from the source.",
            Kind::Gauge,
            s.last_height.map(|h| h as f64),
        ),
        (
            "btm_source_lag_seconds",
            "Seconds since the source last gave a height.",
            Kind::Gauge,
            s.last_height_at
                .map(|t| (Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0),
        ),
        (
            "btm_last_snapshot_height",
            "Height of the last snapshot taken.",
            Kind::Gauge,
            last.map(|l| l.height as f64),
        ),
        (
            "btm_last_snapshot_timestamp_seconds",
            "Unix time of the last snapshot taken.",
            Kind::Gauge,
            last.map(|l| l.at.timestamp() as f64),
        ),
        (
            "btm_last_snapshot_duration_seconds",
            "Duration of the last snapshot, with hooks and pruning.",
            Kind::Gauge,
            last.map(|l| secs(l.duration_ms)),
        ),
    ]
}

/// The volume's snapshots, retention and health.
fn volume_metrics(s: &Status) -> Vec<Metric> {
    let c = &s.counters;
    let secs = |ms: u64| ms as f64 / 1000.0;
    vec![
        (
            "btm_snapshots",
            "btm snapshots on the volume.",
            Kind::Gauge,
            Some(s.snapshot_count as f64),
        ),
        (
            "btm_snapshots_protected",
            "Protected snapshots on the volume (outside retention).",
            Kind::Gauge,
            Some(s.protected_count as f64),
        ),
        (
            "btm_snapshot_cap",
            "Most snapshots retention keeps, protected ones aside.",
            Kind::Gauge,
            Some(s.cap as f64),
        ),
        (
            "btm_snapshot_interval_blocks",
            "Blocks between snapshots (itv).",
            Kind::Gauge,
            Some(s.itv as f64),
        ),
        (
            "btm_snapshots_taken_total",
            "Snapshots taken since start.",
            Kind::Counter,
            Some(c.snapshots as f64),
        ),
        (
            "btm_snapshot_duration_seconds_sum",
            "Total time spent taking snapshots.",
            Kind::Counter,
            Some(secs(c.snapshot_ms_total)),
        ),
        (
            "btm_prune_duration_seconds_sum",
            "Total time spent pruning.",
            Kind::Counter,
            Some(secs(c.prune_ms_total)),
        ),
        (
            "btm_prunes_total",
            "Prune runs since start.",
            Kind::Counter,
            Some(c.prunes as f64),
        ),
        (
            "btm_volume_stalled",
            "1 while the volume's zfs or btrfs commands time out (a suspended pool, a frozen filesystem).",
            Kind::Gauge,
            Some(if s.volume_stalled_since.is_some() { 1.0 } else { 0.0 }),
        ),
        (
            "btm_height_mismatches_total",
            "Snapshots found to hold another height than their label.",
            Kind::Counter,
            Some(c.height_mismatches as f64),
        ),
        (
            "btm_height_mismatch_blocks",
            "How far the latest mismatched snapshot's state is below its label (negative: above); 0 when none stands.",
            Kind::Gauge,
            Some(
                s.height_mismatch
                    .as_ref()
                    .map_or(0.0, |m| m.snapshot as f64 - m.holds as f64),
            ),
        ),
    ]
}

fn export_metrics(s: &Status) -> Vec<Metric> {
    let le = s.last_export.as_ref();
    let running = s.export.as_ref();
    vec![
        (
            "btm_last_export_height",
            "Height of the last successful export.",
            Kind::Gauge,
            le.map(|l| l.height as f64),
        ),
        (
            "btm_last_export_timestamp_seconds",
            "Unix time of the last successful export.",
            Kind::Gauge,
            le.map(|l| l.at.timestamp() as f64),
        ),
        (
            "btm_last_export_duration_seconds",
            "Duration of the last successful export.",
            Kind::Gauge,
            le.map(|l| l.duration_ms as f64 / 1000.0),
        ),
        (
            "btm_last_export_read_bytes",
            "Bytes read by the last successful export.",
            Kind::Gauge,
            le.map(|l| l.bytes_read as f64),
        ),
        (
            "btm_last_export_uploaded_bytes",
            "Bytes uploaded by the last successful export.",
            Kind::Gauge,
            le.map(|l| l.bytes_uploaded as f64),
        ),
        (
            "btm_export_running",
            "1 while an export runs.",
            Kind::Gauge,
            s.export_store
                .as_ref()
                .map(|_| f64::from(u8::from(running.is_some()))),
        ),
        (
            "btm_export_progress_read_bytes",
            "Bytes read so far by the running export.",
            Kind::Gauge,
            running.map(|r| r.bytes_read as f64),
        ),
        (
            "btm_export_progress_total_bytes",
            "Bytes the running export plans to read.",
            Kind::Gauge,
            running.map(|r| r.bytes_total as f64),
        ),
        (
            "btm_export_progress_uploaded_bytes",
            "Bytes uploaded so far by the running export.",
            Kind::Gauge,
            running.map(|r| r.bytes_uploaded as f64),
        ),
    ]
}

/// Exports counted since start, and the export interval.
fn export_count_metrics(s: &Status) -> Vec<Metric> {
    let c = &s.counters;
    vec![
        (
            "btm_exports_total",
            "Exports finished since start.",
            Kind::Counter,
            Some(c.exports as f64),
        ),
        (
            "btm_export_every_blocks",
            "Blocks between exports.",
            Kind::Gauge,
            s.export_every.map(|e| e as f64),
        ),
        (
            "btm_exports_skipped_total",
            "Due exports skipped because one was still running.",
            Kind::Counter,
            Some(c.exports_skipped as f64),
        ),
    ]
}

/// The running metrics endpoint; it outlives reloads and serves the
/// current generation's state.
pub struct Server {
    addr: SocketAddr,
    stop: Trigger,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Bind `addr` and serve until stopped.
    pub fn start(
        addr: SocketAddr,
        current: Current,
        process: Shutdown,
    ) -> Result<Server, DaemonError> {
        let std_listener = std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|cause| DaemonError::Metrics { addr, cause })?;
        let listener = TcpListener::from_std(std_listener)
            .map_err(|cause| DaemonError::Metrics { addr, cause })?;
        let (stop, stopped) = shutdown::channel();
        let task = tokio::spawn(serve(listener, current, process, stopped));
        Ok(Server { addr, stop, task })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop and wait.
    pub async fn stop(self) {
        self.stop.fire();
        let _ = self.task.await;
    }

    /// Stop (another server took over).
    pub fn retire(self) {
        self.stop.fire();
    }
}

async fn serve(
    listener: TcpListener,
    current: Current,
    mut process: Shutdown,
    mut stopped: Shutdown,
) {
    loop {
        let accepted = tokio::select! {
            _ = process.wait() => return,
            _ = stopped.wait() => return,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let state = current.borrow().as_ref().map(|g| Arc::clone(&g.state));
        // Answered inline: rendering is microseconds, and a slow client is
        // cut off by the timeout.
        let _ =
            tokio::time::timeout(Duration::from_secs(5), answer(stream, state.as_deref())).await;
    }
}

async fn answer(mut stream: TcpStream, state: Option<&State>) -> std::io::Result<()> {
    let mut buf = [0u8; 8192];
    let n = stream.read(&mut buf).await?;
    let request = String::from_utf8_lossy(&buf[..n]);
    let (status, body) = if request.starts_with("GET /metrics ") || request.starts_with("GET / ") {
        match state {
            Some(state) => {
                let live = tokio::task::spawn_blocking(btm_live::control::statuses)
                    .await
                    .unwrap_or_default();
                let mut body = render(&state.status());
                body.push_str(&render_live(&live));
                ("200 OK", body)
            }
            None => (
                "503 Service Unavailable",
                "the daemon is starting\n".to_owned(),
            ),
        }
    } else {
        ("404 Not Found", "only GET /metrics is served\n".to_owned())
    };
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// The monitoring the package ships (`packaging/monitoring`) names only
/// metrics the daemon exports. (`promtool` runs its rules' unit tests in
/// `crates/cli/tests/monitoring.rs`.)
#[cfg(test)]
mod shipped_monitoring {
    use std::collections::BTreeSet;

    use btm::protocol::{LastExport, LastSnapshot, RunningExport};
    use chrono::Utc;

    const DASHBOARD: &str = include_str!("../../../packaging/monitoring/btm-dashboard.json");
    const RULES: &str = include_str!("../../../packaging/monitoring/btm-alerts.yml");

    /// Every metric name `render` prints when every value is known.
    fn exported() -> BTreeSet<String> {
        let dir = std::env::temp_dir();
        let settings = crate::test_support::settings("[export]\nstore = \"/b\"\n", &dir);
        let mut s = crate::initial_status(&crate::test_support::cfg(&settings), &settings, 3);
        let now = Utc::now();
        s.last_height = Some(120);
        s.last_height_at = Some(now);
        s.last_snapshot = Some(LastSnapshot {
            height: 120,
            height_after: None,
            durable_height: None,
            at: now,
            duration_ms: 5,
        });
        s.last_export = Some(LastExport {
            height: 100,
            backup: "b".into(),
            at: now,
            duration_ms: 9,
            bytes_read: 1,
            bytes_uploaded: 1,
            files_unchanged: 0,
            chain: None,
        });
        s.export = Some(RunningExport {
            height: 120,
            started_at: now,
            bytes_total: 2,
            bytes_read: 1,
            bytes_uploaded: 1,
        });
        super::render(&s)
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .map(str::to_owned)
            .collect()
    }

    /// The `btm_…` metric names in a PromQL expression.
    fn btm_names(expr: &str) -> Vec<String> {
        expr.match_indices("btm_")
            .filter(|(i, _)| {
                // Not the tail of a longer identifier.
                expr[..*i]
                    .chars()
                    .last()
                    .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'))
            })
            .map(|(i, _)| {
                expr[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect()
            })
            .collect()
    }

    fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                        _ => exprs(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
            _ => {}
        }
    }

    #[test]
    fn the_dashboard_parses_and_names_only_exported_metrics() {
        let have = exported();
        let dash: serde_json::Value =
            serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
        let mut all = Vec::new();
        exprs(&dash, &mut all);
        assert!(all.len() >= 10, "{} queries", all.len());
        let mut used = BTreeSet::new();
        for e in &all {
            let names = btm_names(e);
            assert!(
                !names.is_empty() || e.contains("up{"),
                "a query with no btm metric: {e}"
            );
            for n in names {
                assert!(
                    have.contains(&n),
                    "the dashboard queries {n}, which the daemon does not export: {e}"
                );
                used.insert(n);
            }
        }
        // The headline figures are on it.
        for key in [
            "btm_last_height",
            "btm_last_snapshot_height",
            "btm_last_export_height",
            "btm_errors_total",
        ] {
            assert!(used.contains(key), "{key} is not on the dashboard");
        }
    }

    #[test]
    fn the_alert_rules_name_only_exported_metrics() {
        let have = exported();
        let exprs: Vec<&str> = RULES
            .lines()
            .filter_map(|l| l.trim().strip_prefix("expr:"))
            .collect();
        let alerts = RULES
            .lines()
            .filter(|l| l.trim().starts_with("- alert:"))
            .count();
        assert!(alerts >= 9, "{alerts} alerts");
        assert_eq!(exprs.len(), alerts, "one expression per alert");
        for e in exprs {
            for n in btm_names(e) {
                assert!(
                    have.contains(&n),
                    "a rule uses {n}, which the daemon does not export: {e}"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_restores_are_one_series_per_directory() {
        assert_eq!(render_live(&[]), "");
        let st = |dir: &str, present| btm_live::Status {
            dir: dir.into(),
            present_bytes: present,
            total_bytes: 10,
            waiting: Some("the store failed".into()),
            ..btm_live::Status::default()
        };
        let out = render_live(&[st("/var/lib/node", 5), st("/data/a\"b", 10)]);
        assert!(
            out.contains("btm_live_present_bytes{dir=\"/var/lib/node\"} 5\n"),
            "{out}"
        );
        assert!(
            out.contains("btm_live_present_bytes{dir=\"/data/a\\\"b\"} 10\n"),
            "{out}"
        );
        assert!(
            out.contains("btm_live_waiting{dir=\"/var/lib/node\"} 1\n"),
            "{out}"
        );
        assert_eq!(out.matches("# TYPE btm_live_total_bytes gauge").count(), 1);
    }
}
