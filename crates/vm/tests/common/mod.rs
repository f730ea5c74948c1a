//! Shared set-up of the VM integration tests: prerequisites, one-VM-at-a-time lock, boot.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::time::Duration;

use vmcp_guest_proto::ExitStatus;
use vmcp_vm::agent::{AgentClient, ExecSpec};
use vmcp_vm::qemu::{QemuBackend, QemuVm};
use vmcp_vm::{AgentInfo, Arch, Vm, VmConfig};

/// Generous: a TCG boot takes ~2 s alone, but CI machines are shared.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A bootable image.
#[derive(Debug, Clone)]
pub struct Image {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub kernel_release: String,
}

/// Guest architecture under test: `VMCP_TEST_ARCH` (e.g. `aarch64` on an x86_64 host, run
/// under TCG), else the host's.
pub fn test_arch() -> Arch {
    match std::env::var("VMCP_TEST_ARCH") {
        Ok(a) => a.parse().expect("VMCP_TEST_ARCH must be x86_64 or aarch64"),
        Err(_) => Arch::host(),
    }
}

impl Image {
    pub fn config(&self) -> VmConfig {
        let mut c = VmConfig::new(&self.kernel, &self.initrd);
        c.arch = test_arch();
        c.memory_mib = 256;
        c
    }
}

fn skip(reason: &str) -> Option<Image> {
    if std::env::var_os("VMCP_REQUIRE_VM").is_some_and(|v| v == "1") {
        panic!("VMCP_REQUIRE_VM=1 but the VM prerequisites are missing: {reason}");
    }
    vmcp_test_support::skipped!("SKIPPED: {reason}");
    None
}

/// The image to boot, or `None` after printing why the test is skipped.
pub fn prerequisites() -> Option<Image> {
    if vmcp_vm::qemu::launch_supported().is_err() {
        return skip("this OS cannot launch QEMU yet");
    }
    if let Err(e) = vmcp_vm::qemu::binary::find(test_arch()) {
        return skip(&e.to_string());
    }
    if let (Some(k), Some(i)) = (
        std::env::var_os("VMCP_TEST_KERNEL"),
        std::env::var_os("VMCP_TEST_INITRD"),
    ) {
        return Some(Image {
            kernel: k.into(),
            initrd: i.into(),
            kernel_release: std::env::var("VMCP_TEST_KERNEL_RELEASE").unwrap_or_default(),
        });
    }
    image_from_cache()
}

fn image_from_cache() -> Option<Image> {
    match vmcp_image::find_image(&vmcp_image::BuildOptions::new(test_arch().into())) {
        Ok(Some(p)) => Some(Image {
            kernel: p.kernel,
            initrd: p.initrd,
            kernel_release: p.kernel_release,
        }),
        Ok(None) => skip("no guest image: run `vmcp image build`"),
        Err(e) => skip(&format!("no guest image: {e}")),
    }
}

/// Serialises VM boots within this test binary.
pub async fn vm_lock() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// Creates, starts and waits for a VM.
pub async fn boot(img: &Image, backend: QemuBackend) -> (QemuVm, AgentInfo) {
    let mut vm = backend.create_qemu(img.config()).await.unwrap();
    vm.start().await.unwrap();
    let info = match vm.wait_ready(READY_TIMEOUT).await {
        Ok(info) => info,
        Err(e) => panic!("boot failed: {e}"),
    };
    (vm, info)
}

/// Runs `sh -c script` in the guest, asserts exit 0, returns its stdout.
pub async fn sh(agent: &AgentClient, script: &str) -> String {
    let out = agent
        .exec(ExecSpec::new(["sh", "-c", script]))
        .await
        .unwrap()
        .wait_with_output()
        .await
        .unwrap();
    assert_eq!(
        out.status,
        ExitStatus::Code(0),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
