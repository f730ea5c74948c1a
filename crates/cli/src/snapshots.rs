//! The snapshot store: booted, ready VMs saved once and restored by `vmcp run` in tens of
//! milliseconds instead of a cold boot.
//!
//! Layout: `<cache>/snapshots/<name>/` holds `record.json` (what the snapshot belongs to),
//! `vm/` (the backend's state: for QEMU the device state and the guest memory file) and
//! `vm.vmcp` (the lifecycle's manifest). A snapshot is built in `.tmp-*` beside it and
//! renamed into place, so a reader never sees half of one and two builders do not clash.
//!
//! A [`Record`] names everything a restore depends on: backend, architecture, vCPUs,
//! memory, accelerator, the kernel, initrd and QEMU binary (path, size and modification
//! time: a rebuilt image or an upgraded QEMU no longer matches), the read-only root disk if
//! one is attached, and the vmcp version. `vmcp run` looks up the snapshot named after the
//! record's hash (`auto-<hash>`); a named snapshot is checked field by field and a mismatch
//! is refused with the fields that differ.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde_json::{json, Value};
use vmcp_vm::qemu::QemuBackend;
use vmcp_vm::{Vm, VmConfig};

/// Version of `record.json`. 2: the guest was brought to rest ([`quiesce`]) before the save;
/// format-1 snapshots restore into a guest still loading modules, so they are not used (the
/// automatic snapshot's name changes with the format, and a new one is built). 3: the guest's
/// CRNG is initialized and the agent's exec threads wait idle in the saved guest ([`quiesce`]),
/// which makes the first exec after a restore cheaper.
pub const RECORD_FORMAT: u64 = 3;
/// Largest `record.json` read (a real one is under 2 KiB).
const MAX_RECORD_BYTES: u64 = 64 * 1024;
/// The record file in a snapshot directory.
const RECORD_FILE: &str = "record.json";
/// The backend's snapshot inside a snapshot directory.
const VM_DIR: &str = "vm";
/// Prefix of the snapshots `vmcp run` builds by itself.
pub const AUTO_PREFIX: &str = "auto-";

/// A file a snapshot depends on, identified cheaply (no hashing on the `run` path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileId {
    /// Absolute path.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: u64,
}

impl FileId {
    /// Identifies `path` (canonicalised).
    pub fn of(path: &Path) -> anyhow::Result<FileId> {
        let canon = std::fs::canonicalize(path)
            .with_context(|| format!("cannot resolve {}", path.display()))?;
        let meta = std::fs::metadata(&canon)
            .with_context(|| format!("cannot read {}", canon.display()))?;
        let mtime_ns = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        Ok(FileId {
            path: canon.to_string_lossy().into_owned(),
            size: meta.len(),
            mtime_ns,
        })
    }

    fn to_json(&self) -> Value {
        json!({"path": self.path, "size": self.size, "mtime_ns": self.mtime_ns})
    }

    fn from_json(v: &Value) -> Option<FileId> {
        Some(FileId {
            path: v["path"].as_str()?.to_string(),
            size: v["size"].as_u64()?,
            mtime_ns: v["mtime_ns"].as_u64()?,
        })
    }
}

/// What a snapshot belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Backend (`qemu`).
    pub backend: String,
    /// Guest architecture.
    pub arch: String,
    /// vCPUs.
    pub cpus: u32,
    /// Memory, MiB.
    pub memory_mib: u32,
    /// Accelerator.
    pub accel: String,
    /// Guest kernel.
    pub kernel: FileId,
    /// Guest initramfs.
    pub initrd: FileId,
    /// Read-only root disk, when one is attached.
    pub rootfs: Option<FileId>,
    /// User-mode network card.
    pub network: bool,
    /// Extra kernel arguments.
    pub cmdline_extra: Vec<String>,
    /// The hypervisor binary.
    pub hypervisor: FileId,
    /// vmcp's version.
    pub vmcp_version: String,
}

