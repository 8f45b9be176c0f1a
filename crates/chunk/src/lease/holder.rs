//! Who holds a lease, and when a judge may call its holder gone before the
//! lease expires.
//!
//! Expiry by the store's clock is the only rule that works between
//! machines. A judge on the holder's own machine could often know sooner,
//! and a sweep that waits ten minutes for a backup killed a second ago is
//! an operator's annoyance. But "same host name, PID absent" is not proof:
//! host names repeat (cloned VMs, containers given the same `--hostname`),
//! and a PID means nothing outside its PID namespace, so a GC run in a
//! container or under `unshare -p` used to find every backup of the host
//! "dead" and delete packs a running backup relied on.
//!
//! So a holder records three facts in its lease ([`Identity`]): the
//! kernel's boot id, its PID namespace and its own start time. A judge
//! calls it gone only when the first two are the judge's own, the judge's
//! `/proc` shows its own PID namespace, and the PID is absent or now
//! belongs to a process started at another time ([`judge`]). Anything it
//! cannot prove leaves the lease live until its refreshes stop.

use serde::{Deserialize, Serialize};

/// What a lease says about the process holding it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// `/proc/sys/kernel/random/boot_id` of the holder's machine: the same
    /// string only on the same machine, in the same boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// The inode of the holder's PID namespace (`/proc/self/ns/pid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_ns: Option<u64>,
    /// The holder's start time, in clock ticks after boot (field 22 of
    /// `/proc/<pid>/stat`): a reused PID has another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<u64>,
}

/// The judge's own view: its identity, and whether its `/proc` lists the
/// processes of its own PID namespace (it does not under `unshare -p`
/// without a fresh `/proc`, where a PID found there is another one).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Here {
    /// This process, as a lease it takes records it.
    pub identity: Identity,
    /// Whether `/proc/<pid>` names processes of our PID namespace.
    pub proc_is_ours: bool,
}

/// What `/proc` says about a PID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// No such process.
    Absent,
    /// A process started at this time (clock ticks after boot).
    Started(u64),
    /// Could not be read.
    Unknown,
}

/// A judge's conclusion about a lease's holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// Proven alive: the same process is still there.
    Running,
    /// Proven gone, and why.
    Gone(&'static str),
    /// Nothing can be proven; the lease stands until it expires. Why.
    Unprovable(&'static str),
}

/// Judge the holder `pid` with `identity`, from `here`, asking `probe` what
/// `/proc` says of a PID. Pure: `Gone` only with the proof the module
/// documentation describes.
pub fn judge(pid: u32, identity: &Identity, here: &Here, probe: impl Fn(u32) -> Probe) -> Holder {
    let (Some(boot), Some(ns), Some(started)) =
        (&identity.boot_id, identity.pid_ns, identity.start_time)
    else {
        return Holder::Unprovable("its lease does not record its boot and PID namespace");
    };
    if here.identity.boot_id.as_ref() != Some(boot) {
        return Holder::Unprovable("it ran on another machine, or in another boot");
    }
    if here.identity.pid_ns != Some(ns) {
        return Holder::Unprovable("it ran in another PID namespace");
    }
    if !here.proc_is_ours {
        return Holder::Unprovable("this process's /proc is not its PID namespace's");
    }
    match probe(pid) {
        Probe::Absent => Holder::Gone("its process no longer exists"),
        Probe::Started(t) if t != started => Holder::Gone("its PID belongs to a later process"),
        Probe::Started(_) => Holder::Running,
        Probe::Unknown => Holder::Unprovable("its process could not be looked up"),
    }
}

/// The start time (field 22) in the text of `/proc/<pid>/stat`. The
/// command name (field 2) is in parentheses and may hold spaces and
/// parentheses itself, so fields are counted after the last `)`.
pub fn parse_start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // Field 3 (state) is the first after the name; 22 is the 20th.
    rest.split_ascii_whitespace().nth(19)?.parse().ok()
}

/// What `/proc` says of `pid` now.
pub fn probe(pid: u32) -> Probe {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => parse_start_time(&s).map_or(Probe::Unknown, Probe::Started),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Probe::Absent,
        Err(_) => Probe::Unknown,
    }
}

/// Whether `/proc/self/status` (`status`) of process `pid` says that this
/// `/proc` is the process's own PID namespace's. Its `NSpid` line lists the
/// PID in every namespace from `/proc`'s down to the process's own: one
/// entry, our own PID, only when they are the same.
pub fn proc_shows_own_namespace(status: &str, pid: u32) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .is_some_and(|ids| {
            let ids: Vec<&str> = ids.split_ascii_whitespace().collect();
            ids.len() == 1 && ids[0].parse() == Ok(pid)
        })
}

