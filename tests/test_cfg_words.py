"""``--cfg-options`` values MMEngine's ``DictAction`` would change, refused in one line (``cfg_words.py``)."""

import argparse
import os

import pytest

from xtuner_plugins import cfg_words


def test_a_path_with_a_comma_that_mmengine_would_split_is_refused(tmp_path, monkeypatch):
    """MMEngine's DictAction splits a value at its commas: model.llm=runs/a,b/llm became a list (an AttributeError
    traceback at the model's build) and a data folder 'd,x' two files. Refused naming the path; a list of paths
    that are each there, and values that are no path, are left as they are."""
    monkeypatch.chdir(tmp_path)
    os.makedirs('runs/a,b/llm')
    os.makedirs('d,x')
    open('d,x/a.jsonl', 'w').close()
    open('one.jsonl', 'w').close()
    open('two.jsonl', 'w').close()
    (llm,) = cfg_words.comma_paths(['model.llm=runs/a,b/llm'])
    assert llm == ("model.llm: 'runs/a,b/llm' is a path with a comma, and MMEngine's --cfg-options splits a value "
                   "at its commas (['runs/a', 'b/llm'] would be used): give a path without commas (a link to it), or "
                   "set the value in a config file")
    (data,) = cfg_words.comma_paths(['train_dataloader.dataset.data_files=[one.jsonl,d,x/a.jsonl]'])
    assert "'d,x/a.jsonl' is a path with a comma" in data
    assert cfg_words.comma_paths(['data_files=[one.jsonl,two.jsonl]', 'model.llm_lora.target_modules=q_proj,v_proj',
                                  'data_files=one.jsonl,two.jsonl']) == []
    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=cfg_words.CfgOptions)
    with pytest.raises(SystemExit):
        parser.parse_args(['--cfg-options', 'model.llm=runs/a,b/llm'])


def test_a_value_whose_spaces_mmengine_would_remove_is_refused():
    """MMEngine's DictAction removes every space of a value ('[my data/a.jsonl]' became 'mydata/a.jsonl', an
    annotation file the user never named): such a value is refused with what would have been used; spaces
    around commas and brackets are fine."""
    words = cfg_words.cfg_options_words(['cfg.py', '--cfg-options',
                                         'train_dataloader.dataset.data_files=[my data/a.jsonl]', 'model.llm=x',
                                         '--work-dir', 'w y'])
    assert words == ['train_dataloader.dataset.data_files=[my data/a.jsonl]', 'model.llm=x']
    (problem,) = cfg_words.spaced_values(words + ['a=[x, y]', 'b=( 1 , 2 )', 'c=[[x, y], ( z ,w)]', "d=[ 'q' , r]",
                                                  'e=q_proj, v_proj', "f='[1, 2]'", 'g=1 ', 'h='])
    assert problem.startswith("train_dataloader.dataset.data_files: the value '[my data/a.jsonl]' holds a space, "
                              "and MMEngine's --cfg-options removes every space from a value ('[mydata/a.jsonl]' "
                              "would be used)")
    assert cfg_words.spaced_values(['demo_system_message=You are helpful.'])   # a sentence would lose its spaces
    # a prefix its last space (InternVL's 'Frame-{i}: '), a quoted value or item its outer ones
    for word in ('frame_prefix=Frame-{i}: ', 'frame_prefix=" Frame-{i}:"', "a=['x ', y]", 'prompt= x', 'a=  '):
        (problem,) = cfg_words.spaced_values([word])
        assert problem.startswith(f'{word.partition("=")[0]}: the value {word.partition("=")[2]!r} holds a space'), \
            problem
    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=cfg_words.CfgOptions)
    assert parser.parse_args(['--cfg-options', 'a=[x, y]']).cfg_options == {'a': ['x', 'y']}
    with pytest.raises(SystemExit):
        parser.parse_args(['--cfg-options', 'a=[my data/a.jsonl]'])


