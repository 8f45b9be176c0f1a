//! This machine's name, as btm writes it into store markers, backup
//! metadata and default tags: the host name reduced to characters that are
//! safe in a marker or tag name.

/// The host name, reduced to marker-safe characters (`[A-Za-z0-9.-]`,
/// anything else `_`); `localhost` when it cannot be read.
pub fn name() -> String {
    let raw = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    let clean: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.is_empty() {
        "localhost".into()
    } else {
        clean
    }
}
