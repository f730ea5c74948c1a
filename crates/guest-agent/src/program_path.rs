//! Finding a program in `PATH` before it is spawned.
//!
//! Why the agent does this itself: Rust's `Command` starts a process with `posix_spawn`
//! (musl: `clone(CLONE_VM | CLONE_VFORK)`, no copy of the agent's address space) only when it
//! need not search a `PATH` of the child's own environment. A request that runs `true` with
//! the agent's `PATH` therefore went through `fork` and `execvp`: the whole multi-threaded
//! agent's page tables copied, copy-on-write faults in the agent afterwards, one failed
//! `execve` per `PATH` entry before the right one. Under TCG, the first exec after a snapshot
//! restore runs every one of those kernel paths untranslated; spawning the resolved path
//! skips them (issue 12: `vmcp run -- true` from a snapshot).
//!
//! The search follows `execvp`: entries in order, an empty entry is the working directory,
//! relative entries are relative to the child's working directory, the first executable
//! regular file wins. If a file of that name exists but none is executable, that file is
//! returned so that the spawn fails with "permission denied" as `execvp` would.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// What [`resolve`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Resolved {
    /// Spawn the program as given: it names a path, holds a NUL byte, or there is no
    /// `PATH` to search.
    AsIs,
    /// Spawn this file.
    Found(PathBuf),
    /// No entry of `PATH` has a file of that name.
    Missing,
}

/// Where `program` would be executed from with this `PATH` and working directory.
pub fn resolve(program: &str, path: Option<&str>, cwd: &Path) -> Resolved {
    let Some(path) = path else {
        return Resolved::AsIs;
    };
    // A NUL byte is left to `Command`, which refuses it as invalid input.
    if program.is_empty() || program.contains(['/', '\0']) {
        return Resolved::AsIs;
    }
    let mut not_executable = None;
    for dir in path.split(':') {
        let dir = if dir.is_empty() {
            Path::new(".")
        } else {
            Path::new(dir)
        };
        let candidate = cwd.join(dir).join(program);
        let Ok(meta) = std::fs::metadata(&candidate) else {
            continue;
        };
        if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
            return Resolved::Found(candidate);
        }
        not_executable.get_or_insert(candidate);
    }
    not_executable.map_or(Resolved::Missing, Resolved::Found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn file(dir: &Path, name: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        fs::write(&p, "#!/bin/sh\n").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn first_executable_entry_wins_and_others_are_skipped() {
        let t = tempfile::tempdir().unwrap();
        let (a, b, c) = (t.path().join("a"), t.path().join("b"), t.path().join("c"));
        for d in [&a, &b, &c] {
            fs::create_dir(d).unwrap();
        }
        file(&a, "prog", 0o644); // not executable: skipped like execvp's EACCES
        fs::create_dir(b.join("prog")).unwrap(); // a directory: skipped
        let want = file(&c, "prog", 0o755);
        let path = format!(
            "/nonexistent:{}:{}:{}",
            a.display(),
            b.display(),
            c.display()
        );
        assert_eq!(
            resolve("prog", Some(&path), t.path()),
            Resolved::Found(want)
        );
    }

    #[test]
    fn only_non_executable_matches_are_returned_for_a_permission_error() {
        let t = tempfile::tempdir().unwrap();
        let want = file(t.path(), "prog", 0o644);
        let path = format!("/nonexistent:{}", t.path().display());
        assert_eq!(
            resolve("prog", Some(&path), t.path()),
            Resolved::Found(want)
        );
    }

    #[test]
    fn missing_program_is_an_error() {
        let t = tempfile::tempdir().unwrap();
        let path = format!("/nonexistent:{}", t.path().display());
        assert_eq!(resolve("prog", Some(&path), t.path()), Resolved::Missing);
        assert_eq!(
            resolve("prog", Some(""), Path::new("/nonexistent")),
            Resolved::Missing
        );
    }

    #[test]
    fn relative_and_empty_entries_are_relative_to_the_working_directory() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir(t.path().join("bin")).unwrap();
        let want = file(&t.path().join("bin"), "prog", 0o755);
        assert_eq!(
            resolve("prog", Some("/nonexistent:bin"), t.path()),
            Resolved::Found(want)
        );
        // `Path` equality ignores the `.` an empty entry adds.
        let here = file(t.path(), "other", 0o755);
        assert_eq!(
            resolve("other", Some(":/nonexistent"), t.path()),
            Resolved::Found(here)
        );
    }

    #[test]
    fn paths_and_a_missing_path_variable_are_left_alone() {
        let cwd = Path::new("/");
        assert_eq!(resolve("./prog", Some("/bin"), cwd), Resolved::AsIs);
        assert_eq!(resolve("/bin/sh", Some("/usr/bin"), cwd), Resolved::AsIs);
        assert_eq!(resolve("prog", None, cwd), Resolved::AsIs);
        assert_eq!(resolve("", Some("/bin"), cwd), Resolved::AsIs);
        assert_eq!(resolve("s\0h", Some("/bin"), cwd), Resolved::AsIs);
    }
}
