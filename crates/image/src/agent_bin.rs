//! Finding the guest agent binary to put into the image.
//!
//! Lookup order: an explicit path (`--agent`), `$VMCP_AGENT`, `vmcp-agent-<arch>` or
//! `vmcp-agent` next to the running executable, then the cargo layout
//! `<target dir>/<musl triple>/agent/vmcp-agent` for `$CARGO_TARGET_DIR` and every ancestor
//! of the running executable (so `cargo run`/`cargo test` builds find it). A candidate must
//! be an ELF executable for the guest architecture.

use std::path::{Path, PathBuf};

use crate::manifest::Arch;

/// Errors finding the agent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentBinError {
    /// An explicitly named agent does not exist or is not usable.
    #[error("agent binary {path} (from {origin}) is unusable: {reason}")]
    Unusable {
        /// Path.
        path: String,
        /// Where the path came from.
        origin: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// No candidate found.
    #[error("no vmcp-agent binary for {arch} found; build it with `cargo build -p vmcp-guest-agent --target {triple} --profile agent`, or pass --agent PATH / set VMCP_AGENT (looked in: {looked})")]
    NotFound {
        /// Guest architecture.
        arch: Arch,
        /// Its musl triple.
        triple: &'static str,
        /// Places tried.
        looked: String,
    },
}

/// Checks that `path` is an ELF executable for `arch`.
pub fn check_elf(path: &Path, arch: Arch) -> Result<(), String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let head = bytes.get(..20).ok_or("too short to be an executable")?;
    if &head[..4] != b"\x7fELF" {
        return Err("not an ELF executable".into());
    }
    if head[4] != 2 || head[5] != 1 {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let machine = u16::from_le_bytes([head[18], head[19]]);
    if machine != arch.elf_machine() {
        return Err(format!(
            "built for ELF machine {machine}, not {arch} ({})",
            arch.elf_machine()
        ));
    }
    if has_interpreter(&bytes) {
        return Err(format!(
            "dynamically linked; the guest needs a static build (cargo build -p vmcp-guest-agent --target {} --profile agent)",
            arch.musl_triple()
        ));
    }
    Ok(())
}

/// Whether a 64-bit little-endian ELF file has a `PT_INTERP` program header (needs a
/// dynamic loader, which the initramfs does not have).
fn has_interpreter(elf: &[u8]) -> bool {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let Some(phoff) = elf
        .get(0x20..0x28)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
    else {
        return false;
    };
    let (Some(entsize), Some(num)) = (u16_at(0x36), u16_at(0x38)) else {
        return false;
    };
    (0..usize::from(num)).any(|i| {
        let off = usize::try_from(phoff)
            .ok()
            .and_then(|p| p.checked_add(i * usize::from(entsize)));
        off.and_then(|o| elf.get(o..o + 4))
            .is_some_and(|t| u32::from_le_bytes([t[0], t[1], t[2], t[3]]) == 3)
    })
}

/// Finds the agent for `arch` (see the module docs for the order).
pub fn find_agent(arch: Arch, explicit: Option<&Path>) -> Result<PathBuf, AgentBinError> {
    let env = std::env::var_os("VMCP_AGENT").map(PathBuf::from);
    for (origin, path) in [
        ("--agent", explicit.map(Path::to_path_buf)),
        ("VMCP_AGENT", env),
    ] {
        if let Some(path) = path {
            return match check_elf(&path, arch) {
                Ok(()) => Ok(path),
                Err(reason) => Err(AgentBinError::Unusable {
                    path: path.display().to_string(),
                    origin,
                    reason,
                }),
            };
        }
    }
    let exe = std::env::current_exe().ok();
    let candidates = candidates(
        arch,
        exe.as_deref(),
        std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from),
    );
    for c in &candidates {
        if c.is_file() && check_elf(c, arch).is_ok() {
            return Ok(c.clone());
        }
    }
    let looked: Vec<String> = candidates.iter().map(|c| c.display().to_string()).collect();
    Err(AgentBinError::NotFound {
        arch,
        triple: arch.musl_triple(),
        looked: looked.join(", "),
    })
}

