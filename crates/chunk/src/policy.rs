//! What the engine protects, as its caller says. The engine knows how to
//! leave files out of a backup and how to keep local files through a
//! restore; which files those are (a validator's keys, its signing state)
//! is node policy, and it comes in from the daemon and the CLI
//! (`btm_daemon::node_policy`), never looked up here.

use btm::pathrule::Rule;

/// The files a backup leaves out and a restore keeps.
#[derive(Clone, Copy)]
pub struct Policy {
    /// Key material: left out of every backup unless the backup asks to
    /// include it, and never removed by `restore --delete`.
    pub secrets: &'static [&'static Rule],
    /// Whether a relative path is signing state: a restore never replaces
    /// or removes a local copy unless told to.
    pub signing_state: fn(&[u8]) -> bool,
}

impl Policy {
    /// Nothing protected: for data that is no node's (tests, tools).
    pub const NONE: Policy = Policy {
        secrets: &[],
        signing_state: |_| false,
    };

    /// Whether `rel` is signing state.
    pub fn is_signing_state(&self, rel: &[u8]) -> bool {
        (self.signing_state)(rel)
    }
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("secrets", &self.secrets.len())
            .finish_non_exhaustive()
    }
}
