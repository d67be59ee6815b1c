"""One answer of ``--mb`` MB through ``tokenize_conversation`` at ``max_length``: clipped before it is tokenised
(``clip=max_length``, what training, check_dataset and the start-up check do) against tokenised whole, in one
process, clipped first (its peak memory is then the clipped one's), each ``--repeats`` times; the kept tokens are
checked to be the same.

    .venv/bin/python benchmarks/bench_long_turn.py [--tokenizer FOLDER] [--mb 10] [--max-length 8192]

``--tokenizer`` defaults to realsize's Qwen2.5-0.5B look-alike (``bash benchmarks/realsize.sh`` writes it), else the
tiny tokenizer.
"""

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xtuner_plugins.data.template import add_internvl_tokens  # noqa: E402
from xtuner_plugins.data.tokenize import clip_chars, tokenize_conversation  # noqa: E402

REALSIZE_QWEN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'work_dirs', 'realsize',
                             'models', 'Qwen2.5-0.5B-Instruct')


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--tokenizer', default=REALSIZE_QWEN if os.path.isdir(REALSIZE_QWEN) else None)
    p.add_argument('--mb', type=float, default=10)
    p.add_argument('--max-length', type=int, default=8192)
    p.add_argument('--repeats', type=int, default=2)
    args = p.parse_args()
    if args.tokenizer:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(args.tokenizer, trust_remote_code=False)
        add_internvl_tokens(tok)
    else:
        from xtuner_plugins.tiny.tokenizer import build_tiny_tokenizer
        tok = build_tiny_tokenizer()
    n = int(args.mb * 1e6)
    sentence = 'the quick brown fox jumps over a lazy dog while seven zebras quietly watch '
    answer = (sentence * (n // len(sentence) + 1))[:n]
    conv = [{'from': 'human', 'value': '<image>\nTell me.'}, {'from': 'gpt', 'value': answer}]
    print(f'tokenizer {args.tokenizer or "tiny"}; answer {n} characters; max_length {args.max_length}; clipped '
          f'{clip_chars(tok, args.max_length)} characters after the last image')
    kept = {}
    for clip in (args.max_length, None):
        for _ in range(args.repeats):
            t = time.perf_counter()
            out = tokenize_conversation(conv, tok, [256], max_length=args.max_length, clip=clip)
            wall = time.perf_counter() - t
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
            print(f'{"clipped" if clip else "whole  "}: {wall:6.2f} s, {len(out["input_ids"])} tokens kept, '
                  f'process peak RSS {peak:.2f} GiB', flush=True)
            kept[clip] = out
    print('same tokens kept:', kept[args.max_length] == kept[None])


if __name__ == '__main__':
    main()