impl Record {
    /// The record a VM of `config` (accelerator already chosen) would have.
    pub fn for_config(config: &VmConfig, hypervisor: &Path) -> anyhow::Result<Record> {
        Ok(Record {
            backend: "qemu".into(),
            arch: config.arch.as_str().into(),
            cpus: config.cpus,
            memory_mib: config.memory_mib,
            accel: config.accel.map_or("auto".into(), |a| a.to_string()),
            kernel: FileId::of(&config.kernel)?,
            initrd: FileId::of(&config.initrd)?,
            rootfs: match &config.rootfs {
                Some(d) => Some(FileId::of(&d.path)?),
                None => None,
            },
            network: config.net.has_device(),
            cmdline_extra: config.cmdline_extra.clone(),
            hypervisor: FileId::of(hypervisor)?,
            vmcp_version: env!("CARGO_PKG_VERSION").into(),
        })
    }

    fn to_json(&self) -> Value {
        json!({
            "format": RECORD_FORMAT,
            "backend": self.backend,
            "arch": self.arch,
            "cpus": self.cpus,
            "memory_mib": self.memory_mib,
            "accel": self.accel,
            "kernel": self.kernel.to_json(),
            "initrd": self.initrd.to_json(),
            "rootfs": self.rootfs.as_ref().map(FileId::to_json),
            "network": self.network,
            "cmdline_extra": self.cmdline_extra,
            "hypervisor": self.hypervisor.to_json(),
            "vmcp_version": self.vmcp_version,
        })
    }

    /// Parses a record; `None` when a field is missing or of the wrong type.
    pub fn from_json(v: &Value) -> Option<Record> {
        if v["format"].as_u64()? != RECORD_FORMAT {
            return None;
        }
        let s = |k: &str| v[k].as_str().map(str::to_string);
        let n = |k: &str| v[k].as_u64().and_then(|x| u32::try_from(x).ok());
        Some(Record {
            backend: s("backend")?,
            arch: s("arch")?,
            cpus: n("cpus")?,
            memory_mib: n("memory_mib")?,
            accel: s("accel")?,
            kernel: FileId::from_json(&v["kernel"])?,
            initrd: FileId::from_json(&v["initrd"])?,
            rootfs: match &v["rootfs"] {
                Value::Null => None,
                r => Some(FileId::from_json(r)?),
            },
            network: v["network"].as_bool()?,
            cmdline_extra: v["cmdline_extra"]
                .as_array()?
                .iter()
                .map(|x| x.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()?,
            hypervisor: FileId::from_json(&v["hypervisor"])?,
            vmcp_version: s("vmcp_version")?,
        })
    }

    /// What differs between this (the snapshot's) record and `want` (the VM's), in words.
    pub fn differences(&self, want: &Record) -> Vec<String> {
        let mut d = Vec::new();
        let mut field = |name: &str, have: String, wanted: String| {
            if have != wanted {
                d.push(format!("{name}: snapshot {have}, this VM {wanted}"));
            }
        };
        field("backend", self.backend.clone(), want.backend.clone());
        field("architecture", self.arch.clone(), want.arch.clone());
        field("vCPUs", self.cpus.to_string(), want.cpus.to_string());
        field(
            "memory",
            format!("{} MiB", self.memory_mib),
            format!("{} MiB", want.memory_mib),
        );
        field("accelerator", self.accel.clone(), want.accel.clone());
        let file = |f: &FileId| format!("{} ({} bytes, mtime {})", f.path, f.size, f.mtime_ns);
        field("kernel", file(&self.kernel), file(&want.kernel));
        field("initrd", file(&self.initrd), file(&want.initrd));
        let disk = |f: &Option<FileId>| f.as_ref().map_or_else(|| "none".into(), file);
        field("root disk", disk(&self.rootfs), disk(&want.rootfs));
        field(
            "network",
            self.network.to_string(),
            want.network.to_string(),
        );
        field(
            "kernel arguments",
            self.cmdline_extra.join(" "),
            want.cmdline_extra.join(" "),
        );
        field(
            "QEMU binary",
            file(&self.hypervisor),
            file(&want.hypervisor),
        );
        field(
            "vmcp version",
            self.vmcp_version.clone(),
            want.vmcp_version.clone(),
        );
        d
    }

    /// The name `vmcp run` gives the snapshot of this record: a stable hash of its fields.
    pub fn auto_name(&self) -> String {
        // FNV-1a, 64 bits: stable across builds and platforms, and enough to tell records
        // apart (a collision is caught by the field comparison).
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.to_json().to_string().bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        format!("{AUTO_PREFIX}{h:016x}")
    }
}

/// The store's directory (created, owner-only): `$VMCP_SNAPSHOT_DIR`, else `snapshots` in
/// the cache directory.
pub fn store_dir() -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os("VMCP_SNAPSHOT_DIR").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => vmcp_image::default_cache_dir()
            .context("cannot find the cache directory")?
            .join("snapshots"),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    restrict(&dir);
    Ok(dir)
}

