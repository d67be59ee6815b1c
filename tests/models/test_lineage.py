"""Lineage (models/lineage.py, models/fingerprints.py): every checkpoint records what it was trained from; a chain
of stages is loaded oldest first with LoRA adapters merged (the preference reference is the SFT model); other source
folders, another previous stage or a missing one are refused by name."""

import math
import os
import shutil

import pytest
import torch

from tests.models.conftest import build
from tests.models.test_preference import pair_items, pairs  # noqa: F401 (fixtures)
from xtuner_plugins.errors import Refused
from xtuner_plugins.models.fingerprints import fingerprint, fingerprint_differences
from xtuner_plugins.models.lineage import previous_stage_for, recorded_inputs, resolve_chain, set_remap
from xtuner_plugins.tiny import make_tiny_models

LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0)


def save_stage(model, path):
    """A checkpoint as training writes it: the trained tensors and, from LineageHook, the model's lineage."""
    torch.save({'meta': {'lineage': model.lineage}, 'state_dict': model.state_dict()}, path)
    return str(path)


def perturb(model, scale=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope='module')
def chain(tiny, tmp_path_factory):
    """warm-up (projector) -> LoRA SFT with the projector frozen -> the SFT checkpoint's path, and the SFT model."""
    tmp = tmp_path_factory.mktemp('chain')
    torch.manual_seed(0)
    warm = build(tiny)
    perturb(warm, seed=1)
    warm_path = save_stage(warm, tmp / 'warm.pth')
    sft = build(tiny, llm_lora=LORA, freeze_projector=True, pretrained_pth=warm_path)
    perturb(sft, seed=2)
    return dict(warm=warm_path, warm_model=warm, sft=save_stage(sft, tmp / 'sft.pth'), sft_model=sft.eval())


@pytest.fixture(scope='module')
def other_tower(tmp_path_factory):
    return make_tiny_models(str(tmp_path_factory.mktemp('other')), seed=1)['internvit']


def test_a_fingerprint_tells_another_folder_and_not_a_moved_one(tiny, other_tower, tmp_path):
    here = fingerprint(tiny['internvit'])
    assert 'model.safetensors' in here['files'] and 'config.json' in here['files']
    moved = shutil.copytree(tiny['internvit'], tmp_path / 'moved')
    assert fingerprint_differences(here, fingerprint(str(moved))) == []
    assert fingerprint_differences(here, fingerprint(other_tower)) == ['model.safetensors: other content (same size, '
                                                                       f'{here["files"]["model.safetensors"][0]} bytes)']


