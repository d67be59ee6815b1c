"""benchmarks/realsize.py end to end with tiny models standing in for the real ones (linked under their names):
every row runs in its own process, XTuner's check passes, and the closing lines have the form scripts parse.
Real sizes run in the benchmark only."""

import os
import re
import signal
import subprocess
import sys

from xtuner_plugins.tiny import make_tiny_models
from xtuner_plugins.tiny.vision import write_tiny_siglip

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLOSING = re.compile(r'^real-size (\w)(?: \(at \d+ tiles per image, not 12, in every row of it\))?: '
                     r'tokens/s ours/xtuner (\S+?)( \(check FAILED[^)]*\))?(?: \(machine [^)]*\))?; peak memory '
                     r'ours/xtuner (\S+); packed/unpacked (\S+?)(?: \(machine [^)]*\))?; roofline share (\S+)%$')


def test_realsize_rows_and_closing_lines(tmp_path):
    tiny = make_tiny_models(str(tmp_path / 'tiny'))
    siglip = write_tiny_siglip(str(tmp_path / 'tiny' / 'siglip'), image_size=56)
    models = tmp_path / 'w' / 'models'
    models.mkdir(parents=True)
    for name, target in (('InternViT-300M-448px-V2_5', tiny['internvit']), ('Qwen2.5-0.5B-Instruct', tiny['llm']),
                         ('siglip-so400m-patch14-384', siglip)):
        os.symlink(target, models / name)
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT, HF_HUB_OFFLINE='1', TOKENIZERS_PARALLELISM='false')
    out = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'realsize.py'), '--work', 'w',  # relative
                          '--out', 'out', '--settings', 'a', 'c', '--rows', 'unpacked', 'packed_segments', 'xtuner',
                          '--samples', '3', '--max-tokens', '4096', '--max-dynamic-patch', 'a=4'], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert not [x for x in lines if 'FAILED' in x], out.stdout
    assert any(x.startswith('loss check') and x.endswith('(tolerance 0.02)') and '-> OK' in x for x in lines)
    closing = {m.group(1): m for m in map(CLOSING.match, lines) if m}
    assert set(closing) == {'a', 'c'}, out.stdout
    assert 'real-size a (at 4 tiles per image, not 12' in out.stdout and 'real-size c: ' in out.stdout
    assert closing['a'].group(2) != 'n/a' and closing['a'].group(5) != 'n/a'
    # the roofline share is the LLM's (the step's time less the vision tower's forward, timed by hooks)
    rows = [x for x in lines if re.match(r'^[ac] (unpacked|packed_segments|xtuner) +s/step', x)]
    assert len(rows) == 5 and all(re.search(r"the LLM's \d+%, vision tower \d+\.\d s\)", x) for x in rows), rows
    roof = re.search(r'^roofline \(torch.mm, this process\): bf16 (\S+) TFLOP/s \((\d+)\^3\), fp32 (\S+) TFLOP/s',
                     out.stdout, re.M)
    assert roof, out.stdout
    assert float(closing['a'].group(6)) > 0
    if float(roof.group(1)) >= float(roof.group(3)) / 2:   # bf16 instructions: torch.mm's rate is the ceiling (on a
        assert float(closing['a'].group(6)) < 100         # CPU without them its reference kernel is under linear's)
    assert closing['c'].group(2) == 'n/a' and closing['c'].group(5) != 'n/a'  # XTuner has no bilinear projector
    # every row of a setting times the same samples (a pack's, in the unpacked rows --batch a step): its ratios
    # compare the paths over the same tokens
    import json
    results = json.loads((tmp_path / 'out' / 'results.json').read_text())
    for setting in 'ac':
        timed = {(r['row'], r['tokens'], r['samples']) for r in results['rows'].values() if r['setting'] == setting}
        assert len({(t, n) for _, t, n in timed}) == 1 and len(timed) == (3 if setting == 'a' else 2), timed
        assert min(n for _, _, n in timed) >= 2, timed   # a pack of several samples, so the unpacked rows step


def test_realsize_sh_gives_its_folders_to_the_rows_and_the_scaling_series(tmp_path):
    """``realsize.sh --scaling --work DIR``: the rows and the scaling series both read the models from DIR (the
    series once looked in its own default folder and failed), and the series writes its table. Relative folders
    are the caller's (they once resolved in the checkout's root)."""
    tiny = make_tiny_models(str(tmp_path / 'tiny'))
    models = tmp_path / 'w' / 'models'
    models.mkdir(parents=True)
    for name, target in (('InternViT-300M-448px-V2_5', tiny['internvit']), ('Qwen2.5-0.5B-Instruct', tiny['llm'])):
        os.symlink(target, models / name)
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHON=sys.executable)
    proc = subprocess.Popen(['bash', os.path.join(ROOT, 'benchmarks', 'realsize.sh'), '--scaling', '--out', 'out',
                             '--work', 'w', '--settings', 'a', '--rows', 'unpacked', '--samples', '2',
                             '--max-tokens', '1024'], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=300)   # about a minute with tiny models
    except subprocess.TimeoutExpired:   # e.g. a series reading real-size models from its default folder: stopped
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, log[-3000:]
    table = (tmp_path / 'out' / 'scaling.md').read_text().splitlines()
    assert [line.split(' | ')[:2] for line in table[2:]] == [['| tiles', str(t)] for t in (1, 4, 7, 13)] + [
        ['| pack tokens', str(n)] for n in (2048, 4096, 8192, 16384)]
    assert 'realsize wall:' in (tmp_path / 'out' / 'realsize.txt').read_text()


