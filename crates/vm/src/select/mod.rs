//! Choosing the backend and accelerator for a VM, and `vmcp doctor` as that choice explaining
//! itself.
//!
//! [`select`] is the one place that decides: `vmcp run`, `vmcp bench`, `vmcp doctor` (and the
//! MCP server) call it with the [`VmConfig`] they are about to boot. [`VmConfig::backend`]
//! names a backend or leaves the choice to the host; [`VmConfig::accel`] names an accelerator
//! for backends that offer a choice (QEMU) or leaves it to the backend. The candidates are
//! the backends compiled for this OS, the OS's own framework first; each says through
//! [`Backend::fit`] whether it can run the config here and with which accelerator. The first
//! that fits wins; skipped ones become notices.
//!
//! [`doctor`] asks every backend for its checks ([`Backend::checks`]) and adds what
//! [`select`] would pick, or why nothing fits.

mod report;

pub use report::{Check, DoctorReport, Section};

use crate::error::ConfigError;
use crate::qemu::QemuBackend;
use crate::{Accel, Backend, VmConfig, VmError};

/// The backends compiled for this OS, most preferred first.
pub fn backends() -> Vec<Box<dyn Backend>> {
    // The OS's own hypervisor framework first (macOS: Virtualization.framework), QEMU after.
    let mut all = crate::vz::native_backends();
    all.push(Box::new(QemuBackend::new()));
    all
}

/// How a backend would run a config ([`Backend::fit`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Fit {
    /// The accelerator it would use, for backends that have a choice.
    pub accel: Option<Accel>,
    /// One line for the user when it falls back to something slower.
    pub notice: Option<String>,
}

impl Fit {
    /// A fit with `accel` and an optional notice.
    pub fn new(accel: Option<Accel>, notice: Option<String>) -> Self {
        Fit { accel, notice }
    }
}

/// What [`select`] picked.
#[non_exhaustive]
pub struct Selection {
    /// The backend to create the VM with.
    pub backend: Box<dyn Backend>,
    /// The accelerator to put into [`VmConfig::accel`] (`None`: the backend has no choice).
    pub accel: Option<Accel>,
    /// Lines for the user: backends skipped and why, fallbacks to slower accelerators.
    pub notices: Vec<String>,
}

impl std::fmt::Debug for Selection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Selection")
            .field("backend", &self.backend.name())
            .field("accel", &self.accel)
            .field("notices", &self.notices)
            .finish()
    }
}

impl Selection {
    /// `"backend qemu, accelerator tcg"`.
    pub fn describe(&self) -> String {
        match self.accel {
            Some(a) => format!("backend {}, accelerator {a}", self.backend.name()),
            None => format!("backend {}", self.backend.name()),
        }
    }
}

/// Picks the backend and accelerator for `config` among the backends of this OS.
pub async fn select(config: &VmConfig) -> Result<Selection, VmError> {
    select_from(backends(), config).await
}

/// [`select`] over given candidates, most preferred first (for tests and embedders).
pub async fn select_from(
    candidates: Vec<Box<dyn Backend>>,
    config: &VmConfig,
) -> Result<Selection, VmError> {
    let compiled: Vec<&'static str> = candidates.iter().map(|b| b.name()).collect();
    let candidates: Vec<Box<dyn Backend>> = match config.backend {
        None => candidates,
        Some(kind) => {
            let named: Vec<_> = candidates
                .into_iter()
                .filter(|b| b.name() == kind.as_str())
                .collect();
            if named.is_empty() {
                return Err(ConfigError::BackendNotHere {
                    backend: kind,
                    compiled: compiled.join(", "),
                }
                .into());
            }
            named
        }
    };
    let mut skipped: Vec<(&'static str, VmError)> = Vec::new();
    for backend in candidates {
        match backend.fit(config).await {
            Ok(fit) => {
                let mut notices: Vec<String> = skipped
                    .iter()
                    .map(|(name, e)| {
                        format!(
                            "backend {name} cannot run this VM ({}); using {}",
                            crate::error::chain(e),
                            backend.name()
                        )
                    })
                    .collect();
                notices.extend(fit.notice);
                return Ok(Selection {
                    backend,
                    accel: fit.accel,
                    notices,
                });
            }
            Err(e) => skipped.push((backend.name(), e)),
        }
    }
    if skipped.len() == 1 {
        if let Some((_, e)) = skipped.pop() {
            return Err(e);
        }
    }
    Err(VmError::Unavailable {
        backend: "any",
        reason: if skipped.is_empty() {
            "no backend is compiled for this OS".into()
        } else {
            skipped
                .iter()
                .map(|(name, e)| format!("{name}: {}", crate::error::chain(e)))
                .collect::<Vec<_>>()
                .join("; ")
        },
    })
}

/// `vmcp doctor`: every backend's checks, then what [`select`] picks for a default VM of the
/// host's architecture (or why it cannot).
pub async fn doctor() -> DoctorReport {
    doctor_from(backends(), &VmConfig::new("", "")).await
}

/// [`doctor`] over given backends and config.
pub async fn doctor_from(backends: Vec<Box<dyn Backend>>, config: &VmConfig) -> DoctorReport {
    let mut sections = Vec::with_capacity(backends.len());
    for b in &backends {
        sections.push(b.checks().await);
    }
    let (selection, notices) = match select_from(backends, config).await {
        Ok(s) => (Ok(s.describe()), s.notices),
        Err(e) => (Err(crate::error::chain(&e)), Vec::new()),
    };
    DoctorReport {
        sections,
        selection,
        notices,
    }
}

#[cfg(test)]
mod tests;
