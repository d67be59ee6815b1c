"""Whether bf16 pays on this CPU (models/cpu_bf16.py): the flags, then bf16 against fp32 products timed; and what
``torch_dtype='auto'`` and ``--dtype auto`` make of the answer."""

import pytest
import torch

from tests.models.conftest import build, write_official
from xtuner_plugins.models import compile as compiling
from xtuner_plugins.models import cpu_bf16, precision
from xtuner_plugins.models.precision import llm_parameters, running_dtype, training_dtype


def test_the_rates_are_measured_once_a_process():
    bf16, fp32 = cpu_bf16.rates()
    assert bf16 > 0 and fp32 > 0
    assert cpu_bf16.rates() == (bf16, fp32)                 # cached: the models of one process agree


@pytest.mark.parametrize('rates, pays', [
    ((1.70, 0.37), True),      # a Xeon with AMX (benchmarks/RESULTS.md)
    ((0.40, 0.19), True),      # a Zen 4 (AVX-512 BF16)
    ((0.17, 0.31), False),     # an Emerald Rapids Xeon whose hypervisor hides AMX: avx512_bf16 only
    ((0.30, 0.25), False),     # faster, but not by enough to be told from a shared host's swing
])
def test_bf16_pays_where_it_runs_well_over_the_fp32_rate(monkeypatch, rates, pays):
    monkeypatch.setattr(cpu_bf16, 'has_flags', lambda: True)
    monkeypatch.setattr(cpu_bf16, 'rates', lambda: rates)
    why = cpu_bf16.why_not()
    assert (why is None) == pays
    if not pays:
        assert f'{rates[0] / rates[1]:.2f}x the fp32 rate' in why and f'{rates[0]:.2f} against {rates[1]:.2f}' in why


def test_no_flags_no_measurement(monkeypatch):
    monkeypatch.setattr(cpu_bf16, 'has_flags', lambda: False)
    monkeypatch.setattr(cpu_bf16, 'rates', lambda: pytest.fail('timed products on a CPU that emulates bf16'))
    assert cpu_bf16.why_not() == 'no native bf16 on this CPU'


def test_auto_trains_and_runs_in_fp32_where_bf16_is_slower(tiny, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(cpu_bf16, 'has_flags', lambda: True)
    monkeypatch.setattr(cpu_bf16, 'rates', lambda: (0.17, 0.31))
    said = []
    monkeypatch.setattr(precision, 'print_log', lambda msg, **kw: said.append(msg))
    monkeypatch.setattr(compiling, 'AUTO_MIN_LLM_PARAMETERS', llm_parameters(tiny['llm']))
    why = []
    kw = dict(llm=tiny['llm'], official_checkpoint=None, trained=True, quantized=False, zero3=False)
    assert training_dtype('auto', **kw, why=why) == torch.float32
    assert why == [cpu_bf16.why_not()]
    assert "torch_dtype='auto' trains in fp32 here: bf16 products at 0.55x the fp32 rate" in said[-1]
    assert training_dtype('bfloat16', **kw) == torch.bfloat16              # asked for: as asked
    model = build(tiny, torch_dtype='auto', freeze_llm=False)
    assert model.autocast_dtype is None and model.compile_blocks == ()     # plain fp32, eager
    folder = str(tmp_path / 'official')
    write_official(model, folder)
    monkeypatch.setattr(compiling, 'AUTO_MIN_LLM_PARAMETERS', 1)
    assert running_dtype(folder, 'cpu') == torch.float32
    monkeypatch.setattr(cpu_bf16, 'rates', lambda: (1.70, 0.37))
    assert running_dtype(folder, 'cpu') == torch.bfloat16
    assert training_dtype('auto', **kw) == torch.bfloat16


def _rank_answers(rank, init, out, measured):
    import torch.distributed as dist
    cpu_bf16.has_flags = lambda: True
    cpu_bf16.rates = lambda: measured[rank]
    dist.init_process_group('gloo', init_method=f'file://{init}', rank=rank, world_size=2)
    broadcast, calls = dist.broadcast_object_list, []
    dist.broadcast_object_list = lambda *a, **k: (calls.append(a), broadcast(*a, **k))[-1]
    try:
        answers = {repr(cpu_bf16.why_not()) for _ in range(3)}   # a model's build asks two or three times
        with open(f'{out}.{rank}', 'w') as f:
            f.write(f'{len(calls)} {" ".join(answers)}')
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize('measured, rank1', [
    ([(1.70, 0.37), (0.17, 0.31)], 'None'),                    # rank 1 timed slow bf16: it trains as rank 0 does
    ([(0.17, 0.31), (1.70, 0.37)], "'rank 0: bf16 products at 0.55x"),
])
def test_every_rank_takes_rank_0s_answer(tmp_path, measured, rank1):
    """Two ranks (gloo) whose timings disagree build their models in one dtype, rank 0's: DDP cannot join a bf16
    model to an fp32 one. Asked again, a rank keeps the agreed answer (one broadcast a process group)."""
    import torch.multiprocessing as mp
    mp.spawn(_rank_answers, args=(str(tmp_path / 'init'), str(tmp_path / 'why'), measured), nprocs=2)
    answers = [(tmp_path / f'why.{r}').read_text() for r in (0, 1)]
    assert answers[1].startswith(f'1 {rank1}'), answers   # one broadcast, then the agreed answer kept
    assert answers[0].startswith('1 ') and (answers[0] == '1 None') == (rank1 == 'None'), answers
