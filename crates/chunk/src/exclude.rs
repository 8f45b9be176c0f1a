//! What a backup leaves out on purpose: validator key material by default
//! ([`btm::validator::SECRETS`]), and the operator's `--exclude` globs.
//! Each backup's head records every pattern that matched, why, and how many
//! entries it matched, so `btm backups show` can say what a restore will
//! lack.

use super::format::head::Excluded;
use super::ChunkError;
use btm::validator::SECRETS;

/// One pattern and what it has matched so far.
#[derive(Debug)]
struct Pattern {
    pattern: String,
    why: String,
    matcher: Matcher,
    matched: u64,
}

#[derive(Debug)]
enum Matcher {
    /// A validator secret: the path ends with these components.
    Secret(&'static str),
    /// An operator's glob, as a regular expression over the relative path.
    Glob(regex::bytes::Regex),
}

/// The exclusions of one backup.
#[derive(Debug)]
pub struct Exclusions {
    patterns: Vec<Pattern>,
}

/// Translate a glob into an anchored regular expression over a relative,
/// `/`-separated path. A glob without `/` matches a name at any depth (as in
/// `.gitignore`); with one, the whole path from the root. `*` and `?` stay
/// within one component, `**` spans any number.
pub fn glob_regex(glob: &str) -> String {
    let body = glob.trim_start_matches('/');
    let anchored = glob.contains('/');
    let mut re = String::from(if anchored { "^" } else { "^(?:.*/)?" });
    let mut chars = body.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '*' if chars.peek() == Some(&'*') => {
                chars.next();
                if chars.peek() == Some(&'/') {
                    chars.next();
                    re.push_str("(?:.*/)?");
                } else {
                    re.push_str(".*");
                }
            }
            '*' => re.push_str("[^/]*"),
            '?' => re.push_str("[^/]"),
            c => re.push_str(&regex::escape(&c.to_string())),
        }
    }
    re.push('$');
    re
}

impl Exclusions {
    /// Key material left out unless `include_secrets`, then each glob of
    /// `globs` (with the reason `why`, e.g. "--exclude").
    pub fn new(globs: &[(String, String)], include_secrets: bool) -> Result<Self, ChunkError> {
        let mut patterns = Vec::new();
        if !include_secrets {
            for rule in SECRETS {
                patterns.push(Pattern {
                    pattern: rule.pattern.to_owned(),
                    why: format!("secret: {} (--include-secrets keeps it)", rule.stack),
                    matcher: Matcher::Secret(rule.pattern.trim_end_matches('/')),
                    matched: 0,
                });
            }
        }
        for (glob, why) in globs {
            if glob.trim_matches('/').is_empty() {
                return Err(ChunkError::Invalid(format!(
                    "exclude pattern '{glob}' is empty"
                )));
            }
            let re = regex::bytes::Regex::new(&glob_regex(glob))
                .map_err(|e| ChunkError::Invalid(format!("exclude pattern '{glob}': {e}")))?;
            patterns.push(Pattern {
                pattern: glob.clone(),
                why: why.clone(),
                matcher: Matcher::Glob(re),
                matched: 0,
            });
        }
        Ok(Exclusions { patterns })
    }

    /// Whether the entry at `rel` is left out (a directory with everything
    /// under it); counts the match.
    pub fn excludes(&mut self, rel: &[u8]) -> bool {
        for p in &mut self.patterns {
            let hit = match &p.matcher {
                Matcher::Secret(suffix) => ends_with_components(rel, suffix.as_bytes()),
                Matcher::Glob(re) => re.is_match(rel),
            };
            if hit {
                p.matched += 1;
                return true;
            }
        }
        false
    }

    /// The patterns that matched, for the backup's head.
    pub fn report(&self) -> Vec<Excluded> {
        self.patterns
            .iter()
            .filter(|p| p.matched > 0)
            .map(|p| Excluded {
                pattern: p.pattern.clone(),
                why: p.why.clone(),
                matched: p.matched,
            })
            .collect()
    }
}

fn ends_with_components(rel: &[u8], suffix: &[u8]) -> bool {
    rel.ends_with(suffix)
        && (rel.len() == suffix.len() || rel[rel.len() - suffix.len() - 1] == b'/')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn glob(g: &str, path: &str) -> bool {
        regex::bytes::Regex::new(&glob_regex(g))
            .expect("regex")
            .is_match(path.as_bytes())
    }

    #[test]
    fn globs_follow_gitignore_conventions() {
        assert!(glob("*.log", "a.log"));
        assert!(glob("*.log", "x/y/a.log"));
        assert!(!glob("*.log", "a.log/x"));
        assert!(glob("data/*.db", "data/a.db"));
        assert!(!glob("data/*.db", "x/data/a.db"));
        assert!(!glob("data/*.db", "data/sub/a.db"));
        assert!(glob("data/**/a.db", "data/sub/deep/a.db"));
        assert!(glob("data/**/a.db", "data/a.db"));
        assert!(glob("/tmp", "tmp"));
        assert!(glob("a+b(c)", "a+b(c)"), "regex characters are literal");
    }

    #[test]
    fn secrets_are_left_out_unless_asked_and_counted() {
        let mut ex = Exclusions::new(&[("*.tmp".into(), "--exclude".into())], false).expect("ok");
        assert!(ex.excludes(b"config/priv_validator_key.json"));
        assert!(ex.excludes(b"home/config/node_key.json"));
        assert!(ex.excludes(b"keyring-file"));
        assert!(ex.excludes(b"a.tmp"));
        assert!(!ex.excludes(b"config/config.toml"));
        assert!(!ex.excludes(b"xconfig/node_key.json"));
        let report = ex.report();
        assert_eq!(report.len(), 4);
        assert!(report.iter().all(|e| e.matched == 1));
        let mut with = Exclusions::new(&[], true).expect("ok");
        assert!(!with.excludes(b"config/priv_validator_key.json"));
        assert!(Exclusions::new(&[("/".into(), "--exclude".into())], false).is_err());
    }

    proptest! {
        /// `*` never crosses a `/`, and a literal name matches itself at any
        /// depth.
        #[test]
        fn star_stays_in_one_component(
            dirs in proptest::collection::vec("[a-z]{1,6}", 0..4),
            name in "[a-z]{1,6}",
        ) {
            let mut path = dirs.join("/");
            if !path.is_empty() { path.push('/'); }
            path.push_str(&name);
            prop_assert!(glob(&name, &path));
            prop_assert!(glob("*", &path));
            prop_assert_eq!(glob("/*", &path), dirs.is_empty());
        }
    }
}
