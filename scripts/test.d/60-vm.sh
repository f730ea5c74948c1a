# VM tests: real QEMU boots (TCG where KVM cannot boot a kernel). Builds the guest agent and
# image first if an earlier step has not. VMCP_REQUIRE_VM=1 turns a missing prerequisite into a
# failure instead of a SKIPPED test.
arch=$(uname -m)
cargo build --locked -q -p vmcp-guest-agent --target "$arch-unknown-linux-musl" --profile agent
cargo build --locked -q -p vmcp-cli
./target/debug/vmcp image build >/dev/null
./target/debug/vmcp doctor
export VMCP_REQUIRE_VM=1
cargo test --locked -p vmcp-vm --test qemu_vm
cargo test --locked -p vmcp-cli --test run_vm
# The README command: guest kernel on stdout, 'to-stderr' on stderr, exit status 3.
set +e
./target/debug/vmcp run -- sh -c 'uname -r; echo to-stderr >&2; exit 3' >/tmp/vmcp-readme.out 2>/tmp/vmcp-readme.err </dev/null
rc=$?
set -e
cat /tmp/vmcp-readme.out /tmp/vmcp-readme.err
[ "$rc" = 3 ] || { echo "README command exited $rc, expected 3" >&2; exit 1; }
grep -qx 'to-stderr' /tmp/vmcp-readme.err
grep -Eq '^[0-9]+\.[0-9]+' /tmp/vmcp-readme.out
rm -f /tmp/vmcp-readme.out /tmp/vmcp-readme.err
