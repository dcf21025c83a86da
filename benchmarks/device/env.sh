# sourced on the device: the kit's packages first, the GPU hidden (solves on the CPU in both halves)
export PYTHONPATH=/root/sp
export CUDA_VISIBLE_DEVICES=
export SPARSEC_CACHE=/root/cache
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
export PATH=/root/sp/bin:$PATH