fn pid_ns_of(path: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// This process's view, read from `/proc` once.
pub fn here() -> &'static Here {
    static HERE: std::sync::OnceLock<Here> = std::sync::OnceLock::new();
    HERE.get_or_init(|| {
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty());
        let pid_ns = pid_ns_of("/proc/self/ns/pid");
        let me = std::process::id();
        let start_time = match probe(me) {
            Probe::Started(t) => Some(t),
            _ => None,
        };
        let proc_is_ours = std::fs::read_to_string("/proc/self/status")
            .is_ok_and(|status| proc_shows_own_namespace(&status, me));
        Here {
            identity: Identity {
                boot_id,
                pid_ns,
                start_time,
            },
            proc_is_ours,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn identity(boot: &str, ns: u64, start: u64) -> Identity {
        Identity {
            boot_id: Some(boot.into()),
            pid_ns: Some(ns),
            start_time: Some(start),
        }
    }

    #[test]
    fn the_start_time_is_counted_after_the_command_name() {
        let stat = "4242 (a (weird) name) S 1 4242 4242 0 -1 4194560 120 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_start_time(stat), Some(987_654));
        assert_eq!(parse_start_time("1 (x) S 0"), None);
        assert_eq!(parse_start_time("garbage"), None);
    }

    #[test]
    fn proc_is_ours_only_when_nspid_has_one_entry_and_it_is_us() {
        let status = |ns: &str| format!("Name:\tbtm\nPid:\t42\nNSpid:\t{ns}\nVmRSS:\t1 kB\n");
        assert!(proc_shows_own_namespace(&status("42"), 42));
        // /proc of the parent namespace (unshare -p without a new /proc).
        assert!(!proc_shows_own_namespace(&status("14570\t42"), 42));
        assert!(!proc_shows_own_namespace(&status("43"), 42));
        assert!(!proc_shows_own_namespace("Name:\tbtm\n", 42));
    }

    #[test]
    fn this_process_can_judge_itself() {
        let h = here();
        assert!(h.identity.boot_id.is_some() && h.identity.pid_ns.is_some());
        let me = std::process::id();
        // The test runner's own /proc is its namespace's.
        assert!(h.proc_is_ours);
        assert_eq!(judge(me, &h.identity, h, probe), Holder::Running);
        let mut reused = h.identity.clone();
        reused.start_time = reused.start_time.map(|t| t + 1);
        assert!(matches!(judge(me, &reused, h, probe), Holder::Gone(_)));
    }

    #[test]
    fn a_pid_of_another_namespace_or_machine_proves_nothing() {
        let here = Here {
            identity: identity("b", 7, 100),
            proc_is_ours: true,
        };
        let absent = |_| Probe::Absent;
        assert!(matches!(
            judge(5, &identity("b", 8, 1), &here, absent),
            Holder::Unprovable(_)
        ));
        assert!(matches!(
            judge(5, &identity("other", 7, 1), &here, absent),
            Holder::Unprovable(_)
        ));
        assert!(matches!(
            judge(5, &Identity::default(), &here, absent),
            Holder::Unprovable(_)
        ));
        let foreign_proc = Here {
            proc_is_ours: false,
            ..here.clone()
        };
        assert!(matches!(
            judge(5, &identity("b", 7, 1), &foreign_proc, absent),
            Holder::Unprovable(_)
        ));
        assert!(matches!(
            judge(5, &identity("b", 7, 1), &here, absent),
            Holder::Gone(_)
        ));
    }

    proptest! {
        /// A holder is gone only if the judge shares its boot and PID
        /// namespace, sees its namespace's /proc, and the PID is absent or
        /// started at another time; running only if it started then.
        #[test]
        fn gone_only_with_proof(
            boots in (0u8..3, 0u8..3),
            nss in (0u64..3, 0u64..3),
            starts in (0u64..3, 0u64..3),
            ours: bool,
            probe in prop_oneof![
                Just(Probe::Absent),
                Just(Probe::Unknown),
                (0u64..3).prop_map(Probe::Started),
            ],
            recorded: bool,
        ) {
            let holder = if recorded {
                identity(&boots.0.to_string(), nss.0, starts.0)
            } else {
                Identity::default()
            };
            let here = Here {
                identity: identity(&boots.1.to_string(), nss.1, starts.1),
                proc_is_ours: ours,
            };
            let verdict = judge(9, &holder, &here, |_| probe);
            let provable = recorded && boots.0 == boots.1 && nss.0 == nss.1 && ours;
            match verdict {
                Holder::Gone(_) => prop_assert!(
                    provable && (probe == Probe::Absent
                        || matches!(probe, Probe::Started(t) if t != starts.0))
                ),
                Holder::Running => prop_assert!(provable && probe == Probe::Started(starts.0)),
                Holder::Unprovable(_) => prop_assert!(!provable || probe == Probe::Unknown),
            }
        }
    }
}
