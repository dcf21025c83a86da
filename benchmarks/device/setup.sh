#!/usr/bin/env bash
# On the device, in the carried tree: join the kit's parts, install it into /root/sp, build the
# model, then start the run in the background (poll.sh follows it).  Args: ray_sweep.py's.
set -euo pipefail
cp .whl/ray16/wh.* /root/stash/ 2>/dev/null || true
ls -la /root/stash
cat /root/stash/wh.* > /root/kit.tar
rm -rf /root/kit && mkdir -p /root/kit /root/res /root/cache && tar -xf /root/kit.tar -C /root/kit
python3 -m pip install -q --no-index --no-deps --target /root/sp /root/kit/*.whl .whl/ray16/new/*.whl 2>&1 | tail -3
rm -rf /root/ctl && cp -r .whl/ray16/ctl /root/ctl && cp benchmarks/ray_sweep.py /root/ctl/
source /root/ctl/env.sh
python3 -c "import sys, ray, sparsec, transformers, torch, onnxruntime as o; print(sys.version.split()[0], ray.__version__, transformers.__version__, torch.__version__, o.__version__, o.get_available_providers())"
nproc; free -g | head -2
cd /root/ctl
t0=$(date +%s); python3 -c "from sparsec.models import build; print(build('smollm2'))"; echo "build $(( $(date +%s) - t0 )) s"
setsid nohup bash /root/ctl/chain.sh "$@" > /root/res/chain.log 2>&1 &
echo started