#[cfg(unix)]
fn restrict(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
}

#[cfg(not(unix))]
fn restrict(_dir: &Path) {}

/// A snapshot name must be a plain file name.
pub fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    anyhow::ensure!(
        ok,
        "bad snapshot name {name:?}: use up to 64 letters, digits, '-', '_' or '.', not starting with '.'"
    );
    Ok(())
}

/// One stored snapshot.
#[derive(Debug)]
pub struct Stored {
    /// Its name.
    pub name: String,
    /// Its directory.
    pub dir: PathBuf,
    /// Its record, or why it cannot be read.
    pub record: Result<Record, String>,
}

impl Stored {
    /// The backend's snapshot path (what `Vm::restore_snapshot` takes).
    pub fn vm_path(&self) -> PathBuf {
        self.dir.join(VM_DIR)
    }

    /// Bytes on disk (allocated blocks where the OS tells).
    pub fn disk_bytes(&self) -> u64 {
        vmcp_host_process::disk_usage(&self.dir)
    }
}

fn read_record(dir: &Path) -> Result<Record, String> {
    use std::io::Read;
    let path = dir.join(RECORD_FILE);
    let mut text = String::new();
    std::fs::File::open(&path)
        .and_then(|f| f.take(MAX_RECORD_BYTES).read_to_string(&mut text))
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| format!("{} is not JSON: {e}", path.display()))?;
    Record::from_json(&v).ok_or_else(|| {
        format!(
            "{} is not a snapshot record of this vmcp (format {RECORD_FORMAT})",
            path.display()
        )
    })
}

/// The snapshot called `name`, if it exists.
pub fn find(store: &Path, name: &str) -> anyhow::Result<Option<Stored>> {
    check_name(name)?;
    let dir = store.join(name);
    if !dir.is_dir() {
        return Ok(None);
    }
    Ok(Some(Stored {
        name: name.to_string(),
        record: read_record(&dir),
        dir,
    }))
}

/// Every snapshot in the store, by name.
pub fn list(store: &Path) -> anyhow::Result<Vec<Stored>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(store)
        .with_context(|| format!("cannot list {}", store.display()))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !e.path().is_dir() {
            continue;
        }
        out.push(Stored {
            record: read_record(&e.path()),
            dir: e.path(),
            name,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Removes snapshot directories (and leftovers of interrupted builds).
pub fn remove(dir: &Path) -> anyhow::Result<()> {
    std::fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))
}

/// Removes `.tmp-*` build directories older than `age` (their builder is gone).
pub fn sweep_builds(store: &Path, age: Duration) -> usize {
    let Ok(entries) = std::fs::read_dir(store) else {
        return 0;
    };
    let mut n = 0;
    for e in entries.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|d| d >= age);
        if e.file_name().to_string_lossy().starts_with(".tmp-") && old && remove(&e.path()).is_ok()
        {
            n += 1;
        }
    }
    n
}

/// Boots a VM of `config` (QEMU, accelerator chosen), waits for its agent, flushes the
/// guest's file systems, saves it as snapshot `name` (replacing one of that name) and
/// returns the VM, still running.
pub async fn create(
    store: &Path,
    name: &str,
    config: &VmConfig,
    record: &Record,
    ready_timeout: Duration,
) -> anyhow::Result<Box<dyn Vm>> {
    check_name(name)?;
    let mut vm = QemuBackend::new()
        .create_qemu(config.clone())
        .await
        .context("cannot create the VM to snapshot")?;
    let memory = vm.runtime_dir().join("memory");
    vm.set_memory_file(memory);
    vm.start().await?;
    vm.wait_ready(ready_timeout).await?;
    quiesce(&vm).await?;
    let tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempdir_in(store)
        .with_context(|| format!("cannot create a directory in {}", store.display()))?;
    vm.save_snapshot(&tmp.path().join(VM_DIR)).await?;
    let text = serde_json::to_vec_pretty(&record.to_json()).context("cannot encode the record")?;
    std::fs::write(tmp.path().join(RECORD_FILE), text)
        .with_context(|| format!("cannot write the record in {}", tmp.path().display()))?;
    let final_dir = store.join(name);
    if final_dir.exists() {
        // Replacing: the old one goes first (a concurrent reader may fail and cold-boot).
        remove(&final_dir)?;
    }
    let tmp_path = tmp.keep();
    if let Err(e) = std::fs::rename(&tmp_path, &final_dir) {
        let _ = remove(&tmp_path);
        // Another vmcp built the same snapshot at the same time: use theirs.
        if !final_dir.is_dir() {
            return Err(e)
                .with_context(|| format!("cannot move the snapshot to {}", final_dir.display()));
        }
    }
    Ok(Box::new(vm))
}

