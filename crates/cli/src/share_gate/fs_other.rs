//! Gated shares off Unix: never reached (no share can be made there, see `image_cmd`), so
//! every entry point is an error naming the limit.

use std::path::Path;

use super::{Change, Outcome, StageError, Staged};

const NO_SHARES: &str = "--share needs a Linux or macOS host";

/// Always an error off Unix.
pub fn stage(_tar: &Path, _staging: &Path) -> Result<Staged, StageError> {
    Err(StageError::Refused(NO_SHARES.into()))
}

/// Always an error off Unix.
pub fn compute(_host: &Path, _staged: &Staged) -> Result<(Vec<Change>, Vec<String>), StageError> {
    Err(StageError::Refused(NO_SHARES.into()))
}

/// Refuses every change off Unix.
pub fn apply(_host: &Path, _staged: &Staged, approved: &[Change]) -> Outcome {
    Outcome {
        applied: Vec::new(),
        refused: approved
            .iter()
            .map(|c| (c.path.clone(), NO_SHARES.to_string()))
            .collect(),
    }
}

/// Nothing to read off Unix.
pub fn read_staged(_staged: &Staged, _rel: &Path, _max: u64) -> Option<Vec<u8>> {
    None
}

/// Nothing to read off Unix.
pub fn read_host(_host: &Path, _rel: &Path, _max: u64) -> Option<Vec<u8>> {
    None
}
