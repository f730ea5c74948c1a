# Short fuzzing runs of every target in fuzz/ (everything that parses guest or network bytes):
# a smoke test that the targets build and find nothing quickly. Longer runs: see fuzz/README.md.
# cargo-fuzz needs nightly features; RUSTC_BOOTSTRAP lets the stable toolchain provide them.
secs="${VMCP_FUZZ_SECS:-10}"
cargo fuzz --version >/dev/null 2>&1 || {
  echo "cargo-fuzz is missing: run VMCP_INSTALL_CROSS=1 scripts/install-deps" >&2
  exit 1
}
cd fuzz
export RUSTC_BOOTSTRAP=1
targets=$(cargo fuzz list)
cargo fuzz build
for t in $targets; do
  # A private corpus dir per run: nothing is written into the repository.
  corpus=$(mktemp -d)
  rc=0
  # Inputs that once failed (fuzz/regressions/<target>/) are replayed first, every run.
  seeds=()
  [ -d "regressions/$t" ] && seeds=("regressions/$t")
  cargo fuzz run "$t" "$corpus" "${seeds[@]}" -- -max_total_time="$secs" -print_final_stats=1 >"$corpus.log" 2>&1 || rc=$?
  grep -E '^(stat::number_of_executed_units|==[0-9]+==|SUMMARY|Done)' "$corpus.log" >&2 || true
  [ "$rc" = 0 ] || tail -n 40 "$corpus.log" >&2
  rm -rf "$corpus" "$corpus.log"
  [ "$rc" = 0 ] || { echo "fuzz target $t failed (reproducer in fuzz/artifacts/$t)" >&2; exit 1; }
  echo "fuzz target $t: no crash in ${secs}s" >&2
done
