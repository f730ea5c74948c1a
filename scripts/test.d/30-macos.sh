# macOS targets: the whole workspace must lint clean for both Apple targets (the
# Virtualization.framework layer is compiled only there). Linking needs the Apple SDK, which
# Linux does not have, so this is a compile + lint check, not a run (scripts/cross-clippy
# explains the build-script override it needs for ring).
targets=(aarch64-apple-darwin x86_64-apple-darwin)
installed=$(rustup target list --installed)
for t in "${targets[@]}"; do
  if ! grep -qx "$t" <<<"$installed"; then
    echo "30-macos: rustup target $t is missing; adding it" >&2
    if ! rustup target add "$t"; then
      echo "30-macos: FAILED: cannot add rustup target $t (run scripts/install-deps with VMCP_INSTALL_CROSS=1)" >&2
      exit 1
    fi
  fi
done
for t in "${targets[@]}"; do
  echo "30-macos: cargo clippy --target $t" >&2
  scripts/cross-clippy "$t" --locked
done
# The entitlements plist must be well-formed and grant the virtualization entitlement.
python3 - packaging/macos/vmcp.entitlements <<'PY'
import plistlib, sys
with open(sys.argv[1], "rb") as f:
    p = plistlib.load(f)
assert p.get("com.apple.security.virtualization") is True, p
PY
bash -n packaging/macos/codesign.sh