/// The guest command [`quiesce`] runs: wait (bounded: 1000 rounds of at least 10 ms) until
/// the agent's `modules` thread, which loads the modules not needed before the hello, has
/// ended, then flush the file systems. Exit status 3 when the wait gave up.
const QUIESCE_SCRIPT: &str = "i=0; while grep -qsx modules /proc/1/task/*/comm; do \
     i=$((i+1)); [ $i -ge 1000 ] && { sync; exit 3; }; sleep 0.01; done; sync";

/// How long [`quiesce`] waits at most for the guest's CRNG (see [`wait_crng`]).
const CRNG_LIMIT: Duration = Duration::from_secs(10);
/// How long [`quiesce`] waits at most for QEMU to go idle.
const SETTLE_LIMIT: Duration = Duration::from_secs(3);
/// One idle check: QEMU used less than [`SETTLE_CPU`] of CPU in this window.
const SETTLE_WINDOW: Duration = Duration::from_millis(40);
/// CPU time of an idle QEMU over [`SETTLE_WINDOW`] (an idle guest costs ~2 % of a core).
const SETTLE_CPU: Duration = Duration::from_millis(4);

/// Brings a freshly booted guest to rest before it is saved: what runs at the moment of the
/// save runs again in every VM restored from it, under a cold TCG translation cache. Right
/// after its hello the agent still loads the deferred kernel modules (signature checks,
/// relocations: hundreds of milliseconds of guest CPU under TCG), so the snapshot waits for
/// that to finish and flushes the file systems. Before that it lets the kernel's CRNG finish
/// initializing ([`wait_crng`]), and it runs the command with stdin so that the agent's
/// exec threads are idle in the saved guest. Then it waits until QEMU is idle (the
/// kernel's deferred work after those processes ended: RCU, freeing their memory), for two
/// windows in a row, at most [`SETTLE_LIMIT`]. Where QEMU's CPU time cannot be read the
/// last wait is skipped (restores are slower, not wrong).
pub async fn quiesce(vm: &vmcp_vm::qemu::QemuVm) -> anyhow::Result<()> {
    let agent = vm.agent()?;
    wait_crng(&agent).await?;
    let mut spec = vmcp_vm::agent::ExecSpec::new(["sh", "-c", QUIESCE_SCRIPT]);
    // With stdin, as `vmcp run` execs when its stdin is not a terminal: that takes the most
    // agent threads (stdin, stdout, stderr, waiter), which then wait idle in the saved guest
    // for the first exec after a restore (crates/guest-agent/src/threads.rs).
    spec.stdin = true;
    let process = agent
        .exec(spec)
        .await
        .context("cannot bring the guest to rest before the snapshot")?;
    process
        .control()
        .close_stdin()
        .await
        .context("cannot bring the guest to rest before the snapshot")?;
    let out = process
        .wait_with_output()
        .await
        .context("cannot bring the guest to rest before the snapshot")?;
    match out.status {
        vmcp_guest_proto::ExitStatus::Code(0) => {}
        vmcp_guest_proto::ExitStatus::Code(3) => {
            // Still correct, only slower to restore.
            tracing::warn!("the guest still loaded modules after 10 s; saving it anyway");
        }
        status => anyhow::bail!(
            "the guest could not be brought to rest before the snapshot (`sync` and the wait \
             for its module loader ended with {status:?}): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    }
    let Some(pid) = vm.pid() else { return Ok(()) };
    let until = std::time::Instant::now() + SETTLE_LIMIT;
    let mut quiet = 0;
    let Some(mut last) = cpu_time(pid) else {
        return Ok(());
    };
    while quiet < 2 && std::time::Instant::now() < until {
        tokio::time::sleep(SETTLE_WINDOW).await;
        let Some(now) = cpu_time(pid) else { break };
        quiet = if now.saturating_sub(last) < SETTLE_CPU {
            quiet + 1
        } else {
            0
        };
        last = now;
    }
    if quiet < 2 {
        tracing::info!("the guest was still busy after {SETTLE_LIMIT:?}; saving it anyway");
    }
    Ok(())
}

/// Waits, at most [`CRNG_LIMIT`], until the guest kernel's CRNG is initialized: reading one
/// byte of `/dev/random` waits for it (Linux 6.1 then gathers timer-jitter entropy, about a
/// second of guest time under TCG). A guest saved before that point initializes it in every
/// restore instead, when the re-key credits the host's entropy: a printk, a workqueue and a
/// static-key patch of kernel text, all run untranslated in the new QEMU. The re-key reseeds
/// the CRNG of every restore with the host's entropy either way. If the wait runs out, the
/// snapshot is saved anyway (its restores are slower, not wrong).
async fn wait_crng(agent: &vmcp_vm::agent::AgentClient) -> anyhow::Result<()> {
    let context = "cannot wait for the guest's random number generator before the snapshot";
    let spec = vmcp_vm::agent::ExecSpec::new(["head", "-c", "1", "/dev/random"]);
    let mut process = agent.exec(spec).await.context(context)?;
    let wait = async {
        while let Some(event) = process.next_event().await? {
            if let vmcp_vm::agent::ProcessEvent::Exited(status) = event {
                return Ok(Some(status));
            }
        }
        Ok::<_, vmcp_vm::agent::AgentError>(None)
    };
    match tokio::time::timeout(CRNG_LIMIT, wait).await {
        Ok(Ok(Some(vmcp_guest_proto::ExitStatus::Code(0)))) => Ok(()),
        Ok(Ok(status)) => {
            tracing::warn!(
                ?status,
                "reading /dev/random in the guest failed; saving it anyway"
            );
            Ok(())
        }
        Ok(Err(e)) => Err(e).context(context),
        Err(_) => {
            tracing::info!("the guest's CRNG was not ready after {CRNG_LIMIT:?}; saving it anyway");
            // SIGKILL, by its number in the Linux guest.
            let _ = process.control().signal(9).await;
            Ok(())
        }
    }
}

/// CPU time all threads of process `pid` have used (Linux: the first field of each
/// `/proc/<pid>/task/<tid>/schedstat`, nanoseconds; the vCPU is a thread of its own).
fn cpu_time(pid: u32) -> Option<Duration> {
    let mut ns: u64 = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        let used: u64 = text.split_whitespace().next()?.parse().ok()?;
        ns = ns.saturating_add(used);
    }
    Some(Duration::from_nanos(ns))
}

/// Restores snapshot `stored` into a new VM of `config` and waits for its agent.
pub async fn restore(
    stored: &Stored,
    config: &VmConfig,
    want: &Record,
    ready_timeout: Duration,
) -> anyhow::Result<Box<dyn Vm>> {
    let have = stored
        .record
        .as_ref()
        .map_err(|e| anyhow::anyhow!("snapshot {} is unusable: {e}", stored.name))?;
    let diff = have.differences(want);
    anyhow::ensure!(
        diff.is_empty(),
        "snapshot {} does not fit this VM ({}); make a new one with `vmcp snapshot create --name {}`",
        stored.name,
        diff.join("; "),
        stored.name
    );
    let mut vm = QemuBackend::new().create_qemu(config.clone()).await?;
    vmcp_vm::timing::mark("restore: VM prepared (id, runtime dir, token)");
    vm.restore_snapshot(&stored.vm_path())
        .await
        .with_context(|| format!("cannot restore snapshot {}", stored.name))?;
    vmcp_vm::timing::mark("restore: state loaded, guest running");
    vm.wait_ready(ready_timeout).await.with_context(|| {
        format!(
            "the VM restored from snapshot {} did not get ready",
            stored.name
        )
    })?;
    vmcp_vm::timing::mark("restore: agent re-keyed and ready");
    Ok(Box::new(vm))
}

/// Why a VM of `config` on `backend` boots cold instead of restoring a snapshot, if it does.
/// Only QEMU VMs without a writable root disk, an image layer, shares or a network card use
/// snapshots: a restored guest's view of a disk that changed since would be wrong, an image VM
/// mounts its own fresh writable layer at boot, and restoring a guest's network state onto a
/// new netdev and egress proxy is untested.
pub fn cold_reason(config: &VmConfig, backend: &str) -> Option<&'static str> {
    if backend != "qemu" {
        Some("only QEMU VMs are restored from snapshots")
    } else if config.rootfs.as_ref().is_some_and(|d| !d.read_only) {
        Some("a VM with a writable root disk is not restored from a snapshot")
    } else if config.image.is_some() {
        Some("a VM with an image layer is not restored from a snapshot")
    } else if !config.shares.is_empty() {
        Some("a VM with shared directories is not restored from a snapshot")
    } else if config.net.has_device() {
        Some("a VM with a network card is not restored from a snapshot")
    } else if !config.net.publish.is_empty() {
        Some("a VM with published ports is not restored from a snapshot")
    } else if vmcp_vm::qemu::launch_supported().is_err() {
        Some("QEMU snapshots are not supported on this host")
    } else {
        None
    }
}

