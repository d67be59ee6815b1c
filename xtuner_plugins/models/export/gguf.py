"""``--format gguf``: the text model's GGUF and its mmproj GGUF, for llama.cpp (and what is built on it), written by
llama.cpp's own converter and quantiser from the official InternVL layout::

    OUT_DIR/NAME-F16.gguf (or -Q8_0, -Q4_K_M, -F32)   the LLM, its tokenizer and the chat template it was trained with
    OUT_DIR/mmproj-NAME-F16.gguf                       InternViT + the projector, projector type "internvl"

llama.cpp comes from ``make gguf`` (``.venv-gguf``: llama-cpp-python built from its source distribution, and the
converter of the same llama.cpp tree in ``.venv-gguf/llama.cpp``). The converter runs in this venv's Python
(``gguf_convert.py``; its torch and transformers are the ones it wants), the quantiser and the answers in
``.venv-gguf`` (``models/gguf_worker.py``).

What llama.cpp cannot take is refused before anything is written, with the reason (:func:`config_misfit`): a family
other than InternViT + pixel shuffle (its converter reads ``LlavaForConditionalGeneration`` for Pixtral towers only,
not CLIP or SigLIP), an LLM family its converter does not know, an activation or a pixel-shuffle version it does not
implement. A folder that lacks what the converter reads (``architectures``, ``preprocessor_config.json`` with
``image_mean``/``image_std``, the tokenizer's chat template) is converted from a staged copy with them filled in
(links to its files; the folder itself is never written). The mmproj stays F16 (F32 with ``--quant f32``): only the
LLM is quantised, as llama.cpp's published GGUFs do. ``q4_k_m`` needs rows of a multiple of 256: llama.cpp's
quantiser falls back to another type for the tensors that have not, and the fallbacks are printed.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace
from typing import Dict, List, Optional, Tuple

from ..head import unwrapped
from .files import Log, _print
from .gguf_checks import OTHER_LAYOUTS, config_problem, vocabulary_problem
from .gguf_run import run

QUANTS = ('f16', 'q8_0', 'q4_k_m', 'f32')
#: the converter's --outtype for each quant (q8_0 and q4_k_m: quantised from the F16 file by llama.cpp's quantiser)
OUTTYPE = {'f16': 'f16', 'f32': 'f32', 'q8_0': 'f16', 'q4_k_m': 'f16'}
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
WORKER = os.path.join(os.path.dirname(HERE), 'gguf_worker.py')
MAKE_GGUF = 'run `make gguf` first (it builds llama.cpp into .venv-gguf once; docs/conversion.md, "GGUF")'
#: llm_config.model_type -> the architecture the converter looks up, for a folder whose llm_config names none
LLM_ARCHITECTURES = {'qwen2': 'Qwen2ForCausalLM', 'qwen3': 'Qwen3ForCausalLM', 'llama': 'LlamaForCausalLM',
                     'internlm2': 'InternLM2ForCausalLM', 'phi3': 'Phi3ForCausalLM'}
#: the pre-tokenizer of Qwen2's tokenizer.json (and of this project's tiny tokenizer): llama.cpp's "qwen2"
QWEN2_PRE = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
             r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


def venv() -> str:
    return os.environ.get('XTUNER_GGUF_VENV') or os.path.join(ROOT, '.venv-gguf')


def tools() -> Tuple[str, str]:
    """``(python, tree)``: ``.venv-gguf``'s Python and llama.cpp's converter tree; ``ValueError`` naming
    ``make gguf`` when it has not been built."""
    python, tree = os.path.join(venv(), 'bin', 'python'), os.path.join(venv(), 'llama.cpp')
    for path in (python, os.path.join(tree, 'convert_hf_to_gguf.py'), os.path.join(venv(), '.installed')):
        if not os.path.exists(path):
            raise ValueError(f'llama.cpp is not built here ({path} is missing): {MAKE_GGUF}')
    return python, tree


def converter_maps(tree: str) -> Tuple[Dict[str, str], Dict[str, str]]:
    """The architectures the converter knows: ``(TEXT_MODEL_MAP, MMPROJ_MODEL_MAP)`` of its ``conversion``
    package, read as literals (importing it needs torch and its own gguf-py)."""
    with open(os.path.join(tree, 'conversion', '__init__.py'), encoding='utf-8') as f:
        module = ast.parse(f.read())
    maps = {}
    for node in module.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (node.targets[0] if isinstance(node, ast.Assign)
                                                                        else None)
        if isinstance(target, ast.Name) and target.id in ('TEXT_MODEL_MAP', 'MMPROJ_MODEL_MAP'):
            maps[target.id] = ast.literal_eval(node.value)
    return maps['TEXT_MODEL_MAP'], maps['MMPROJ_MODEL_MAP']


def llm_architecture(llm: dict) -> Optional[str]:
    names = llm.get('architectures') or []
    return names[0] if names else LLM_ARCHITECTURES.get(llm.get('model_type'))


def config_misfit(config: dict, tree: str) -> Optional[str]:
    """Why llama.cpp cannot take the model ``config`` (an official folder's ``config.json``) describes, or None."""
    problem = config_problem(config)   # the layout, the fields the converter reads and their types
    if problem:
        return problem
    text_map, mmproj_map = converter_maps(tree)
    vision, llm, reasons = config['vision_config'], config['llm_config'], []
    tower = (vision.get('architectures') or ['InternVisionModel'])[0]
    if mmproj_map.get(tower) != 'internvl':
        reasons.append(f'vision tower {tower} (llama.cpp\'s InternVL mmproj takes InternVisionModel)')
    arch = llm_architecture(llm)
    if arch not in text_map:
        reasons.append(f'LLM {arch or llm.get("model_type")!r}, a family llama.cpp\'s converter does not know')
    if vision.get('hidden_act', 'gelu') not in ('gelu', 'silu'):
        reasons.append(f'vision hidden_act {vision["hidden_act"]!r} (llama.cpp\'s InternVL takes gelu or silu)')
    if vision.get('norm_type', 'layer_norm') != 'layer_norm' and (vision.get('hidden_size'),
                                                                  vision.get('num_hidden_layers')) != (3200, 45):
        reasons.append(f'vision norm_type {vision["norm_type"]!r} (llama.cpp uses RMSNorm for the 6B InternViT only)')
    if config.get('ps_version', 'v2') != 'v2':
        reasons.append(f'ps_version {config["ps_version"]!r} (llama.cpp implements pixel shuffle v2)')
    if config.get('select_layer', -1) != -1:
        reasons.append(f'select_layer {config["select_layer"]} (llama.cpp takes the last layer\'s features)')
    gemma3 = arch == 'Gemma3ForCausalLM'
    if gemma3:
        reasons.extend(gemma3_misfits(llm))
    elif str(llm.get('model_type', '')).startswith('gemma') or str(arch or '').startswith('Gemma'):
        reasons.append(f'LLM {arch or llm.get("model_type")!r}: llama.cpp\'s Gemma and Gemma 2 read the embeddings '
                       f'as their head and drop the lm_head the official folder writes apart (Gemma 3 converts)')
    from ..attention import sliding_window
    window = sliding_window(SimpleNamespace(**{k: llm.get(k) for k in ('sliding_window', 'layer_types')},
                                            use_sliding_window=llm.get('use_sliding_window', True)))
    if window and not gemma3:   # a tiny Mistral with an 8-token window answered otherwise through llama.cpp
        reasons.append(f'a sliding window of {window} tokens in the LLM, which llama.cpp\'s graph for it does not '
                       f'apply')
    return '; '.join(reasons) or None


def gemma3_misfits(llm: dict) -> List[str]:
    """What of a Gemma 3 LLM's config llama.cpp's Gemma 3 graph does otherwise: it scales the queries by the head
    width's root (the hidden size over the heads' at 62 layers: Gemma 3 27B), where transformers takes
    ``query_pre_attn_scalar``'s, and has no attention logit cap. Its sliding layers are the GGUF's own list
    (``gguf_convert.py``)."""
    reasons = []
    heads, hidden = llm.get('num_attention_heads') or 8, llm.get('hidden_size')
    head_dim = llm.get('head_dim') or 256
    scale = hidden / heads if llm.get('num_hidden_layers') == 62 and hidden else head_dim
    if llm.get('query_pre_attn_scalar', 256) != scale:
        reasons.append(f'query_pre_attn_scalar {llm.get("query_pre_attn_scalar", 256)} (llama.cpp\'s Gemma 3 scales '
                       f'the queries by {scale:g}\'s root)')
    if llm.get('attn_logit_softcapping') is not None:
        reasons.append(f'attn_logit_softcapping {llm["attn_logit_softcapping"]} (llama.cpp\'s Gemma 3 has no '
                       f'attention logit cap)')
    return reasons


def model_misfit(model) -> Optional[str]:
    """:func:`config_misfit` for a model about to be exported (before anything is written)."""
    from ..vision import hf_to_official_vision_config
    from .official import internvl_misfit
    _, tree = tools()
    if model.vision.name in ('clip', 'siglip'):
        return OTHER_LAYOUTS['llava']
    misfit = internvl_misfit(model)
    if misfit:
        return f'llama.cpp reads InternVL\'s official layout only: {misfit}'
    llm = model.language_model   # a LoRA-trained LLM is still peft's wrapper here (merged when written)
    llm = unwrapped(llm)
    config = {'model_type': 'internvl_chat', 'vision_config': hf_to_official_vision_config(model.vision_model.config),
              'llm_config': dict(llm.config.to_dict(), architectures=[type(llm).__name__]),
              'downsample_ratio': model.downsample_ratio, 'ps_version': model.ps_version,
              'select_layer': model.select_layer}
    tokenizer = model.tokenizer   # (the files the official folder is then written with)
    sentencepiece = str(getattr(tokenizer, 'vocab_file', None) or '')
    return config_misfit(config, tree) or vocabulary_problem(
        type(llm).__name__, type(tokenizer).__name__.removesuffix('Fast'),
        sentencepiece.endswith('.model') and os.path.isfile(sentencepiece))


def pre_tokenizer(folder: str) -> str:
    """``qwen2`` when the folder's tokenizer.json pre-tokenizes as Qwen2's (a ``Split`` on Qwen2's pattern, then
    byte-level), else ``-`` (the converter then needs to recognise the tokenizer itself)."""
    try:
        with open(os.path.join(folder, 'tokenizer.json'), encoding='utf-8') as f:
            pre = json.load(f).get('pre_tokenizer') or {}
    except (OSError, ValueError):
        return '-'
    steps = pre.get('pretokenizers') or []
    if pre.get('type') == 'Sequence' and len(steps) == 2 and steps[0].get('type') == 'Split' \
            and (steps[0].get('pattern') or {}).get('Regex') == QWEN2_PRE and steps[0].get('behavior') == 'Isolated' \
            and not steps[0].get('invert') and steps[1].get('type') == 'ByteLevel' \
            and not steps[1].get('add_prefix_space') and not steps[1].get('use_regex'):
        return 'qwen2'
    return '-'


def json_object(path: str, missing: Optional[dict] = None) -> dict:
    """The JSON object in ``path`` (``missing``, when given, for a file that is not there); ``ValueError`` naming
    the file for one that does not read or holds something else."""
    if missing is not None and not os.path.isfile(path):
        return missing
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f'{path}: does not read ({exc})') from None
    if not isinstance(data, dict):
        raise ValueError(f'{path}: holds a JSON {type(data).__name__}, not an object')
    return data


