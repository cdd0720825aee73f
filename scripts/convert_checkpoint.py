"""Convert an official DAPS checkpoint into a diffusers model folder usable as +model.name=diffusers +model.path=<out>.

    python scripts/convert_checkpoint.py --config configs/model/ffhq256ddpm.yaml [--checkpoint PATH] [--out DIR]
    python scripts/convert_checkpoint.py --config configs/model/ffhq256ldm.yaml --allow-unsafe-pickle   # see below
    python scripts/convert_checkpoint.py --config configs/model/imagenet256ldm.yaml   # class-conditional cin256

The architecture comes from the model config (its ``name``: adm | ldm; an ldm with ``cond_stage_config`` is
class-conditional and its folder holds class_embedding.safetensors). The checkpoint is read with
torch.load(weights_only=True); a file that needs arbitrary unpickling is refused unless --allow-unsafe-pickle is
given (unpickling can run code stored in the file: use it only for files from a source you trust).
posterior_sample.py does the same conversion on first use and caches it in the config's ``converted`` folder.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cores.convert import PARTS, convert  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, required=True, help="a model config of kind adm or ldm")
    ap.add_argument("--checkpoint", type=Path, help="default: the config's checkpoint")
    ap.add_argument("--out", type=Path, help="default: the config's converted folder")
    ap.add_argument("--allow-unsafe-pickle", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = yaml.safe_load(args.config.read_text())
    checkpoint = args.checkpoint or Path(cfg["checkpoint"])
    if not checkpoint.is_file():
        raise SystemExit(f"checkpoint not found: {checkpoint.resolve()}. {cfg.get('download', '')}")
    if cfg["name"] not in PARTS:
        raise SystemExit(f"{args.config}: name must be adm or ldm, got {cfg['name']!r}")
    try:
        out = convert(cfg["name"], checkpoint, cfg["architecture"], args.out or Path(cfg["converted"]),
                      args.allow_unsafe_pickle)
    except ValueError as err:
        raise SystemExit(str(err)) from err
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
