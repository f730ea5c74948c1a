# Windows: lint both Windows targets, link vmcp.exe with mingw-w64, check that it does not
# import WinHvPlatform.dll, then run it and the Windows unit tests of the vm crate under wine.
# Needs what `VMCP_INSTALL_CROSS=1 scripts/install-deps` installs (mingw-w64, wine64, the two
# rustup targets). Set VMCP_SKIP_WINDOWS=1 to skip loudly on a machine without them.
# Run by scripts/test-all (bash -euo pipefail), or by hand: bash scripts/test.d/40-windows.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

win_log() { printf '   [windows] %s\n' "$*" >&2; }
win_fail() { printf '   [windows] FAILED: %s\n' "$*" >&2; exit 1; }
win_t0=$(date +%s)
win_lap() { local now; now=$(date +%s); win_log "$1 took $((now - win_t0))s"; win_t0=$now; }

if [ "${VMCP_SKIP_WINDOWS:-0}" = "1" ]; then
  echo "SKIPPED: Windows cross checks (VMCP_SKIP_WINDOWS=1)" >&2
  exit 0
fi

WINE=""
for w in wine64 /usr/lib/wine/wine64 wine; do
  if command -v "$w" >/dev/null 2>&1; then WINE=$(command -v "$w"); break; fi
done
WINESERVER=""
for w in wineserver /usr/lib/wine/wineserver64 /usr/lib/wine/wineserver; do
  if command -v "$w" >/dev/null 2>&1; then WINESERVER=$(command -v "$w"); break; fi
done
command -v x86_64-w64-mingw32-gcc >/dev/null || win_fail "x86_64-w64-mingw32-gcc missing: run VMCP_INSTALL_CROSS=1 scripts/install-deps (or VMCP_SKIP_WINDOWS=1)"
[ -n "$WINE" ] || win_fail "wine64 missing: run VMCP_INSTALL_CROSS=1 scripts/install-deps (or VMCP_SKIP_WINDOWS=1)"
for t in x86_64-pc-windows-msvc x86_64-pc-windows-gnu; do
  rustup target list --installed | grep -qx "$t" || win_fail "rustup target $t missing: rustup target add $t"
done

# 1. Lint the whole workspace for both Windows targets (scripts/cross-clippy explains the MSVC
# build-script override for ring).
for t in x86_64-pc-windows-msvc x86_64-pc-windows-gnu; do
  bash scripts/cross-clippy "$t" --locked
done
win_lap "clippy for both Windows targets"

# 2. Link vmcp.exe and the vm crate's unit tests for windows-gnu.
cargo build -p vmcp-cli --locked --target x86_64-pc-windows-gnu
exe=target/x86_64-pc-windows-gnu/debug/vmcp.exe
tests_exe=$(cargo test -p vmcp-vm --lib --locked --target x86_64-pc-windows-gnu --no-run --message-format=json 2>/dev/null \
  | sed -n 's/.*"executable":"\([^"]*vmcp_vm[^"]*\.exe\)".*/\1/p' | tail -n1)
hostproc_exe=$(cargo test -p vmcp-host-process --lib --locked --target x86_64-pc-windows-gnu --no-run --message-format=json 2>/dev/null \
  | sed -n 's/.*"executable":"\([^"]*vmcp_host_process[^"]*\.exe\)".*/\1/p' | tail -n1)
launch_exe=$(cargo test -p vmcp-vm --test windows_launch --locked --target x86_64-pc-windows-gnu --no-run --message-format=json 2>/dev/null \
  | sed -n 's/.*"executable":"\([^"]*windows_launch[^"]*\.exe\)".*/\1/p' | tail -n1)
cargo build -p vmcp-vm --example fake_qemu --locked --target x86_64-pc-windows-gnu
fake_qemu=target/x86_64-pc-windows-gnu/debug/examples/fake_qemu.exe
[ -f "$launch_exe" ] || win_fail "the windows_launch test executable was not built"
[ -f "$fake_qemu" ] || win_fail "$fake_qemu was not built"
[ -f "$exe" ] || win_fail "$exe was not built"
[ -f "$tests_exe" ] || win_fail "the vmcp-vm unit test executable was not built"
[ -f "$hostproc_exe" ] || win_fail "the vmcp-host-process unit test executable was not built"
win_lap "building vmcp.exe and the vm unit tests (windows-gnu)"

