//! The Prometheus alert rules the package ships: `promtool check rules`,
//! and `promtool test rules` with unit tests that make every alert fire and
//! clear. (Debian's `prometheus` package ships `promtool`; scripts/test.sh
//! installs it.) That the rules and the dashboard name only exported
//! metrics is checked in the daemon crate (`metrics::shipped_monitoring`).

use std::path::Path;
use std::process::Command;

fn promtool(args: &[&str]) -> String {
    let dir = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../packaging/monitoring"
    ));
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool runs (scripts/test.sh installs Debian's prometheus package)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}: {text}");
    text
}

#[test]
fn the_alert_rules_are_valid() {
    let out = promtool(&["check", "rules", "btm-alerts.yml"]);
    assert!(out.contains("SUCCESS: 11 rules found"), "{out}");
}

#[test]
fn every_alert_fires_and_clears() {
    let out = promtool(&["test", "rules", "btm-alerts.test.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
    // Each alert has a case in the unit tests.
    let tests = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../packaging/monitoring/btm-alerts.test.yml"
    ))
    .expect("tests");
    let rules = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../packaging/monitoring/btm-alerts.yml"
    ))
    .expect("rules");
    for alert in rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
    {
        let firing = format!("alertname: {alert}\n");
        let cleared = format!("alertname: {alert}, exp_alerts: []");
        assert!(tests.contains(&firing), "{alert} never fires in the tests");
        assert!(
            tests.contains(&cleared),
            "{alert} never clears in the tests"
        );
    }
}
