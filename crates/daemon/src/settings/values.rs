//! How each kind of value is spelled, in the file and on the command line:
//! durations, sizes, modes, argument vectors. Every parser names what it
//! expected, so an error says how to write the value.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

use btm::retention::Algo;
use btm::volume::{self, SnapMode};

/// A command's argument vector: a list in the file, a string split on
/// whitespace on the command line.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Argv(pub Vec<String>);

pub(super) fn parse_argv(s: &str) -> Result<Argv, String> {
    Ok(Argv(s.split_whitespace().map(str::to_owned).collect()))
}

/// A volume name, checked as every operation checks it.
pub fn parse_volume(s: &str) -> Result<String, String> {
    volume::validate_name(s).map_err(|e| e.to_string())?;
    Ok(s.to_owned())
}

/// `zfs` or `btrfs`, case-insensitive.
pub fn parse_mode(s: &str) -> Result<SnapMode, String> {
    s.parse()
}

/// `fair` or `fade`, case-insensitive.
pub fn parse_algo(s: &str) -> Result<Algo, String> {
    s.parse()
}

pub(super) fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

pub(super) fn de_mode<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SnapMode>, D::Error> {
    String::deserialize(d)?
        .parse()
        .map(Some)
        .map_err(serde::de::Error::custom)
}

pub(super) fn de_algo<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Algo>, D::Error> {
    String::deserialize(d)?
        .parse()
        .map(Some)
        .map_err(serde::de::Error::custom)
}

pub(super) fn de_keep<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    parse_keep(&String::deserialize(d)?)
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("keep_branches: {e}")))
}

/// How long branches are kept: a duration such as `7d` or `12h`, or `0`.
pub fn parse_keep(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("'{s}' is not a duration like 7d, 12h or 0 ({e})"))
}

/// How long branches are kept when nothing says: a week.
pub const DEFAULT_KEEP_BRANCHES: Duration = Duration::from_secs(7 * 86_400);

/// A positive duration such as `1s`, `500ms`, `2m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("'{s}' is not a duration like 1s, 500ms or 2m ({e})"))?;
    if d.is_zero() {
        return Err(format!("'{s}' must be longer than zero"));
    }
    Ok(d)
}

pub(super) fn de_size<'de, D: Deserializer<'de>>(d: D, key: &str) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumOrStr {
        Num(u64),
        Str(String),
    }
    let n = match NumOrStr::deserialize(d)? {
        NumOrStr::Num(n) => n,
        NumOrStr::Str(s) => {
            parse_size(&s).map_err(|e| serde::de::Error::custom(format!("{key}: {e}")))?
        }
    };
    if n == 0 {
        return Err(serde::de::Error::custom(format!(
            "{key} must be at least 1 byte"
        )));
    }
    Ok(Some(n))
}

pub(super) fn de_max_rate<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    de_size(d, "max_rate")
}

pub(super) fn de_pack_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    de_size(d, "pack_size")
}

/// A byte size: a number with an optional K/M/G (powers of 1024, with or
/// without "iB") or KB/MB/GB (powers of 1000) suffix.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size like 50MiB or 1000000"))?;
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KIB" => 1 << 10,
        "M" | "MIB" => 1 << 20,
        "G" | "GIB" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => {
            return Err(format!(
                "'{s}' has an unknown unit (use K, M, G, KiB, MB, …)"
            ))
        }
    };
    n.checked_mul(mult)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("'{s}' must be between 1 byte and 16 EiB"))
}
