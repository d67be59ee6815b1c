import hashlib
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def digest(folder):
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith(('.safetensors', '.json')):
            with open(os.path.join(folder, name), 'rb') as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


def test_writes_both_checkpoints_in_their_real_layouts_deterministically(tmp_path):
    for out in ('a', 'b'):
        result = subprocess.run([sys.executable, 'tools/make_tiny_models.py', str(tmp_path / out)], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
    vit = json.load(open(tmp_path / 'a' / 'internvit' / 'config.json'))
    assert vit['model_type'] == 'intern_vit_6b' and vit['architectures'] == ['InternVisionModel']
    assert vit['auto_map']['AutoModel'] == 'modeling_intern_vit.InternVisionModel'
    llm = json.load(open(tmp_path / 'a' / 'llm' / 'config.json'))
    assert llm['architectures'] == ['Qwen2ForCausalLM'] and llm['tie_word_embeddings'] is True
    tok = json.load(open(tmp_path / 'a' / 'llm' / 'tokenizer_config.json'))
    assert tok['tokenizer_class'] == 'Qwen2Tokenizer' and tok['eos_token'] == '<|im_end|>'
    for part in ('internvit', 'llm'):
        assert digest(tmp_path / 'a' / part) == digest(tmp_path / 'b' / part), part
