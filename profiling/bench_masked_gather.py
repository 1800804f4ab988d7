"""Benchmark the token gathers: the authors' method, the best PyTorch built-in, and our kernels.

Run from the repository root: ``python -m profiling.bench_masked_gather --device cuda --size vith14``.

Cases (ViT-H/14 at 224 px, batch 128: B=128, N=256, D=1280; M=4 target blocks of K=43 tokens,
one context block of K=72; predictor width 384), each timed forward + backward except targets:
- gather: x [B, N, D] -> [M*B, K, D] (what the loss and the predictor's context repeat use);
- context+pos: (x + pos) at the context tokens (the encoder's input), gradient to x, on the step's
  operands: the tokens in the layout PatchEmbed returns (read off the module itself), in the row's
  dtype (bf16: what the convolution gives under autocast), and the fp32 position embedding;
- context+pos transposed: the same with the tokens as the convolution gives them on images in
  their own layout (a transposed view, features N elements apart), for comparison;
- mask_tokens: mask token + pos at the target tokens, predictor width, gradient to the mask token;
- targets: LayerNorm of the target encoder's output at the target tokens (forward only, no_grad).

Methods: 'authors' = their ``apply_masks`` (index repeat over D, gather per block, cat) and their
order of work (add pos / normalise over all N first); 'builtin' = advanced indexing; 'kernel' = the
ops in kernels/ (on a CPU these take their plain-PyTorch path, not Triton). Bytes are the minimum
each case must move, so GB/s compare methods on the same footing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ijepa_fast.kernels.inputs import GATHER_SHAPES, make_gather_inputs, patch_layout
from ijepa_fast.kernels.masked_gather import mask_tokens, masked_gather, masked_gather_add
from ijepa_fast.kernels.target_norm_gather import target_norm_gather
from ijepa_fast.models.vit import PatchEmbed
from profiling import _bench_util as bu

CASES = ("gather", "context+pos", "context+pos transposed", "mask_tokens", "targets")


def patch_embed_layout(x: torch.Tensor) -> torch.Tensor:
    """The values of ``x`` [B, N, D] in the memory layout PatchEmbed gives its tokens, read off a
    small PatchEmbed's output (the order of its strides)."""
    probe = PatchEmbed(patch_size=1, embed_dim=4)(torch.zeros(2, 3, 2, 3))  # [2, 6, 4]: sizes all distinct
    order = sorted(range(3), key=lambda i: -probe.stride(i))
    return x.permute(order).contiguous().permute([order.index(i) for i in range(3)])


