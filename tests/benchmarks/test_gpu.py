"""benchmarks/gpu.sh: every row of the GPU run, end to end on the CPU with tiny models (--tiny; about 100 s on a
2-core CPU), and the runner's handling of rows that fail, run past their budget, no longer fit in the run's or
need CUDA where there is none."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import gpu, gpu_rows

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = ['tiny xtuner', 'tiny packed segments compiled', 'tiny packed segments compiled no ckpt',
         'tiny packed varlen compiled no ckpt',
         'tiny packed segments', 'tiny packed segments compiled half ckpt',
         'tiny packed segments ckpt full', 'tiny packed varlen', 'tiny packed flex', 'tiny packed segments liger',
         'tiny packed sdpa', 'tiny unpacked']
CUDA_ONLY = ['tiny packed segments compiled', 'tiny packed segments compiled no ckpt',
             'tiny packed varlen compiled no ckpt',
             'tiny packed segments compiled half ckpt', 'tiny packed varlen',
             'tiny packed flex', 'tiny packed segments liger', 'cuda tests']
ROWS = ['prepare tiny', 'prepare memory', *TRAIN, 'tiny profile', 'cuda tests', 'tiny stage', 'tiny bf16 vs fp32',
        'memory pretrain_mlp', 'memory finetune_lora', 'memory finetune_full']


def fake_row(tmp_path, name, code, budget=30):
    path = str(tmp_path / 'raw' / f'{name}.json')
    return dict(name=name, kind='memory', cmd=[sys.executable, '-c', code.replace('PATH', repr(path))],
                budget=budget, json=path, group=None)


def test_a_failing_or_slow_row_is_that_rows_result_and_the_run_goes_on(tmp_path):
    ok = 'import json; json.dump(dict(x=1), open(PATH, "w"))'
    rows = [fake_row(tmp_path, 'crash', 'raise RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")'),
            fake_row(tmp_path, 'slow', 'import time; time.sleep(60)', budget=1),
            fake_row(tmp_path, 'fine', ok),
            fake_row(tmp_path, 'silent', 'pass')]
    gpu_rows.execute(rows, str(tmp_path), deadline=1e12, min_start=0, jobs=1)
    by = {r['name']: r for r in rows}
    assert by['crash']['status'] == 'failed' and 'CUDA out of memory' in by['crash']['reason']
    assert by['slow']['status'] == 'timeout' and by['slow']['seconds'] < 10
    assert by['fine']['status'] == 'ok' and by['fine']['figures'] == dict(x=1)
    assert by['silent']['status'] == 'failed' and 'exit 0' in by['silent']['reason']  # no figures written
    assert all(os.path.exists(r['log']) for r in rows)
    late = [fake_row(tmp_path, 'late', ok)]
    gpu_rows.execute(late, str(tmp_path), deadline=0, min_start=5, jobs=1)
    assert late[0]['status'] == 'not run' and 'out of time' in late[0]['reason']


def test_a_row_that_needs_cuda_is_skipped_without_it_by_name(tmp_path, capsys):
    ok = 'import json; json.dump(dict(x=1), open(PATH, "w"))'
    rows = [dict(fake_row(tmp_path, 'flex', ok), cuda_only='no CPU backward'), fake_row(tmp_path, 'fine', ok)]
    gpu_rows.execute(rows, str(tmp_path), deadline=1e12, min_start=0, jobs=1, cuda=False)
    assert [r['status'] for r in rows] == ['skipped', 'ok']
    assert rows[0]['reason'] == 'needs CUDA (no CPU backward) and this machine has none'
    assert 'flex: skipped: needs CUDA (no CPU backward)' in capsys.readouterr().out
    assert not os.path.exists(rows[0]['json'])  # never started
    gpu_rows.execute(rows[:1], str(tmp_path), deadline=1e12, min_start=0, jobs=1, cuda=True)
    assert rows[0]['status'] == 'ok'
    tiny = {r['name']: r for r in gpu.plan('tiny', str(tmp_path / 'out'), str(tmp_path / 'work'))}
    assert tiny['tiny packed flex']['cuda_only'] and 'cuda' in tiny['tiny packed flex']['cmd']
    assert [n for n, r in tiny.items() if r['cuda_only']] == CUDA_ONLY
    assert all('cuda' not in r['cmd'] for n, r in tiny.items() if n not in CUDA_ONLY)
    assert '--compile-blocks' in tiny['tiny packed segments compiled']['cmd']
    assert '--liger-kernel' in tiny['tiny packed segments liger']['cmd']


def test_a_liger_row_whose_kernels_change_the_loss_fails(tmp_path):
    """bench_train.py --liger-kernel compares one pack's loss and gradients without and with Liger's kernels
    (its ``liger_check``): a row beyond the tolerance fails, and the table carries the comparison."""
    figures = dict(rows=dict(packed=dict(tokens_per_s=1.0, samples_per_s=1.0, flops_per_step=1.0, tflops=1.0,
                                         data_share=0.0, pad_share=0.0, peak_mib=1.0, warmup_s=1.0)))
    rows = []
    for name, ok in (('bad', False), ('good', True)):
        check = dict(ok=ok, loss_rel=0.5 if not ok else 1e-6, grad_rel=0.2 if not ok else 1e-5)
        code = f'import json; json.dump({dict(figures, liger_check=check)!r}, open(PATH, "w"))'
        rows.append(dict(fake_row(tmp_path, name, code), kind='train'))
    gpu_rows.execute(rows, str(tmp_path), deadline=1e12, min_start=0, jobs=1)
    assert [r['status'] for r in rows] == ['failed', 'ok']
    assert "Liger's kernels changed the loss or gradients" in rows[0]['reason']
    table = gpu.table(rows, 'header', tiny=True)
    assert 'against eager: loss rel 5.0e-01, grads 2.0e-01' in table and 'against eager: loss rel 1.0e-06' in table


def test_the_cuda_tests_row_succeeds_or_fails_as_pytest_does(tmp_path):
    """The ``cuda tests`` row (the modules with CUDA-only checks, run on the GPU machine) runs pytest in a child:
    the row's status is pytest's outcome, and the table carries pytest's summary line."""
    rows = []
    for name, body in (('good', 'def test_ok():\n    assert True\n'), ('bad', 'def test_no():\n    assert 1 == 2\n')):
        test, path = tmp_path / f'test_{name}.py', str(tmp_path / 'raw' / f'{name}.json')
        test.write_text(body)
        rows.append(dict(name=f'cuda tests {name}', kind='tests', budget=120, json=path, group=None, cmd=[
            sys.executable, os.path.join(ROOT, 'benchmarks', 'gpu.py'), '--child', 'tests', '--tests', str(test),
            '--json', path]))
    gpu_rows.execute(rows, str(tmp_path), deadline=1e12, min_start=0, jobs=1)
    assert [r['status'] for r in rows] == ['ok', 'failed'], [r['reason'] for r in rows]
    assert '1 passed' in rows[0]['figures']['summary'] and '1 failed' in rows[1]['reason']
    table = gpu.table(rows, 'header', tiny=True)
    assert '- cuda tests good: ok' in table and '- cuda tests bad: failed' in table and '1 failed' in table
    assert {r['name'] for r in gpu.plan('real', str(tmp_path / 'out'), str(tmp_path / 'work')) if r['kind'] ==
            'tests'} == {'cuda tests'}


