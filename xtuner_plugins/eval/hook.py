"""Evaluation during training: the project's scorer on a held-out file, every N iterations and at the end.

    custom_hooks.append(dict(type=EvalHook, data_file='data/val.jsonl', image_folder='data/images',
                             interval=500, max_questions=200, min_reliance=0.1, on_low_reliance='warn'))

The questions (``xtuner_plugins.eval.data``: a training-format jsonl or an MMBench TSV) are asked of the model
being trained, through :class:`TrainingModelAnswerer`: the training data set's prompt (template, system
message) and tiles (tile size, tiling, image mode), greedy decoding, with and without the image (blind
control); multiple choice (an MMBench TSV) is generated and read as VLMEvalKit reads it, or with
``mc='likelihood'`` ranked by the log-likelihood of each option (nothing generated: a model in mid-training
that does not answer with a letter yet is still measured). Accuracy, blind accuracy and image reliance go to the
console and to the visualizer (TensorBoard: ``eval/accuracy``, ``eval/blind``, ``eval/reliance``, and how
multiple-choice answers were read, ``eval/by_letter``, ...), with a few sample answers; a reliance below
``min_reliance`` warns, or stops training (``on_low_reliance='stop'``).

Several ranks, DDP or DeepSpeed ZeRO-2/3: the questions are split over the ranks and the results gathered.
Every rank runs the same number of forward passes (questions padded to an equal count per rank, and a fixed
``max_new_tokens`` decoding steps without stopping early, or as many likelihood passes as the file's most
options), because ZeRO-3 gathers parameters in every forward
pass collectively: unequal counts would hang.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
from mmengine.dist import all_gather_object, get_dist_info
from mmengine.hooks import Hook
from mmengine.logging import print_log
from PIL import Image

from xtuner_plugins.data.image_io import load_image
from xtuner_plugins.data.template import IGNORE_INDEX
from xtuner_plugins.data.token_ids import answer_ids
from xtuner_plugins.data.tokenize import tokenize_conversation
from xtuner_plugins.data.tiling import image_tiles
from xtuner_plugins.models.prompt import check_question

from .data import read_questions
from .questions import first_questions
from .evaluate import MC_MODES, Failure, Report, evaluate
from .scoring import METRICS

__all__ = ['EvalHook', 'TrainingModelAnswerer']


class TrainingModelAnswerer:
    """``ask``/``reset`` (as ``ConvertedModel``) on the training model, prompting and tiling as its data set."""

    def __init__(self, model, dataset, fixed_steps: bool = False, max_options: int = 0):
        self.model, self.dataset, self.fixed_steps = model, dataset, fixed_steps
        self.max_options = max_options  # fixed_steps: every question's options padded to this many forwards
        self.tokenizer = model.tokenizer

    def reset(self) -> None:
        pass  # one turn per question

    def _tiles(self, image: Image.Image, num_images: int) -> torch.Tensor:
        d = self.dataset  # as the data set tiles a sample with num_images images
        return image_tiles(image, d.image_mode, image_size=d.image_size, min_num=d.min_dynamic_patch,
                           max_num=max(1, d.max_dynamic_patch // num_images) if d.dynamic_image_size else 1,
                           use_thumbnail=d.use_thumbnail, mean=d.image_mean)

    def _prompt(self, prompt: str, images: Sequence):
        """The data set's prompt ids up to the answer, the tiles and their flags."""
        check_question(prompt, self.tokenizer)   # as tools/eval.py's models refuse it: not scored, control_text
        images = [load_image(i) for i in images]   # paths, a TSV's bytes, or images: the package's one pixel rule
        tiles = [self._tiles(im, len(images)) for im in images]
        if images and '<image>' not in prompt:
            prompt = '<image>\n' * len(images) + prompt
        turns = [{'from': 'human', 'value': prompt}, {'from': 'gpt', 'value': 'x'}]
        sample = tokenize_conversation(turns, self.tokenizer, [self.model.num_image_token * t.shape[0] for t in tiles],
                                       self.dataset.template, self.dataset.system)
        first = next(i for i, label in enumerate(sample['labels']) if label != IGNORE_INDEX)
        ids = torch.tensor([sample['input_ids'][:first]])
        if tiles:
            pixels, flags = torch.cat(tiles), torch.ones(sum(t.shape[0] for t in tiles), dtype=torch.long)
        else:  # the dummy tile a text-only sample carries
            size = self.dataset.image_size
            pixels, flags = torch.zeros(1, 3, size, size, dtype=torch.uint8), torch.zeros(1, dtype=torch.long)
        return ids, pixels, flags

    def _logits(self, ids: torch.Tensor, pixels: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        batch = dict(input_ids=ids.to(device), attention_mask=torch.ones_like(ids, device=device),
                     pixel_values=pixels.to(device), image_flags=flags.to(device))
        return self.model(batch, mode='tensor')

    @torch.no_grad()
    def option_logprobs(self, prompt: str, images: Sequence, texts: Sequence[str]) -> List[float]:
        """Each text's log-likelihood as the answer (:mod:`xtuner_plugins.models.likelihood`); with ``fixed_steps``,
        ``max_options`` forward passes whatever the number of texts (equal counts on every rank)."""
        from xtuner_plugins.models.likelihood import continuation_logprob
        ids, pixels, flags = self._prompt(prompt, images)
        padded = list(texts) + [texts[0]] * (max(self.max_options, len(texts)) - len(texts) if self.fixed_steps else 0)
        prefix = self.dataset.template.assistant_prefix
        out = [continuation_logprob(lambda x: self._logits(x, pixels, flags), ids,
                                    answer_ids(self.tokenizer, prefix, text)) for text in padded]
        return out[:len(texts)]

    @torch.no_grad()
    def ask(self, prompt: str, images: Sequence = (), generation: Optional[dict] = None) -> str:
        ids, pixels, flags = self._prompt(prompt, images)
        stop = self.tokenizer.convert_tokens_to_ids(self.dataset.template.stop_word)
        out: List[int] = []
        for _ in range((generation or {}).get('max_new_tokens', 16)):
            token = int(self._logits(ids, pixels, flags)[0, -1].argmax())
            if token == stop and not self.fixed_steps:
                break
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        if stop in out:
            out = out[:out.index(stop)]
        return self.tokenizer.decode(out, skip_special_tokens=True).strip()


def _settings_problem(on_low_reliance, mc, metric, interval, max_questions, max_new_tokens, min_reliance) -> str:
    """What is wrong with :class:`EvalHook`'s settings, or ''."""
    from xtuner_plugins.data.fitting import whole_number as whole
    if on_low_reliance not in ('warn', 'stop'):
        return f"on_low_reliance={on_low_reliance!r}; use 'warn' or 'stop'"
    if mc not in MC_MODES:
        return f'mc={mc!r}; use one of {", ".join(MC_MODES)}'
    if metric not in METRICS:
        return f'metric={metric!r}; use one of {", ".join(sorted(METRICS))}'
    if not whole(interval, 0):
        return f'interval={interval!r}; give a whole number of iterations (0: at the end of training only)'
    if max_questions is not None and not whole(max_questions, 1):
        return f'max_questions={max_questions!r}; give a whole number >= 1, or None for all'
    if not whole(max_new_tokens, 1):
        return f'max_new_tokens={max_new_tokens!r}; give a whole number >= 1'
    if min_reliance is not None and not (isinstance(min_reliance, (int, float)) and -1 <= min_reliance <= 1):
        return (f'min_reliance={min_reliance!r}; image reliance is accuracy - blind accuracy, between -1 and 1: give '
                'a number there (0.1: a tenth of the questions need the image), or None')
    return ''


class EvalHook(Hook):
    """Runs the scorer on ``data_file`` every ``interval`` iterations and after training (module docstring)."""

    priority = 'LOW'  # after the optimizer step and the logger, before checkpoints

    def __init__(self, data_file: str, image_folder: Optional[str] = None, interval: int = 500,
                 max_questions: Optional[int] = None, max_new_tokens: int = 16, blind: bool = True,
                 metric: str = 'exact', circular: bool = False, show: int = 3, min_reliance: Optional[float] = None,
                 on_low_reliance: str = 'warn', mc: str = 'generate'):
        from xtuner_plugins.errors import Refused   # (one line at training's start, where they were tracebacks)
        problem = _settings_problem(on_low_reliance=on_low_reliance, mc=mc, metric=metric, interval=interval,
                                    max_questions=max_questions, max_new_tokens=max_new_tokens,
                                    min_reliance=min_reliance)
        if problem:
            raise Refused(f'EvalHook: {problem}')
        try:
            questions = read_questions(data_file, image_folder, circular=circular)
        except (OSError, ValueError) as exc:   # the file not there, not questions, a bad row: named in it
            raise Refused(f'EvalHook: {exc}') from None
        self.questions = first_questions(questions, max_questions)
        self.data_file, self.interval, self.max_new_tokens = data_file, interval, max_new_tokens
        self.blind, self.metric, self.show, self.mc = blind, metric, show, mc
        self.min_reliance, self.on_low_reliance = min_reliance, on_low_reliance
        self.history: List[dict] = []
        self._last_iter = -1

    def before_train(self, runner) -> None:
        """Leave out, counted and named in one warning, the questions the model cannot be asked (its tokenizer's
        special tokens in them, an image that does not decode): every rank reads the same file and drops the same
        ones, so the ranks' forward counts stay equal (a question failing on one rank only, mid-evaluation, would
        leave the others waiting under ZeRO-3)."""
        from xtuner_plugins.data.errors import SampleError
        from xtuner_plugins.engine.nonfinite import unwrap_model
        tokenizer = getattr(unwrap_model(runner.model), 'tokenizer', None)
        kept, dropped = [], []
        for q in self.questions:
            try:
                if tokenizer is not None:
                    check_question(q.prompt, tokenizer)
                for image in q.images:
                    if isinstance(image, str):
                        load_image(image)
                kept.append(q)
            except SampleError as err:
                dropped.append(f'{q.source}: {err}')
        if dropped:
            self.questions = kept
            print_log(f'EvalHook: {len(dropped)} of {len(kept) + len(dropped)} questions of {self.data_file} left '
                      f'out, not asked: {dropped[0]}' + (f' (and {len(dropped) - 1} more)' if len(dropped) > 1
                                                         else ''), logger='current', level=30)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if self.interval > 0 and self.every_n_train_iters(runner, self.interval):
            self.run(runner, runner.iter + 1)

    def after_train(self, runner) -> None:
        if self._last_iter != runner.iter:  # not just evaluated at the last iteration
            self.run(runner, runner.iter)

    def run(self, runner, iteration: int) -> dict:
        """Evaluate after ``iteration`` iterations; every rank returns the same summary."""
        from xtuner_plugins.engine.checks import _unwrap
        from xtuner_plugins.engine.nonfinite import unwrap_model
        self._last_iter = iteration
        if not self.questions:   # every one left out (before_train said so)
            return dict(iter=iteration)
        model = unwrap_model(runner.model)
        dataset = _unwrap(runner.train_dataloader.dataset, 'dataset')
        rank, world = get_dist_info()
        per_rank = math.ceil(len(self.questions) / world)
        mine = self.questions[rank::world]
        padded = mine + [self.questions[0]] * (per_rank - len(mine))  # equal forward counts on every rank
        was_training = model.training
        model.eval()
        failures: List[Failure] = []
        try:
            answerer = TrainingModelAnswerer(model, dataset, fixed_steps=world > 1,
                                             max_options=max((len(q.options) for q in self.questions), default=0))
            options = dict(blind=self.blind, metric=self.metric, max_new_tokens=self.max_new_tokens, mc=self.mc)
            # a question that cannot be asked (control text, an image that no longer decodes) is not scored, as
            # in tools/eval.py: it stopped the training at the first evaluation
            results = evaluate(answerer, mine, failures=failures, **options)
            if len(padded) > len(mine):   # the padding's forwards, for equal counts on every rank; not scored
                evaluate(answerer, padded[len(mine):], failures=[], **options)
        finally:
            model.train(was_training)
        parts = all_gather_object((results, failures))
        gathered = [r for part, _ in parts for r in part]
        report = Report(gathered, [f for _, part in parts for f in part])
        summary = dict(report.summary(), iter=iteration)
        self.history.append(summary)
        runner.visualizer.add_scalars({f'eval/{k}': v for k, v in summary.items() if k not in ('n', 'iter')},
                                      step=iteration)
        samples = '\n'.join(f'    {r.id}: {r.prompt[-60:]!r} -> {r.answer!r} (reference {r.reference!r}'
                             + (f', blind {r.blind_answer!r})' if r.blind_answer is not None else ')')
                             for r in gathered[:self.show])
        read = f'  {report.read_line()}\n' if report.read_line() else ''
        read += ''.join(f'  {line}\n' for line in report.not_scored().splitlines()[:self.show])
        print_log(f'eval at iteration {iteration} on {self.data_file}: {report.closing_line()}\n{report.table()}\n'
                  f'{read}  samples:\n{samples}', logger='current')
        reliance = summary.get('reliance')
        if self.min_reliance is not None and reliance is not None and reliance < self.min_reliance:
            message = (f'image reliance {reliance:.3f} is below {self.min_reliance} at iteration {iteration}: the '
                       f'model answers {summary["blind"]:.3f} of the questions without the image')
            if self.on_low_reliance == 'stop':
                raise RuntimeError(message)
            print_log(message, logger='current', level=30)
        return summary