def test_a_killed_row_says_how_far_its_memory_got():
    """A row's process is watched from outside: one the kernel kills (here: itself, with SIGKILL) still reports
    its peak RSS, read from /proc while it ran."""
    from benchmarks.realsize_report import run_watched
    code = 'import os, signal, time; b = bytearray(300 * 2 ** 20); time.sleep(1); os.kill(os.getpid(), signal.SIGKILL)'
    proc, peak = run_watched([sys.executable, '-c', code])
    assert proc.returncode == -9 and 300 * 2 ** 20 < peak < 1024 * 2 ** 20, (proc.returncode, peak)


def test_max_dynamic_patch_values():
    import argparse

    import pytest

    from benchmarks.realsize_report import parse_tiles
    assert parse_tiles(argparse.ArgumentParser(), ['a=6', 'b=4']) == {'a': 6, 'b': 4, 'c': 12}
    for bad in ('a=0', 'd=6', 'a6', 'a=x'):
        with pytest.raises(SystemExit):
            parse_tiles(argparse.ArgumentParser(), [bad])


def test_the_roofline_size_keeps_one_product_within_its_budget():
    """4096^3 where a product takes under 2 s; smaller where bf16 runs in torch's reference kernel (about
    1 GFLOP/s on an AVX2 CPU, where a 4096^3 product took minutes and the rows' test ran out of time)."""
    from benchmarks.roofline import roofline_size
    assert roofline_size(4e11) == roofline_size(7e10) == 4096       # the CPUs of RESULTS.md's runs
    assert roofline_size(1.2e9) == 1024 and 2 * 1024 ** 3 / 1.2e9 <= 2.0
    assert roofline_size(1e6) == 512


def test_real_size_rows_are_refused_where_bf16_has_no_instructions(tmp_path):
    """On a CPU whose bf16 products run far under fp32 (no AVX-512 BF16 / AMX), a real-size LLM is refused with
    the rates and a lower bound of a step's time; tiny stand-ins (the tests') and CPUs with bf16 run."""
    from benchmarks.roofline import model_weights, slow_bf16_refusal
    weights = model_weights(str(tmp_path), 'Qwen2.5-0.5B-Instruct')   # not written: the published config on meta
    assert 490e6 < weights < 500e6
    message = slow_bf16_refusal({'bf16': 0.0012, 'fp32': 0.082}, weights)
    assert 'no bf16 matmul instructions' in message and '1.2 GFLOP/s' in message and '82.0' in message
    assert 'over 2.5 hours' in message or 'over 2.6 hours' in message, message   # 6 x 0.494B x 3700 / 1.2e9 s
    assert slow_bf16_refusal({'bf16': 0.40, 'fp32': 0.19}, weights) is None
    tiny = make_tiny_models(str(tmp_path / 'tiny'))
    (tmp_path / 'models').mkdir()
    os.symlink(tiny['llm'], tmp_path / 'models' / 'Qwen2.5-0.5B-Instruct')
    small = model_weights(str(tmp_path), 'Qwen2.5-0.5B-Instruct')
    from transformers import AutoModelForCausalLM
    assert small == AutoModelForCausalLM.from_pretrained(tiny['llm']).num_parameters()   # tied weights once
    assert slow_bf16_refusal({'bf16': 0.0012, 'fp32': 0.082}, small) is None


def test_a_cpu_whose_bf16_is_slower_than_fp32_is_said_before_the_rows():
    from benchmarks.roofline import slow_bf16_note
    note = slow_bf16_note({'bf16': 0.17, 'fp32': 0.30})   # the Xeon with AMX hidden (benchmarks/RESULTS.md)
    assert note.startswith('bf16 products here run at 0.57x the fp32 rate: the rows (bf16, as on a GPU) take')
    assert slow_bf16_note({'bf16': 1.70, 'fp32': 0.37}) is None and slow_bf16_note({'bf16': 0.4, 'fp32': 0.19}) is None