@pytest.mark.skipif(torch.cuda.is_available(), reason='the refusal of a machine without CUDA')
def test_the_real_run_without_cuda_is_refused_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'gpu.py'), '--out', str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1] == (
        'gpu.py: error: no CUDA device here: the real run needs a GPU (--tiny is the smoke run of every row on the '
        'CPU)'), proc.stderr
    assert not os.listdir(tmp_path)


def test_real_plan_fits_the_budget_order_and_sizes(tmp_path):
    rows = gpu.plan('real', str(tmp_path / 'out'), str(tmp_path / 'work'))
    names = [r['name'] for r in rows]
    for size in ('0.5b', '1.5b'):
        assert {f'{size} {n}' for n, _ in gpu.TRAIN_ROWS} <= set(names)
    assert names.index('1.5b packed flex') < names.index('0.5b packed flex')  # goal rows first
    assert {'memory pretrain_mlp', 'memory finetune_lora', 'memory finetune_full', '1.5b bf16 vs fp32'} <= set(names)
    flex = rows[names.index('1.5b packed flex')]['cmd']
    assert flex[flex.index('--attn') + 1] == 'flex_attention' and '--real' in flex and 'cuda' in flex
    assert gpu.MODES['real']['run_budget'] < 600
    assert len({r['json'] for r in rows}) == len(rows)
    folders = [r['cmd'][i + 1] for r in rows for i, a in enumerate(r['cmd']) if a in ('--work', '--workdir')]
    assert len(folders) == len(rows) - 4  # all but the memory stages and the CUDA tests
    assert all(f.startswith(str(tmp_path / 'work')) for f in folders)  # checkpoints never go under --out
    # the LoRA stage (measured over its plan on an H100) dumps its allocator history beside the raw figures
    snaps = {r['name']: r['cmd'][r['cmd'].index('--snapshot') + 1] for r in rows if '--snapshot' in r['cmd']}
    assert snaps == {'memory finetune_lora': str(tmp_path / 'out' / 'raw' / 'memory_finetune_lora.pickle')}


