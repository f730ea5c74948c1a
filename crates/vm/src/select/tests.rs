//! The selector over fake backends (preference, fallback notices, named backends, accelerator
//! requests) and over this host's real ones.

use super::*;
use crate::fake::{FakeBackend, Faults};
use crate::{Arch, BackendKind, ErrorClass};

fn fake(unusable: bool) -> Box<dyn Backend> {
    Box::new(FakeBackend::responder(Faults {
        unusable,
        ..Faults::default()
    }))
}

fn config() -> VmConfig {
    VmConfig::new("/k", "/i")
}

#[tokio::test]
async fn first_usable_backend_wins_and_skipped_ones_become_notices() {
    let s = select_from(vec![fake(false), fake(true)], &config())
        .await
        .unwrap();
    assert_eq!(s.backend.name(), "fake");
    assert!(s.notices.is_empty(), "{:?}", s.notices);
    assert_eq!(s.describe(), "backend fake");

    let s = select_from(vec![fake(true), fake(false)], &config())
        .await
        .unwrap();
    assert_eq!(s.notices.len(), 1);
    assert!(
        s.notices[0].contains("fault injected: backend unusable")
            && s.notices[0].ends_with("using fake"),
        "{:?}",
        s.notices
    );
}

#[tokio::test]
async fn nothing_usable_lists_every_reason() {
    let e = select_from(vec![fake(true)], &config()).await.unwrap_err();
    assert!(
        matches!(
            e,
            VmError::Unavailable {
                backend: "fake",
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.is_host_setup());
    let e = select_from(vec![fake(true), fake(true)], &config())
        .await
        .unwrap_err();
    let text = crate::error::chain(&e);
    assert!(
        text.starts_with("backend any is unavailable: fake: "),
        "{text}"
    );
    assert_eq!(text.matches("fault injected").count(), 2, "{text}");
    let e = select_from(vec![], &config()).await.unwrap_err();
    assert!(e.to_string().contains("no backend is compiled"), "{e}");
}

#[tokio::test]
async fn a_named_backend_must_exist_here() {
    let mut c = config();
    c.backend = Some(BackendKind::Vz);
    let e = select_from(vec![fake(false)], &c).await.unwrap_err();
    let text = crate::error::chain(&e);
    assert!(
        text.contains("backend vz does not exist on this OS: this build has fake"),
        "{text}"
    );
    assert_eq!(e.class(), ErrorClass::Config);
}

#[tokio::test]
async fn an_accelerator_request_skips_backends_without_a_choice() {
    let mut c = config();
    c.accel = Some(Accel::Tcg);
    let e = select_from(vec![fake(false)], &c).await.unwrap_err();
    let text = crate::error::chain(&e);
    assert!(text.contains("no accelerator choice"), "{text}");
}

#[tokio::test]
async fn this_host_selects_qemu_or_says_why_not() {
    let mut c = config();
    c.arch = Arch::host();
    match select(&c).await {
        Ok(s) => {
            assert_eq!(s.backend.name(), "qemu");
            assert!(s.accel.is_some());
            assert!(s.describe().starts_with("backend qemu, accelerator "));
        }
        Err(e) => assert!(e.to_string().contains("qemu"), "{e}"),
    }
    c.backend = Some(BackendKind::Qemu);
    c.accel = Some(Accel::Whpx);
    let e = select(&c).await.unwrap_err();
    assert!(crate::error::chain(&e).contains("whpx"), "{e}");
}

#[tokio::test]
async fn doctor_is_every_backends_checks_plus_the_selection() {
    let r = doctor_from(vec![fake(true), fake(false)], &config()).await;
    assert_eq!(r.sections.len(), 2);
    assert_eq!(r.sections[0].title, "fake backend");
    assert!(!r.sections[0].checks[0].ok);
    assert!(r.can_run_vms());
    assert_eq!(r.notices.len(), 1);
    let text = r.to_string();
    assert!(
        text.ends_with("vmcp can run VMs here: `vmcp run` uses backend fake."),
        "{text}"
    );

    let r = doctor_from(vec![fake(true)], &config()).await;
    assert!(!r.can_run_vms());
    assert!(r
        .to_string()
        .contains("`vmcp run` cannot start a VM: backend fake is unavailable"));

    let r = doctor().await;
    assert!(!r.sections.is_empty());
    assert_eq!(
        r.can_run_vms(),
        select(&VmConfig::new("", "")).await.is_ok()
    );
}
