//! What the platform layers need to launch QEMU: the same on every OS, so it lives once here.

use std::ffi::OsString;

pub use vmcp_host_process::Ids;

/// The system user QEMU runs as when vmcp is root (`scripts/install.d` creates it).
pub const QEMU_USER: &str = "vmcp-qemu";
/// The shared fallback when [`QEMU_USER`] does not exist.
pub const FALLBACK_USER: &str = "nobody";

/// What to launch and how.
#[derive(Debug)]
pub struct SpawnSpec {
    /// Full argv (`argv[0]` is the binary).
    pub argv: Vec<OsString>,
    /// Unix descriptors QEMU inherits (ignored on Windows, where nothing is inherited).
    pub inherit: Vec<i32>,
    /// Drop to these ids before exec (Linux only).
    pub drop_to: Option<Ids>,
}

/// The unprivileged user QEMU runs as when vmcp is root: the dedicated [`QEMU_USER`], else
/// `nobody` with a warning (other services running as `nobody` could then trace QEMU), else
/// uid/gid 65534; plus the `kvm` group when `with_kvm_group` (so `/dev/kvm` stays usable).
pub fn unprivileged_ids(with_kvm_group: bool) -> Ids {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    let (ids, fell_back) = unprivileged_ids_from(&passwd, &group, with_kvm_group);
    if fell_back {
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            tracing::warn!(
                "user {QEMU_USER} does not exist, so QEMU runs as the shared user {FALLBACK_USER} \
                 (uid {}); other processes of that user could inspect it. To fix: run \
                 scripts/install-deps, or create it with `useradd --system --no-create-home \
                 --shell /usr/sbin/nologin {QEMU_USER}`",
                ids.uid
            )
        });
    }
    ids
}

/// [`unprivileged_ids`] over given file contents; also says whether it fell back.
pub fn unprivileged_ids_from(passwd: &str, group: &str, with_kvm_group: bool) -> (Ids, bool) {
    let extra: &[&str] = if with_kvm_group { &["kvm"] } else { &[] };
    if let Some(ids) = vmcp_host_process::user_ids_from(passwd, group, QEMU_USER, extra) {
        if ids.uid != 0 {
            return (ids, false);
        }
    }
    let ids = vmcp_host_process::user_ids_from(passwd, group, FALLBACK_USER, extra)
        .filter(|ids| ids.uid != 0)
        .unwrap_or(Ids {
            uid: 65534,
            gid: 65534,
            groups: Vec::new(),
        });
    (ids, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedicated_user_first_then_nobody() {
        let passwd = "root:x:0:0::/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/usr/sbin/nologin\n";
        let group = "root:x:0:\nkvm:x:993:\n";
        let (ids, fell_back) = unprivileged_ids_from(passwd, group, true);
        assert!(fell_back);
        assert_eq!(
            ids,
            Ids {
                uid: 65534,
                gid: 65534,
                groups: vec![993]
            }
        );
        let with_own = format!("{passwd}vmcp-qemu:x:991:990::/nonexistent:/usr/sbin/nologin\n");
        let (ids, fell_back) = unprivileged_ids_from(&with_own, group, false);
        assert!(!fell_back);
        assert_eq!((ids.uid, ids.gid, ids.groups.len()), (991, 990, 0));
        // A dedicated user mapped to root is no drop at all: never use it.
        let (ids, fell_back) =
            unprivileged_ids_from("vmcp-qemu:x:0:0::/:\nnobody:x:99:98::/:\n", "", true);
        assert!(fell_back);
        assert_eq!((ids.uid, ids.gid), (99, 98));
        assert_eq!(
            unprivileged_ids_from("garbage", "kvm:x:nan:", true).0.uid,
            65534
        );
    }
}
