//! QEMU's part of snapshots: save a VM's device state next to its memory file, and load
//! both into a fresh QEMU.
//!
//! # Layout of a QEMU snapshot (a directory)
//! - `memory`: the guest's RAM. The VM that is saved runs with its RAM in this file from
//!   its first instruction (`memory-backend-file`, `share=on`), so saving writes no RAM at all.
//!   A restore maps it copy-on-write (`share=off,readonly=on,rom=off`): the page cache of
//!   the file is shared by every VM restored from it, and each VM's writes stay private.
//! - `state`: the device state (CPU, virtio queues, timers: about 130 KiB), written by QMP
//!   `migrate` with the `x-ignore-shared` capability, which leaves the shared RAM out.
//! - Or, saved from a VM whose RAM is not a shared file (a restored VM maps its snapshot's
//!   memory privately; a VM booted without a memory file has anonymous RAM): `state` holds
//!   the RAM too (the same `migrate`: only shared RAM is left out), a `ram-in-state` file
//!   marks it (saying whether the RAM was a memory backend, which names QEMU's RAM block),
//!   and there is no `memory`. Its restores load the RAM into private memory of the same
//!   kind: slower than mapping a file and not shared between VMs, but such a VM can be
//!   saved again (this is how restored VMs are checkpointed).
//!
//! # How QEMU reaches the files
//! QEMU may run as an unprivileged user that cannot open paths in vmcp's cache, so vmcp
//! opens both files. The memory file is inherited and opened again by QEMU as `/dev/fd/N`
//! (which checks the file's mode: while a VM saves into it, it belongs to QEMU's user; after
//! the save it is vmcp's again, readable by QEMU's group only). The state file travels over
//! the QMP socket (`add-fd` with `SCM_RIGHTS`) and is named `file:/dev/fdset/N` in `migrate`
//! and `migrate-incoming` (`fd:` URIs on files are deprecated in QEMU 10).
//!
//! # Sequence
//! Save: `migrate-set-capabilities x-ignore-shared`, `stop`, `add-fd`, `migrate`, poll
//! `query-migrate` until `completed`. Restore: QEMU starts with `-incoming defer` and no
//! kernel; `migrate-set-capabilities`, `add-fd`, `migrate-incoming` (with `exit-on-error`
//! off, so a bad file is reported here instead of ending QEMU) sent in one burst, poll until
//! `completed`, then `cont`: a snapshot saved from a stopped VM stays paused after loading.
//!
//! # What a restore costs
//! What the guest was doing when it was saved, it goes on doing in every restored VM, under
//! a new QEMU whose TCG translation cache is empty: a snapshot must be taken of a guest at
//! rest (the CLI's snapshot store waits for the agent's background module loading first,
//! which otherwise costs every restore hundreds of milliseconds of guest CPU).
//!
//! # Limits
//! The restoring QEMU must be the same version with the same devices, memory size and
//! machine type (the snapshot store's manifest checks this before a restore is tried). A
//! state file that QEMU cannot load is reported with QEMU's reason; a memory file that is
//! corrupt cannot be detected here: the guest then fails to answer and the restore ends in
//! the agent timeout.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::platform::{self, HostStream};
use super::qmp::{self, QmpClient, QmpError};

/// The device state file in a snapshot directory.
pub const STATE_FILE: &str = "state";
/// The memory file in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// The marker of a snapshot whose RAM is in the state file (no memory file).
pub const RAM_IN_STATE_FILE: &str = "ram-in-state";
/// The marker's content when the saved RAM was a memory backend.
const RAM_BACKEND_MARK: &[u8] = b"memory-backend";
/// How long saving or loading the device state may take.
pub const MIGRATE_TIMEOUT: Duration = Duration::from_secs(30);
/// The first bytes of a QEMU migration stream: `QEVM`, version 3.
const STATE_MAGIC: [u8; 8] = *b"QEVM\0\0\0\x03";
/// The fd set the state file goes into.
const STATE_FDSET: u64 = 7;
/// `max-bandwidth` of a save: 1 TiB/s, i.e. no cap.
const UNCAPPED_BYTES_PER_SEC: u64 = 1 << 40;

