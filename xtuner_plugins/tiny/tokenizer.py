"""A tiny tokenizer in the format of Qwen2.5's, built offline in a fraction of a second.

:func:`build_tiny_tokenizer` trains a byte-level BPE on a small text embedded in this module and wraps it as a
:class:`transformers.Qwen2TokenizerFast` with the same *structure* as the Qwen2.5 tokenizer that InternVL 2.5
uses for its Qwen2.5 LLMs:

* normalizer NFC;
* pre-tokenizer: a ``Split`` on Qwen2's regex (behaviour ``isolated``), then ``ByteLevel`` with
  ``add_prefix_space=False`` and ``use_regex=False``;
* a full 256-byte initial alphabet, so any text (Chinese included) encodes and decodes back exactly;
* ``ByteLevel`` decoder and post-processor, no unknown token;
* special tokens ``<|endoftext|>`` (the pad token), ``<|im_start|>``, ``<|im_end|>`` (the eos token), no bos
  (``bos_token``: a variant whose post-processor starts every text with that bos, as Llama 3's and InternLM2's
  tokenizers add theirs);
* a ChatML chat template;
* optionally InternVL's nine added tokens, added the way InternVL adds them (special added tokens, in
  InternVL's order).

``chat='llama3'`` / ``'phi3'`` / ``'gemma'`` give it another family's special tokens, bos, eos, pad and own chat
template instead (Llama 3 Instruct's, Phi-3's, Gemma 3's: :data:`CHAT_FAMILIES`), for LLMs trained with those
templates.

Only the format is imitated: the ids are not Qwen's. The real Qwen2.5 tokenizer has 151643 BPE entries,
then ``<|endoftext|>`` = 151643, ``<|im_start|>`` = 151644, ``<|im_end|>`` = 151645, more special tokens up to
151664, and InternVL's tokens at 151665..151673 (``<IMG_CONTEXT>`` = 151667). Here the BPE part has
``vocab_size`` entries and the special tokens follow it in the same order.
"""

from __future__ import annotations

from typing import List, Optional

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, Qwen2TokenizerFast

from xtuner_plugins.data.template import add_internvl_tokens as _add_internvl_tokens

__all__ = ['build_tiny_tokenizer', 'CHAT_FAMILIES', 'QWEN2_PRETOKENIZE_REGEX', 'QWEN_SPECIAL_TOKENS', 'TINY_CORPUS']

# Qwen2's pre-tokenizer pattern. Checked against ``PRETOKENIZE_REGEX`` in transformers'
# ``models/qwen2/tokenization_qwen2.py`` (4.57.6), which is also the ``Split`` pattern of Qwen2.5's tokenizer.json.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# In Qwen's order (their ids follow the BPE vocabulary, like 151643, 151644, 151645 in Qwen2.5).
QWEN_SPECIAL_TOKENS = ('<|endoftext|>', '<|im_start|>', '<|im_end|>')

QWEN_DEFAULT_SYSTEM = 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.'

