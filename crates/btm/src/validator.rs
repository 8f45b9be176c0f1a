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

use crate::family;
pub use crate::family::Rule;
use crate::pathrule::wild;

/// Signing state of every family: never rolled back or lowered by default.
pub fn signing_state() -> &'static [&'static Rule] {
    family::signing_state()
}

/// Key material of every family: left out of backups and exports by
/// default.
pub fn secrets() -> &'static [&'static Rule] {
    family::secrets()
}

/// How deep under the volume root a node's home is looked for: the volume
/// may be the home itself, hold several homes, or hold `.lighthouse/mainnet`.
pub const SEARCH_DEPTH: usize = 2;

/// The rule among `rules` that `rel` matches, if any.
pub fn matching(rules: &[&'static Rule], rel: &[u8]) -> Option<&'static Rule> {
    rules.iter().copied().find(|r| r.matches(rel))
}

/// Whether a signing-state rule matches with its home at most
/// [`SEARCH_DEPTH`] below the root (deeper matches are someone else's
/// files, not a node's).
pub fn is_signing_state(rel: &[u8]) -> Option<&'static Rule> {
    let r = matching(signing_state(), rel)?;
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
        for rule in signing_state() {
            let comps: Vec<&str> = rule.pattern.trim_end_matches('/').split('/').collect();
            for path in expand(&tree, home.clone(), &comps)? {
                match tree.kind(&path) {
                    Ok(Some(confined::Kind::File)) if !rule.is_dir() => {
                        found.push((path, rule.stack));
                    }
                    Ok(Some(confined::Kind::Dir)) if rule.is_dir() => {
                        for (name, kind) in tree.list(&path)? {
                            if kind == confined::Kind::File {
                                found.push((path.join(name), rule.stack));
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) if skippable(&e) => {}
                    Err(e) => return Err(e),
                }
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

/// The paths under `base` whose components match `comps` (a component
/// with `*` is matched against the listing of its directory). Missing
/// directories, symlinks and non-directories on the way match nothing.
fn expand(tree: &Tree, base: PathBuf, comps: &[&str]) -> Result<Vec<PathBuf>, confined::Error> {
    let Some((first, rest)) = comps.split_first() else {
        return Ok(vec![base]);
    };
    let names: Vec<PathBuf> = if first.contains('*') {
        let listed = match tree.list(&base) {
            Ok(l) => l,
            Err(e) if skippable(&e) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        listed
            .into_iter()
            .filter(|(name, _)| wild(first.as_bytes(), name.as_encoded_bytes()))
            .map(|(name, _)| base.join(name))
            .collect()
    } else {
        vec![base.join(first)]
    };
    let mut out = Vec::new();
    for n in names {
        out.extend(expand(tree, n, rest)?);
    }
    Ok(out)
}

/// Errors that mean "not a node's file here": absent, or a symlink or a
/// non-directory on the way.
fn skippable(e: &confined::Error) -> bool {
    e.is_not_found()
        || matches!(
            e,
            confined::Error::Symlink { .. } | confined::Error::NotDir { .. }
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rules_match_files_and_directory_contents() {
        let state = signing_state()[0];
        assert!(state.matches(b"data/priv_validator_state.json"));
        assert!(state.matches(b"node1/data/priv_validator_state.json"));
        assert!(!state.matches(b"data/priv_validator_state.json.bak"));
        assert!(!state.matches(b"xdata/priv_validator_state.json"));
        let teku = signing_state()
            .iter()
            .find(|r| r.stack.starts_with("Teku"))
            .expect("teku");
        assert!(teku.matches(b"teku/validator/slashprotection/0xabc.yml"));
        assert!(!teku.matches(b"teku/validator/slashprotection"));
        let keystore = secrets()
            .iter()
            .find(|r| r.pattern == "keystore/")
            .expect("ks");
        assert!(keystore.matches(b"geth/keystore/UTC--2024"));
        assert!(keystore.matches(b"keystore/a/b"));
        assert!(!keystore.matches(b"keystores.txt"));
        assert_eq!(
            matching(secrets(), b"home/config/node_key.json").map(|r| r.stack),
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

    #[test]
    fn signing_state_is_found_through_wildcards_and_not_through_symlinks() {
        let dir = tempfile::tempdir().expect("tmp");
        let root = dir.path();
        let mk = |rel: &str| {
            let p = root.join(rel);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, b"x").expect("write");
        };
        mk("ledger/tower-1_9-Abc.bin");
        mk("ledger/tower-1_9-Abc.bin.tmp");
        mk("kms/state/cosmoshub-4-consensus.json");
        mk("node/data/priv_validator_state.json");
        mk("a/b/c/data/priv_validator_state.json");
        std::os::unix::fs::symlink(root.join("node"), root.join("link")).expect("symlink");
        let found: Vec<String> = find_signing_state(root)
            .expect("find")
            .iter()
            .map(|f| f.path.as_path().display().to_string())
            .collect();
        assert_eq!(
            found,
            [
                "kms/state/cosmoshub-4-consensus.json",
                "ledger/tower-1_9-Abc.bin",
                "node/data/priv_validator_state.json"
            ]
        );
    }

    proptest! {
        /// A rule matches a path exactly when the path ends with the
        /// pattern's components (files), or passes through them (dirs).
        #[test]
        fn matching_is_by_whole_components(
            prefix in proptest::collection::vec("[a-z_.]{1,8}", 0..4),
            suffix in proptest::collection::vec("[a-z_.]{1,8}", 0..3),
            rule in 0..secrets().len(),
        ) {
            let rule = secrets()[rule];
            // Wildcard components are tested in `family`.
            prop_assume!(!rule.pattern.contains('*'));
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
