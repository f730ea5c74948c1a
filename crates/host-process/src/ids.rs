//! Users and groups from `/etc/passwd` and `/etc/group`, parsed as plain text (no NSS): used
//! to pick the unprivileged user a child runs as when vmcp is root.

/// User and groups a child runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ids {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups (e.g. `kvm`, for `/dev/kvm`).
    pub groups: Vec<u32>,
}

/// The ids of user `user` in `passwd`, with the ids of the groups in `extra_groups` that
/// exist in `group` as supplementary groups. `None` if the user is not listed.
pub fn user_ids_from(passwd: &str, group: &str, user: &str, extra_groups: &[&str]) -> Option<Ids> {
    let (uid, gid) = passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 4 || f[0] != user {
            return None;
        }
        Some((f[2].parse().ok()?, f[3].parse().ok()?))
    })?;
    let groups = extra_groups
        .iter()
        .filter_map(|want| {
            group.lines().find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() >= 3 && f[0] == *want).then(|| f[2].parse().ok())?
            })
        })
        .collect();
    Some(Ids { uid, gid, groups })
}

/// [`user_ids_from`] over this host's `/etc/passwd` and `/etc/group`.
pub fn lookup_user(user: &str, extra_groups: &[&str]) -> Option<Ids> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    user_ids_from(&passwd, &group, user, extra_groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_from_files() {
        let passwd = "root:x:0:0::/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/usr/sbin/nologin\nvmcp-qemu:x:990:989::/nonexistent:/usr/sbin/nologin\n";
        let group = "root:x:0:\nkvm:x:993:\n";
        assert_eq!(
            user_ids_from(passwd, group, "vmcp-qemu", &["kvm"]),
            Some(Ids {
                uid: 990,
                gid: 989,
                groups: vec![993]
            })
        );
        assert_eq!(
            user_ids_from(passwd, group, "nobody", &[]).map(|i| i.groups),
            Some(vec![])
        );
        assert_eq!(
            user_ids_from(passwd, group, "nobody", &["nosuchgroup"]).map(|i| i.groups),
            Some(vec![])
        );
        assert_eq!(user_ids_from(passwd, group, "absent", &[]), None);
        assert_eq!(
            user_ids_from("garbage", "kvm:x:nan:", "garbage", &["kvm"]),
            None
        );
        assert_eq!(user_ids_from("odd:x:nan:1::/:", "", "odd", &[]), None);
    }

    #[test]
    fn root_is_listed_here() {
        if !std::path::Path::new("/etc/passwd").exists() {
            vmcp_test_support::skipped!("SKIPPED: no /etc/passwd on this host");
            return;
        }
        assert_eq!(lookup_user("root", &[]).map(|i| i.uid), Some(0));
    }
}
