"""benchmarks/bench_memory.py: a stage is measured in training mode, its LLM's layers checkpointed as the config
says (from_pretrained leaves the LLM in eval mode, where transformers checkpoints nothing)."""

import pytest

from benchmarks import bench_memory


@pytest.mark.parametrize('stage', ['pretrain_mlp', 'finetune_lora'])
def test_measure_checkpoints_the_llm_layers(tmp_path, monkeypatch, stage):
    from xtuner_plugins.models import VisionLanguageModel
    calls = []
    built = VisionLanguageModel.__init__

    def init(self, *a, **k):   # count the checkpointed calls of every decoder layer of the model measured
        built(self, *a, **k)
        lm = self.language_model
        base = lm.get_base_model() if hasattr(lm, 'get_base_model') else lm
        for layer in base.model.layers:
            func = layer._gradient_checkpointing_func
            layer._gradient_checkpointing_func = lambda *x, f=func, **y: (calls.append(1), f(*x, **y))[1]
    monkeypatch.setattr(VisionLanguageModel, '__init__', init)
    models = bench_memory.write_family_models(str(tmp_path), 'internvit', real=False)
    out = bench_memory.measure(stage, models, 'cpu', batch=1, steps=1)
    assert out['peak_mb'] > 0
    assert calls, 'no LLM layer ran checkpointed'
