#!/usr/bin/env bash
# Wait up to $1 s for the run (chain.sh's sentinel, or both halves' JSON), printing progress;
# copy /root/res to $OUT either way.
end=$(( $(date +%s) + ${1:-240} ))
finished() { [ -e /root/res/DONE ] || { [ -e /root/res/in-process.json ] && [ -e /root/res/ray.json ]; }; }
while ! finished && [ "$(date +%s)" -lt "$end" ]; do sleep 10; done
echo "$(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg) done=$(finished && echo yes || echo no)"
for f in /root/res/*.log; do echo "== $f"; tail -c 600 "$f"; done
ps -eo pcpu,etimes,args --sort=-pcpu | grep -v "ps -eo" | head -8
mkdir -p "$OUT" && cp -r /root/res/. "$OUT"/ 2>/dev/null; ls /root/res
