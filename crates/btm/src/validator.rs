//! What btm knows about validator stacks: which files hold signing state
//! (rolled back, they make a validator double-sign and be slashed) and which
//! hold keys (uploaded, they leak). Rollback and restore keep signing state
//! by default; backups and exports leave keys out by default. The lists and
//! their sources are in `docs/validators.md`.
//!
//! Matching is pure: a path relative to the volume or backup root either
//! matches a rule or not. Finding signing state in a live volume is the
//! only part that reads the disk ([`find_signing_state`]).

use std::path::{Path, PathBuf};

use crate::confined::{self, Tree};
use crate::preserve::RelPath;

/// One known file or directory of a validator stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// Path components, matched at the end of a relative path. A trailing
    /// `/` means a directory: everything under it matches.
    pub pattern: &'static str,
    /// The stack it belongs to, for messages.
    pub stack: &'static str,
}

/// Signing state: never rolled back or lowered by default.
pub const SIGNING_STATE: &[Rule] = &[
    Rule {
        pattern: "data/priv_validator_state.json",
        stack: "CometBFT/Tendermint",
    },
    Rule {
        pattern: "validators/slashing_protection.sqlite",
        stack: "Lighthouse",
    },
    Rule {
        pattern: "validators/slashing_protection.sqlite3",
        stack: "Nimbus",
    },
    Rule {
        pattern: "validator.db",
        stack: "Prysm",
    },
    Rule {
        pattern: "validator/slashprotection/",
        stack: "Teku",
    },
];

/// Key material: left out of backups and exports by default.
pub const SECRETS: &[Rule] = &[
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
        pattern: "keyring-test/",
        stack: "Cosmos SDK keyring",
    },
    Rule {
        pattern: "keystore/",
        stack: "Ethereum keystore",
    },
    Rule {
        pattern: "validator_keys/",
        stack: "Ethereum validator keystores",
    },
    Rule {
        pattern: "voting-keystore.json",
        stack: "Lighthouse validator keystore",
    },
    Rule {
        pattern: "secrets/",
        stack: "validator keystore passwords (Lighthouse, Nimbus)",
    },
    Rule {
        pattern: "direct/accounts/",
        stack: "Prysm validator keystore",
    },
];

/// How deep under the volume root a node's home is looked for: the volume
/// may be the home itself, hold several homes, or hold `.lighthouse/mainnet`.
pub const SEARCH_DEPTH: usize = 2;

impl Rule {
    /// Whether `rel` (a path relative to a root, `/`-separated) is this
    /// rule's file, or inside its directory.
    pub fn matches(&self, rel: &[u8]) -> bool {
        let pattern = self.pattern.as_bytes();
        let (pattern, dir) = match pattern.strip_suffix(b"/") {
            Some(p) => (p, true),
            None => (pattern, false),
        };
        let comps: Vec<&[u8]> = rel.split(|&c| c == b'/').collect();
        let want: Vec<&[u8]> = pattern.split(|&c| c == b'/').collect();
        if dir {
            // Any window of components equal to the pattern, followed by at
            // least one more (the directory itself is not content).
            comps
                .windows(want.len())
                .enumerate()
                .any(|(i, w)| w == want.as_slice() && i + want.len() < comps.len())
        } else {
            comps.ends_with(&want)
        }
    }
}

/// The rule among `rules` that `rel` matches, if any.
pub fn matching<'r>(rules: &'r [Rule], rel: &[u8]) -> Option<&'r Rule> {
    rules.iter().find(|r| r.matches(rel))
}

/// Whether a signing-state rule matches with its home at most
/// [`SEARCH_DEPTH`] below the root (deeper matches are someone else's
/// files, not a node's).
pub fn is_signing_state(rel: &[u8]) -> Option<&'static Rule> {
    let r = matching(SIGNING_STATE, rel)?;
    // Components beyond those the rule names are the home's. A directory
    // rule ("a/b/") splits into one more: the file inside it.
    let comps = rel.split(|&c| c == b'/').count();
    let named = r.pattern.split('/').count();
    (comps <= named + SEARCH_DEPTH).then_some(r)
}

/// A signing-state file found in a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Relative to the volume root.
    pub path: RelPath,
    /// The stack it belongs to.
    pub stack: &'static str,
}

