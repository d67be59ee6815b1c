"""A converted folder checked before transformers reads it: its format (from ``config.json``), its weights and
tokenizer files there and whole. transformers' own errors for a half-written copy are tracebacks from deep inside;
these are one ``ValueError`` naming the folder, the file and what is wrong."""

from __future__ import annotations

import filecmp
import glob
import json
import os
import re
from typing import Callable, Optional, Tuple

FOLDER_FORMATS = {'internvl_chat': 'official', 'xtuner_vlm_chat': 'remote', 'llava': 'llava', 'internvl': 'hf'}
#: the parts' configs each format's config.json holds: without one, its config class builds a default (a 7B-class
#: Qwen2 or Llama), and loading the folder took all the memory there was before failing
PART_CONFIGS = {'official': ('vision_config', 'llm_config'), 'remote': ('vision_config', 'llm_config'),
                'llava': ('vision_config', 'text_config'), 'hf': ('vision_config', 'text_config')}


def folder_format(folder: str) -> str:
    """The format of a converted folder, from its ``config.json``; a clear error for anything else."""
    path = os.path.join(folder, 'config.json')
    if os.path.isfile(folder):   # a training checkpoint, most often: 'no such folder' read as a wrong path
        raise ValueError(f'{folder} is a file, not a model folder; give a folder written by '
                         f'tools/convert_to_official.py (convert a training checkpoint first: python '
                         f'tools/convert_to_official.py {folder} OUT_DIR)')
    if not os.path.isdir(folder):
        raise ValueError(f'{folder}: no such folder; give a folder written by tools/convert_to_official.py')
    if not os.path.isfile(path) and glob.glob(os.path.join(folder, '*.gguf')):   # --format gguf wrote it
        raise ValueError(f'{folder}: a GGUF folder (--format gguf, llama.cpp\'s files), which this tool does not '
                         f'read: tools/chat.py and tools/eval.py answer through it, and llama.cpp\'s own server '
                         f'serves it (llama-server -m MODEL.gguf --mmproj MMPROJ.gguf); the other tools and vLLM '
                         f'read the official, hf, llava and remote formats')
    if not os.path.isfile(path):
        raise ValueError(f'{folder}: no config.json; give a folder written by tools/convert_to_official.py')
    try:
        with open(path, encoding='utf-8') as f:
            config = json.load(f)
        model_type = config.get('model_type')
    except (ValueError, AttributeError) as exc:  # not JSON, not UTF-8, not an object
        raise ValueError(f'{path}: not a JSON object ({exc}); {AGAIN}') from None
    if model_type not in FOLDER_FORMATS:
        raise ValueError(f'{path}: model_type {model_type!r} is not a converted vision-language model '
                         f'(expected one of {sorted(FOLDER_FORMATS)}); give a folder written by '
                         f'tools/convert_to_official.py')
    fmt = FOLDER_FORMATS[model_type]
    for key in PART_CONFIGS[fmt]:
        part = config.get(key)   # (an LLM's config names its model_type; InternViT's may not in older folders)
        if not isinstance(part, dict) or not part or key != 'vision_config' and not part.get('model_type'):
            said = 'missing' if key not in config else f'{json.dumps(part):.60}'
            article = 'an' if fmt in ('official', 'hf') else 'a'
            raise ValueError(f'{path}: its "{key}" is {said}, where {article} {fmt} folder holds its part\'s config '
                             f'(with its model_type): loaded, a default model (7B-class) would be built in its place; '
                             f'{AGAIN}')
    return fmt


#: Files one of which a folder's tokenizer is read from (fast tokenizers, sentencepiece, BPE, WordPiece, tiktoken).
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer.model', 'vocab.json', 'vocab.txt', 'tokenizer.tiktoken')
# A tokenizer class given a missing file's path as None fails anywhere in its __init__ (TypeError, ...).
TOKENIZER_ERRORS = (OSError, ValueError, TypeError, KeyError, AttributeError)
AGAIN = 'convert the model again (tools/convert_to_official.py) or copy the folder whole'


