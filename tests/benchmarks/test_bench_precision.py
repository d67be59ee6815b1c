"""bench_precision.py reads tokens/s and memory from the progress lines tools/train.py prints."""

from benchmarks.bench_precision import LINE


def test_progress_lines_parsed():
    text = ('11/25 18:44:06 - mmengine - INFO - iter 1/3  loss 11.4  lr 4.00e-10  51 tokens/s  eta 0:01:13  '
            'mem 5.74 GiB\n... iter 2/3  loss 11.42  lr 4.00e-05  1.2k tokens/s  eta 0:00:26  mem 6.02 GiB\n')
    got = [(int(m.group(1)), float(m.group(2)) * (1000 if m.group(3) else 1), float(m.group(4)))
           for m in LINE.finditer(text)]
    assert got == [(1, 51.0, 5.74), (2, 1200.0, 6.02)]
