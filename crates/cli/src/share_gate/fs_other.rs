//! Staging off Unix: never reached (no share can be made there, see `image_cmd`), so it is an
//! error naming the limit.

use std::path::Path;

use super::StageError;

/// Always an error off Unix.
pub fn stage(_host: &Path, _tar: &Path, _staging: &Path) -> Result<Vec<String>, StageError> {
    Err(StageError::Refused(
        "--share needs a Linux or macOS host".into(),
    ))
}