def safetensors_problem(path: str) -> Optional[str]:
    """Why ``path`` is not a whole safetensors file (the size its header promises, against the file's), or
    ``None``. Reads the header only: 8 bytes of length, then the JSON naming each tensor's byte range."""
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        head = f.read(8)
        length = int.from_bytes(head, 'little') if len(head) == 8 else None
        if length is None or 8 + length > size:
            return f'{size} bytes, shorter than its own header: a truncated (half-written) file'
        try:
            header = json.loads(f.read(length))
            end = max([int(t['data_offsets'][1]) for k, t in header.items() if k != '__metadata__'] or [0])
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            return f'its header does not read ({type(exc).__name__}: {exc}): a corrupt file'
    if 8 + length + end != size:
        return (f'{size} bytes where its header promises {8 + length + end}: a '
                f'{"truncated (half-written)" if size < 8 + length + end else "corrupt"} file')
    return None


def config_whole(config: dict, key: str, path: str, default: Optional[int] = None) -> Optional[int]:
    """``config.json``'s ``key`` (``part.key`` in a part's config; a list's first, as hf's ``[size, size]``), a whole
    number of at least 1; ``default`` where it is absent or null; ``ValueError`` naming the file and the key for
    anything else (a hand-edited file: ``int()`` said 'invalid literal' naming neither, or a traceback)."""
    from xtuner_plugins.data.fitting import whole_number
    *parts, last = key.split('.')
    holder = config
    for part in parts:
        holder = holder.get(part) if isinstance(holder, dict) else None
    value = holder.get(last) if isinstance(holder, dict) else None
    if isinstance(value, (list, tuple)) and value:
        value = value[0]
    if value is None:
        return default
    if not whole_number(value):
        raise ValueError(f'{path}: {key} {value!r} is not a whole number, 1 or more; {AGAIN}')
    return int(value)


def recorded_tile_size(config: dict, path: str) -> Optional[int]:
    """The tile size a folder's ``config.json`` (``path``) records: InternVL's ``force_image_size``, else its vision
    tower's own (:func:`config_whole`: a whole number, or a ``ValueError`` naming the key); None where neither is."""
    return config_whole(config, 'force_image_size', path) or config_whole(config, 'vision_config.image_size', path)


