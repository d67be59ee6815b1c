"""llama.cpp's converter (``convert_hf_to_gguf.py`` of the tree ``make gguf`` unpacks) run on a staged folder, once per
output, in one process. Run as a script by ``gguf.py``, with the main venv's Python (its torch and transformers 4.57
are the ones the converter wants; the converter brings its own gguf-py)::

    python gguf_convert.py LLAMA_CPP_DIR PRE -- CONVERTER ARGS ... [-- CONVERTER ARGS ...]

Some of the converter's limits are lifted here, its code left as it is:

* ``PRE``: the name of the BPE pre-tokenizer to write when llama.cpp does not recognise the tokenizer by the hash of
its test encoding (``-``: none, the converter's own error stands). The hash is over token ids, so any vocabulary but
the published ones misses it (this project's tiny tokenizer among them) even when its pre-tokenizer is one llama.cpp
implements; ``gguf.py`` names it only when the tokenizer's pre-tokenizer is that one, rule for rule.
* The mmproj's tensor names are looked up in a table built for as many blocks as the vision tower has layers, and
  InternVL's projector is named by block (``mlp1.{bid}``: ``mlp1.0``, ``mlp1.1``, ``mlp1.3``): a tower of fewer than
  4 layers (the demo's has 2) fails on ``mlp1.3`` ("Can not map tensor"). The table is built for at least 4 blocks;
  the GGUF's block count stays the tower's.
* InternViT's position embedding is written with its first row (the class token's) last: llama.cpp's InternVL graph
  puts the class token after the patches and adds the rows in order (the same order as its llava graph's, llama.cpp
  issue #25814), so, written as it is, each patch took its neighbour's row and the image features were 4-7% off the
  trained model's (a sweep measured it; rotated, they match to about 4e-4). The mmproj records it under
  :data:`POSITION_ORDER_KEY`: a llama.cpp whose graph puts the class token first needs the GGUF written anew.
* The mmproj also records the video frame prefix the model was trained with (:data:`FRAME_PREFIX_KEY`), which
  ``gguf_model.py`` writes before each frame of a video.
* A Gemma 3 LLM's GGUF lists which of its layers slide (``sliding_window_pattern``, from its ``layer_types``):
  llama.cpp otherwise takes the published models' layout, five sliding layers then a full one, and a model of
  another layout answered otherwise (a 2-layer look-alike, sliding then full: none of 12 answers alike).
* A SentencePiece vocabulary whose staged ``tokenizer_config.json`` says ``add_prefix_space: false`` (``gguf.py``
  stages it for a tokenizer that puts no word start after a special token, ``legacy=False``) gets
  ``tokenizer.ggml.add_space_prefix`` false whatever the LLM's family: the converter's Llama reads that setting, its
  Phi-3 does not, and llama.cpp's default (a word start after every special token) put the GGUF's prompts apart from
  training's after every marker.
"""

from __future__ import annotations

import json
import logging
import os
import sys

#: the mmproj's record of where its class token's position row is (``last``)
POSITION_ORDER_KEY = 'xtuner_plugins.position_embd.cls_row'
#: the mmproj's record of the text before each video frame's ``<image>`` the model was trained with (the staged
#: ``config.json``'s ``frame_prefix``, which ``gguf.stage`` always fills in); a GGUF without it answers no video
FRAME_PREFIX_KEY = 'xtuner_plugins.frame_prefix'


def main(argv) -> int:
    tree, pre, *rest = argv
    jobs, job = [], None
    for arg in rest:
        if arg == '--':
            job = []
            jobs.append(job)
        else:
            job.append(arg)
    sys.path.insert(0, tree)
    import convert_hf_to_gguf as converter  # inserts its own gguf-py into sys.path
    from conversion.base import TextModel

    recognised = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer):
        try:
            return recognised(self, tokenizer)
        except NotImplementedError:
            if pre == '-':
                raise
            logging.getLogger('gguf_convert').info('tokenizer not recognised by its hash; its pre-tokenizer is %s '
                                                   '(checked rule for rule)', pre)
            return pre

    TextModel.get_vocab_base_pre = get_vocab_base_pre

    import gguf
    prepared = TextModel.prepare_metadata

    def prepare_metadata(self, vocab_only):   # the vocabulary is set in here
        prepared(self, vocab_only)
        kv = self.gguf_writer.kv_data[0]
        sentencepiece = getattr(kv.get(gguf.Keys.Tokenizer.MODEL), 'value', None) == 'llama'
        if sentencepiece and gguf.Keys.Tokenizer.ADD_PREFIX not in kv and unprefixed(str(self.dir_model)):
            self.gguf_writer.add_add_space_prefix(False)

    TextModel.prepare_metadata = prepare_metadata
    from conversion.base import MmprojModel
    built = MmprojModel.__init__

    def init(self, *args, **kwargs):
        built(self, *args, **kwargs)
        if self.block_count < 4:  # the table's names only: the GGUF's block count is the tower's
            self.tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, 4)

    MmprojModel.__init__ = init

    from conversion.internvl import InternVisionModel
    tensors, parameters = InternVisionModel.modify_tensors, InternVisionModel.set_gguf_parameters

    def modify_tensors(self, data_torch, name, bid):
        if 'position_embedding' in name:   # [1, 1 + patches, width]: the class token's row to the end
            import torch
            data_torch = torch.cat([data_torch[..., 1:, :], data_torch[..., :1, :]], dim=-2)
        return tensors(self, data_torch, name, bid)

    def set_gguf_parameters(self):
        parameters(self)
        self.gguf_writer.add_string(POSITION_ORDER_KEY, 'last')
        with open(os.path.join(str(self.dir_model), 'config.json'), encoding='utf-8') as f:
            prefix = json.load(f).get('frame_prefix')
        if isinstance(prefix, str):
            self.gguf_writer.add_string(FRAME_PREFIX_KEY, prefix)

    InternVisionModel.modify_tensors, InternVisionModel.set_gguf_parameters = modify_tensors, set_gguf_parameters

    from conversion.gemma import Gemma3Model
    gemma3_parameters = Gemma3Model.set_gguf_parameters

    def set_gemma3_parameters(self):   # each layer's kind, where llama.cpp would take one sliding layer in 6
        gemma3_parameters(self)
        kinds = self.hparams.get('layer_types')
        if kinds and self.hparams.get('sliding_window'):
            self.gguf_writer.add_sliding_window_pattern([kind == 'sliding_attention' for kind in kinds])

    Gemma3Model.set_gguf_parameters = set_gemma3_parameters
    for job in jobs:
        sys.argv = ['convert_hf_to_gguf.py', *job]
        converter.main()
    return 0


def unprefixed(folder: str) -> bool:
    """Whether ``folder``'s ``tokenizer_config.json`` says ``add_prefix_space: false``."""
    try:
        with open(os.path.join(folder, 'tokenizer_config.json'), encoding='utf-8') as f:
            return json.load(f).get('add_prefix_space') is False
    except (OSError, ValueError, AttributeError):
        return False


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