/// Errors of saving or loading QEMU state.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// A QMP command failed.
    #[error("QMP {step} failed")]
    Qmp {
        /// The step.
        step: &'static str,
        /// QEMU's answer.
        #[source]
        source: QmpError,
    },
    /// A file could not be opened, read or written.
    #[error("cannot {what}")]
    Io {
        /// What was being done.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// QEMU reported the migration as failed.
    #[error("QEMU could not {op} the VM state: {reason}")]
    Migration {
        /// `save` or `load`.
        op: &'static str,
        /// QEMU's `error-desc`.
        reason: String,
    },
    /// The migration did not finish in time.
    #[error("QEMU did not {op} the VM state within {timeout:?}")]
    Timeout {
        /// `save` or `load`.
        op: &'static str,
        /// The limit.
        timeout: Duration,
    },
    /// The files are not a QEMU snapshot this VM can load.
    #[error("{path} is not a usable QEMU snapshot: {reason}")]
    NotASnapshot {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl SnapshotError {
    /// The kind of problem (see [`crate::ErrorClass`]).
    pub fn class(&self) -> crate::ErrorClass {
        match self {
            SnapshotError::Qmp { .. } | SnapshotError::Timeout { .. } => {
                crate::ErrorClass::Hypervisor
            }
            SnapshotError::Io { .. } => crate::ErrorClass::HostSetup,
            SnapshotError::Migration { op, .. } if *op == "save" => crate::ErrorClass::Hypervisor,
            SnapshotError::Migration { .. } | SnapshotError::NotASnapshot { .. } => {
                crate::ErrorClass::Config
            }
        }
    }
}

/// The files of the snapshot in `dir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotFiles {
    /// Device state.
    pub state: PathBuf,
    /// Guest RAM.
    pub memory: PathBuf,
    /// Present (empty) when the RAM is in the state file and there is no memory file.
    pub ram_marker: PathBuf,
}

impl SnapshotFiles {
    /// The files of the snapshot directory `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        SnapshotFiles {
            state: dir.join(STATE_FILE),
            memory: dir.join(MEMORY_FILE),
            ram_marker: dir.join(RAM_IN_STATE_FILE),
        }
    }

    /// Whether the RAM is in the state file (marked by [`RAM_IN_STATE_FILE`]) instead of a
    /// memory file: saved from a VM whose RAM was not a shared file, e.g. a restored one.
    pub fn ram_in_state(&self) -> bool {
        self.ram_marker.exists()
    }

    /// With the RAM in the state file: whether it was saved from a memory backend (the
    /// RAM block is then `mem`, else the machine's own). `None`: there is a memory file.
    pub fn ram_in_state_backend(&self) -> Option<bool> {
        let marker = std::fs::read(&self.ram_marker).ok()?;
        Some(marker.starts_with(RAM_BACKEND_MARK))
    }

    /// Marks the snapshot as one with its RAM in the state file, saved from a VM whose RAM
    /// was a memory backend (`backend`) or the machine's own.
    pub fn mark_ram_in_state(&self, backend: bool) -> std::io::Result<()> {
        let mark: &[u8] = if backend { RAM_BACKEND_MARK } else { b"" };
        std::fs::write(&self.ram_marker, mark)
    }

    /// Checks what can be checked without QEMU: the state file starts like a QEMU migration
    /// stream and the memory file, if there is one, is exactly `memory_mib` MiB. Returns the
    /// opened state file.
    pub fn check(&self, memory_mib: u32) -> Result<File, SnapshotError> {
        let not = |path: &Path, reason: String| SnapshotError::NotASnapshot {
            path: path.to_path_buf(),
            reason,
        };
        let mut state = File::open(&self.state).map_err(|source| SnapshotError::Io {
            what: format!("open {}", self.state.display()),
            source,
        })?;
        let mut head = [0u8; 8];
        let mut got = 0;
        while got < head.len() {
            match state.read(&mut head[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(SnapshotError::Io {
                        what: format!("read {}", self.state.display()),
                        source,
                    })
                }
            }
        }
        if got < head.len() || head != STATE_MAGIC {
            return Err(not(
                &self.state,
                "it does not start like a QEMU migration stream (QEVM, version 3)".into(),
            ));
        }
        if self.ram_in_state() {
            return reopen(&self.state);
        }
        let len = std::fs::metadata(&self.memory)
            .map_err(|source| SnapshotError::Io {
                what: format!("read the size of {}", self.memory.display()),
                source,
            })?
            .len();
        let want = u64::from(memory_mib) << 20;
        if len != want {
            return Err(not(
                &self.memory,
                format!(
                    "it holds {len} bytes of memory, the VM has {memory_mib} MiB ({want} bytes)"
                ),
            ));
        }
        reopen(&self.state)
    }
}

