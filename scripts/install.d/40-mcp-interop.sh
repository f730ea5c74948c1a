# Reference MCP servers for the interoperability tests (crates/mcp/tests/interop.rs):
# the TypeScript SDK's "everything" server (npm) and the Python SDK (PyPI) in a venv; and the
# official conformance harness (npm) that crates/cli/tests/mcp_serve_interop.rs runs in server
# mode against `vmcp mcp serve --http`.
# Sourced by scripts/install-deps. Installs into $VMCP_INTEROP_PREFIX (default /opt/vmcp-interop);
# the tests look there too. Versions are pinned; bump them here and nowhere else.
VMCP_INTEROP_PREFIX="${VMCP_INTEROP_PREFIX:-/opt/vmcp-interop}"
MCP_TS_EVERYTHING_VERSION="2026.8.31"
MCP_PY_VERSION="2.3.0"
# 0.1.14 and later import fs.globSync, which needs Node.js 22; Debian bookworm's machines here
# have Node.js 20, so the harness stays at the last release that runs on it.
MCP_CONFORMANCE_VERSION="0.1.13"

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  log "installing Node.js and npm (MCP interop tests)"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  log "installing python3-venv (MCP interop tests)"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
fi
$SUDO mkdir -p "$VMCP_INTEROP_PREFIX"

ts_dir="$VMCP_INTEROP_PREFIX/ts"
ts_stamp="$ts_dir/.installed-$MCP_TS_EVERYTHING_VERSION"
if [ ! -f "$ts_stamp" ]; then
  log "installing @modelcontextprotocol/server-everything@$MCP_TS_EVERYTHING_VERSION into $ts_dir"
  $SUDO rm -rf "$ts_dir"
  $SUDO mkdir -p "$ts_dir"
  $SUDO npm install --prefix "$ts_dir" --no-audit --no-fund --loglevel=error \
    "@modelcontextprotocol/server-everything@$MCP_TS_EVERYTHING_VERSION" >/dev/null
  $SUDO touch "$ts_stamp"
fi

py_dir="$VMCP_INTEROP_PREFIX/py"
py_stamp="$py_dir/.installed-$MCP_PY_VERSION"
if [ ! -f "$py_stamp" ]; then
  log "installing Python mcp==$MCP_PY_VERSION into $py_dir"
  $SUDO rm -rf "$py_dir"
  $SUDO python3 -m venv "$py_dir"
  $SUDO "$py_dir/bin/pip" install --quiet --disable-pip-version-check "mcp==$MCP_PY_VERSION"
  $SUDO touch "$py_stamp"
fi

conf_dir="$VMCP_INTEROP_PREFIX/conformance"
conf_stamp="$conf_dir/.installed-$MCP_CONFORMANCE_VERSION"
if [ ! -f "$conf_stamp" ]; then
  log "installing @modelcontextprotocol/conformance@$MCP_CONFORMANCE_VERSION into $conf_dir"
  $SUDO rm -rf "$conf_dir"
  $SUDO mkdir -p "$conf_dir"
  $SUDO npm install --prefix "$conf_dir" --no-audit --no-fund --loglevel=error \
    "@modelcontextprotocol/conformance@$MCP_CONFORMANCE_VERSION" >/dev/null
  $SUDO touch "$conf_stamp"
fi
