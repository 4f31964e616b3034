#!/bin/sh
# Run pytest as on an AMD EPYC Zen 3 (AVX2, no AVX-512, no VNNI), from any x86 machine:
#   * qemu-x86_64 -cpu EPYC-Milan answers CPUID, so ONNX Runtime (MLAS) and torch pick the kernels
#     they pick on Zen 3 (u8 x s8 through the saturating vpmaddubsw);
#   * /proc/cpuinfo is replaced, in a private mount namespace, by this machine's with every
#     AVX-512 and VNNI flag removed, so lowbit's target detection sees what it sees on Zen 3.
# Needs root (unshare -m, mount --bind) and qemu-user (apt-get install qemu-user).  Slow (TCG):
# pass the test files that compare with ONNX Runtime, not the whole suite.  Subprocesses a test
# starts run natively, so leave out the CLI tests.
#
#   sh benchmarks/pytest_without_vnni.sh tests/runtime tests/export/test_onnx_export.py
set -eu
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
fake=$(mktemp)
trap 'rm -f "$fake"' EXIT
awk -F: '
  $1 ~ /^flags[ \t]*$/ { n = split($2, f, " "); line = $1 ":";
                         for (i = 1; i <= n; i++) if (f[i] !~ /^avx512/ && f[i] !~ /vnni/ && f[i] !~ /^amx/) line = line " " f[i];
                         print line; next }
  $1 ~ /^model name[ \t]*$/ { print $1 ": AMD EPYC (qemu-x86_64 -cpu EPYC-Milan: Zen 3, AVX2, no VNNI)"; next }
  { print }' /proc/cpuinfo > "$fake"
cd "$repo"
unshare -m sh -c 'mount --bind "$0" /proc/cpuinfo && shift && exec qemu-x86_64 -cpu EPYC-Milan "$@" 2>&1 | grep -v "TCG doesn.t support"' \
  "$fake" _ "$python" -m pytest -p no:cacheprovider -q -rfE "$@"
