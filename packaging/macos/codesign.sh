#!/usr/bin/env bash
# Signs a vmcp binary with the com.apple.security.virtualization entitlement, which
# Virtualization.framework requires. Ad-hoc signing ("-") is enough for local use; pass an
# identity as the second argument (or VMCP_CODESIGN_IDENTITY) for distribution.
#
#   packaging/macos/codesign.sh target/release/vmcp
#   packaging/macos/codesign.sh target/debug/vmcp
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="${1:-}"
identity="${2:-${VMCP_CODESIGN_IDENTITY:--}}"
if [ -z "$bin" ]; then
  echo "usage: $0 <path-to-vmcp> [signing identity, default '-' = ad hoc]" >&2
  exit 2
fi
if [ "$(uname -s)" != "Darwin" ]; then
  echo "codesign.sh: codesign exists only on macOS; sign the binary on the Mac that runs it" >&2
  exit 1
fi
if [ ! -f "$bin" ]; then
  echo "codesign.sh: $bin does not exist: build it first (cargo build -p vmcp-cli)" >&2
  exit 1
fi
codesign --force --sign "$identity" --entitlements "$here/vmcp.entitlements" "$bin"
# Show the entitlement so a failure is visible here rather than at VM start.
if ! codesign -d --entitlements - "$bin" 2>/dev/null | grep -q com.apple.security.virtualization; then
  echo "codesign.sh: $bin was signed but does not show the virtualization entitlement" >&2
  exit 1
fi
echo "signed $bin with com.apple.security.virtualization ($identity)"
