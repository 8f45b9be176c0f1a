//! Path rules: a file or directory named by its last path components,
//! with `*` wildcards within a component. Which files are keys or signing
//! state is policy ([`crate::family`]); how a rule matches a path is this
//! module, small enough for the chunk engine to use without the policy.

/// One file or directory, named by its last path components.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// Path components, matched at the end of a relative path. A trailing
    /// `/` means a directory: everything under it matches. `*` in a
    /// component matches any run of characters within it.
    pub pattern: &'static str,
    /// Whose file it is and what it holds, for messages.
    pub stack: &'static str,
}

impl Rule {
    /// Whether `rel` (a path relative to a root, `/`-separated) is this
    /// rule's file, or inside its directory.
    pub fn matches(&self, rel: &[u8]) -> bool {
        if !self.is_dir() {
            return self.names(rel);
        }
        // Some directory above the entry (the directory itself is not
        // content) is the rule's directory.
        rel.iter()
            .enumerate()
            .filter(|(_, &c)| c == b'/')
            .any(|(i, _)| self.names(&rel[..i]))
    }

    /// Whether `rel` is the rule's file or directory itself (its last
    /// components match the pattern): what an exclusion leaves out, with
    /// everything under it. Allocates nothing: a backup asks this of every
    /// entry for every rule.
    pub fn names(&self, rel: &[u8]) -> bool {
        let pattern = self.pattern.as_bytes();
        let pattern = pattern.strip_suffix(b"/").unwrap_or(pattern);
        let mut got = rel.rsplit(|&c| c == b'/');
        pattern
            .rsplit(|&c| c == b'/')
            .all(|want| got.next().is_some_and(|g| wild(want, g)))
    }

    /// Whether the rule names a directory (its pattern ends with `/`).
    pub fn is_dir(&self) -> bool {
        self.pattern.ends_with('/')
    }
}

/// Whether `name` matches the component pattern `pat`, where `*` matches
/// any run of bytes (a component never holds `/`).
pub fn wild(pat: &[u8], name: &[u8]) -> bool {
    let Some(star) = pat.iter().position(|&c| c == b'*') else {
        return pat == name;
    };
    let (head, rest) = (&pat[..star], &pat[star + 1..]);
    if !name.starts_with(head) {
        return false;
    }
    let name = &name[head.len()..];
    // The rest may itself hold stars: try every split point.
    (0..=name.len()).any(|i| wild(rest, &name[i..]))
}