def check_folder(folder: str) -> None:
    """A converted folder's weights and tokenizer files there and whole, before transformers reads them (whose
    errors, for a half-written copy, are tracebacks from deep inside); ``ValueError`` naming what is wrong."""
    def there(name):
        return os.path.isfile(os.path.join(folder, name))

    shards = []
    for index, single in (('model.safetensors.index.json', 'model.safetensors'),
                          ('pytorch_model.bin.index.json', 'pytorch_model.bin')):
        if there(index):
            try:
                with open(os.path.join(folder, index), encoding='utf-8') as f:
                    shards = sorted(set(json.load(f)['weight_map'].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ValueError(f'{os.path.join(folder, index)}: not a weight index ({type(exc).__name__}: '
                                 f'{exc}); {AGAIN}') from None
            outside = names_outside(shards)
            if outside:   # transformers reads os.path.join(folder, name): '../x', '/x' load another folder's file
                raise ValueError(f'{os.path.join(folder, index)}: it names {outside[0]} as a weight file, not a '
                                 f'file of this folder (an index names its shards by their names in it); {AGAIN}')
            missing = [s for s in shards if not there(s)]
            if missing:
                raise ValueError(f'{folder}: {len(missing)} of the {len(shards)} weight files {index} lists are '
                                 f'missing ({", ".join(missing[:3])}{", ..." if len(missing) > 3 else ""}); {AGAIN}')
            break
        if there(single):
            shards = [single]
            break
    if not shards:
        raise ValueError(f'{folder}: no weights (model.safetensors, model.safetensors.index.json with its shards, '
                         f'or pytorch_model.bin); {AGAIN}')
    for shard in shards:
        problem = safetensors_problem(os.path.join(folder, shard)) if shard.endswith('.safetensors') else None
        if problem:
            raise ValueError(f'{os.path.join(folder, shard)}: {problem}; {AGAIN}')
    if not any(there(name) for name in TOKENIZER_FILES):
        raise ValueError(f'{folder}: no tokenizer files (one of {", ".join(TOKENIZER_FILES)}); {AGAIN}')
    if not there('tokenizer_config.json'):   # transformers would pick a tokenizer by config.json's model_type
        raise ValueError(f'{folder}: no tokenizer_config.json (the tokenizer\'s class and special tokens); {AGAIN}')


def names_outside(shards) -> list:
    """The names of a weight index's shards that are not names of files in its folder ('../x.safetensors', an
    absolute path: joined to the folder, each reads another folder's file)."""
    return [s for s in shards if not isinstance(s, str) or os.path.basename(s) != s or s in ('', '.', '..')]


def check_processor_files(folder: str) -> None:
    """An ``hf`` or ``llava`` folder's processor files there (the converter writes them): without
    ``processor_config.json`` transformers' processor takes its defaults (256 image tokens an image, not the
    model's: "Image features and image tokens do not match" at the first question), without a chat template it
    cannot build a prompt; ``ValueError`` naming the file."""
    def there(name):
        return os.path.isfile(os.path.join(folder, name))

    for name, holds in (('preprocessor_config.json', 'the image processor\'s settings'),
                        ('processor_config.json', 'the image tokens per image')):
        if not there(name):
            raise ValueError(f'{folder}: no {name} ({holds}, which transformers would otherwise take at their '
                             f'defaults, not this model\'s); {AGAIN}')
    if not (there('chat_template.jinja') or there('chat_template.json')
            or any('"chat_template"' in _text(os.path.join(folder, name))
                   for name in ('tokenizer_config.json', 'processor_config.json'))):
        raise ValueError(f'{folder}: no chat template (chat_template.jinja, or one in tokenizer_config.json): the '
                         f'prompt cannot be built as training built it; {AGAIN}')


def _text(path: str) -> str:
    try:
        with open(path, encoding='utf-8') as f:
            return f.read()
    except (OSError, ValueError):
        return ''


def from_folder(what: str, folder: str, load: Callable, errors: Tuple[type, ...] = (OSError, ValueError)):
    """``load()``; an error of the folder's files (``errors``, safetensors' own, or the bare ``Exception`` the
    tokenizers library raises for a ``tokenizer.json`` it cannot read) as one ``ValueError`` naming the folder and
    what did not load, not transformers' traceback from deep inside."""
    try:
        return load()
    except Exception as exc:
        if not isinstance(exc, errors) and type(exc).__module__.split('.')[0] != 'safetensors' \
                and type(exc) is not Exception:
            raise
        said = ' '.join(str(exc).split())  # one line (torch's shape mismatches come a line each)
        raise ValueError(f'{folder}: the {what} does not load ({type(exc).__name__}: {said}); {AGAIN}') from None


#: what a model's load fails with when its files do not fit together: a tensor of another shape (RuntimeError); a
#: config.json value the model's code cannot take (a template it does not know: KeyError; a downsample_ratio of 0:
#: ZeroDivisionError; a field of the wrong kind: TypeError, AttributeError)
MODEL_ERRORS = (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError, ArithmeticError)


def weights_fit(folder: str, loaded) -> object:
    """The model of ``from_pretrained(..., output_loading_info=True)``'s ``(model, info)``; ``ValueError`` when the
    folder's weights lack tensors the model has (transformers would fill them with random values, and only warn)
    or hold tensors it has not (dropped): the weights are not this config's model, or are incomplete."""
    model, info = loaded
    missing, unexpected = list(info.get('missing_keys') or []), list(info.get('unexpected_keys') or [])

    def some(keys):
        return ', '.join(sorted(keys)[:3]) + (', ...' if len(keys) > 3 else '')
    if missing or unexpected:
        parts = ([f'{len(missing)} tensors of the model its config.json describes are not in its weights '
                  f'({some(missing)})'] if missing else []) + \
                ([f'{len(unexpected)} tensors in its weights are not the model\'s ({some(unexpected)})']
                 if unexpected else [])
        raise ValueError(f'{folder}: its weights do not fit its config.json: {"; ".join(parts)}; {AGAIN}')
    return model



def tokenizer_fits(folder: str, tokenizer, model, processor: bool = False) -> None:
    """``ValueError`` when the folder's tokenizer is not its model's: InternVL's image tokens missing (a tokenizer of
    another model copied in: the images would never reach the model, or a line naming no file), or ids beyond the
    model's embedding rows (an IndexError in the middle of an answer), unless a ``processor`` stands between."""
    from xtuner_plugins.data.template import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
    embeddings = (model.get_input_embeddings() if hasattr(model, 'get_input_embeddings') else None) or \
        model.language_model.get_input_embeddings()
    rows = embeddings.weight.shape[0]
    missing = [t for t in (IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN)
               if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if missing:
        raise ValueError(f'{folder}: its tokenizer has no {", ".join(missing)} (InternVL\'s image tokens): a '
                         f'tokenizer of another model? {AGAIN}')
    if len(tokenizer) > rows and not processor:  # an hf processor's <video>, past the rows, never reaches the model
        raise ValueError(f'{folder}: its tokenizer has {len(tokenizer)} tokens, its model\'s embedding {rows} rows: '
                         f'a tokenizer of another model? {AGAIN}')


#: what a folder that runs its code with this option gets told
TRUST = ('read them, then pass --trust-remote-code to run them; or convert the model again with this project\'s '
         'tools/convert_to_official.py')


def our_code_file(name: str) -> Optional[str]:
    """This checkout's copy of a code file a converted folder ships (``remote_code/``, ``projector.py``), or None."""
    from xtuner_plugins.remote_code import FOLDER, PROJECTOR_FILE, VLM_FILES
    if name == 'projector.py':
        return PROJECTOR_FILE
    return os.path.join(FOLDER, name) if name in VLM_FILES else None


def foreign_code(folder: str) -> Optional[str]:
    """Why loading ``folder`` with ``trust_remote_code`` would run code this project did not write, or None: a
    ``.py`` file in it (at any depth) that is not byte for byte this checkout's file of that name, or an
    ``auto_map`` naming code in another repository (``REPO--module.Class``). The tools run a folder's code only
    when it is ours (a folder from someone else, or converted by another version, may run anything on import).
    Symbolic links to folders are followed, as transformers follows them (each real folder read once), and an
    ``auto_map`` entry must name a module at the folder's top level (``module.Class``), where ours are."""
    seen = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:   # a link back up the tree
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        for name in sorted(files):
            if not name.endswith('.py'):
                continue
            path = os.path.join(root, name)
            ours = our_code_file(name) if root == folder else None
            if ours is None:
                return f'{path} is code this project does not ship in a converted folder'
            if not filecmp.cmp(path, ours, shallow=False):
                return f'{path} differs from this project\'s {os.path.relpath(ours, os.path.dirname(ours))}'
    for json_name in ('config.json', 'tokenizer_config.json', 'processor_config.json', 'preprocessor_config.json'):
        try:
            with open(os.path.join(folder, json_name), encoding='utf-8') as f:
                text = f.read()
        except OSError:
            continue
        values = _auto_map_values(text)
        if any('--' in value for value in values):
            return f'{os.path.join(folder, json_name)}\'s auto_map names code in another repository'
        outside = next((value for value in values if not _TOP_LEVEL_CLASS.fullmatch(value)), None)
        if outside is not None:
            return (f'{os.path.join(folder, json_name)}\'s auto_map names {outside!r}: not a class of a module at '
                    'the folder\'s top level (module.Class), where a converted folder\'s code is')
    return None


#: an ``auto_map`` entry of a converted folder: a class of a module at its top level
_TOP_LEVEL_CLASS = re.compile(r'[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*')


def _auto_map_values(text: str):
    """Every string under an ``auto_map`` key of the JSON ``text`` (nothing when it does not read)."""
    try:
        stack, found = [json.loads(text)], []
    except ValueError:
        return []
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                (found if key == 'auto_map' else stack).append(value)
        elif isinstance(node, list):
            stack.extend(node)
    strings = []
    while found:  # the auto_maps' values: a class path, or a list of them (a tokenizer's slow and fast classes)
        node = found.pop()
        if isinstance(node, str):
            strings.append(node)
        elif isinstance(node, dict):
            found.extend(node.values())
        elif isinstance(node, list):
            found.extend(node)
    return strings


def check_code(folder: str, trust_remote_code: bool) -> None:
    """``ValueError`` when loading ``folder`` would run code not this project's (:func:`foreign_code`) and
    ``trust_remote_code`` was not given."""
    problem = None if trust_remote_code else foreign_code(folder)
    if problem:
        raise ValueError(f'{folder}: loading it would run Python code that is not this project\'s ({problem}); '
                         f'{TRUST}')
