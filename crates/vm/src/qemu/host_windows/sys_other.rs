//! The OS layer on hosts that are not Windows: the Windows facts say so.

use crate::qemu::host_windows::facts::{WhpStatus, WindowsVersion};

/// Always [`WhpStatus::NotWindows`].
pub(crate) fn whp_status() -> WhpStatus {
    WhpStatus::NotWindows
}

/// Always an error: this is not Windows.
pub(crate) fn windows_version() -> Result<WindowsVersion, String> {
    Err("this is not a Windows host".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn says_not_windows() {
        assert_eq!(whp_status(), WhpStatus::NotWindows);
        assert!(windows_version().unwrap_err().contains("not a Windows"));
    }
}
