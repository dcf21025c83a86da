#!/usr/bin/env bash
# Both halves on this host, one after the other (args: ray_sweep.py's common ones; HALVES: their
# order, default "in-process ray"), each to its own JSON and log in /root/res; then a sentinel.
source /root/ctl/env.sh
cd /root/ctl
for half in ${HALVES:-in-process ray}; do
  echo "$half start $(date +%T) load $(cut -d' ' -f1 /proc/loadavg) OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}"
  python3 ray_sweep.py --$half "$@" --out-json /root/res/$half.json > /root/res/$half.log 2>&1
  echo "$half rc $? end $(date +%T)"
done
touch /root/res/DONE
