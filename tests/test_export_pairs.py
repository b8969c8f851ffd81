"""bench/export_pairs.py: only export settings make a variant, and the table pairs each variant with its own seed."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import export_pairs as ep  # noqa: E402
import minigolf as mg  # noqa: E402


def test_a_variant_is_export_settings_only():
    assert ep.parse_variant("GPTQ_ACT_ORDER=1 CLIP_SIGMAS=attn:13,mlp:11.5") == {
        "GPTQ_ACT_ORDER": "1", "CLIP_SIGMAS": "attn:13,mlp:11.5"}
    with pytest.raises(mg.HarnessError, match="MATRIX_LR would change training"):
        ep.parse_variant("LQER_RANK=2 MATRIX_LR=0.03")
    with pytest.raises(mg.HarnessError, match="NAME=VALUE"):
        ep.parse_variant("GPTQ_EMBED")


def record(seed: int, variant: str, penalty: float, size: int) -> dict:
    return dict(row="proxy8192", seed=seed, date=f"d{seed}", variant=variant, penalty=penalty, bytes_total=size,
                commit="abcdef0123")


def test_the_table_pairs_each_variant_with_the_rows_own_export_of_the_same_training():
    # Seed 2's training exports worse in both forms; the paired difference sees the variant's constant -0.001.
    runs = [record(1, "row", 0.002, 900), record(1, "X=1", 0.001, 880),
            record(2, "row", 0.010, 910), record(2, "X=1", 0.009, 890)]
    lines = ep.table(runs).splitlines()
    variant = next(line for line in lines if "`X=1`" in line).split(" | ")
    assert variant[3] == "+0.00500 ± 0.00400"  # the penalties themselves carry the seed spread
    assert variant[4] == "-0.00100 ± 0.00000" and variant[6] == "-20"


def test_a_row_whose_point_is_its_data_is_refused_at_regime_before_any_work(tmp_path, capsys):
    assert ep.main(["run", "proxy8192", "--shape", "regime", "--work", str(tmp_path)]) == 2
    assert "every row at regime runs on sp1024" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
