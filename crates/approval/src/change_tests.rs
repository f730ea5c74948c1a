use super::*;

#[test]
fn empty_dirs_have_no_changes() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let c = ChangeSet::between(a.path(), b.path(), &ChangeLimits::default()).unwrap();
    assert!(c.is_empty());
}