# 3. The import table: WinHvPlatform.dll must be loaded at run time, never imported.
imports=$(x86_64-w64-mingw32-objdump -p "$exe" | awk '/DLL Name:/ {print tolower($3)}' | sort -u)
win_log "vmcp.exe imports: $(echo "$imports" | tr '\n' ' ')"
if echo "$imports" | grep -q 'winhvplatform'; then
  win_fail "vmcp.exe imports WinHvPlatform.dll: it would not start where the Hypervisor Platform is off"
fi
echo "$imports" | grep -qx 'kernel32.dll' || win_fail "objdump shows no import table for $exe"

# 4. Under wine, from a private temp folder: the ProcessPrng stub beside copies of the exes.
tmp=$(mktemp -d)
cleanup() {
  if [ -n "$WINESERVER" ]; then WINEPREFIX="$tmp/prefix" "$WINESERVER" -k >/dev/null 2>&1 || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT
mkdir -p "$tmp/bin" "$tmp/prefix"
x86_64-w64-mingw32-gcc -shared -O2 -s -o "$tmp/bin/bcryptprimitives.dll" \
  packaging/windows/processprng-stub.c -ladvapi32
cp "$exe" "$tests_exe" "$hostproc_exe" "$launch_exe" "$fake_qemu" "$tmp/bin/"
tests_bin="$tmp/bin/$(basename "$tests_exe")"
export WINEPREFIX="$tmp/prefix" WINEDEBUG=-all WINEDLLOVERRIDES="mscoree,mshtml=" DISPLAY="" WAYLAND_DISPLAY=""
win_lap "stub DLL and copies"

# First start creates the prefix (slow); its own output is noise.
timeout 180 "$WINE" "$tmp/bin/vmcp.exe" --help >"$tmp/help.txt" 2>"$tmp/help.err" \
  || { cat "$tmp/help.err" >&2; win_fail "vmcp.exe --help under wine exited with $?"; }
grep -q '^Usage: vmcp' "$tmp/help.txt" || { cat "$tmp/help.txt" >&2; win_fail "vmcp.exe --help printed no usage"; }
win_lap "vmcp.exe --help under wine (first start, makes the prefix)"

set +e
timeout 60 "$WINE" "$tmp/bin/vmcp.exe" doctor >"$tmp/doctor.txt" 2>"$tmp/doctor.err"
rc=$?
set -e
sed 's/^/   | /' "$tmp/doctor.txt" >&2
[ "$rc" -eq 1 ] || { cat "$tmp/doctor.err" >&2; win_fail "vmcp.exe doctor exited with $rc under wine, expected 1 (cannot run VMs, no crash)"; }
for want in \
  '[ok] Windows version: Windows' \
  '[--] WinHvPlatform.dll: WinHvPlatform.dll cannot be loaded (' \
  'Enable-WindowsOptionalFeature -Online -FeatureName HypervisorPlatform' \
  '[--] QEMU: not found (looked in: ' \
  'qemu.org/download' \
  'vmcp cannot run VMs here'; do
  grep -qF -- "$want" "$tmp/doctor.txt" || win_fail "vmcp.exe doctor output lacks: $want"
done
win_lap "vmcp.exe doctor under wine"

# The Windows unit tests, on (wine's) Windows: the OS layer for real (RtlGetVersion, WHP
# probe, Job Object kill-on-close) and the pure logic compiled for Windows.
timeout 120 "$WINE" "$tests_bin" qemu::host_windows qemu::platform_windows --test-threads=2 >"$tmp/tests.txt" 2>&1 \
  || { cat "$tmp/tests.txt" >&2; win_fail "vmcp-vm qemu::host_windows / qemu::platform_windows unit tests failed under wine"; }
grep -E '^test result:' "$tmp/tests.txt" >&2
timeout 120 "$WINE" "$tmp/bin/$(basename "$hostproc_exe")" --test-threads=2 >"$tmp/hostproc.txt" 2>&1 \
  || { cat "$tmp/hostproc.txt" >&2; win_fail "vmcp-host-process unit tests failed under wine"; }
grep -E '^test result:' "$tmp/hostproc.txt" >&2
for t in job_kills_its_process_on_drop job_kill_terminates_its_process process_queries; do
  grep -q "windows::tests::$t ... ok" "$tmp/hostproc.txt" \
    || win_fail "the host-process Windows test $t did not run under wine"
done
grep -q 'qemu::platform_windows::tests::spawned_child_is_in_the_job_and_killable ... ok' "$tmp/tests.txt" \
  || win_fail "the Windows QEMU spawn test did not run under wine"
win_lap "vmcp-vm windows:: and qemu::platform_windows unit tests under wine"

# The QEMU backend's Windows launch layer end to end, with a fake QEMU (examples/fake_qemu.rs):
# job, loopback channels, QMP, token handshake, graceful shutdown, drop, and QEMU dying when
# the process holding the VM is killed (TerminateProcess: only the Job Object can do that).
VMCP_TEST_FAKE_QEMU="Z:$tmp/bin/fake_qemu.exe" timeout 120 "$WINE" "$tmp/bin/$(basename "$launch_exe")" --nocapture --skip child_holding_a_vm \
  >"$tmp/launch.txt" 2>&1 || { cat "$tmp/launch.txt" >&2; win_fail "windows_launch tests failed under wine"; }
grep -E '^test result:' "$tmp/launch.txt" >&2
for t in windows_launch_with_a_fake_qemu qemu_dies_when_vmcp_is_killed; do
  grep -q "^test $t ... ok" "$tmp/launch.txt" || win_fail "$t did not pass under wine"
done
if grep -q 'SKIPPED' "$tmp/launch.txt"; then cat "$tmp/launch.txt" >&2; win_fail "windows_launch skipped under wine"; fi
win_lap "Windows launch layer with a fake QEMU under wine"

# 5. `vmcp image build` on Windows without Linux tools: vmcp.exe under wine unpacks the pinned
# .debs and writes the initramfs in Rust, from a folder with a space in its name; the result
# must be byte-identical to the image the Linux build makes from the same inputs. The inputs
# come from the host build into the user's cache (apt-get download; reused by later steps).
cargo build -p vmcp-guest-agent --locked --target x86_64-unknown-linux-musl --profile agent
agent_bin=target/x86_64-unknown-linux-musl/agent/vmcp-agent
cargo build -p vmcp-cli --locked
host_out=$(target/debug/vmcp image build --agent "$agent_bin" 2>"$tmp/host-image.err") \
  || { cat "$tmp/host-image.err" >&2; win_fail "host vmcp image build failed"; }
host_kernel=$(echo "$host_out" | sed -n 's/^kernel //p')
host_initrd=$(echo "$host_out" | sed -n 's/^initrd //p')
win_lap "host image build (inputs for the wine build)"
win_cache="$tmp/win cache"
mkdir -p "$win_cache/downloads"
image_dir=$(dirname "$host_kernel")
cp "$(dirname "$(dirname "$image_dir")")"/downloads/*.deb "$win_cache/downloads/"
cp "$agent_bin" "$tmp/bin/vmcp-agent"
timeout 300 "$WINE" "$tmp/bin/vmcp.exe" image build --cache-dir "Z:$win_cache" --agent "Z:$tmp/bin/vmcp-agent" \
  >"$tmp/win-image.txt" 2>"$tmp/win-image.err" \
  || { cat "$tmp/win-image.err" >&2; win_fail "vmcp.exe image build under wine failed"; }
win_image="$win_cache/images/$(basename "$image_dir")"
for f in "$host_kernel" "$host_initrd"; do
  cmp "$f" "$win_image/$(basename "$f")" \
    || win_fail "vmcp.exe image build under wine made a different $(basename "$f")"
done
win_log "vmcp.exe image build under wine: $(basename "$image_dir") identical to the Linux build"
win_lap "vmcp.exe image build under wine"

# 6. `vmcp run` on Windows without QEMU: the image is there (step 5), so the error must be the
# missing QEMU with the download page, exit 125, and nothing left in the runtime folder.
set +e
VMCP_CACHE_DIR="Z:$win_cache" timeout 60 "$WINE" "$tmp/bin/vmcp.exe" run -- uname -a \
  >"$tmp/run.txt" 2>"$tmp/run.err"
rc=$?
set -e
sed 's/^/   | /' "$tmp/run.err" >&2
[ "$rc" -eq 125 ] || win_fail "vmcp.exe run without QEMU exited with $rc under wine, expected 125"
grep -qF 'qemu-system-x86_64.exe was not found in PATH or in %ProgramFiles%\qemu' "$tmp/run.err" \
  || win_fail "vmcp.exe run without QEMU did not say where it looked"
grep -qF 'qemu.org/download' "$tmp/run.err" || win_fail "vmcp.exe run without QEMU did not name the download page"
win_lap "vmcp.exe run without QEMU under wine"
