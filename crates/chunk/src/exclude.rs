//! What a backup leaves out on purpose: key material by default (the
//! caller's [`crate::Policy::secrets`]: every node family's key files when
//! the daemon or the CLI calls), and the operator's `--exclude` globs.
//! Each backup's head records every pattern it applied, why, and how many
//! entries it matched, so `btm backups show` can say what a restore will
//! lack, and `restore --delete` knows what lies outside the backup's scope
//! and must be left alone ([`Exclusions::outside_backup`]).

use std::collections::HashMap;

use super::format::head::Excluded;
use super::ChunkError;
use btm::pathrule::Rule;

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
    /// Key material: the path is the rule's file or directory.
    Secret(&'static Rule),
    /// An operator's glob, as a regular expression over the relative path.
    Glob(regex::bytes::Regex),
}

/// The exclusions of one backup.
///
/// Every entry of a backup is checked, against some forty key-material
/// rules, so the rules are indexed by the name they end with: an entry
/// costs one lookup of its own name, plus the few rules whose last
/// component has a wildcard and the operator's globs.
#[derive(Debug)]
pub struct Exclusions {
    patterns: Vec<Pattern>,
    /// Secret rules by their literal last component: indexes into
    /// `patterns`, ascending.
    by_name: HashMap<&'static [u8], Vec<usize>>,
    /// Every other pattern: indexes into `patterns`, ascending.
    scan: Vec<usize>,
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
    /// The key-material rules `secrets` (empty to include key material),
    /// then each glob of `globs` (with the reason `why`, e.g. "--exclude").
    pub fn new(
        secrets: &'static [&'static Rule],
        globs: &[(String, String)],
    ) -> Result<Self, ChunkError> {
        let mut patterns = Vec::new();
        {
            for rule in secrets {
                patterns.push(Pattern {
                    pattern: rule.pattern.to_owned(),
                    why: format!("secret: {} (--include-secrets keeps it)", rule.stack),
                    matcher: Matcher::Secret(rule),
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
        Ok(Exclusions::indexed(patterns))
    }

    fn indexed(patterns: Vec<Pattern>) -> Self {
        let mut by_name: HashMap<&'static [u8], Vec<usize>> = HashMap::new();
        let mut scan = Vec::new();
        for (i, p) in patterns.iter().enumerate() {
            let literal_name = match &p.matcher {
                Matcher::Secret(rule) => rule
                    .pattern
                    .trim_end_matches('/')
                    .rsplit('/')
                    .next()
                    .filter(|n| !n.contains('*')),
                Matcher::Glob(_) => None,
            };
            match literal_name {
                Some(n) => by_name.entry(n.as_bytes()).or_default().push(i),
                None => scan.push(i),
            }
        }
        Exclusions {
            patterns,
            by_name,
            scan,
        }
    }

    /// What a backup recorded as left out (its head's `excluded`), and key
    /// material always, whatever the backup recorded: the entries a
    /// `restore --delete` must never remove, because the backup never
    /// meant to hold them. (A backup made with `--include-secrets` holds
    /// its keys; a local key it does not hold is still no stray file.)
    pub fn outside_backup(
        secrets: &'static [&'static Rule],
        recorded: &[Excluded],
    ) -> Result<Self, ChunkError> {
        let mut patterns = Exclusions::new(secrets, &[])?.patterns;
        let globs: Vec<(String, String)> = recorded
            .iter()
            .filter(|x| !secrets.iter().any(|r| r.pattern == x.pattern))
            .map(|x| (x.pattern.clone(), x.why.clone()))
            .collect();
        patterns.extend(Exclusions::new(&[], &globs)?.patterns);
        Ok(Exclusions::indexed(patterns))
    }

    /// Whether the entry at `rel` is left out (a directory with everything
    /// under it); counts the match.
    pub fn excludes(&mut self, rel: &[u8]) -> bool {
        self.reason(rel).is_some()
    }

    /// Why the entry at `rel` is left out, if it is; counts the match.
    /// The first pattern in order that matches is the reason.
    pub fn reason(&mut self, rel: &[u8]) -> Option<&str> {
        let hits = |i: &usize| match &self.patterns[*i].matcher {
            Matcher::Secret(rule) => rule.names(rel),
            Matcher::Glob(re) => re.is_match(rel),
        };
        let name = rel.rsplit(|&c| c == b'/').next().unwrap_or(rel);
        let named = self
            .by_name
            .get(name)
            .and_then(|ix| ix.iter().find(|i| hits(i)))
            .copied();
        // A pattern to scan wins only if it comes first.
        let scanned = self
            .scan
            .iter()
            .take_while(|i| named.is_none_or(|n| **i < n))
            .find(|i| hits(i))
            .copied();
        let p = &mut self.patterns[scanned.or(named)?];
        p.matched += 1;
        Some(&p.why)
    }

    /// Every pattern applied, with what it matched, for the backup's head:
    /// those that matched nothing say what a later restore must still
    /// leave alone.
    pub fn report(&self) -> Vec<Excluded> {
        self.patterns
            .iter()
            .map(|p| Excluded {
                pattern: p.pattern.clone(),
                why: p.why.clone(),
                matched: p.matched,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Key rules as a node policy gives them (the real list is the one
    /// the daemon hands in; this crate never reaches for it).
    fn secrets() -> &'static [&'static Rule] {
        const RULES: [Rule; 9] = [
            Rule {
                pattern: "config/priv_validator_key.json",
                stack: "CometBFT validator key",
            },
            Rule {
                pattern: "config/node_key.json",
                stack: "CometBFT node key",
            },
            Rule {
                pattern: "keyring-file/",
                stack: "Cosmos SDK keyring",
            },
            Rule {
                pattern: "keystore/",
                stack: "Ethereum keystore",
            },
            Rule {
                pattern: "nodekey",
                stack: "geth node key",
            },
            Rule {
                pattern: "wallets/",
                stack: "Bitcoin Core wallets",
            },
            Rule {
                pattern: "*.key",
                stack: "key files",
            },
            Rule {
                pattern: "validators/*/keystore.json",
                stack: "consensus keystores",
            },
            Rule {
                pattern: "x/keystore",
                stack: "nested keystore",
            },
        ];
        static REFS: [&Rule; 9] = [
            &RULES[0], &RULES[1], &RULES[2], &RULES[3], &RULES[4], &RULES[5], &RULES[6], &RULES[7],
            &RULES[8],
        ];
        &REFS
    }
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
        let mut ex =
            Exclusions::new(secrets(), &[("*.tmp".into(), "--exclude".into())]).expect("ok");
        assert!(ex.excludes(b"config/priv_validator_key.json"));
        assert!(ex.excludes(b"home/config/node_key.json"));
        assert!(ex.excludes(b"keyring-file"));
        assert!(ex.excludes(b"a.tmp"));
        assert!(!ex.excludes(b"config/config.toml"));
        assert!(!ex.excludes(b"xconfig/node_key.json"));
        let report = ex.report();
        assert_eq!(report.len(), secrets().len() + 1, "every pattern applied");
        assert_eq!(report.iter().filter(|e| e.matched == 1).count(), 4);
        assert_eq!(report.iter().map(|e| e.matched).sum::<u64>(), 4);
        let mut with = Exclusions::new(&[], &[]).expect("ok");
        assert!(!with.excludes(b"config/priv_validator_key.json"));
        assert!(Exclusions::new(secrets(), &[("/".into(), "--exclude".into())]).is_err());
    }

    #[test]
    fn what_a_backup_left_out_and_keys_are_outside_its_scope() {
        let recorded = [
            Excluded {
                pattern: "*.log".into(),
                why: "--exclude".into(),
                matched: 0,
            },
            Excluded {
                pattern: "config/node_key.json".into(),
                why: "secret: CometBFT node key (--include-secrets keeps it)".into(),
                matched: 1,
            },
        ];
        let mut scope = Exclusions::outside_backup(secrets(), &recorded).expect("scope");
        assert_eq!(scope.reason(b"data/app.log"), Some("--exclude"));
        assert!(scope
            .reason(b"config/priv_validator_key.json")
            .is_some_and(|w| w.starts_with("secret: ")));
        assert!(scope.excludes(b"x/keystore"));
        assert_eq!(scope.reason(b"data/blockstore.db"), None);
        // Nothing recorded (an old head, or --include-secrets): keys still.
        let mut bare = Exclusions::outside_backup(secrets(), &[]).expect("scope");
        assert!(bare.excludes(b"config/node_key.json"));
        assert!(!bare.excludes(b"data/app.log"));
        let broken = [Excluded {
            pattern: "/".into(),
            why: "--exclude".into(),
            matched: 0,
        }];
        assert!(Exclusions::outside_backup(secrets(), &broken).is_err());
    }

    proptest! {
        /// The index changes nothing: the reason is the first pattern in
        /// order that matches, as a plain scan finds it.
        #[test]
        fn the_index_finds_what_a_scan_finds(
            comps in proptest::collection::vec(
                "(a|keystore|nodekey|x\\.key|wallets|config|node_key\\.json|b\\.log|tower-1\\.bin)",
                1..5,
            ),
        ) {
            let globs = [("*.log".to_owned(), "--exclude".to_owned()), ("config/**".to_owned(), "--exclude".to_owned())];
            let mut ex = Exclusions::new(secrets(), &globs).expect("ok");
            let rel = comps.join("/");
            let scan = ex.patterns.iter().position(|p| match &p.matcher {
                Matcher::Secret(rule) => rule.names(rel.as_bytes()),
                Matcher::Glob(re) => re.is_match(rel.as_bytes()),
            });
            let want = scan.map(|i| ex.patterns[i].why.clone());
            prop_assert_eq!(ex.reason(rel.as_bytes()).map(str::to_owned), want);
        }

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
