//! The node policy the chunk engine is given: which files are key
//! material and which are signing state, from [`btm::validator`]. The
//! engine protects what it is told; this is where the daemon and the CLI
//! tell it.

use btm_chunk::Policy;

/// Every node family's key material and signing state.
pub fn node_policy() -> Policy {
    Policy {
        secrets: btm::validator::secrets(),
        signing_state: |rel| btm::validator::is_signing_state(rel).is_some(),
    }
}
