"""bench/calibration.py: every published delta names rows mini-golf can run, and agreement counts only signs that
full scale can tell."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import calibration as cal  # noqa: E402
import minigolf as mg  # noqa: E402


def test_every_published_delta_has_a_source_and_rows_that_run_at_both_shapes():
    entries = cal.load_entries(cal.CALIBRATION)
    assert len(entries) >= 10
    for e in entries:
        assert e["source"] and e["full_scale"] != 0, e["change"]
        for name in (e["row"], e.get("base") or mg.ROWS[e["row"]].base):
            assert not mg.shape_refusal(mg.ROWS[name], mg.SHAPES["regime"]), name


def test_agreement_counts_signs_beyond_the_full_scale_noise_and_ranks_the_deltas():
    pairs = [(-0.002, -0.001), (-0.001, -0.0005), (0.003, 0.004), (-0.0002, 0.01)]  # the last is within noise
    assert cal.agreement(pairs) == "signs agree 3/3, Spearman rho +1.00"
    assert cal.agreement([(-0.002, 0.001), (-0.001, -0.001), (0.001, 0.002)]).startswith("signs agree 2/3")


def test_a_row_is_measured_against_its_base_on_the_seeds_both_ran():
    def run(row, seed, bpb):
        return dict(row=row, seed=seed, val_bpb=bpb, exit_code=0, machine=dict(bf16=False))
    records = [run("plain", 1, 2.0), run("plain", 2, 2.1), run("xsa", 1, 1.99), run("xsa", 2, 2.09), run("xsa", 3, 1.0)]
    mean, se, n, kind = cal.measured(records, "xsa", "plain")
    assert n == 2 and abs(mean + 0.01) < 1e-9 and se < 1e-9 and kind == "no native bf16"
    assert cal.measured(records, "smear", "plain") is None


def test_a_shape_whose_runs_span_two_kinds_of_cpu_names_the_kind_each_pair_ran_on():
    def run(row, seed, bpb, bf16):
        return dict(row=row, seed=seed, val_bpb=bpb, exit_code=0, machine=dict(bf16=bf16))
    records = [run("plain", 1, 2.0, True), run("xsa", 1, 1.99, True), run("plain", 1, 2.1, False),
               run("row_norm", 1, 2.08, False)]
    entries = [dict(change="XSA", full_scale=-0.002, source="s", row="xsa"),
               dict(change="MuonEq-R", full_scale=-0.001, source="s", row="row_norm")]
    text = cal.table(entries, {"mini": records, "regime": records[2:]}, {"mini": [], "regime": []},
                     {"mini": [], "regime": []})
    assert "| -0.0100 (1, native bf16) |" in text and "| -0.0200 (1, no native bf16) |" in text
    assert "| -0.0200 (1) |" in text  # regime ran on one kind: nothing to tell apart


def test_a_scoring_row_without_runs_is_measured_as_a_variant_of_its_base_on_the_same_weights():
    def export(seed, variant, settings, final):
        return dict(row="plain", seed=seed, date=f"d{seed}", variant=variant, settings=settings, final_bpb=final)
    exports = [export(1, "row", {}, 2.00), export(1, "DOC_EVAL=1", {"DOC_EVAL": "1"}, 1.99),
               export(2, "row", {}, 2.10), export(2, "DOC_EVAL=1", {"DOC_EVAL": "1"}, 2.09),
               export(2, "EVAL_STRIDE=0", {"EVAL_STRIDE": "0"}, 2.12)]
    mean, se, n = cal.measured_on_same_weights(exports, "doc_eval", "plain")
    assert n == 2 and abs(mean + 0.01) < 1e-9 and se < 1e-9
    assert cal.measured_on_same_weights(exports, "no_sliding", "plain")[2] == 1
    assert cal.measured_on_same_weights(exports, "xsa", "plain") is None  # it changes training: no export pair


def test_a_training_change_is_also_read_before_export_and_an_export_change_only_on_its_final_score():
    def run(row, seed, final, pre):
        return dict(row=row, seed=seed, val_bpb=final, exit_code=0, machine=dict(bf16=False),
                    log=f"pre_export_exact val_bpb:{pre}\nfinal_roundtrip_exact val_bpb:{final}\n"
                        f"final_submission val_bpb:{final}\n")
    # xsa trains better (-0.002 before export) but exports worse (+0.01 after): the two readings disagree in sign.
    records = [run("plain", 1, 2.10, 2.00), run("xsa", 1, 2.11, 1.998), run("awq", 1, 2.09, 2.00),
               run("gptq", 1, 2.10, 2.00)]
    pre = cal.before_export(records, read_log=lambda r: r["log"])
    assert [r["val_bpb"] for r in pre] == [2.00, 1.998, 2.00, 2.00]
    entries = [dict(change="XSA", full_scale=-0.002, source="s", row="xsa"),
               dict(change="AWQ", full_scale=-0.001, source="s", row="awq", base="gptq", stage="export")]
    text = cal.table(entries, {"regime": records, "mini": records[:2]}, {"regime": [], "mini": []},
                     {"regime": pre, "mini": pre[:2]})
    assert "| +0.0100 (1) | -0.0020 (1) |" in text and "| -0.0100 (1) | (export) |" in text
    assert "on the final score: **regime** signs agree 1/2" in text
    assert "read before export: **regime** signs agree 2/2" in text
    # mini measured XSA only, so the changes both shapes measured are XSA alone
    assert "**regime** signs agree 2/2 (too few to rank) (on the changes every shape measured: signs agree 1/1" in text
