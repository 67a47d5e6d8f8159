#!/usr/bin/env bash
# The project's test command (README "Run the tests"; CI runs it through .ci/run).
#
# 1. Installs the Debian packages the tests need, when one is missing (dpkg-query decides, so a
#    rerun with everything present installs nothing): apt-get, with sudo when not root.
# 2. Makes a missing browser, mpirun or data set a test failure instead of a skipped check
#    (BNLAB_REQUIRE_BROWSER, BNLAB_REQUIRE_MPI, BNLAB_REQUIRE_DATA = 1, always: step 1 installed
#    them, so their absence is a fault; set one to 0 beforehand to skip that check instead).
# 3. Checks that the README's Rust examples are the crate READMEs' (which run as doctests).
# 4. Runs rustfmt, clippy without and with the `mpi` feature, and every test with `mpi`.
#
# Needs Rust (rustup, the toolchain in Cargo.toml's rust-version or newer) and a Debian system.
set -euo pipefail
cd "$(dirname "$0")/.."

# dataset-fashion-mnist: the default data; chromium: the report's browser test;
# fonts-dejavu-core: text in the PNG plots; openmpi-bin libopenmpi-dev libclang-dev: the `mpi`
# feature (mpirun, the MPI library, libclang for rsmpi's bindings); gcc, pkg-config: linking,
# and finding the MPI library.
PACKAGES=(dataset-fashion-mnist chromium fonts-dejavu-core openmpi-bin libopenmpi-dev libclang-dev gcc pkg-config)

install_missing() {
    if ! command -v dpkg-query >/dev/null; then
        echo "test.sh: not a Debian system; install the equivalents of: ${PACKAGES[*]}" >&2
        return
    fi
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        if [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" != "install ok installed" ]; then
            missing+=("$p")
        fi
    done
    [ ${#missing[@]} -eq 0 ] && return
    echo "test.sh: installing ${missing[*]}" >&2
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then sudo=(sudo); fi
    "${sudo[@]}" apt-get update -q
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# Every ```rust block of README.md must appear, byte for byte, as a block of a crate README.
check_readme_examples() {
    local dir=target/readme-examples f c i=0 found
    rm -rf "$dir" && mkdir -p "$dir"
    extract() { awk -v out="$2" '/^```rust$/ {n++; on=1; next} /^```$/ {on=0} on {print > (out "." n)}' "$1"; }
    extract README.md "$dir/top"
    for f in crates/*/README.md; do i=$((i + 1)); extract "$f" "$dir/crate$i"; done
    for f in "$dir"/top.*; do
        [ -e "$f" ] || continue
        found=0
        for c in "$dir"/crate*.*; do
            if cmp -s "$f" "$c"; then found=1; break; fi
        done
        if [ $found -eq 0 ]; then
            echo "test.sh: README.md's Rust example ${f##*.} is not in any crates/*/README.md;" \
                "keep them identical (the crate READMEs are the doctested copies)" >&2
            exit 1
        fi
    done
}

command -v cargo >/dev/null || {
    echo "test.sh: cargo not found; install Rust with rustup (https://rustup.rs)" >&2
    exit 1
}
install_missing
for component in rustfmt clippy; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
        rustup component add "$component"
    fi
done

# 1 unless the caller set 0 (then unset: the data tests treat any value as "required").
for var in BNLAB_REQUIRE_BROWSER BNLAB_REQUIRE_MPI BNLAB_REQUIRE_DATA; do
    if [ "${!var:-1}" = 0 ]; then unset "$var"; else export "$var=1"; fi
done

set -x
check_readme_examples
cargo fmt --check
cargo clippy --all-targets -- -D warnings
cargo clippy --all-targets --features bnlab/mpi -- -D warnings
cargo test --workspace --features bnlab/mpi