def chat_prompt(folder: str, config: dict, tok_cfg: dict) -> Tuple[Optional[str], str]:
    """The chat template the GGUF is to carry where the folder's is not the prompt its ``chat()`` builds (the one
    the model was trained with: ``config.json``'s ``template`` and ``system_message``), and what was changed;
    ``(None, '')`` where it is. llama.cpp prompts with the GGUF's template alone: a folder whose ``system_message``
    differs from its template's default, or whose tokenizer template is another (OpenGVLab's folders carry the
    LLM's own), would otherwise answer to another prompt than the folder's ``chat()``.

    The GGUF's template never writes the bos (a converted folder's does for a tokenizer that adds one: files.py's
    ``chat_template``): llama.cpp puts it before the prompt itself where the GGUF's ``tokenizer.ggml.add_bos_token``
    says so (its converter reads that from the tokenizer). A ``{{ bos_token }}`` would be dropped again by llama.cpp's
    server (it strips a leading bos from the rendered template) and render as nothing in llama-cpp-python 0.3.36's
    ``MTMDChatHandler`` (the bos detokenised without its special text), but a runtime that wrote the bos's text and
    tokenised the prompt with ``add_special`` would start it with two."""
    from xtuner_plugins.data.template import get_template
    from .files import BOS, chat_template, template_system, with_system, without_bos
    name, system = config.get('template', 'internvl2_5'), config.get('system_message')
    current = tok_cfg.get('chat_template')
    if not current and os.path.isfile(os.path.join(folder, 'chat_template.jinja')):
        with open(os.path.join(folder, 'chat_template.jinja'), encoding='utf-8') as f:
            current = f.read()
    if not current:
        return chat_template(name, system), f'the chat template ({name})'
    if isinstance(current, str) and template_system(current) is not None:  # the converter's
        changed, why = without_bos(current), []
        if system is not None and template_system(current) != system:
            changed = with_system(changed, system)
            why.append('the chat template\'s default system message (config.json\'s system_message, which chat() uses)')
        if current.startswith(BOS):
            why.append('the chat template without its bos_token (llama.cpp adds the bos itself)')
        return (changed, ', '.join(why)) if why else (None, '')
    try:
        get_template(name)
    except (KeyError, ValueError):
        return None, ''  # a template this project does not know: the folder's own is kept
    return chat_template(name, system), f'the chat template ({name}, as chat() prompts; the tokenizer\'s own is not it)'


