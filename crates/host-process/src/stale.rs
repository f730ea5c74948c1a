//! Runtime directories left behind by a vmcp that was killed.
//!
//! A runtime directory is removed when its [`crate::RuntimeDir`] is dropped, but a SIGKILLed
//! vmcp runs no destructor (its children die through the watchdog and the parent-death signal;
//! the directory stays). So each runtime directory holds an `owner` file with the creating
//! process's pid and start time, and creating one first removes sibling directories whose
//! owner is gone. The start time guards
//! against pid reuse; directories of other users, or without a readable owner file, are never
//! touched.

use std::path::Path;

/// Name of the owner file inside a runtime directory.
pub const OWNER_FILE: &str = "owner";
/// Prefix of runtime directory names.
pub const DIR_PREFIX: &str = "vmcp-";

/// Contents of the owner file for process `pid` started at `start`.
pub fn owner_line(pid: u32, start: u64) -> String {
    format!("{pid} {start}\n")
}

/// Parses an owner file.
pub fn parse_owner(text: &str) -> Option<(u32, u64)> {
    let mut it = text.split_whitespace();
    let pid = it.next()?.parse().ok()?;
    let start = it.next()?.parse().ok()?;
    it.next().is_none().then_some((pid, start))
}

/// Removes runtime directories in `base` whose owner process is gone. `is_mine` says whether
/// a directory belongs to this user; `start_time(pid)` gives a live process's start time.
/// Returns the removed directories.
pub fn sweep(
    base: &Path,
    is_mine: impl Fn(&Path) -> bool,
    start_time: impl Fn(u32) -> Option<u64>,
) -> Vec<std::path::PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(base) else {
        return removed;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let named_like_ours = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(DIR_PREFIX));
        if !named_like_ours || !is_mine(&path) {
            continue;
        }
        let Some((pid, start)) = std::fs::read_to_string(path.join(OWNER_FILE))
            .ok()
            .as_deref()
            .and_then(parse_owner)
        else {
            continue;
        };
        if start_time(pid) == Some(start) {
            continue; // owner alive
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => {
                tracing::info!(dir = %path.display(), pid, "removed a stale VM runtime directory");
                removed.push(path);
            }
            Err(e) => {
                tracing::warn!(dir = %path.display(), error = %e, "cannot remove a stale VM runtime directory")
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_round_trip() {
        assert_eq!(parse_owner(&owner_line(42, 7)), Some((42, 7)));
        assert_eq!(parse_owner("42"), None);
        assert_eq!(parse_owner("42 7 9"), None);
        assert_eq!(parse_owner("x 7"), None);
        assert_eq!(parse_owner(""), None);
    }

    #[test]
    fn sweeps_only_dead_owned_dirs() {
        let base = tempfile::tempdir().unwrap();
        let mk = |name: &str, owner: Option<&str>| {
            let d = base.path().join(name);
            std::fs::create_dir(&d).unwrap();
            std::fs::write(d.join("console.log"), b"x").unwrap();
            if let Some(o) = owner {
                std::fs::write(d.join(OWNER_FILE), o).unwrap();
            }
            d
        };
        let dead = mk("vmcp-dead-1", Some("100 5\n"));
        let reused = mk("vmcp-reused-1", Some("200 5\n"));
        let alive = mk("vmcp-alive-1", Some("300 5\n"));
        let no_owner = mk("vmcp-noowner-1", None);
        let garbage = mk("vmcp-garbage-1", Some("junk"));
        let foreign = mk("other-1", Some("100 5\n"));
        let not_mine = mk("vmcp-notmine-1", Some("100 5\n"));
        std::fs::write(base.path().join("vmcp-file"), b"").unwrap();
        let removed = sweep(
            base.path(),
            |p| !p.ends_with("vmcp-notmine-1"),
            |pid| match pid {
                200 => Some(6),
                300 => Some(5),
                _ => None,
            },
        );
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert!(!dead.exists() && !reused.exists());
        for kept in [&alive, &no_owner, &garbage, &foreign, &not_mine] {
            assert!(kept.exists(), "{}", kept.display());
        }
        assert!(sweep(Path::new("/nonexistent"), |_| true, |_| None).is_empty());
    }
}
