"""torchrun worker of test_gptq.py: calibrate and export with GPTQ a fixed random tiny model, as a run
does after training; every rank writes the artifact bytes it got to $OUT_DIR/rank<r>.ptz, and rank 0 the RTN
export of the same weights to rtn.ptz. Run alone it is world 1."""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as tg  # noqa: E402

env = dict(os.environ)
cfg = tg.Config.from_env(env)
rt = tg.setup_runtime(cfg, env)
tg.PASSTHROUGH_MAX = 1024  # the tiny model's matrices become int6
torch.manual_seed(0)
model = tg.GPT(cfg)
with torch.no_grad():  # trained-like weights (the trainer's init has zero output projections)
    for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p)) if p.dim() < 2 else p.normal_(0.0, p.size(-1) ** -0.5)
hessians = tg.calibrate(model, cfg, rt)
blob = tg.export_ranks(model, cfg, rt, 0, hessians)[0]
out = Path(cfg.out_dir)
out.mkdir(parents=True, exist_ok=True)
(out / f"rank{rt.rank}.ptz").write_bytes(blob)
if rt.is_main:
    (out / "rtn.ptz").write_bytes(tg.export_model(model, cfg)[0])
if rt.distributed:
    torch.distributed.destroy_process_group()