/// QEMU reads from the start: hand over a fresh descriptor.
fn reopen(state: &Path) -> Result<File, SnapshotError> {
    File::open(state).map_err(|source| SnapshotError::Io {
        what: format!("open {}", state.display()),
        source,
    })
}

fn qmp_err(step: &'static str) -> impl FnOnce(QmpError) -> SnapshotError {
    move |source| SnapshotError::Qmp { step, source }
}

async fn ignore_shared(q: &mut QmpClient<HostStream>) -> Result<(), SnapshotError> {
    q.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]})),
    )
    .await
    .map(drop)
    .map_err(qmp_err("migrate-set-capabilities"))
}

/// Hands `file` to QEMU as fd set [`STATE_FDSET`]; returns its `file:` URI.
async fn add_fd(q: &mut QmpClient<HostStream>, file: &File) -> Result<String, SnapshotError> {
    let bytes = qmp::request("add-fd", Some(json!({"fdset-id": STATE_FDSET})))
        .map_err(qmp_err("add-fd"))?;
    platform::send_with_fd(q.stream_mut(), &bytes, file)
        .await
        .map_err(|source| SnapshotError::Io {
            what: "pass the state file to QEMU".into(),
            source,
        })?;
    let answer = q.answer("add-fd").await.map_err(qmp_err("add-fd"))?;
    let set = answer["fdset-id"].as_u64().unwrap_or(STATE_FDSET);
    Ok(format!("file:/dev/fdset/{set}"))
}

