# Headless Chromium and its WebDriver for the approval page's browser test
# (crates/approval/tests/browser.rs). Sourced by scripts/install-deps.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  log "installing chromium and chromium-driver (approval page browser test)"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    chromium chromium-driver >/dev/null
fi