/// Find the signing-state files of every stack under `root`, looking in the
/// root and directories up to [`SEARCH_DEPTH`] below it, without following
/// symlinks (a link is not the volume's own file). Sorted by path.
pub fn find_signing_state(root: &Path) -> Result<Vec<Found>, confined::Error> {
    let tree = Tree::open(root)?;
    let mut homes: Vec<PathBuf> = vec![PathBuf::new()];
    let mut level = vec![PathBuf::new()];
    for _ in 0..SEARCH_DEPTH {
        let mut next = Vec::new();
        for dir in &level {
            for (name, kind) in tree.list(dir)? {
                if kind == confined::Kind::Dir {
                    next.push(dir.join(name));
                }
            }
        }
        homes.extend(next.iter().cloned());
        level = next;
    }
    let mut found = Vec::new();
    for home in &homes {
        for rule in SIGNING_STATE {
            let path = home.join(rule.pattern.trim_end_matches('/'));
            match tree.kind(&path) {
                Ok(Some(confined::Kind::File)) if !rule.pattern.ends_with('/') => {
                    found.push((path, rule.stack));
                }
                Ok(Some(confined::Kind::Dir)) if rule.pattern.ends_with('/') => {
                    for (name, kind) in tree.list(&path)? {
                        if kind == confined::Kind::File {
                            found.push((path.join(name), rule.stack));
                        }
                    }
                }
                Ok(_) => {}
                Err(e) if e.is_not_found() => {}
                // A symlink or non-directory on the way: not a node's file.
                Err(confined::Error::Symlink { .. } | confined::Error::NotDir { .. }) => {}
                Err(e) => return Err(e),
            }
        }
    }
    found.sort();
    found.dedup();
    Ok(found
        .into_iter()
        .filter_map(|(p, stack)| {
            let path: RelPath = p.to_str()?.parse().ok()?;
            Some(Found { path, stack })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rules_match_files_and_directory_contents() {
        let state = &SIGNING_STATE[0];
        assert!(state.matches(b"data/priv_validator_state.json"));
        assert!(state.matches(b"node1/data/priv_validator_state.json"));
        assert!(!state.matches(b"data/priv_validator_state.json.bak"));
        assert!(!state.matches(b"xdata/priv_validator_state.json"));
        let teku = SIGNING_STATE
            .iter()
            .find(|r| r.stack == "Teku")
            .expect("teku");
        assert!(teku.matches(b"teku/validator/slashprotection/0xabc.yml"));
        assert!(!teku.matches(b"teku/validator/slashprotection"));
        let keystore = SECRETS
            .iter()
            .find(|r| r.pattern == "keystore/")
            .expect("ks");
        assert!(keystore.matches(b"geth/keystore/UTC--2024"));
        assert!(keystore.matches(b"keystore/a/b"));
        assert!(!keystore.matches(b"keystores.txt"));
        assert_eq!(
            matching(SECRETS, b"home/config/node_key.json").map(|r| r.stack),
            Some("CometBFT node key")
        );
    }

    #[test]
    fn signing_state_is_looked_for_near_the_root_only() {
        assert!(is_signing_state(b"data/priv_validator_state.json").is_some());
        assert!(is_signing_state(b"a/b/data/priv_validator_state.json").is_some());
        assert!(is_signing_state(b"a/b/c/data/priv_validator_state.json").is_none());
        assert!(
            is_signing_state(b".lighthouse/mainnet/validators/slashing_protection.sqlite")
                .is_some()
        );
    }

    proptest! {
        /// A rule matches a path exactly when the path ends with the
        /// pattern's components (files), or passes through them (dirs).
        #[test]
        fn matching_is_by_whole_components(
            prefix in proptest::collection::vec("[a-z_.]{1,8}", 0..4),
            suffix in proptest::collection::vec("[a-z_.]{1,8}", 0..3),
            rule in 0..SECRETS.len(),
        ) {
            let rule = SECRETS[rule];
            let pat = rule.pattern.trim_end_matches('/');
            let mut comps: Vec<String> = prefix.clone();
            comps.extend(pat.split('/').map(str::to_owned));
            comps.extend(suffix.clone());
            let rel = comps.join("/");
            let dir = rule.pattern.ends_with('/');
            prop_assert_eq!(rule.matches(rel.as_bytes()), !dir && suffix.is_empty() || dir && !suffix.is_empty());
            // Glued to a neighbour, a component no longer matches.
            let glued = format!("{}x", rel);
            if suffix.is_empty() && !dir {
                prop_assert!(!rule.matches(glued.as_bytes()));
            }
        }
    }
}
