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
from pathlib import Path

import torch

from .checkpoints import (load_state_strict, load_torchvision_state, read_torch_file,
                          save_checkpoint)
from .errors import check_choice, check_int, exit_status
from .files import CheckpointError, check_output, sha256_file
from .models.vit import (CONFIGS, HEAD, build, image_tower_state,
                         is_torchscript_archive, logit_scale, set_zero_shot_head,
                         torchscript_state)


def read_text_embeddings(path: str | Path) -> torch.Tensor:
    """A tensor [num_classes, embedding] saved with torch.save (read with weights_only)."""
    if is_torchscript_archive(path):  # torch's own refusal is a page of advice
        raise CheckpointError(f"class text embeddings {path} is a TorchScript archive (a model?), "
                              f"not a tensor: save the embeddings with torch.save(tensor, path)")
    value = read_torch_file(path, what="class text embeddings")
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"{path} must hold one tensor [num_classes, embedding] "
                              f"(torch.save(tensor, path)), got {type(value).__name__}")
    return value


def read_clip_state(path: str | Path, trust_torchscript: bool = False,
                    trust_checkpoint: bool = False, arch: str | None = None
                    ) -> dict[str, torch.Tensor]:
    """A CLIP state dict from a file: plain (optionally under `state_dict`, `module.`
    prefixes), ours (refused when it records another network than `arch`), or a
    TorchScript archive when `trust_torchscript`. A plain file that holds more than
    tensors is read with full unpickling only when `trust_checkpoint` (see
    `deep.checkpoints.load_model`)."""
    if is_torchscript_archive(path):
        if not trust_torchscript:  # (the sweep's refusal names --trust-checkpoint, its switch)
            raise CheckpointError(
                f"{path} is a TorchScript archive (as OpenAI's CLIP .pt files are). Reading one "
                "runs code stored inside it, so it is refused by default: if you trust the "
                "file, add --trust-torchscript, or use open_clip's plain state dict of the "
                "same weights instead")
        return torchscript_state(path, trust=True)
    return load_torchvision_state(path, trust_checkpoint, arch)


def prepare_checkpoint(weights: str | Path, out: str | Path, num_classes: int,
                       arch: str = "clip-vit-b16", text_embeddings: str | Path | None = None,
                       trust_torchscript: bool = False, trust_checkpoint: bool = False) -> Path:
    """Write a checkpoint of this toolkit (arch, num_classes, 3 channels) from CLIP
    weights, with a zero-shot head when `text_embeddings` is given (else the file's own
    `head.*`, or a fresh head seeded 0). Use it as --checkpoint, or as `pretrain --init`
    to train a source model."""
    check_int("num_classes", num_classes)
    check_choice("arch", arch, sorted(CONFIGS))
    out = check_output(out)
    if out.resolve() == Path(weights).expanduser().resolve():
        raise CheckpointError(f"--out {out} is the --weights file: writing the checkpoint would "
                              f"replace the weights it is made from; choose another --out")
    state = read_clip_state(weights, trust_torchscript, trust_checkpoint, arch)
    embeddings = None if text_embeddings is None else read_text_embeddings(text_embeddings)
    if embeddings is not None:  # the zero-shot head replaces any head the file has
        state = {k: v for k, v in state.items() if not k.startswith(HEAD + ".")}
    model = build(arch, num_classes)
    load_state_strict(model, image_tower_state(state, model, str(weights)), what=str(weights))
    meta = {"source_weights": Path(weights).name, "source_sha256": sha256_file(weights)}
    if embeddings is not None:
        scale = logit_scale(state)
        set_zero_shot_head(model, embeddings, scale)
        meta.update(head="zero-shot", text_embeddings=Path(text_embeddings).name,
                    logit_scale=scale)
    elif any(k.startswith(HEAD + ".") for k in state):
        meta["head"] = "from the weights file"
    else:
        meta["head"] = "random (seed 0)"
    return save_checkpoint(out, model, arch, num_classes, 3, meta=meta)


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
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="read a plain file that holds more than tensors with full unpickling "
                   "(may run code: trusted files only)")
    args = parser.parse_args(argv)

    def prepare() -> None:
        path = prepare_checkpoint(args.weights, args.out, args.num_classes, args.arch,
                                  args.text_embeddings, args.trust_torchscript,
                                  args.trust_checkpoint)
        print(f"wrote {path}")
    return exit_status(prepare)


if __name__ == "__main__":
    sys.exit(main())
