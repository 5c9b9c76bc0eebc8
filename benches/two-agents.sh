# Sourced by failback.sh and downtime.sh: two agents A and B on loopback,
# each serving target "vm" ($W/a/vm.img, $W/b/vm.img) to the other (and, with
# EXTRA_TARGET=NAME, a second target $W/X/NAME.img), started in the
# background and stopped when the script exits. Needs DF, W, PORT_A, PORT_B.
A=$W/a/vm.img; B=$W/b/vm.img
FA=$($DF init --state-dir $W/a/state); FB=$($DF init --state-dir $W/b/state)
mk() { # dir peer_fp disk port
cat > $1/serve.toml <<T
listen = "127.0.0.1:$4"
state_dir = "$1/state"
[[peer]]
name = "p"
fingerprint = "$2"
[[target]]
name = "vm"
path = "$3"
allowed_peers = ["p"]
retention = 3
T
if [ -n "${EXTRA_TARGET:-}" ]; then
cat >> $1/serve.toml <<T
[[target]]
name = "$EXTRA_TARGET"
path = "$1/$EXTRA_TARGET.img"
allowed_peers = ["p"]
T
fi
}
mk $W/a $FB $A $PORT_A; mk $W/b $FA $B $PORT_B
$DF serve --config $W/a/serve.toml 2>$W/a/log & PA=$!
$DF serve --config $W/b/serve.toml 2>$W/b/log & PB=$!
trap "kill $PA $PB 2>/dev/null" EXIT
sleep 1