/// How [`auto_start`] started a VM, or why it did not.
pub enum AutoStart {
    /// Restored from the existing automatic snapshot.
    Restored(Box<dyn Vm>),
    /// Booted cold, then saved as the automatic snapshot (first use); the VM keeps running.
    Built(Box<dyn Vm>),
    /// Not started: boot cold. `None` when snapshots do not apply to this VM, else why the
    /// snapshot could not be used (worth a notice).
    Cold(Option<String>),
}

/// Starts a VM of `config` (accelerator chosen, validated, snapshot-eligible: see
/// [`cold_reason`]) from its automatic snapshot, building the snapshot on first use.
/// `notice` hears about a one-time build before it starts. A broken snapshot is removed.
pub async fn auto_start(
    config: &VmConfig,
    ready_timeout: Duration,
    notice: &(dyn Fn(&str) + Send + Sync),
) -> anyhow::Result<AutoStart> {
    let record = vmcp_vm::qemu::binary::find(config.arch)
        .map_err(anyhow::Error::new)
        .and_then(|bin| Record::for_config(config, &bin));
    let (record, store) = match (record, store_dir()) {
        (Ok(r), Ok(s)) => (r, s),
        (Err(e), _) | (_, Err(e)) => {
            tracing::info!(error = %e, "no snapshot for this VM; booting cold");
            return Ok(AutoStart::Cold(None));
        }
    };
    let name = record.auto_name();
    match find(&store, &name)? {
        Some(stored) => match restore(&stored, config, &record, ready_timeout).await {
            Ok(vm) => Ok(AutoStart::Restored(vm)),
            Err(e) => {
                let removed = remove(&stored.dir).is_ok();
                Ok(AutoStart::Cold(Some(format!(
                    "{}; {}booting cold",
                    chain(&e),
                    if removed { "removed it, " } else { "" }
                ))))
            }
        },
        None => {
            sweep_builds(&store, Duration::from_secs(3600));
            notice(&format!(
                "building snapshot {name} for fast starts (one time)"
            ));
            // A VM whose allow-list travels over the agent channel is built without it (its
            // proxy and the agent's listener are not part of a shared snapshot), then
            // restored from the new snapshot with it.
            let channel = config.net.channel_net().egress.is_some();
            let mut plain = config.clone();
            if channel {
                plain.net = vmcp_vm::NetConfig::default();
            }
            let built = match create(&store, &name, &plain, &record, ready_timeout).await {
                Ok(vm) => vm,
                Err(e) => {
                    return Ok(AutoStart::Cold(Some(format!(
                        "cannot build the snapshot: {}; booting cold",
                        chain(&e)
                    ))))
                }
            };
            if !channel {
                return Ok(AutoStart::Built(built));
            }
            drop(built);
            let restored = match find(&store, &name)? {
                Some(stored) => restore(&stored, config, &record, ready_timeout).await,
                None => Err(anyhow::anyhow!("the snapshot just built is gone")),
            };
            Ok(match restored {
                Ok(vm) => AutoStart::Built(vm),
                Err(e) => AutoStart::Cold(Some(format!(
                    "cannot restore the snapshot just built: {}; booting cold",
                    chain(&e)
                ))),
            })
        }
    }
}