def test_a_large_file_is_fingerprinted_by_samples_that_see_a_change_anywhere(tmp_path, monkeypatch):
    import xtuner_plugins.models.fingerprints as fingerprints
    monkeypatch.setattr(fingerprints, 'WHOLE_HASH_BYTES', 1 << 16)
    data = bytearray(os.urandom(3 << 20))
    (tmp_path / 'a.safetensors').write_bytes(bytes(data))
    before = fingerprint(str(tmp_path))
    data[len(data) // 2:len(data) // 2 + (128 << 10)] = bytes(128 << 10)  # a tensor in the middle zeroed
    (tmp_path / 'a.safetensors').write_bytes(bytes(data))
    assert fingerprint_differences(before, fingerprint(str(tmp_path))) == [
        'a.safetensors: other content (same size, 3145728 bytes)']


def test_the_chain_is_found_from_the_last_checkpoint(chain):
    stages = resolve_chain(chain['sft'])
    assert [s.path for s in stages] == [chain['warm'], chain['sft']]
    assert stages[1].get('llm_lora') == LORA and stages[0].get('llm_lora') is None


def test_a_stage_after_a_frozen_projector_stage_gets_the_warm_up_projector(tiny, chain):
    """The SFT checkpoint holds no mlp1 (frozen there): a stage after it gets the warm-up's, not a random one."""
    assert not any(k.startswith('mlp1.') for k in torch.load(chain['sft'], weights_only=False)['state_dict'])
    dpo = build(tiny, llm_lora=LORA, freeze_projector=True, pretrained_pth=chain['sft'])
    for a, b in zip(chain['warm_model'].mlp1.parameters(), dpo.mlp1.parameters()):
        assert torch.equal(a, b)


def test_the_preference_reference_is_the_sft_model_and_rewards_start_at_zero(tiny, chain, pairs, batch):
    """DPO after LoRA SFT: the SFT adapters are merged, fresh adapters train on top; the reference (adapters off)
    is the SFT model, so at step 0 every reward is exactly 0 (it was 0.0171 with the SFT adapters trained on)."""
    dpo = build(tiny, llm_lora=LORA, freeze_projector=True, pretrained_pth=chain['sft'],
                preference=dict(types=('sigmoid',), beta=0.1)).eval()
    out = dpo(dict(pairs), mode='loss')
    assert out['rewards_chosen'].item() == 0.0 and out['rewards_rejected'].item() == 0.0
    assert out['term_sigmoid'].item() == pytest.approx(math.log(2), abs=1e-7)
    with torch.no_grad(), dpo.language_model.disable_adapter():  # the reference computes what SFT computes
        ref = dpo(batch, mode='tensor')
    with torch.no_grad():
        sft = chain['sft_model'](batch, mode='tensor')
    assert torch.allclose(ref, sft, atol=1e-4), (ref - sft).abs().max()  # merging rounds in float32
    trained = {n for n, p in dpo.named_parameters() if p.requires_grad}
    assert trained and all('lora_' in n for n in trained)


def test_a_full_stage_after_a_lora_stage_trains_the_merged_llm(tiny, chain):
    full = build(tiny, freeze_llm=False, pretrained_pth=chain['sft'])
    assert all(p.requires_grad for p in full.language_model.parameters())
    assert not any('lora_' in n for n, _ in full.named_parameters())


def test_another_tower_than_the_recorded_one_is_refused(tiny, chain, other_tower):
    from xtuner_plugins.models import VisionLanguageModel
    with pytest.raises(ValueError, match=rf'model.vision_encoder: {other_tower} is not the folder '
                                         rf'{chain["warm"]} was trained with \({tiny["internvit"]}\): '
                                         r'model.safetensors: other content'):
        VisionLanguageModel(vision_encoder=other_tower, llm=tiny['llm'], torch_dtype='float32',
                            llm_lora=LORA, pretrained_pth=chain['sft'])


def test_the_converter_takes_the_previous_stage_from_the_checkpoint(tiny, chain, other_tower, tmp_path):
    cfg = dict(vision_encoder=tiny['internvit'], llm=tiny['llm'])
    notes = []
    assert previous_stage_for(cfg, chain['sft'], notes.append) == chain['warm']
    assert notes == [f'previous stage (recorded in {chain["sft"]}): {chain["warm"]}']
    moved = shutil.copy(chain['warm'], tmp_path / 'moved.pth')  # the same checkpoint elsewhere is fine
    assert previous_stage_for(dict(cfg, pretrained_pth=str(moved)), chain['sft']) == str(moved)
    other = save_stage(build(tiny), tmp_path / 'other_warm.pth')
    with pytest.raises(ValueError, match=rf'{other} is not the checkpoint {chain["sft"]} was trained from'):
        previous_stage_for(dict(cfg, pretrained_pth=other), chain['sft'])
    with pytest.raises(ValueError, match=r'model.vision_encoder: .* is not the folder'):
        previous_stage_for(dict(cfg, vision_encoder=other_tower), chain['sft'])
    with pytest.raises(ValueError, match='trained without a previous stage, but the config gives'):
        previous_stage_for(dict(cfg, pretrained_pth=chain['warm']), chain['warm'])


def test_a_missing_or_changed_previous_stage_is_named(tiny, tmp_path):
    warm = save_stage(build(tiny), tmp_path / 'warm.pth')
    first = shutil.copy(warm, tmp_path / 'first.pth')
    os.makedirs(tmp_path / 'kept')
    shutil.copy(warm, tmp_path / 'kept' / 'warm.pth')
    sft = save_stage(build(tiny, llm_lora=LORA, pretrained_pth=warm), tmp_path / 'sft.pth')
    again = build(tiny)
    perturb(again, seed=5)
    save_stage(again, warm)  # the warm-up run again into the same file
    # the recorded path holds another checkpoint (a colleague's own work_dirs/pretrain_mlp/iter_N.pth, the recorded
    # path being relative): the right one beside it is taken, by its content (it was refused for the other)
    assert [s.path for s in resolve_chain(sft)] == [str(first), sft]
    os.remove(first)
    with pytest.raises(ValueError, match=rf'{warm} is not the checkpoint {sft} was trained from \({warm}\): '
                                         r'(.*); nor is it beside sft\.pth: put it there \(it is known by its '
                                         rf'content, under any name\), or give the tools --remap {warm}='
                                         r'THE_RIGHT_FILE$'):
        resolve_chain(sft)
    os.remove(warm)
    with pytest.raises(Refused, match=rf'{warm}: the previous stage of {sft} \(recorded in it, at {warm}\) is not '
                                      rf'found, there or beside it; {sft} holds only what its own stage trained, so '
                                      r"the weights that stage started from \(a warm-up's projector, LoRA merged "
                                      r'before\) are read from there: put it back or beside sft\.pth'):
        resolve_chain(sft)
    # moved with it, renamed: found beside it by its content (a chain copied to another folder together)
    shutil.copy(tmp_path / 'kept' / 'warm.pth', tmp_path / 'pre.pth')
    assert [s.path for s in resolve_chain(sft)] == [str(tmp_path / 'pre.pth'), sft]
    shutil.copy(tmp_path / 'kept' / 'warm.pth', tmp_path / 'pre2.pth')   # a copy beside it too: the same content
    os.symlink(tmp_path / 'pre.pth', tmp_path / 'a_link.pth')
    assert [s.path for s in resolve_chain(sft)] == [str(tmp_path / 'a_link.pth'), sft]
    os.remove(tmp_path / 'a_link.pth')
    os.remove(tmp_path / 'pre.pth')
    os.remove(tmp_path / 'pre2.pth')
    first = shutil.copy(tmp_path / 'kept' / 'warm.pth', tmp_path / 'first.pth')
    # a moved folder is found with --remap's pairs, the earlier stages' too
    moved = os.path.join(os.path.dirname(warm), 'moved')
    os.makedirs(moved)
    shutil.copy(first, os.path.join(moved, os.path.basename(warm)))
    set_remap([(os.path.dirname(warm), moved)])
    try:
        assert [s.path for s in resolve_chain(sft)] == [os.path.join(moved, os.path.basename(warm)), sft]
    finally:
        set_remap([])


def test_a_stage_meant_to_follow_another_is_stopped_without_one(tiny):
    from types import SimpleNamespace

    from xtuner_plugins.engine import LineageHook
    hook = LineageHook()
    lora = build(tiny, llm_lora=LORA)
    with pytest.raises(ValueError, match=r'model.pretrained_pth=CHECKPOINT .* or model.from_scratch=True'):
        hook.before_run(SimpleNamespace(model=lora))
    hook.before_run(SimpleNamespace(model=build(tiny)))  # the warm-up starts from nothing
    hook.before_run(SimpleNamespace(model=build(tiny, llm_lora=LORA, from_scratch=True)))
    checkpoint = {'meta': {}}
    hook.before_save_checkpoint(SimpleNamespace(model=lora), checkpoint)
    assert checkpoint['meta']['lineage']['llm_lora'] == LORA


def test_an_old_checkpoint_without_lineage_gives_its_recorded_config(tiny, chain, tmp_path):
    """Checkpoints written before lineage was recorded: the previous stage and adapters come from the config."""
    text = f"model = dict(pretrained_pth={chain['warm']!r}, llm_lora=dict(r=4, lora_alpha=8, lora_dropout=0.0))"
    torch.save({'meta': {'cfg': text}, 'state_dict': torch.load(chain['sft'], weights_only=False)['state_dict']}, tmp_path / 'old.pth')
    stages = resolve_chain(str(tmp_path / 'old.pth'))
    assert [s.path for s in stages] == [chain['warm'], str(tmp_path / 'old.pth')]
    assert stages[1].get('llm_lora') == LORA and stages[1].get('partial')


def test_a_file_is_hashed_once_per_process_until_it_changes(tmp_path, monkeypatch):
    """A conversion fingerprints the same sources more than once: the digest is reused while the file's size and
    modification time stay; a rewrite of the same size is hashed again and seen."""
    import time

    from xtuner_plugins.models import fingerprints
    calls = []
    real = fingerprints._hash_file
    monkeypatch.setattr(fingerprints, '_hash_file', lambda path, size: calls.append(path) or real(path, size))
    path = tmp_path / 'model.safetensors'
    path.write_bytes(b'a' * 1000)
    first = fingerprints.fingerprint(str(path))
    assert fingerprints.fingerprint(str(path)) == first and len(calls) == 1
    time.sleep(0.01)
    path.write_bytes(b'b' * 1000)
    assert fingerprints.fingerprint_differences(first, fingerprints.fingerprint(str(path))) and len(calls) == 2


@pytest.mark.parametrize('field, value, message', [
    ('sources', ['vision_encoder', 'llm'], "sources: expected a mapping of source folders, got list"),
    ('sources', {'llm': 'tiny/llm'}, "sources.llm: expected a mapping, got str 'tiny/llm'"),
    ('sources', {'llm': {'path': 'l', 'files': {'config.json': 7}}},
     r"sources.llm.files\['config.json'\]: expected \[size, digest\], got int 7"),
    ('pretrained', 'warm.pth', "pretrained: expected a mapping, got str 'warm.pth'"),
    ('pretrained', {'path': 3}, 'pretrained.path: expected a path, got int 3'),
    ('llm_lora', [4, 8], r'llm_lora: expected a mapping of LoRA settings or None, got list \[4, 8\]'),
    ('from_scratch', 'no', "from_scratch: expected true or false, got str 'no'"),
    (None, ['sources'], r"expected a mapping, got list \['sources'\]"),
])
def test_a_tampered_lineage_is_named_by_checkpoint_and_field(tiny, chain, tmp_path, field, value, message):
    meta = torch.load(chain['sft'], weights_only=False)['meta']
    lineage = value if field is None else dict(meta['lineage'], **{field: value})
    torch.save({'meta': {'lineage': lineage}, 'state_dict': {}}, tmp_path / 'iter_3.pth')
    path = str(tmp_path / 'iter_3.pth')
    pattern = rf"^{path}: its recorded lineage \(meta\['lineage'\]\) is not what training writes: {message}"
    with pytest.raises(ValueError, match=pattern):
        resolve_chain(path)
    with pytest.raises(ValueError, match=pattern):
        previous_stage_for(dict(vision_encoder=tiny['internvit'], llm=tiny['llm']), path)


def test_an_old_checkpoints_config_is_read_as_data_never_run(tmp_path):
    marker = tmp_path / 'ran'
    text = f'import os\nmodel = dict(pretrained_pth=os.system("touch {marker}"))\n'
    torch.save({'meta': {'cfg': text}, 'state_dict': {}}, tmp_path / 'old.pth')
    with pytest.raises(ValueError, match=r"old.pth: meta\['cfg'\] \(the training config\): line 1 is not a plain "
                                         r"setting \('import os'\)"):
        resolve_chain(str(tmp_path / 'old.pth'))
    assert not marker.exists()
    torch.save({'meta': {'cfg': 'model = dict(pretrained_pth=[1])'}, 'state_dict': {}}, tmp_path / 'old.pth')
    with pytest.raises(ValueError, match=r"old.pth: meta\['cfg'\] .* sets model.pretrained_pth to \[1\], not a path"):
        resolve_chain(str(tmp_path / 'old.pth'))


def test_the_inputs_a_lineage_names(tiny, chain):
    """What a conversion of the SFT checkpoint reads besides the command line: the warm-up checkpoint (through
    the lineage) and the source folders recorded along the chain."""
    found = recorded_inputs(chain['sft'])
    assert chain['warm'] in found and tiny['internvit'] in found and tiny['llm'] in found
    assert chain['warm'] not in recorded_inputs(chain['warm'])


def test_a_stage_takes_the_chat_template_of_the_stages_before_it(tiny, chain, tmp_path):
    """A preference stage after an SFT stage trained with ``Hermes-2`` trained on the default template's turns
    without a word (and its converted model recorded the default). A stage naming none (``template=None``, the stage
    configs') now takes the template the newest earlier stage records (its config, ``meta['cfg']``); one naming
    another is refused naming both; without earlier stages it is internvl2_5."""
    from xtuner_plugins.errors import Refused
    from xtuner_plugins.models.stages import inherited_template
    state = torch.load(chain['sft'], weights_only=False)
    for template in ('Hermes-2', None):
        state['meta']['cfg'] = f"model = dict(template={template!r}, llm_lora=dict(r=4, lora_alpha=8))\n"
        torch.save(state, tmp_path / f'{template}.pth')
    assert build(tiny, freeze_llm=False, pretrained_pth=str(tmp_path / 'Hermes-2.pth')).template == 'Hermes-2'
    with pytest.raises(Refused, match=rf"model.template: {tmp_path}/Hermes-2.pth \(model.pretrained_pth, or a stage "
                                      r"before it\) was trained with the template 'Hermes-2', this run gives "
                                      r"'internvl2_5': .*or set it to Hermes-2"):
        build(tiny, freeze_llm=False, template='internvl2_5', pretrained_pth=str(tmp_path / 'Hermes-2.pth'))
    # a stage recording none (it inherited too) and the warm-up before it recording none: the default
    assert inherited_template(str(tmp_path / 'None.pth')) == 'internvl2_5' == inherited_template(None)
    assert build(tiny, freeze_llm=False, pretrained_pth=str(tmp_path / 'None.pth')).template == 'internvl2_5'


def test_a_next_stage_of_another_vision_geometry_is_refused_naming_it(tiny, tmp_path):
    """A warm-up trained with ps_version v1 and select_layer -2 was fine-tuned on v2 and the last layer with its
    projector loaded all the same (same shapes, other features), without a word; another downsample_ratio was a
    shape mismatch naming no setting. The geometry the model builds is compared (training's start-up,
    ``refusals.geometry_refusal``), however it is written; a chain trained before still builds (the tools)."""
    from mmengine.config import Config

    from xtuner_plugins.engine.refusals import geometry_refusal
    from xtuner_plugins.models.stages import geometry_problem
    path = tmp_path / 'warm.pth'

    def trained(**model):
        cfg = Config(dict(model=dict(type='xtuner_plugins.models.VisionLanguageModel', **model)))
        torch.save({'meta': {'cfg': cfg.pretty_text}, 'state_dict': {}}, path)
    tower = tiny['internvit']
    trained(vision_encoder=tower, ps_version='v1', select_layer=-2, downsample_ratio=0.5)
    assert geometry_refusal({'model': dict(vision_encoder=tower, pretrained_pth=str(path))}) == (
        f'{path} (model.pretrained_pth) was trained with another vision geometry than this run gives ('
        "model.ps_version: trained 'v1', given 'v2'; model.select_layer: trained -2, given -1): its projector "
        '(mlp1) learnt on those features; give the trained values (--cfg-options model.KEY=VALUE), or leave '
        'model.pretrained_pth out to train a new projector')
    assert 'model.downsample_ratio: trained 0.5, given 0.25' in geometry_problem(str(path), dict(
        vision_encoder=tower, ps_version='v1', select_layer=-2, downsample_ratio=0.25))
    # the same geometry written otherwise: never refused
    same = [dict(vision_encoder=dict(path=tower, select_layer=-2), ps_version='v1'),
            dict(vision_encoder=tower, select_layer=-2, projector=dict(type='pixel_shuffle_mlp', ps_version='v1')),
            dict(vision_encoder=tower, select_layer=-2, ps_version='v1', official_checkpoint='x', downsample_ratio=1)]
    assert [geometry_problem(str(path), s) for s in same] == [None] * 3
    # the pixels' normalisation: the projector learnt on features of pixels normalised so (a colleague's warm-up
    # with mean/std 0.5 was fine-tuned on InternViT's ImageNet values without a word); written out or the default
    trained(vision_encoder=dict(path=tower, mean=[0.5] * 3, std=[0.5] * 3))
    assert ('model.vision_encoder.mean: trained (0.5, 0.5, 0.5), given (0.485, 0.456, 0.406); '
            'model.vision_encoder.std: trained (0.5, 0.5, 0.5), given (0.229, 0.224, 0.225)') in geometry_problem(
        str(path), dict(vision_encoder=tower))
    assert geometry_problem(str(path), dict(vision_encoder=dict(path=tower, mean=(.5, .5, .5), std=[.5] * 3))) is None
    trained(vision_encoder=tower)
    imagenet = dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    assert geometry_problem(str(path), dict(vision_encoder=dict(type='internvit', path=tower, **imagenet))) is None
    assert 'model.vision_encoder.std: trained (0.229' in geometry_problem(str(path), dict(
        vision_encoder=dict(path=tower, std=[1, 1, 1])))
    trained(vision_encoder=tower, select_layer=None)   # the encoder's default, and -1 written out
    assert geometry_problem(str(path), dict(vision_encoder=tower, select_layer=-1)) is None
    from xtuner_plugins.tiny.vision import write_tiny_clip
    clip = write_tiny_clip(str(tmp_path / 'clip'))   # CLIP's default is its second-to-last layer (LLaVA's)
    trained(vision_encoder=clip, projector='mlp')
    assert [geometry_problem(str(path), dict(vision_encoder=v, projector='mlp', select_layer=-2))
            for v in (clip, dict(type='clip', path=clip))] == [None, None]
    assert 'model.select_layer: trained -2, given -1' in geometry_problem(str(path), dict(
        vision_encoder=dict(type='clip', path=clip), projector='mlp', select_layer=-1))
    trained(vision_encoder=tower, projector='mlp', ps_version='v1')   # LLaVA's MLP reads no pixel-shuffle setting
    assert geometry_problem(str(path), dict(vision_encoder=tower, projector='mlp', downsample_ratio=0.25)) is None
    said = geometry_problem(str(path), dict(vision_encoder=tower))   # the projector alone, not its settings
    assert "(model.projector: trained 'mlp', given 'pixel_shuffle_mlp'):" in said, said
    # the model itself builds from a chain of two geometries (the converter and the chat tools read such chains)
    trained(vision_encoder=tower, ps_version='v1')
    torch.save({'meta': {'cfg': Config(dict(model=dict(ps_version='v1'))).pretty_text,
                         'lineage': build(tiny, ps_version='v1').lineage},
                'state_dict': build(tiny, ps_version='v1').state_dict()}, path)
    assert build(tiny, llm_lora=LORA, freeze_projector=True, pretrained_pth=str(path)).ps_version == 'v2'


def test_a_checkpoint_whose_config_and_lineage_disagree_is_refused_by_every_reader(tiny, chain, tmp_path):
    """The converter builds from meta['cfg'], a next stage merges the adapters by meta['lineage']: a file whose cfg
    was edited to lora_alpha 32 (its lineage saying 8) was refused by the converter only; a next stage merged it at 8
    without a word, another model than the one chat and eval see. Every reader of the lineage refuses it now."""
    from xtuner_plugins.models.lineage import read_lineage, records_disagree
    from xtuner_plugins.models.runconfig import run_config
    lora = dict(type='peft.LoraConfig', r=4, lora_alpha=8, lora_dropout=0.05, target_modules=('q_proj', 'v_proj'))
    record = dict(llm_lora=dict(LORA, target_modules=['q_proj', 'v_proj']), vision_lora=None)
    assert records_disagree(dict(llm_lora=lora), record) is None   # dropout and the class name change no weights
    assert records_disagree(dict(llm_lora=dict(lora, lora_alpha=32)), record) == 'model.llm_lora.lora_alpha: 32 and 8'
    assert records_disagree(dict(llm_lora=lora, vision_lora=dict(r=2)), record) == \
        "model.vision_lora: {'r': 2} and None"
    saved = torch.load(chain['sft'], weights_only=False)
    model_text = (f"model = dict(type='VisionLanguageModel', vision_encoder={tiny['internvit']!r}, llm={tiny['llm']!r}"
                  f", freeze_projector=True, llm_lora=dict(r=4, lora_alpha={{}}, lora_dropout=0.0))\n")
    paths = {}
    for alpha in (8, 32):
        paths[alpha] = str(tmp_path / f'sft_{alpha}.pth')
        torch.save({'meta': dict(saved['meta'], cfg=model_text.format(alpha)), 'state_dict': saved['state_dict']},
                   paths[alpha])
    assert read_lineage(paths[8]) == saved['meta']['lineage']
    said = (rf"^{paths[32]}: its training config and its lineage \(meta\['cfg'\], meta\['lineage'\]\) disagree "
            r"\(model.llm_lora.lora_alpha: 32 and 8\): changed after training")
    with pytest.raises(Refused, match=said):   # a next stage
        build(tiny, freeze_llm=False, pretrained_pth=paths[32])
    with pytest.raises(ValueError, match=said):   # the converter, chat, eval
        run_config(paths[32], log=lambda m: None)
    build(tiny, freeze_llm=False, pretrained_pth=paths[8])


def test_a_previous_stage_holding_nothing_or_part_of_the_projector_is_refused(tiny, tmp_path):
    """A ``model.pretrained_pth`` whose state_dict was empty, or held 3 of the projector's tensors, loaded with an
    INFO line ('Loaded 0 tensors') and the run trained on a random projector, exit 0. Refused naming the file and
    what is missing; the whole warm-up loads."""
    warm = build(tiny)
    projector = {k: v for k, v in warm.state_dict().items() if k.startswith('mlp1.')}
    path = tmp_path / 'warm.pth'

    def saved(state):
        torch.save({'meta': {'lineage': warm.lineage}, 'state_dict': state}, path)
        return str(path)
    with pytest.raises(Refused, match=r'warm\.pth: the checkpoint holds no tensors \(its state_dict is empty\)'):
        build(tiny, llm_lora=LORA, pretrained_pth=saved({}))
    cut = dict(list(projector.items())[:len(projector) // 2])
    with pytest.raises(Refused, match=rf"warm\.pth: it holds {len(cut)} of the projector's {len(projector)} tensors "
                                      r"\(mlp1; missing: \['mlp1\."):
        build(tiny, llm_lora=LORA, pretrained_pth=saved(cut))
    model = build(tiny, llm_lora=LORA, pretrained_pth=saved(projector))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in projector.items())