@pytest.mark.slow
def test_tiny_run_writes_every_row_with_sane_figures(tmp_path):
    """The smoke run that proves gpu.sh before a GPU is lent: every row, and exit 0 on a CPU (the flex row, which
    trains on CUDA only, skipped by name)."""
    out = tmp_path / 'out'
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop('GPU_BENCH_START', None)
    proc = subprocess.run(['bash', os.path.join(ROOT, 'benchmarks', 'gpu.sh'), '--tiny', '--out', str(out),
                           '--work', str(tmp_path / 'work')],
                          capture_output=True, text=True, env=env, timeout=900)
    table = (out / 'table.md').read_text()
    results = json.loads((out / 'results.json').read_text())
    by = {r['name']: r for r in results['rows']}
    assert sorted(by) == sorted(ROWS), proc.stdout[-3000:]
    assert table in proc.stdout and 'SMOKE RUN' in table and 'Goals' in table
    for name in ROWS:
        assert name in table
    flex = by.pop('tiny packed flex')
    compiled = by.pop('tiny packed segments compiled')
    by.pop('tiny packed segments compiled half ckpt')
    by.pop('tiny packed segments compiled no ckpt')
    by.pop('tiny packed varlen compiled no ckpt')
    liger = by.pop('tiny packed segments liger')
    varlen = by.pop('tiny packed varlen')
    tests = by.pop('cuda tests')
    if not torch.cuda.is_available():
        assert tests['status'] == 'skipped', tests
        assert compiled['status'] == 'skipped', compiled
        assert liger['status'] == 'skipped' and varlen['status'] == 'skipped', (liger, varlen)
        assert flex['status'] == 'skipped', flex
        assert ("tiny packed flex: skipped: needs CUDA (torch's FlexAttention has no backward on a CPU) and this "
                'machine has none') in proc.stdout
    assert all(r['status'] == 'ok' for r in by.values()), {k: r['reason'] for k, r in by.items()}
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for r in results['rows']:
        assert r['status'] == 'skipped' or os.path.exists(r['log'])
        if r['status'] == 'ok':
            assert os.path.exists(r['json'])
    train = {n: by[n]['figures']['rows'] for n in TRAIN if n in by}
    for name, figures in train.items():
        (path, x), = figures.items()
        assert path == name.split()[1]
        assert all(math.isfinite(x[k]) and x[k] > 0 for k in ('tokens_per_s', 'samples_per_s', 'flops_per_step',
                                                               'tflops', 'peak_mib'))
        assert 0 <= x['data_share'] < 1 and 0 <= x['pad_share'] < 1
        assert 100 < x['tokens_per_s'] / x['samples_per_s'] < 2000  # tokens per sample: 13 tiles of 4 + text
    assert train['tiny packed sdpa']['packed']['pad_share'] == 0 < train['tiny unpacked']['unpacked']['pad_share']
    assert train['tiny packed segments']['packed']['pad_share'] == 0
    # the profiled step, split by kind (on the CPU by host time), in the table
    kinds = by['tiny profile']['figures']['rows']['packed']['kinds']
    assert kinds['matmul'] > 0 and kinds['vision forward'] > 0 and 'Where a step goes' in table
    assert os.path.getsize(tmp_path / 'out' / 'raw' / 'profile_tiny.txt') > 1000
    # XTuner trained the unpacked row's batches: the same FLOPs and padding, and its loss check passed
    assert train['tiny xtuner']['xtuner']['flops_per_step'] == train['tiny unpacked']['unpacked']['flops_per_step']
    assert train['tiny xtuner']['xtuner']['pad_share'] == train['tiny unpacked']['unpacked']['pad_share']
    check = by['tiny xtuner']['figures']['check']
    assert check['ok'] and check['loss_rel'] < 1e-4
    # the stage config through tools/train.py: 'auto' checkpointing said what it chose (on a CPU: every layer)
    stage = by['tiny stage']['figures']
    assert stage['ok'] and stage['last_iter'] == 3 and stage['peak_mib'] > 0 and stage['tokens_per_s'] > 0, stage
    assert stage['lm_head_rows'] == 151674   # Qwen2.5's tokenizer length with InternVL's tokens, as bench_train's
    assert stage['auto'].startswith("llm_grad_ckpt_layers='auto': 2 of the LLM's 2 decoder layers checkpointed")
    assert "tiny stage: ok" in table and 'through tools/train.py, 3 iterations, 151,674 LM head rows' in table
    precision = by['tiny bf16 vs fp32']['figures']['precision']
    assert precision['ok'] and len(precision['losses_fp32']) == len(precision['losses_bf16']) == 2
    assert 0 < precision['loss_rel'] < precision['tolerance']['loss']  # bf16 differs, a little
    memory = {s: by[f'memory {s}']['figures'] for s in gpu.MEMORY_STAGES}
    assert all(m['peak_mb'] > 100 and m['trainable'] < m['total'] for m in memory.values())
    assert memory['pretrain_mlp']['trainable'] < memory['finetune_lora']['trainable'] \
        < memory['finetune_full']['trainable']


