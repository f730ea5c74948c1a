//! QEMU backend (KVM or TCG on Linux; HVF on macOS and WHPX on Windows later).
