#!/usr/bin/env bash
# The full test command: installs what it needs, then runs every check the project has.
#   ./scripts/test.sh            everything (what CI runs)
#   FUZZ_SECONDS=60 ./scripts/test.sh   longer fuzz runs (default 20 s per target)
set -euo pipefail
cd "$(dirname "$0")/.."

FUZZ_SECONDS="${FUZZ_SECONDS:-20}"
step() { printf '\n==> %s\n' "$*"; }
started=$SECONDS

step "toolchain and tools"
rustup component add rustfmt clippy >/dev/null 2>&1 || true
rustup target add x86_64-unknown-none >/dev/null
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

step "cargo fmt --check"
cargo fmt --all --check
cargo fmt --manifest-path fuzz/Cargo.toml --check

step "cargo clippy --all-targets -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "QEMU and the guest kernel for tests/tests/qemu_vhost.rs"
if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends qemu-system-x86 </dev/null ||
        { apt-get update -q </dev/null && apt-get install -y -q --no-install-recommends qemu-system-x86 </dev/null; } ||
        echo "qemu-system-x86 could not be installed: the QEMU tests will skip"
fi
kernel_started=$SECONDS
VMBUS_GUEST_KERNEL_DIR=$(scripts/build-guest-kernel.sh </dev/null | tail -n 1)
export VMBUS_GUEST_KERNEL_DIR
echo "guest kernel in $VMBUS_GUEST_KERNEL_DIR ($((SECONDS - kernel_started)) s)"

step "workspace tests"
cargo test --workspace --locked

step "no_std builds (x86_64-unknown-none)"
cargo build --locked --target x86_64-unknown-none -p ringbuf --no-default-features
cargo build --locked --target x86_64-unknown-none -p vmbus-core -p vsc-guest --no-default-features

step "loom models"
RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
    cargo test --locked -p ringbuf --test loom --release

step "fuzz targets (${FUZZ_SECONDS} s each, stable toolchain without sanitizer)"
targets=$(cd fuzz && cargo fuzz list)
log=$(mktemp)
for t in $targets; do
    echo "--- fuzz $t"
    if ! (cd fuzz && cargo fuzz run -s none "$t" -- -max_total_time="$FUZZ_SECONDS" -print_final_stats=1) >"$log" 2>&1; then
        tail -n 60 "$log"
        echo "fuzz target $t failed (crash input under fuzz/artifacts/$t/)"
        exit 1
    fi
    grep -E 'DONE|stat::number_of_executed_units|stat::average_exec_per_sec' "$log" || true
done
rm -f "$log"

step "all checks passed in $((SECONDS - started)) s"
