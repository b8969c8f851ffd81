"""No validation token may reach training, the compile warm-up, or any gradient."""
import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import tiny_env, write_shard


@pytest.fixture()
def split_vocab_dataset(tiny_dataset, tmp_path):
    """Train tokens use ids < 256 only, validation tokens ids >= 256 only: any val token seen is detectable."""
    rng = np.random.default_rng(0)
    write_shard(tmp_path / "fineweb_train_000000.bin", rng.integers(4, 256, 30_000))
    write_shard(tmp_path / "fineweb_val_000000.bin", rng.integers(256, 512, 3_000))
    return tmp_path


def main_in_process(env: dict, cwd, monkeypatch) -> None:
    """train_gpt.main() in this process (so spies can watch it), with `env`, in `cwd`, on one thread."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(cwd)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tg.main()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_training_and_warmup_never_see_validation_tokens(tiny_dataset, split_vocab_dataset, monkeypatch):
    env = tiny_env(tiny_dataset, "leak", DATA_PATH=split_vocab_dataset, WARMUP_STEPS=3, ITERATIONS=6,
                   VAL_LOSS_EVERY=3, EVAL_STRIDE=16)
    seen = {"grad": 0, "no_grad": 0}
    original = tg.GPT.forward

    def spy(self, input_ids, target_ids, per_token=False):
        ids = torch.cat([input_ids.flatten(), target_ids.flatten()])
        key = "grad" if torch.is_grad_enabled() else "no_grad"
        seen[key] = max(seen[key], int(ids.max()))
        return original(self, input_ids, target_ids, per_token)

    monkeypatch.setattr(tg.GPT, "forward", spy)
    main_in_process(env, split_vocab_dataset, monkeypatch)
    assert seen["grad"] < 256, "a validation token reached a forward pass that builds gradients"
    assert seen["no_grad"] >= 256, "the spy must also see evaluation (otherwise this test could not fail)"


@pytest.mark.slow
def test_gptq_hessians_are_collected_from_training_tokens_only(tiny_dataset, split_vocab_dataset, monkeypatch):
    env = tiny_env(tiny_dataset, "leakgptq", DATA_PATH=split_vocab_dataset, ITERATIONS=4, EVAL_STRIDE=0, GPTQ=1,
                   GPTQ_CALIB_BATCHES=3, GPTQ_EMBED=1)
    seen = []
    original = tg.collect_hessians

    def spy(model, batches, embed):
        # The embedding is the first thing every token id reaches, whatever path the collection takes.
        handle = model.tok_emb.register_forward_pre_hook(lambda module, inputs: seen.append(int(inputs[0].max())))
        try:
            hessians = original(model, batches, embed)
            assert "tok_emb.weight" in hessians  # the head's input is collected in the same pass
            return hessians
        finally:
            handle.remove()

    monkeypatch.setattr(tg, "collect_hessians", spy)
    main_in_process(env, split_vocab_dataset, monkeypatch)
    assert len(seen) == 3, "every calibration batch must pass through the embedding"
    assert max(seen) < 256, "a validation token reached Hessian collection"
