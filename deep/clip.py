"""`python -m deep.clip prepare`: CLIP weights -> a checkpoint of this toolkit.

    python -m deep.clip prepare --weights open_clip_vit_b16.bin --num-classes 2 \\
        --out clip-vit-b16-camelyon17.pt [--text-embeddings classes.pt]

Reads a CLIP state dict (open_clip's plain files; OpenAI's TorchScript `.pt` only with
--trust-torchscript, since reading one runs its code), keeps the image tower, adds a
head (zero-shot from class text embeddings, or fresh and seeded) and writes our
checkpoint format. Use the result as `--checkpoint`, or as `pretrain --init` to
fine-tune a source model first. The network itself is `deep.models.vit`.
"""

from __future__ import annotations

import argparse
import sys

from .models.vit import CONFIGS, prepare_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deep.clip",
                                     description="CLIP ViT weights -> a checkpoint of this toolkit")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="CLIP image tower (+ optional zero-shot head) -> checkpoint")
    p.add_argument("--weights", required=True, help="CLIP state dict (open_clip, or converted)")
    p.add_argument("--out", required=True)
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--arch", default="clip-vit-b16", choices=sorted(CONFIGS))
    p.add_argument("--text-embeddings", help="tensor [num_classes, 512] of class text "
                   "embeddings (torch.save); the head becomes CLIP's zero-shot classifier")
    p.add_argument("--trust-torchscript", action="store_true",
                   help="read a TorchScript archive (runs its code: trusted files only)")
    args = parser.parse_args(argv)
    try:
        path = prepare_checkpoint(args.weights, args.out, args.num_classes, args.arch,
                                  args.text_embeddings, args.trust_torchscript)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