# A plain ChatML template: a default system turn when the conversation has none, then
# ``<|im_start|>{role}\n{content}<|im_end|>\n`` per message and the assistant prefix for generation.
CHATML_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' -}}"
    '{%- else -%}'
    "{{- '<|im_start|>system\\n" + QWEN_DEFAULT_SYSTEM + "<|im_end|>\\n' -}}"
    '{%- endif -%}'
    '{%- for message in messages -%}'
    "{%- if not (loop.first and message['role'] == 'system') -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    '{%- endif -%}'
    '{%- endfor -%}'
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Llama 3 Instruct's own chat template (Meta-Llama-3-8B-Instruct's tokenizer_config.json): each message's content
# trimmed, between its header and <|eot_id|>; the bos before the first.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Phi-3-mini-4k-instruct's own chat template (the bos, then <|role|>\n content <|end|>\n per turn).
PHI3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'system') %}{{'<|system|>' + '\n' + "
    "message['content'] + '<|end|>' + '\n'}}{% elif (message['role'] == 'user') %}{{'<|user|>' + '\n' + "
    "message['content'] + '<|end|>' + '\n' + '<|assistant|>' + '\n'}}{% elif message['role'] == 'assistant' %}"
    "{{message['content'] + '<|end|>' + '\n'}}{% endif %}{% endfor %}"
)

# Gemma 3's own chat template (gemma-3-1b-it's tokenizer_config.json): the bos, no system turn (a system message and a
# blank line open the first user turn), ``<start_of_turn>user|model\n`` content trimmed ``<end_of_turn>\n``.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first_user_prefix = messages[0]['content'] + "
    "'\n\n' %}{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = '' %}"
    "{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

#: the chat families of :func:`build_tiny_tokenizer`: special tokens (in the real tokenizers' order), bos (added
#: to every text by the post-processor; None: none), eos, pad and the family's own chat template
CHAT_FAMILIES = {
    'chatml': dict(specials=QWEN_SPECIAL_TOKENS, bos=None, eos='<|im_end|>', pad='<|endoftext|>',
                   template=CHATML_TEMPLATE),
    'llama3': dict(specials=('<|begin_of_text|>', '<|end_of_text|>', '<|start_header_id|>', '<|end_header_id|>',
                             '<|eot_id|>'), bos='<|begin_of_text|>', eos='<|eot_id|>', pad=None,
                   template=LLAMA3_TEMPLATE),
    'phi3': dict(specials=('<s>', '<|endoftext|>', '<|assistant|>', '<|system|>', '<|end|>', '<|user|>'), bos='<s>',
                 eos='<|endoftext|>', pad='<|endoftext|>', template=PHI3_TEMPLATE),
    'gemma': dict(specials=('<pad>', '<eos>', '<bos>', '<start_of_turn>', '<end_of_turn>'), bos='<bos>', eos='<eos>',
                  pad='<pad>', template=GEMMA_TEMPLATE),
}

# The training text: short prose about images, colours, shapes and counting, the words of the chat
# template, and a little Chinese (including InternVL's system message) so that common pieces get merges.
TINY_CORPUS: List[str] = [
    'The image shows a red circle next to a blue square on a white background.',
    'There are three green triangles in the picture, and one of them is larger than the others.',
    'A small yellow star sits in the top left corner of the image.',
    'How many circles are there in the image? There are two circles: one red and one orange.',
    'Describe the image in detail. The picture contains a purple rectangle above a black line.',
    'What colour is the square? The square is blue.',
    'What shape is in the center of the image? A green hexagon is in the center.',
    'Count the objects in the picture. I can see four shapes: a circle, a square, a triangle and a star.',
    'The background is light grey and the shapes are drawn with thick black outlines.',
    'A photograph of a cat sitting on a wooden table near two white cups.',
    'The dog runs across the green grass under a bright blue sky with a few white clouds.',
    'Please answer the question about the image using a single word or phrase.',
    'The left half of the image is dark, while the right half is bright and colourful.',
    'Five red dots form a line from the bottom left to the top right of the picture.',
    'Is there a triangle in the image? Yes, there is a small brown triangle at the bottom.',
    'Is the circle larger than the square? No, the circle is smaller than the square.',
    'The chart shows the number of apples, oranges and bananas sold each day of the week.',
    'Read the text in the image. The sign says: open every day from nine to five.',
    'Two people are standing in front of a tall building, and one of them holds an umbrella.',
    'The colours in the image are red, orange, yellow, green, blue, indigo and violet.',
    'There is one large circle, two medium squares and three small triangles, six shapes in total.',
    'The picture is a simple drawing; every shape has a different colour and size.',
    'Where is the star? The star is to the right of the circle and below the square.',
    'Answer: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 100, 256, 448, 1024.',
    'The user asks a question about the image and the assistant answers it.',
    'system user assistant question answer image picture photo shape colour color count number',
    'Please describe the picture briefly. A red ball, a blue box and a green cone on a table.',
    'In this image, the numbers one, two, three and four are written in black ink.',
    'The triangle points up, the arrow points left, and the line goes from left to right.',
    'What is the colour of the largest shape? The largest shape is a dark blue circle.',
    'The image is divided into a grid of tiles; each tile is 448 by 448 pixels.',
    "It's a sunny day. They're playing in the park, and we'll see them later. I've counted seven birds.",
    '图片中有三个红色的圆形和一个蓝色的正方形。',
    '请描述这张图片。图片里有一只猫坐在桌子上。',
    '这张图片中有几个三角形？有两个绿色的三角形。',
    '你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。',
]


def _train_bpe(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior='isolated', invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=[],  # added after the BPE vocabulary, like Qwen's
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeat the corpus a little so that frequent pieces clearly win over one-off pairs.
    tok.train_from_iterator(TINY_CORPUS * 3, trainer=trainer)
    return tok


def build_tiny_tokenizer(add_internvl_tokens: bool = True, vocab_size: int = 512,
                         bos_token: Optional[str] = None, chat: str = 'chatml') -> PreTrainedTokenizerFast:
    """Build a tiny Qwen2.5-format tokenizer offline (deterministic, well under a second).

    This imitates the format of Qwen2.5's tokenizer (byte-level BPE, Qwen2's pre-tokenizer regex, ChatML
    special tokens, bos ``None``, eos ``<|im_end|>``, pad ``<|endoftext|>``, no unknown token), but the ids
    differ from the real ones: real Qwen2.5 puts ``<|endoftext|>`` at 151643 and InternVL's added tokens at
    151665..151673, while here the BPE vocabulary has ``vocab_size`` entries and ``<|endoftext|>``,
    ``<|im_start|>``, ``<|im_end|>`` take ids ``vocab_size .. vocab_size + 2``, followed by InternVL's nine
    tokens when ``add_internvl_tokens`` is true (``len(tokenizer) == vocab_size + 12``).

    Args:
        add_internvl_tokens: add ``<img> </img> <IMG_CONTEXT> <quad> </quad> <ref> </ref> <box> </box>`` as
            special added tokens, as InternVL does before training.
        vocab_size: size of the byte-level BPE vocabulary (256 bytes plus merges), special tokens excluded.
            Must be at least 256 and at most what the embedded corpus supports (977).
        bos_token: a bos the tokenizer adds at the start of every text (a test variant: a special token after
            ``<|im_end|>``, added by a ``TemplateProcessing`` post-processor as Llama 3's tokenizer adds
            ``<|begin_of_text|>``; ``len(tokenizer)`` is one more). ``None`` (the default): no bos, as Qwen2.5's.
        chat: the chat family whose special tokens, bos, eos, pad and own chat template the tokenizer has
            (:data:`CHAT_FAMILIES`): ``chatml`` (Qwen2.5's, the default), ``llama3`` (Llama 3 Instruct's:
            ``<|begin_of_text|>`` added as the bos, eos ``<|eot_id|>``, no pad token), ``phi3`` (Phi-3's markers,
            bos ``<s>`` added, eos and pad ``<|endoftext|>``) or ``gemma`` (Gemma's ``<start_of_turn>`` and
            ``<end_of_turn>``, bos ``<bos>`` added, eos ``<eos>``, pad ``<pad>``). With any but ``chatml``,
            ``bos_token`` is the family's.
    """
    if vocab_size < 256:
        raise ValueError(f'vocab_size must be >= 256 (the byte alphabet), got {vocab_size}')
    backend = _train_bpe(vocab_size)
    got = backend.get_vocab_size()
    if got != vocab_size:
        raise ValueError(
            f'the embedded corpus only supports a BPE vocabulary of {got} entries, {vocab_size} were requested')
    # Register the special tokens on the backend first so that they get Qwen's order of ids
    # (the wrapper's constructor would add eos and pad first otherwise).
    if chat not in CHAT_FAMILIES:
        raise ValueError(f'unknown chat family {chat!r}; use one of {sorted(CHAT_FAMILIES)}')
    family = CHAT_FAMILIES[chat]
    if chat != 'chatml':
        bos_token = family['bos']
    specials = family['specials'] + ((bos_token,) if bos_token and bos_token not in family['specials'] else ())
    backend.add_special_tokens([
        AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
        for t in specials
    ])
    if bos_token:
        bos_id = backend.token_to_id(bos_token)
        backend.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f'{bos_token} $A', pair=f'{bos_token} $A {bos_token} $B',
                                          special_tokens=[(bos_token, bos_id)])])

    if chat == 'chatml':
        tokenizer = Qwen2TokenizerFast(
            tokenizer_object=backend,
            bos_token=bos_token,
            eos_token='<|im_end|>',
            pad_token='<|endoftext|>',
            unk_token=None,
            additional_special_tokens=['<|im_start|>', '<|im_end|>'],
            model_max_length=131072,
            errors='replace',
            add_prefix_space=False,
            clean_up_tokenization_spaces=False,
            split_special_tokens=False,
            chat_template=CHATML_TEMPLATE,
        )
    else:   # Llama 3 and Phi-3 ship the generic fast class (Gemma's own is its SentencePiece-style one)
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token=bos_token, eos_token=family['eos'], pad_token=family['pad'],
            model_max_length=131072, clean_up_tokenization_spaces=False, chat_template=family['template'])
    if add_internvl_tokens:
        _add_internvl_tokens(tokenizer)
    return tokenizer
