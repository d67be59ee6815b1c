import json
import os
import subprocess
import sys

from tests.helpers import conv, write_image, write_jsonl
from tools import check_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def good_data(tmp_path, n=3):
    img = tmp_path / 'images'
    for i in range(n):
        write_image(img / f'{i}.png', size=(60 + 10 * i, 40), seed=i)
    path = write_jsonl(tmp_path / 'good.jsonl', [
        {'id': i, 'image': f'{i}.png', 'conversations': conv(answer=f'answer {i}')} for i in range(n)])
    return path, str(img)


def test_clean_data_exits_zero(tmp_path, tiny_tokenizer_dir, capsys):
    path, img = good_data(tmp_path)
    code = check_dataset.main(['--data', path, '--image-folder', img, '--tokenizer', tiny_tokenizer_dir,
                               '--image-size', '28'])
    out = capsys.readouterr().out
    assert code == 0, out
    assert 'images found: 3' in out and 'samples: 3' in out
    assert 'tokens (text + image): min' in out
    assert 'problems: 0' in out


def test_every_problem_is_listed_with_file_and_line(tmp_path, tiny_tokenizer_dir, capsys):
    path, img = good_data(tmp_path, n=1)
    (tmp_path / 'images' / 'broken.jpg').write_bytes(b'not an image')
    bad = write_jsonl(tmp_path / 'bad.jsonl', [
        {'image': '0.png', 'conversations': conv()},
        '{oops',
        {'image': 'missing.png', 'conversations': conv()},
        {'image': 'broken.jpg', 'conversations': conv()},
        {'image': '0.png', 'conversations': [{'from': 'human', 'value': '<image><image>'},
                                             {'from': 'gpt', 'value': 'x'}]},
        {'image': '0.png', 'conversations': conv(answer='word ' * 200)},
    ])
    code = check_dataset.main(['--data', bad, '--image-folder', img, '--tokenizer', tiny_tokenizer_dir,
                               '--image-size', '28', '--max-length', '300'])
    out = capsys.readouterr().out
    assert code == 1
    for line, reason in [(2, 'bad_json'), (3, 'missing_image'), (4, 'corrupt_image'), (5, 'image_tag_mismatch'),
                         (6, 'truncated')]:
        assert f'{bad}:{line}: {reason}:' in out, out
    assert 'images missing image: 1' in out and 'images corrupt image: 1' in out
    assert 'truncated: 1' in out
    assert check_dataset.main(['--data', bad, '--image-folder', img, '--tokenizer', tiny_tokenizer_dir,
                               '--image-size', '28', '--max-length', '300', '--allow-truncation']) == 1


def test_dropped_when_images_do_not_fit(tmp_path, tiny_tokenizer_dir, capsys):
    path, img = good_data(tmp_path, n=1)
    code = check_dataset.main(['--data', path, '--image-folder', img, '--tokenizer', tiny_tokenizer_dir,
                               '--max-length', '50'])  # 448 px tiles: 256 tokens each, cannot fit
    out = capsys.readouterr().out
    assert code == 1
    assert f'{path}:1: too_long:' in out and 'dropped (too long): 1' in out


def test_meta_file_without_tokenizer(tmp_path, capsys):
    path, img = good_data(tmp_path)
    meta = tmp_path / 'meta.json'
    meta.write_text(json.dumps({'good': {'root': 'images', 'annotation': 'good.jsonl', 'repeat_time': 2}}))
    assert check_dataset.main(['--data', str(meta)]) == 0
    out = capsys.readouterr().out
    assert '6 samples after repeats' in out and 'images found: 3' in out


def test_runs_as_a_script_with_help():
    result = subprocess.run([sys.executable, 'tools/check_dataset.py', '--help'], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert '--max-dynamic-patch' in result.stdout and '--tokenizer' in result.stdout


def test_one_tile_modes_count_the_projectors_tokens(tmp_path, tiny_tokenizer_dir, capsys):
    """--image-mode resize/pad: one tile per image of --num-image-token tokens (100 more tokens per tile, 100
    more per sample); tile mode would cut the 60..80 x 40 images into several 28 px tiles."""
    import re
    path, img = good_data(tmp_path)
    maxima = {}
    for mode, tokens in (('pad', 10), ('pad', 110), ('resize', 10), ('tile', 10)):
        assert check_dataset.main(['--data', path, '--image-folder', img, '--tokenizer', tiny_tokenizer_dir,
                                   '--image-size', '28', '--image-mode', mode, '--num-image-token',
                                   str(tokens)]) == 0
        out = capsys.readouterr().out
        maxima[mode, tokens] = int(re.search(r'tokens \(text \+ image\): min \d+, .*max (\d+)', out).group(1))
    assert maxima['pad', 110] - maxima['pad', 10] == 100
    assert maxima['resize', 10] == maxima['pad', 10] < maxima['tile', 10]