def test_only_keeps_the_rows_it_names_and_the_prepare_rows_they_read(tmp_path):
    """``--only`` runs the rows it names and only the prepare rows that write their models and data (a prepare row
    of another size would spend the GPU's minutes writing gigabytes nobody reads)."""
    rows = gpu.plan('real', str(tmp_path / 'out'), str(tmp_path / 'work'))
    names = lambda *patterns: [r['name'] for r in gpu.only(rows, list(patterns))]  # noqa: E731
    assert names('1.5b xtuner', '1.5b packed s*') == ['prepare 1.5b', '1.5b xtuner', '1.5b packed segments compiled',
                                                      '1.5b packed segments compiled no ckpt', '1.5b packed segments', '1.5b packed segments compiled half ckpt',
                                                      '1.5b packed segments ckpt full', '1.5b packed segments liger',
                                                      '1.5b packed sdpa']
    half = next(r for r in rows if r['name'] == '1.5b packed segments compiled half ckpt')['cmd']
    assert half[half.index('--llm-ckpt-layers') + 1] == '14'   # of Qwen2.5-1.5B's 28
    assert names('memory finetune_lora') == ['prepare memory', 'memory finetune_lora']
    assert names('0.5b unpacked', 'memory *') == ['prepare 0.5b', 'prepare memory', 'memory pretrain_mlp',
                                                  'memory finetune_lora', 'memory finetune_full', '0.5b unpacked']
    assert names('nothing') == []