fn chain(e: &anyhow::Error) -> String {
    e.chain()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(dir: &Path) -> Record {
        let k = dir.join("k");
        let i = dir.join("i");
        std::fs::write(&k, b"kernel").unwrap();
        std::fs::write(&i, b"initrd").unwrap();
        let mut c = VmConfig::new(&k, &i);
        c.accel = Some(vmcp_vm::Accel::Tcg);
        Record::for_config(&c, &k).unwrap()
    }

    #[test]
    fn records_round_trip_and_name_their_differences() {
        let d = tempfile::tempdir().unwrap();
        let r = record(d.path());
        assert_eq!(Record::from_json(&r.to_json()), Some(r.clone()));
        assert!(r.differences(&r).is_empty());
        assert_eq!(r.auto_name(), r.clone().auto_name());
        assert!(r.auto_name().starts_with(AUTO_PREFIX));
        let mut other = r.clone();
        other.memory_mib = 512;
        other.vmcp_version = "9.9.9".into();
        let diff = r.differences(&other);
        assert_eq!(diff.len(), 2, "{diff:?}");
        assert!(
            diff[0].contains("memory: snapshot 256 MiB, this VM 512 MiB"),
            "{diff:?}"
        );
        assert!(diff[1].contains("vmcp version"), "{diff:?}");
        assert_ne!(r.auto_name(), other.auto_name());
        // A rebuilt kernel (same path, new size) no longer fits.
        std::fs::write(d.path().join("k"), b"a new kernel").unwrap();
        let rebuilt = record(d.path());
        assert!(r
            .differences(&rebuilt)
            .iter()
            .any(|x| x.starts_with("kernel")));
    }

    #[test]
    fn bad_records_and_names_are_refused() {
        let d = tempfile::tempdir().unwrap();
        for bad in ["", "../x", ".hidden", "a/b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        check_name("auto-0123abcd").unwrap();
        check_name("my_snap.1").unwrap();
        let snap = d.path().join("s");
        std::fs::create_dir(&snap).unwrap();
        assert!(read_record(&snap).unwrap_err().contains("cannot read"));
        std::fs::write(snap.join(RECORD_FILE), b"{not json").unwrap();
        assert!(read_record(&snap).unwrap_err().contains("not JSON"));
        std::fs::write(snap.join(RECORD_FILE), br#"{"format": 99}"#).unwrap();
        assert!(read_record(&snap)
            .unwrap_err()
            .contains(&format!("format {RECORD_FORMAT}")));
        // A huge record is read only up to the bound, then fails to parse.
        std::fs::write(snap.join(RECORD_FILE), vec![b' '; 200_000]).unwrap();
        assert!(read_record(&snap).is_err());
        let listed = list(d.path()).unwrap();
        assert_eq!(listed.len(), 1);
        assert!(listed[0].record.is_err());
        assert!(find(d.path(), "nope").unwrap().is_none());
        assert!(find(d.path(), "../etc").is_err());
    }

    #[test]
    fn which_networked_vms_boot_cold() {
        let base = VmConfig::new("/k", "/i");
        let with = |f: &dyn Fn(&mut vmcp_vm::NetConfig)| {
            let mut c = base.clone();
            f(&mut c.net);
            cold_reason(&c, "qemu")
        };
        assert_eq!(
            with(&|_| {}),
            vmcp_vm::qemu::launch_supported()
                .err()
                .map(|_| "QEMU snapshots are not supported on this host")
        );
        let allow: vmcp_vm::NetMode = "allow=pypi.org".parse().unwrap();
        let card = with(&|n| {
            n.mode = allow.clone();
            n.card = true;
        })
        .unwrap();
        assert!(card.contains("network card"), "{card}");
        // Over the agent channel the guest's boot state holds no network setting: the same
        // snapshot as a VM without network.
        let channel = with(&|n| n.mode = allow.clone());
        assert_eq!(channel, with(&|_| {}));
        let published = with(&|n| n.publish = vec!["8080:80".parse().unwrap()]).unwrap();
        assert!(published.contains("published ports"), "{published}");
    }

    #[test]
    fn stale_build_directories_are_swept() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join(".tmp-old")).unwrap();
        std::fs::create_dir(d.path().join("kept")).unwrap();
        assert_eq!(sweep_builds(d.path(), Duration::from_secs(3600)), 0);
        assert_eq!(sweep_builds(d.path(), Duration::ZERO), 1);
        assert!(d.path().join("kept").is_dir());
    }
}
