"""What ``torch_dtype='auto'`` trains in (models/precision.py): the LLM counted from its files' headers, bf16 weights
with bf16 autocast on a CPU with native bf16 for an LLM of 100M parameters or more, fp32 otherwise, and the CPU's
optimizer wrapper autocasting what the model asks for."""

import pytest
import torch

from tests.models.conftest import build, write_official
from xtuner_plugins.engine.nonfinite import GuardedOptimWrapper
from xtuner_plugins.models import compile as compiling
from xtuner_plugins.models.precision import llm_parameters, running_dtype, training_dtype
from xtuner_plugins.models.llm import load_llm


def test_llm_parameters_from_the_headers(tiny, tmp_path):
    llm = load_llm(tiny['llm'])
    n = sum(p.numel() for p in llm.parameters())
    assert llm_parameters(tiny['llm']) == n
    assert llm_parameters(llm) == n
    model = build(tiny)
    write_official(model, tmp_path / 'official')
    in_model = sum(p.numel() for p in model.language_model.parameters())
    assert llm_parameters(None, str(tmp_path / 'official')) == in_model   # language_model.* only
    assert llm_parameters(str(tmp_path / 'nowhere')) == 0


@pytest.fixture
def amx(monkeypatch):
    """A CPU with native bf16 and no GPU, whatever this machine is."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr('xtuner_plugins.models.cpu_bf16.why_not', lambda: None)
    return monkeypatch


def test_auto_rules(tiny, amx):
    n = llm_parameters(tiny['llm'])
    kw = dict(llm=tiny['llm'], official_checkpoint=None, trained=True, quantized=False, zero3=False)
    amx.setattr(compiling, 'AUTO_MIN_LLM_PARAMETERS', n)
    assert training_dtype('auto', **kw) == torch.bfloat16
    assert training_dtype(None, **kw) == torch.bfloat16
    assert training_dtype('float32', **kw) == torch.float32                    # the setting that turns it off
    for off in (dict(trained=False), dict(quantized=True), dict(zero3=True)):
        why = []
        assert training_dtype('auto', **dict(kw, **off), why=why) == torch.float32 and len(why) == 1, off
    amx.setattr(compiling, 'AUTO_MIN_LLM_PARAMETERS', n + 1)
    why = []
    assert training_dtype('auto', **kw, why=why) == torch.float32              # the tiny look-alikes stay fp32
    assert 'parameters' in why[0]
    amx.setattr(compiling, 'AUTO_MIN_LLM_PARAMETERS', n)
    amx.setattr('xtuner_plugins.models.cpu_bf16.why_not', lambda: 'no native bf16 on this CPU')
    assert training_dtype('auto', **kw) == torch.float32                       # AVX2: bf16 is emulated, slow
    amx.setattr(torch.cuda, 'is_available', lambda: True)
    assert training_dtype('auto', **kw) == torch.bfloat16                      # a GPU, as always



def test_a_tool_runs_a_folder_of_100m_parameters_in_bf16_on_a_cpu_with_native_bf16(tiny, amx, tmp_path):
    folder = str(tmp_path / 'official')
    model = build(tiny)
    write_official(model, folder)
    n = sum(p.numel() for p in model.parameters())   # every tensor of the folder: the tower's matmuls gain too
    assert llm_parameters(folder) == n
    amx.setattr(compiling, 'AUTO_MIN_LLM_PARAMETERS', n)
    assert running_dtype(folder, 'cpu') == torch.bfloat16
    amx.setattr(compiling, 'AUTO_MIN_LLM_PARAMETERS', n + 1)
    assert running_dtype(folder, 'cpu') == torch.float32                        # tiny folders keep fp32
    assert running_dtype(folder, 'cuda:0') == torch.bfloat16                    # a GPU, as always
    amx.setattr(compiling, 'AUTO_MIN_LLM_PARAMETERS', n)
    amx.setattr('xtuner_plugins.models.cpu_bf16.why_not', lambda: 'no native bf16 on this CPU')
    assert running_dtype(folder, 'cpu') == torch.float32                        # AVX2: bf16 is emulated, slow


def test_cpu_wrapper_autocasts_what_the_model_asks(tiny, amx):
    amx.setattr(compiling, 'AUTO_MIN_LLM_PARAMETERS', 1)
    amx.setattr(compiling, 'cxx_compiler', lambda: False)                      # eager: what is tested is the dtype
    model = build(tiny, torch_dtype='auto', freeze_llm=True)
    assert model.autocast_dtype == torch.bfloat16
    assert next(model.language_model.parameters()).dtype == torch.bfloat16     # frozen: bf16
    assert all(p.dtype == torch.float32 for p in model.mlp1.parameters())      # trained: fp32
    wrapper = GuardedOptimWrapper(optimizer=torch.optim.AdamW(model.mlp1.parameters(), lr=1e-3))
    with wrapper.optim_context(model):
        assert torch.is_autocast_enabled('cpu') and torch.get_autocast_dtype('cpu') == torch.bfloat16
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    fp32 = build(tiny, freeze_llm=True)
    assert fp32.autocast_dtype is None
    with wrapper.optim_context(fp32):
        assert not torch.is_autocast_enabled('cpu')
    only_run = build(tiny, torch_dtype='bfloat16', trainable_fp32=False)
    assert only_run.autocast_dtype is None


@pytest.mark.parametrize('kw', [dict(freeze_llm=True), dict(freeze_llm=True, llm_grad_ckpt=True,
                                                         llm_lora=dict(r=4, lora_alpha=8, target_modules='all-linear'))])
def test_bf16_recipe_trains_near_fp32(tiny, batch, amx, kw):
    """The tiny model's first loss and a few AdamW steps through the wrapper: bf16 within bf16's error of fp32."""
    amx.setattr(compiling, 'AUTO_MIN_LLM_PARAMETERS', 1)
    amx.setattr(compiling, 'cxx_compiler', lambda: False)

    def losses(torch_dtype):
        torch.manual_seed(0)
        model = build(tiny, torch_dtype=torch_dtype, **kw).train()
        params = [p for p in model.parameters() if p.requires_grad]
        wrapper = GuardedOptimWrapper(optimizer=torch.optim.AdamW(params, lr=1e-2))
        out = []
        for _ in range(4):
            with wrapper.optim_context(model):
                loss = model(batch, mode='loss')['loss']
            wrapper.update_params(loss)
            out.append(loss.item())
        return model, out

    model, bf16 = losses('auto')
    assert model.autocast_dtype == torch.bfloat16
    _, fp32 = losses('float32')
    assert bf16[0] == pytest.approx(fp32[0], rel=2e-2)
    assert bf16[-1] < bf16[0] and fp32[-1] < fp32[0]
    assert bf16 != fp32                                                        # bf16 did run
