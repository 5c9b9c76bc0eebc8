#!/usr/bin/env bash
# Builds the .deb: the binary, its man pages and shell completions, then
# cargo-deb (installed when missing).
#   packaging/build-deb.sh                 # release build, .deb in target/debian/
#   DEB_OUT=DIR packaging/build-deb.sh     # the .deb in DIR
#   PROFILE=dev NO_BUILD=1 ...             # package the binary already built (tests)
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${PROFILE:-release}"
command -v cargo-deb >/dev/null || cargo install cargo-deb --version 3.8.0 --locked --quiet
if [ -z "${NO_BUILD:-}" ]; then
  cargo build --locked --profile "$profile" -p diskferry-agent
fi
target="${CARGO_TARGET_DIR:-$PWD/target}"
case "$profile" in dev|test) dir=debug ;; *) dir="$profile" ;; esac
bin="$target/$dir/diskferry"
out="$PWD/packaging/generated"
rm -rf "$out"
mkdir -p "$out/man" "$out/completions"
"$bin" man --out "$out/man" >/dev/null
gzip -9n "$out/man/"*.1
"$bin" completions bash >"$out/completions/diskferry"
"$bin" completions zsh >"$out/completions/_diskferry"
"$bin" completions fish >"$out/completions/diskferry.fish"
args=(-p diskferry-agent --no-build --profile "$profile")
[ -n "${DEB_OUT:-}" ] && args+=(-o "$DEB_OUT")
cargo deb "${args[@]}"
