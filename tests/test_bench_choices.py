"""The micro-benchmark of implementation choices times equivalent things: every variant of a case
computes what the variant the code uses computes, on the same input."""

from __future__ import annotations

import torch

from profiling import bench_choices as bc


def _outputs(variants: dict, normalise) -> list[torch.Tensor]:
    return [normalise(name, fn(3)) for name, fn in variants.items()]


def test_target_union_variants_agree():
    a, b = _outputs(bc.case_target_union(B=5, M=3, N=12), lambda _, t: t)
    assert torch.equal(a, b) and a.any() and not a.all()


def test_block_mask_variants_agree():
    a, b = _outputs(bc.case_block_tables(B=7, H=6, W=5, h=3, w=2), lambda _, t: t)
    assert torch.equal(a, b)
    assert (a.sum(1) == 3 * 2).all()  # every block holds h * w patches


def test_winner_orderings_agree():
    a, b, c = _outputs(bc.case_order_winners(R=6, N=20, k=7), lambda _, t: t)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert (a.diff(dim=1) > 0).all()


def test_count_dtypes_agree():
    a, b = _outputs(bc.case_count_dtype(R=4, N=30, k=9), lambda _, t: t.long())
    assert torch.equal(a, b)


def test_probe_softmax_layouts_agree():
    major, last = (fn(3) for fn in bc.case_probe_softmax(P=2, K=3, n=5).values())
    assert torch.allclose(major.transpose(1, 2), last)
    assert torch.allclose(major.sum(1), torch.ones(2, 5))


def test_path_variants_agree():
    a, b = _outputs(bc.case_scan_paths(count=50), lambda _, paths: [str(p) for p in paths])
    assert a == b and len(a) == 50


def test_table_names_the_used_variant_of_every_case():
    rows = [
        {"case": "c", "variant": "x (used)", "median_ms": 1.0, "p20_ms": 0.9, "p80_ms": 1.1, "relative": 1.0},
        {"case": "c", "variant": "y", "median_ms": 2.0, "p20_ms": 1.8, "p80_ms": 2.2, "relative": 2.0},
    ]
    text = bc.table(rows)
    assert "| c | y | 2.000 | 1.800 | 2.200 | 2.00 |" in text


def test_every_case_marks_exactly_one_used_variant():
    for case, (make, _) in bc.CASES.items():
        names = list(make())
        assert len(names) >= 2 and sum("(used)" in n for n in names) == 1, (case, names)