fn candidates(arch: Arch, exe: Option<&Path>, target_dir: Option<PathBuf>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let rel = Path::new(arch.musl_triple())
        .join("agent")
        .join("vmcp-agent");
    if let Some(dir) = exe.and_then(Path::parent) {
        out.push(dir.join(format!("vmcp-agent-{arch}")));
        out.push(dir.join("vmcp-agent"));
    }
    if let Some(t) = target_dir {
        out.push(t.join(&rel));
    }
    if let Some(exe) = exe {
        for dir in exe.ancestors().skip(1) {
            let c = dir.join(&rel);
            if !out.contains(&c) {
                out.push(c);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf(machine: u16) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[18..20].copy_from_slice(&machine.to_le_bytes());
        b
    }

    #[test]
    fn elf_check() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a");
        std::fs::write(&p, elf(62)).unwrap();
        assert!(check_elf(&p, Arch::X86_64).is_ok());
        let err = check_elf(&p, Arch::Aarch64).unwrap_err();
        assert!(err.contains("aarch64"), "{err}");
        std::fs::write(&p, b"#!/bin/sh\necho not elf at all\n").unwrap();
        assert!(check_elf(&p, Arch::X86_64)
            .unwrap_err()
            .contains("not an ELF"));
        std::fs::write(&p, b"\x7fELF").unwrap();
        assert!(check_elf(&p, Arch::X86_64).is_err());
    }

    #[test]
    fn dynamic_executables_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a");
        let mut b = elf(62);
        // One program header at offset 64, of type PT_INTERP.
        b[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        b.resize(64 + 56, 0);
        b[64..68].copy_from_slice(&3u32.to_le_bytes());
        std::fs::write(&p, &b).unwrap();
        let err = check_elf(&p, Arch::X86_64).unwrap_err();
        assert!(err.contains("dynamically linked"), "{err}");
        // The same with a PT_LOAD header is fine.
        b[64..68].copy_from_slice(&1u32.to_le_bytes());
        std::fs::write(&p, &b).unwrap();
        assert!(check_elf(&p, Arch::X86_64).is_ok());
        // The running test binary is dynamic on glibc hosts; real static agents pass.
        let me = std::env::current_exe().unwrap();
        let _ = check_elf(&me, Arch::X86_64);
    }

    #[test]
    fn explicit_path_wins_and_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vmcp-agent");
        std::fs::write(&p, elf(62)).unwrap();
        assert_eq!(find_agent(Arch::X86_64, Some(&p)).unwrap(), p);
        let missing = dir.path().join("nope");
        let err = find_agent(Arch::X86_64, Some(&missing))
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope") && err.contains("--agent"), "{err}");
    }

    #[test]
    fn cargo_layout_candidates() {
        let exe = Path::new("/w/target/debug/deps/vmcp-123");
        let c = candidates(Arch::X86_64, Some(exe), Some(PathBuf::from("/t")));
        assert_eq!(c[0], Path::new("/w/target/debug/deps/vmcp-agent-x86_64"));
        assert!(c.contains(&PathBuf::from(
            "/t/x86_64-unknown-linux-musl/agent/vmcp-agent"
        )));
        assert!(c.contains(&PathBuf::from(
            "/w/target/x86_64-unknown-linux-musl/agent/vmcp-agent"
        )));
    }

    #[test]
    fn not_found_names_the_cargo_command() {
        let err = AgentBinError::NotFound {
            arch: Arch::X86_64,
            triple: Arch::X86_64.musl_triple(),
            looked: "x".into(),
        };
        let s = err.to_string();
        assert!(s.contains("cargo build -p vmcp-guest-agent --target x86_64-unknown-linux-musl --profile agent"), "{s}");
    }
}
