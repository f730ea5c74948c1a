# VM end to end. The VM integration tests themselves (crates/vm/tests/qemu_vm.rs,
# crates/cli/tests/run_vm.rs) run in 50-test.sh under VMCP_REQUIRE_VM=1, so a missing QEMU or
# image fails there instead of skipping. Here: doctor must find a working backend and the
# built image, and the README command must behave as documented.
./target/debug/vmcp doctor | tee /tmp/vmcp-doctor.out
grep -qE '^ *\[ok\] image:' /tmp/vmcp-doctor.out || { echo "vmcp doctor finds no guest image" >&2; exit 1; }
rm -f /tmp/vmcp-doctor.out
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
