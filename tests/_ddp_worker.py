"""One rank of tests/test_ddp.py: a few GALI-8 training steps under DDP on the CPU (gloo), each
rank on its own data and noise, then every rank's parameter sums written to a JSON file."""

import itertools
import json
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs

from gali_ext.gali import build_gali
from gali_ext.recipes.models import build_ali_models
from gali_ext.trainer import train_step


def main(out: str, n_dis: int) -> None:
    accelerator = Accelerator(
        cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)]
    )
    torch.manual_seed(0)
    models = build_ali_models("digits")
    gali = build_gali("gali8", models)
    d_opt = torch.optim.Adam(gali.head.parameters(), 1e-3)
    eg = itertools.chain(models.encoder.parameters(), models.generator.parameters())
    g_opt = torch.optim.Adam(eg, 1e-3)
    prepared, d_opt, g_opt = accelerator.prepare(gali, d_opt, g_opt)
    torch.manual_seed(1 + accelerator.process_index)  # other data and noise on each rank
    for _ in range(2):
        batches = [torch.rand(6, 1, 16, 16) * 2 - 1 for _ in range(n_dis)]
        train_step(prepared, batches, d_opt, g_opt, n_dis=n_dis, accelerator=accelerator)
    with torch.no_grad():
        sums = torch.stack(
            [
                torch.stack([p.double().sum() for p in module.parameters()]).sum()
                for module in (models.encoder, models.generator, gali.head)
            ]
        )
    gathered = accelerator.gather(sums[None])
    if accelerator.is_main_process:
        result = {"processes": accelerator.num_processes, "sums": gathered.tolist()}
        with open(out, "w") as f:
            json.dump(result, f)
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
