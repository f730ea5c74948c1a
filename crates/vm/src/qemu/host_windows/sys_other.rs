//! The OS layer on hosts that are not Windows: the Windows facts say so, and a Job Object
//! cannot be created. (There, the QEMU backend ties its child to vmcp with the host's own
//! means, e.g. `PR_SET_PDEATHSIG` on Linux.)

use crate::qemu::host_windows::facts::{WhpStatus, WindowsVersion};

/// Always [`WhpStatus::NotWindows`].
pub(crate) fn whp_status() -> WhpStatus {
    WhpStatus::NotWindows
}

/// Always an error: this is not Windows.
pub(crate) fn windows_version() -> Result<WindowsVersion, String> {
    Err("this is not a Windows host".into())
}

/// Windows only: always `None` here.
pub fn process_start_time(_pid: u32) -> Option<u64> {
    None
}

/// Windows only: always `None` here.
pub fn process_rss_kib(_pid: u32) -> Option<u64> {
    None
}

/// A Windows Job Object; cannot exist on this host.
#[derive(Debug)]
pub struct KillOnCloseJob {
    _none: (),
}

fn unsupported() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "Job Objects exist only on Windows",
    )
}

impl KillOnCloseJob {
    /// Fails: Job Objects exist only on Windows.
    pub fn new() -> std::io::Result<KillOnCloseJob> {
        Err(unsupported())
    }

    /// Fails: Job Objects exist only on Windows.
    pub fn assign(&self, _child: &tokio::process::Child) -> std::io::Result<()> {
        Err(unsupported())
    }

    /// Fails: Job Objects exist only on Windows.
    pub fn assign_std(&self, _child: &std::process::Child) -> std::io::Result<()> {
        Err(unsupported())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn says_not_windows() {
        assert_eq!(whp_status(), WhpStatus::NotWindows);
        assert!(windows_version().unwrap_err().contains("not a Windows"));
        assert_eq!(process_start_time(std::process::id()), None);
        assert_eq!(process_rss_kib(std::process::id()), None);
        let e = KillOnCloseJob::new().unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::Unsupported);
        let job = KillOnCloseJob { _none: () };
        let mut child = std::process::Command::new("true").spawn().unwrap();
        assert!(job.assign_std(&child).is_err());
        child.wait().unwrap();
    }
}