def stage(folder: str, staging: str, log: Log = _print) -> None:
    """``staging``: links to ``folder``'s files, with what the converter reads and the folder lacks filled in
    (``architectures``, ``preprocessor_config.json``'s mean/std, the tokenizer's chat template)."""
    from xtuner_plugins.data.tiling import IMAGENET_MEAN, IMAGENET_STD
    config = json_object(os.path.join(folder, 'config.json'))
    pre = json_object(os.path.join(folder, 'preprocessor_config.json'), missing={})
    tok_cfg = json_object(os.path.join(folder, 'tokenizer_config.json'), missing={})
    os.makedirs(staging)
    filled = []
    if not config.get('architectures'):
        config['architectures'] = ['InternVLChatModel']
        filled.append('architectures')
    if not config['vision_config'].get('architectures'):
        config['vision_config']['architectures'] = ['InternVisionModel']
        filled.append('vision_config.architectures')
    if not config['llm_config'].get('architectures'):
        config['llm_config']['architectures'] = [llm_architecture(config['llm_config'])]
        filled.append('llm_config.architectures')
    from xtuner_plugins.data.template import DEFAULT_FRAME_PREFIX
    config.setdefault('frame_prefix', DEFAULT_FRAME_PREFIX)   # into the mmproj (gguf_convert.FRAME_PREFIX_KEY)
    written = {'config.json': config}
    if 'image_mean' not in pre or 'image_std' not in pre:
        pre.setdefault('image_mean', list(config.get('image_mean', IMAGENET_MEAN)))
        pre.setdefault('image_std', list(config.get('image_std', IMAGENET_STD)))
        written['preprocessor_config.json'] = pre
        filled.append('preprocessor_config.json image_mean/image_std')
    template, why = chat_prompt(folder, config, tok_cfg)
    if template is not None:  # the converter reads tokenizer_config.json's before chat_template.jinja
        tok_cfg['chat_template'] = template
        written['tokenizer_config.json'] = tok_cfg
        filled.append(why)
    if spaces_after_specials(folder) is False and tok_cfg.get('add_prefix_space') is not False:   # (gguf_convert.py)
        tok_cfg['add_prefix_space'] = False
        written['tokenizer_config.json'] = tok_cfg
        filled.append('add_prefix_space false (its SentencePiece tokenizer puts no word start after a special token)')
    for name in os.listdir(folder):
        if name not in written and os.path.isfile(os.path.join(folder, name)):
            os.symlink(os.path.abspath(os.path.join(folder, name)), os.path.join(staging, name))
    for name, content in written.items():
        with open(os.path.join(staging, name), 'w', encoding='utf-8') as f:
            json.dump(content, f, indent=2, ensure_ascii=False)
    if filled:
        log(f'filled in for llama.cpp\'s converter (a staged copy; {folder} is not written): {", ".join(filled)}')
    if config.get('use_thumbnail') is False:
        log(f'WARNING: {folder} was trained without a thumbnail (use_thumbnail false), and llama.cpp\'s mtmd adds one '
            'to every image of more than one tile: such images get a tile through llama.cpp that the model never saw '
            'in training (docs/conversion.md, "GGUF")')


