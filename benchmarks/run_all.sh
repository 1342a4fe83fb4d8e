#!/usr/bin/env bash
# Run every netstack benchmark: `run_all.sh` (full, several minutes) or `run_all.sh --quick`
# (smoke mode, each script < 30 s, about a minute in all; what CI may run). Exit status: the
# first failure's.
# Needs root: connect_scaling, publish_scaling, iperf_dnat and dns_qps work inside throwaway
# network namespaces nst-bench-<pid>* (iperf_dnat also needs iperf3; dns_qps needs dnsperf,
# aardvark-dns and dnsmasq-base: `.ci/setup --test` installs them).
# docker_run runs a private dockerd (docker.io, runc, busybox-static) in its namespace.
set -u -o pipefail
case "${1:-}" in
  "" | --quick) ;;
  *) echo "usage: $0 [--quick]" >&2; exit 2 ;;
esac
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py=${PYTHON:-python3}
rc=0
for bench in ipam_fill connect_scaling publish_scaling iperf_dnat dns_qps cni_latency docker_run; do
  echo "=== $bench ${1:-}"
  "$py" "$here/$bench.py" ${1:+"$1"} || { r=$?; echo "=== $bench FAILED (rc=$r)"; [ "$rc" = 0 ] && rc=$r; }
  echo
done
exit "$rc"