def test_defaults_follow_the_machine(monkeypatch):
    """Without options the run measures what fits and what training does by default here: 6 tiles in the tiled
    settings under 32 GiB (XTuner's rows were killed at 12 on 24 GiB), 12 above; the compiled rows beside the
    eager ones where compile_blocks='auto' compiles."""
    import argparse

    from benchmarks import realsize
    from benchmarks.realsize_report import parse_tiles
    from xtuner_plugins.models import compile as compile_
    assert parse_tiles(argparse.ArgumentParser(), [], 24 * 2 ** 30) == {'a': 6, 'b': 6, 'c': 12}
    assert parse_tiles(argparse.ArgumentParser(), [], 64 * 2 ** 30) == {'a': 12, 'b': 12, 'c': 12}
    assert parse_tiles(argparse.ArgumentParser(), ['a=12'], 24 * 2 ** 30) == {'a': 12, 'b': 6, 'c': 12}
    monkeypatch.setattr('xtuner_plugins.models.cpu_bf16.why_not', lambda: None)
    monkeypatch.setattr(compile_, 'cxx_compiler', lambda: True)
    monkeypatch.setattr(compile_.torch.cuda, 'is_available', lambda: False)
    assert realsize.default_rows() == ('unpacked', 'unpacked_compiled', 'packed_segments', 'packed_segments_compiled',
                                       'xtuner')
    monkeypatch.setattr('xtuner_plugins.models.cpu_bf16.why_not', lambda: 'no native bf16 on this CPU')
    assert realsize.default_rows() == ('unpacked', 'packed_segments', 'xtuner')


def test_rows_run_as_each_tool_runs_its_memory(monkeypatch):
    """``--malloc train`` (the default): our rows as tools/train.py runs here (jemalloc where it finds it), XTuner's
    on glibc keeping what is freed; ``keep``: every row on the latter; neither leaks the caller's preload."""
    from benchmarks import realsize, realsize_report
    from xtuner_plugins import malloc
    monkeypatch.setenv('LD_PRELOAD', '/x/caller.so')
    monkeypatch.setenv('XTUNER_PLUGINS_JEMALLOC', __file__)   # an existing file stands for the library
    ours, theirs = realsize.row_env('train', 'packed_segments'), realsize.row_env('train', 'xtuner')
    if not os.path.exists('/dev/nvidia0'):
        assert ours['LD_PRELOAD'] == __file__ and ours['MALLOC_CONF'] == malloc.JEMALLOC_CONF
    assert 'LD_PRELOAD' not in theirs and theirs['MALLOC_MMAP_MAX_'] == '0'
    # --op-reads: the planner is checked on glibc's exact bytes, so our rows leave jemalloc out
    assert realsize.row_env('train', 'packed_segments', op_reads=True) == realsize.row_env('keep', 'packed_segments')
    for row in ('unpacked', 'xtuner'):
        keep = realsize.row_env('keep', row)
        assert 'LD_PRELOAD' not in keep and keep.items() >= realsize_report.KEEP_FREED.items()
        assert 'LD_PRELOAD' not in realsize.row_env('default', row)


def test_bytes_counted_by_jemalloc_are_marked_and_the_planner_checks_run_on_glibc():
    from benchmarks.realsize_report import rounded
    assert rounded({'malloc': 'jemalloc'}) == " (jemalloc's size classes)" and rounded({'malloc': 'glibc'}) == ''
    assert rounded({}) == ''   # rows of an earlier results.json (--reuse)


def test_a_ratio_of_rows_the_machine_ran_at_other_speeds_is_marked(capsys):
    """A shared host's bf16 matmul rate moved from 0.70 to 1.5 TFLOP/s within minutes: XTuner's row, timed in a
    fast spell, read ours/XTuner 1.26, and a row faster than the run's first reading read 94% of the roofline.
    The rate read around each row marks such a ratio, and a share is of the highest reading."""
    sys.path.insert(0, ROOT)
    from benchmarks.realsize_report import closing, print_row

    def row(name, tokens_per_s, machine):
        return dict(row=name, tokens_per_s=tokens_per_s, peak_mib=1024.0, llm_tflops=0.5, tflops=0.6,
                    flops_per_step=6e12, samples=2, timed_steps=1, vision_s=5.0, data_share=0.0, pad_share=0.0,
                    act_measured=2 ** 30, wall_s=90.0, machine_bf16=machine)
    roof = {'bf16': 0.70}
    steady = {('a', 'unpacked'): row('unpacked', 90.0, [0.70, 0.72]),
              ('a', 'packed_segments'): row('packed_segments', 110.0, [0.71, 0.70]),
              ('a', 'xtuner'): row('xtuner', 80.0, [0.69, 0.70])}
    closing(steady, ['a'], roof)
    line = capsys.readouterr().out.splitlines()[-1]
    # the share: 0.5 TFLOP/s of the packed row's highest reading, 0.71
    assert CLOSING.match(line) and 'machine' not in line and line.endswith('roofline share 70%'), line
    moved = {**steady, ('a', 'xtuner'): row('xtuner', 80.0, [1.40, 1.50])}
    closing(moved, ['a'], roof)
    line = capsys.readouterr().out.splitlines()[-1]
    assert CLOSING.match(line), line
    assert 'ours/xtuner 1.38 (machine bf16 0.70-1.50 TFLOP/s around these rows, 114% apart: not a figure); ' \
        in line and 'packed/unpacked 1.22; ' in line, line   # the packed and unpacked rows' readings agree
    print_row('a', 'unpacked', row('unpacked', 90.0, [0.70, 1.00]), roof)
    line = capsys.readouterr().out
    assert '(60% of bf16 roofline; the LLM\'s 50%' in line and 'machine bf16 0.70 -> 1.00 TFLOP/s' in line, line