def spaces_after_specials(folder: str) -> Optional[bool]:
    """For a SentencePiece tokenizer (``tokenizer.model`` in ``folder``): whether the text after a special token
    (``<img>``) starts with a word start, as llama.cpp's ``add_space_prefix`` writes every piece; None for any
    other tokenizer, or one that cannot be read."""
    if not os.path.isfile(os.path.join(folder, 'tokenizer.model')):
        return None
    try:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        after = tokenizer.encode('<img>a', add_special_tokens=False)
        alone = tokenizer.encode('a', add_special_tokens=False)
    except Exception:  # noqa: BLE001 -- not ours to judge here: the conversion says what is wrong
        return None
    return after[1:] == alone if after[:1] == [tokenizer.convert_tokens_to_ids('<img>')] else None


#: llama.cpp's quantiser's line for a tensor whose rows do not fit the type asked for
FALLBACK = re.compile(r'ncols\s+(\d+) not divisible by (\d+) \(required for type\s+(\w+)\) -> falling back to\s+(\w+)')


def convert_staged(staging: str, out_dir: str, name: str, quant: str, log: Log = _print) -> List[str]:
    """The GGUF pair of the staged folder, into ``out_dir``; returns the files written."""
    python, tree = tools()
    kind = OUTTYPE[quant]
    text = os.path.join(out_dir, f'{name}-{kind.upper()}.gguf')
    mmproj = os.path.join(out_dir, f'mmproj-{name}-{kind.upper()}.gguf')
    env = dict(os.environ, HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1')
    log(f'llama.cpp\'s converter: {os.path.basename(text)}, {os.path.basename(mmproj)}')
    run([sys.executable, os.path.join(HERE, 'gguf_convert.py'), tree, pre_tokenizer(staging),
          '--', staging, '--outfile', text, '--outtype', kind,
          '--', staging, '--mmproj', '--outfile', mmproj, '--outtype', kind], 'llama.cpp\'s converter', env, out_dir)
    if quant in ('f16', 'f32'):
        return [text, mmproj]
    quantised = os.path.join(out_dir, f'{name}-{quant.upper()}.gguf')
    log(f'llama.cpp\'s quantiser (llama_model_quantize): {os.path.basename(quantised)}')
    output = run([python, WORKER, 'quantize', text, quantised, quant], 'llama.cpp\'s quantiser', env, out_dir)
    fallbacks = FALLBACK.findall(output)
    if fallbacks:
        moves = ', '.join(sorted({f'{want} -> {got}' for _, _, want, got in fallbacks}))
        widths = ', '.join(sorted({cols for cols, _, _, _ in fallbacks}, key=int))
        log(f'{len(fallbacks)} tensors quantised to another type than {quant} asks ({moves}): their rows ({widths} '
            f'wide) are not multiples of {fallbacks[0][1]}; llama.cpp\'s own fallback')
    os.remove(text)
    return [quantised, mmproj]


def check_loads(model: str, mmproj: str) -> None:
    """``ValueError`` with llama.cpp's words when it does not load the pair it was written as (an OLMoE with grouped
    key/value heads: a tensor of the wrong shape), where the export said done and every question failed."""
    python, _ = tools()
    done = subprocess.run([python, WORKER, 'check', model, mmproj], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors='replace')
    if done.returncode:
        lines = done.stdout.strip().splitlines()
        said = [re.sub(r'\s+', ' ', line.split('error loading model:')[-1]).strip() for line in lines
                if re.search(r'error loading model|mtmd context|clip_', line) and re.search(r'error|fail', line, re.I)]
        raise ValueError(f'llama.cpp does not load the GGUF it was converted to ({"; ".join(said[:2]) or lines[-1]})'
                         f': this model\'s layout is not one llama.cpp runs')


def write_gguf_from_folder(folder: str, out_dir: str, quant: str = 'f16', log: Log = _print,
                           name: Optional[str] = None) -> List[str]:
    """An official folder's GGUF pair, into the (new, empty) ``out_dir``, its files named after ``name`` (by
    default the folder's); the staged copy is made inside it and removed. Returns the files written."""
    if quant not in QUANTS:
        raise ValueError(f'--quant {quant}: use one of {", ".join(QUANTS)}')
    name = name or os.path.basename(os.path.normpath(folder)) or 'model'
    # llama.cpp's converter names the model (general.name, general.finetune) after the folder it reads: the staged
    # copy is named as the model (a folder named .staging wrote '.Staging' into every file)
    staging = os.path.join(out_dir, '.staging', name)
    try:
        stage(folder, staging, log)
        files = convert_staged(staging, out_dir, name, quant, log)
    finally:
        shutil.rmtree(os.path.dirname(staging), ignore_errors=True)
    check_loads(*files)
    for path in files:
        log(f'wrote {os.path.basename(path)} ({os.path.getsize(path) / 2 ** 20:.2f} MiB)')
    return files


def write_gguf(model, tiling: dict, out_dir: str, dtype, max_shard_size: str = '5GB', log: Log = _print,
               system: Optional[str] = None, quant: str = 'f16') -> None:
    """A trained model's GGUF pair: the official layout written into ``out_dir/official`` first (the converter
    reads it), converted, then removed."""
    from .official import write_official
    source = os.path.join(out_dir, 'official')
    os.makedirs(source)
    try:
        write_official(model, tiling, source, dtype, max_shard_size, log, system=system)
        name = re.sub(r'\.tmp-\d+$', '', os.path.basename(os.path.normpath(out_dir)))  # export_checkpoint's temporary
        write_gguf_from_folder(source, out_dir, quant, log, name)
    finally:
        shutil.rmtree(source, ignore_errors=True)