def apply_masks_authors(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The authors' method: per block, repeat the indices over D, gather, then concatenate."""
    return torch.cat([torch.gather(x, 1, m.unsqueeze(-1).repeat(1, 1, x.size(-1))) for m in idx], dim=0)


def gather_builtin(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    M, B, K = idx.shape
    return x[torch.arange(B, device=x.device).view(1, B, 1), idx].reshape(M * B, K, -1)  # (M*B, K, D)


def _methods(case: str, t: dict) -> dict:
    """method -> zero-argument function producing the case's output (before any backward)."""
    x, pos, tok, idx = t["x"], t["pos"], t["mask_token"], t["idx"]
    if case == "gather":
        return {
            "authors": lambda: apply_masks_authors(x, idx),
            "builtin": lambda: gather_builtin(x, idx),
            "kernel": lambda: masked_gather(x, idx),
        }
    if case.startswith("context+pos"):
        return {
            "authors": lambda: apply_masks_authors(x + pos, idx),
            "builtin": lambda: gather_builtin(x, idx) + pos[0][idx[0]],
            "kernel": lambda: masked_gather_add(x, pos, idx),
        }
    if case == "mask_tokens":
        M, B, K = idx.shape

        def authors():
            pos_b = apply_masks_authors(pos.repeat(B, 1, 1), idx)  # (M*B, K, D)
            return tok.repeat(M * B, K, 1) + pos_b

        return {
            "authors": authors,
            "builtin": lambda: tok + pos[0][idx].reshape(M * B, K, -1),
            "kernel": lambda: mask_tokens(tok, pos, idx),
        }
    D = x.size(-1)  # targets
    return {
        "authors": lambda: apply_masks_authors(F.layer_norm(x, (D,)), idx),
        "builtin": lambda: F.layer_norm(gather_builtin(x, idx), (D,)),
        "kernel": lambda: target_norm_gather(x, idx),
    }


def _case_inputs(case: str, s: dict, device: str, dtype: torch.dtype) -> dict:
    context = case.startswith("context+pos")
    M, K, D = (1, s["K_ctx"], s["D"]) if context else (s["M"], s["K"], s["D"])
    if case == "mask_tokens":
        D = s["D_pred"]
    t = make_gather_inputs(s["B"], s["N"], D, M, K, dtype=dtype, device=device, unique=True, pos_grad=False)
    if context:  # the step's operands: PatchEmbed's tokens, the fp32 position embedding buffer
        layout = patch_layout if case.endswith("transposed") else patch_embed_layout
        t["x"] = layout(t["x"].detach()).requires_grad_()
        t["pos"] = t["pos"].float()
    if case in ("mask_tokens", "targets"):
        t["x"].requires_grad_(False)
    if case == "targets":
        t["mask_token"].requires_grad_(False)
    return t


def _bytes(case: str, t: dict) -> int:
    """Minimum bytes: read the gathered rows (+ pos rows), write the output; backward: read grad,
    write grad (each operand at its own element size)."""
    M, B, K = t["idx"].shape
    x, pos = t["x"], t["pos"]
    e, D, rows = x.element_size(), x.size(-1), M * B * K
    if case == "gather":
        return rows * D * e * 2 + (rows * D * e + x.numel() * e)
    if case.startswith("context+pos"):
        out = torch.promote_types(x.dtype, pos.dtype).itemsize
        return rows * D * (e + pos.element_size() + out) + (rows * D * out + x.numel() * e)
    if case == "mask_tokens":
        return rows * D * e * 2 + rows * D * e  # backward reads grad once (the sum for the mask token)
    return rows * D * e * 2


def run_case(case: str, s: dict, device: str, dtype: torch.dtype, reps: int) -> list[dict]:
    t = _case_inputs(case, s, device, dtype)
    leaves = [v for v in (t["x"], t["mask_token"]) if v.requires_grad]
    rows = []
    for method, fwd in _methods(case, t).items():
        if leaves:
            grad = torch.randn_like(fwd())

            def fn(fwd=fwd, grad=grad):
                fwd().backward(grad)
        else:

            def fn(fwd=fwd):
                with torch.no_grad():
                    fwd()

        timing = bu.time_ms(fn, device, reps, grad_to_none=leaves)
        dtype_name = str(dtype).removeprefix("torch.")
        rows.append(
            {"case": f"{case} {dtype_name}", "method": method, "dtype": dtype_name, "bytes": _bytes(case, t), **timing}
        )
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    args = bu.parse_args(argv, "Benchmark the masked-token gathers (forward + backward).")
    s = GATHER_SHAPES[args.size]
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for case in CASES:
            rows += run_case(case, s, args.device, dtype, args.reps)
    copy_gbs = bu.copy_bandwidth_gbs(args.device, 256 << 20 if args.device == "cuda" else 16 << 20, args.reps)
    bu.add_rates(rows, copy_gbs)
    meta = {
        "device": bu.device_name(args.device),
        "size": args.size,
        "shapes": s,
        "copy_bandwidth_gb_s": round(copy_gbs, 1),
        "timing": "fwd+bwd (targets: fwd only)",
        "context_operands": "tokens in PatchEmbed's layout (or transposed), in the row's dtype; fp32 pos",
        "note": "on a CPU the 'kernel' rows run the ops' plain-PyTorch path, not Triton",
    }
    bu.report(rows, meta, args.json)
    return rows


if __name__ == "__main__":
    main()