def test_a_tilde_the_shell_left_unexpanded_is_refused_naming_the_expansion(monkeypatch):
    """The shell expands ~ only at a word's start: model.llm=~/models/qwen and --work-dir=~/runs reached the
    tools as they are (a work folder made as ./~). Refused naming the path meant; a ~ inside a value is left."""
    monkeypatch.setenv('HOME', '/home/u')
    (llm,) = cfg_words.tilde_values(['model.llm=~/models/qwen'])
    assert llm == ("model.llm: '~/models/qwen' starts with ~, which the shell expands only at the start of a word, "
                   "not after model.llm= (it would be used as it is): give /home/u/models/qwen")
    (data,) = cfg_words.tilde_values(['train_dataloader.dataset.data_files=[a.jsonl,~/b.jsonl]'])
    assert 'give /home/u/b.jsonl' in data
    assert cfg_words.tilde_values(['model.llm=runs/~x', 'system=hi~there', 'data_files=[a.jsonl]']) == []
    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=cfg_words.CfgOptions)
    with pytest.raises(SystemExit):
        parser.parse_args(['--cfg-options', 'model.llm=~/models/qwen'])
    from xtuner_plugins.cli.train_args import options_refusal
    args = argparse.Namespace(cfg_options=None, config='configs/finetune_lora.py')
    assert options_refusal(args, ['configs/finetune_lora.py', '--work-dir=~/runs']) == (
        "train: refused: --work-dir: '~/runs' starts with ~, which the shell expands only at the start of a word, "
        "not after --work-dir= (it would be used as it is): give /home/u/runs")
    assert options_refusal(args, ['configs/finetune_lora.py', '--work-dir', '/home/u/runs']) is None


def test_a_call_mmengine_would_recurse_on_is_refused():
    """``model.vision_encoder=dict(type='internvit',path=...,mean=[...])``: MMEngine's parser of the value recursed
    without end, a RecursionError of about 1000 traceback lines (a helper's sweep). Refused in one line, before
    XTuner's parser; a tuple, a dict literal and a name with parentheses in a path are left as they are."""
    from xtuner_plugins.cli.train_args import unpaired_refusal
    (problem,) = cfg_words.call_values(["model.vision_encoder=dict(type='internvit',path='m',mean=[0.5,0.5,0.5])"])
    assert problem.startswith("model.vision_encoder: the value \"dict(type='internvit',path='m',mean=[0.5,0.5,0.5])\" "
                              'holds a name followed by parentheses with a comma (a call such as dict(a=1,b=2), a '
                              'path or a sentence alike), which --cfg-options cannot give')
    assert cfg_words.call_values(['a=(1,2)', "b={'x':1}", 'c=runs/model(v2)/llm', 'd=dict(a=1)', 'e=[a,b]',
                                  'f=[(1,2),(3,4)]', 'g=x,(1,2)']) == []
    assert len(cfg_words.call_values(['p=runs/v(1,2)/a.jsonl', 'system=You are (very, very) helpful'])) == 2
    argv = ['cfg.py', '--cfg-options', 'max_iters=2', 'model.x=f(a,b)']
    assert unpaired_refusal(argv).startswith('train: FAILED before loading anything: --cfg-options: model.x: the '
                                             "value 'f(a,b)' holds a name followed by parentheses")
    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=cfg_words.CfgOptions)
    with pytest.raises(SystemExit):
        parser.parse_args(['--cfg-options', 'model.x=f(a,b)'])


def test_a_key_given_twice_with_different_values_is_refused():
    """MMEngine's DictAction kept the last of ``optim_wrapper.optimizer.lr=1e-4 ... optim_wrapper.optimizer.lr=1e-5``
    (a command line added to) without a word: the run trained with one of the two values typed. Refused in one line,
    in one --cfg-options or across two, by training before XTuner's parser and by the tools' action; the same value
    twice (1e-4 and 0.0001 too) is let through."""
    from xtuner_plugins.cli.train_args import unpaired_refusal
    (problem,) = cfg_words.twice_given(['optim_wrapper.optimizer.lr=1e-4', 'max_iters=2',
                                        'optim_wrapper.optimizer.lr=1e-5'])
    assert problem == ('optim_wrapper.optimizer.lr is given twice, optim_wrapper.optimizer.lr=1e-4 and '
                       'optim_wrapper.optimizer.lr=1e-5 (only the last would be used): give it once')
    assert cfg_words.twice_given(['a=1e-4', 'a=0.0001', 'b=[x,y]', 'b=[x, y]', 'c=1']) == []
    argv = ['cfg.py', '--cfg-options', 'model.freeze_llm=True', '--work-dir', 'w', '--cfg-options',
            'model.freeze_llm=False']
    assert unpaired_refusal(argv) == ('train: FAILED before loading anything: --cfg-options: model.freeze_llm is '
                                      'given twice, model.freeze_llm=True and model.freeze_llm=False (only the last '
                                      'would be used): give it once')
    assert unpaired_refusal(['cfg.py', '--cfg-options', 'a=1', 'a=1']) is None
    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=cfg_words.CfgOptions)
    for words in (['--cfg-options', 'a=1', 'a=2'], ['--cfg-options', 'a=1', '--cfg-options', 'b=3', 'a=2']):
        with pytest.raises(SystemExit):
            parser.parse_args(words)
    assert parser.parse_args(['--cfg-options', 'a=1', '--cfg-options', 'a=1.0', 'b=2']).cfg_options == {'a': 1.0,
                                                                                                        'b': 2}