/// Polls `query-migrate` until the migration ends.
async fn wait_migration(
    q: &mut QmpClient<HostStream>,
    op: &'static str,
) -> Result<(), SnapshotError> {
    let until = Instant::now() + MIGRATE_TIMEOUT;
    loop {
        let v: Value = q
            .execute("query-migrate", None)
            .await
            .map_err(qmp_err("query-migrate"))?;
        match v["status"].as_str() {
            Some("completed") => return Ok(()),
            Some("failed" | "cancelled") => {
                return Err(SnapshotError::Migration {
                    op,
                    reason: v["error-desc"]
                        .as_str()
                        .unwrap_or("no reason given")
                        .to_string(),
                })
            }
            _ => {}
        }
        if Instant::now() >= until {
            return Err(SnapshotError::Timeout {
                op,
                timeout: MIGRATE_TIMEOUT,
            });
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Stops the guest (if `running`) and writes its device state to `state`; the RAM stays in
/// the VM's shared memory file. The VM is left stopped.
pub async fn save(
    q: &mut QmpClient<HostStream>,
    state: &File,
    running: bool,
) -> Result<(), SnapshotError> {
    ignore_shared(q).await?;
    // RAM that is not in the shared file goes into the stream: no bandwidth cap on a
    // local file (QEMU's default is 128 MiB/s).
    q.execute(
        "migrate-set-parameters",
        Some(json!({"max-bandwidth": UNCAPPED_BYTES_PER_SEC})),
    )
    .await
    .map_err(qmp_err("migrate-set-parameters"))?;
    if running {
        q.execute("stop", None).await.map_err(qmp_err("stop"))?;
    }
    let uri = add_fd(q, state).await?;
    q.execute("migrate", Some(json!({ "uri": uri })))
        .await
        .map_err(qmp_err("migrate"))?;
    wait_migration(q, "save").await?;
    state.sync_all().map_err(|source| SnapshotError::Io {
        what: "flush the state file".into(),
        source,
    })
}

/// Loads the device state from `state` into a QEMU started with `-incoming defer` and the
/// snapshot's memory file, then lets the guest run.
///
/// The three set-up commands go out in one burst and their answers are read afterwards (QMP
/// runs a client's commands in order), so the restore waits for one round trip, not three.
/// A failed command makes the next ones fail too; the first error is the one reported.
pub async fn load(q: &mut QmpClient<HostStream>, state: &File) -> Result<(), SnapshotError> {
    use tokio::io::AsyncWriteExt;
    let caps = qmp::request(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]})),
    )
    .map_err(qmp_err("migrate-set-capabilities"))?;
    let add = qmp::request("add-fd", Some(json!({"fdset-id": STATE_FDSET})))
        .map_err(qmp_err("add-fd"))?;
    let uri = format!("file:/dev/fdset/{STATE_FDSET}");
    let incoming = qmp::request(
        "migrate-incoming",
        Some(json!({ "uri": uri, "exit-on-error": false })),
    )
    .map_err(qmp_err("migrate-incoming"))?;
    let io = |what: &'static str| {
        move |source| SnapshotError::Io {
            what: what.into(),
            source,
        }
    };
    q.stream_mut()
        .write_all(&caps)
        .await
        .map_err(io("send the migration capabilities to QEMU"))?;
    platform::send_with_fd(q.stream_mut(), &add, state)
        .await
        .map_err(io("pass the state file to QEMU"))?;
    q.stream_mut()
        .write_all(&incoming)
        .await
        .map_err(io("start loading the state in QEMU"))?;
    let caps = q.answer("migrate-set-capabilities").await;
    let added = q.answer("add-fd").await;
    let started = q.answer("migrate-incoming").await;
    caps.map_err(qmp_err("migrate-set-capabilities"))?;
    let set = added.map_err(qmp_err("add-fd"))?["fdset-id"].as_u64();
    if set != Some(STATE_FDSET) {
        return Err(SnapshotError::Migration {
            op: "load",
            reason: format!("QEMU put the state file in fd set {set:?}, not {STATE_FDSET}"),
        });
    }
    started.map_err(qmp_err("migrate-incoming"))?;
    crate::timing::mark("qemu: capabilities, add-fd, migrate-incoming");
    wait_migration(q, "load").await?;
    crate::timing::mark("qemu: device state loaded");
    q.execute("cont", None)
        .await
        .map(drop)
        .map_err(qmp_err("cont"))?;
    crate::timing::mark("qemu: cont");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreign_truncated_and_mismatched_files_are_refused_before_qemu_runs() {
        let dir = tempfile::tempdir().unwrap();
        let files = SnapshotFiles::in_dir(dir.path());
        let e = files.check(256).unwrap_err().to_string();
        assert!(e.contains("cannot open") && e.contains("state"), "{e}");

        std::fs::write(&files.state, b"QEV").unwrap();
        let e = files.check(256).unwrap_err().to_string();
        assert!(e.contains("not a usable QEMU snapshot"), "{e}");
        std::fs::write(&files.state, b"\x7fELF\x02\x01\x01\0rest").unwrap();
        assert!(files.check(256).is_err());

        std::fs::write(&files.state, b"QEVM\0\0\0\x03more").unwrap();
        let e = files.check(256).unwrap_err().to_string();
        assert!(e.contains("memory"), "{e}");
        let f = File::create(&files.memory).unwrap();
        f.set_len(128 << 20).unwrap();
        let e = files.check(256).unwrap_err().to_string();
        assert!(e.contains("the VM has 256 MiB"), "{e}");
        // The RAM-in-state marker: no memory file needed (nor looked at).
        files.mark_ram_in_state(true).unwrap();
        assert!(files.ram_in_state());
        assert_eq!(files.ram_in_state_backend(), Some(true));
        files.check(256).unwrap();
        files.mark_ram_in_state(false).unwrap();
        assert_eq!(files.ram_in_state_backend(), Some(false));
        std::fs::remove_file(&files.ram_marker).unwrap();
        assert_eq!(files.ram_in_state_backend(), None);
        f.set_len(256 << 20).unwrap();
        let mut state = files.check(256).unwrap();
        let mut head = [0u8; 4];
        state.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"QEVM", "the returned file reads from the start");
    }
}
