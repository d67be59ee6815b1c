"""Evaluation questions (eval/data.py, mmbench.py, questions.py) from a training-format jsonl and from MMBench's
TSV; bad input names file and row."""

import base64
import io
import json

import pytest
from PIL import Image

from tests.helpers import write_image
from xtuner_plugins.data.image_io import load_image
from xtuner_plugins.eval.data import context_note, read_open_questions, read_questions
from xtuner_plugins.eval.mmbench import MC_INSTRUCTION, read_mmbench_tsv
from xtuner_plugins.eval.questions import QuestionsError


def b64_png(colour):
    buf = io.BytesIO()
    Image.new('RGB', (8, 6), colour).save(buf, format='PNG')
    return base64.b64encode(buf.getvalue()).decode()


def write_tsv(path, rows, columns=('index', 'question', 'hint', 'A', 'B', 'C', 'D', 'answer', 'category', 'image')):
    lines = ['\t'.join(columns)] + ['\t'.join(str(r.get(c, '')) for c in columns) for r in rows]
    path.write_text('\n'.join(lines) + '\n')
    return str(path)


ROWS = [dict(index=0, question='What colour?', hint='A square.', A='red', B='green', C='blue', D='', answer='B',
             category='colour', image=b64_png('green')),
        dict(index=1, question='Which shape?', hint='nan', A='square', B='circle', C='', D='', answer='A',
             category='shape', image='0')]  # MMBench repeats an image by naming the row that holds it


def test_mmbench_rows_prompts_and_shared_images(tmp_path):
    q0, q1 = read_mmbench_tsv(write_tsv(tmp_path / 'mmb.tsv', ROWS))
    assert q0.prompt == f'A square.\nWhat colour?\nOptions:\nA. red\nB. green\nC. blue\n{MC_INSTRUCTION}'
    assert q0.options == {'A': 'red', 'B': 'green', 'C': 'blue'} and q0.references == ['B']
    assert q1.prompt.startswith('Which shape?\nOptions:\nA. square\nB. circle\n')  # a 'nan' hint is none
    assert (q0.stem, q1.stem) == ('A square.\nWhat colour?', 'Which shape?')  # what --mc likelihood asks
    # the image kept as its file's bytes (decoded when asked), the one row 0 holds
    assert isinstance(q1.images[0], bytes) and q1.images[0] == q0.images[0]
    assert load_image(q1.images[0]).getpixel((0, 0)) == (0, 128, 0) and q1.category == 'shape'


def test_a_blank_option_cell_is_no_option(tmp_path):
    """A cell of one space became option D with empty text, which every answer contains: the right answer 'blue'
    scored 0 (two options read by text), and 'purple' or '' was read as D."""
    from xtuner_plugins.eval.scoring import read_option
    (q,) = read_mmbench_tsv(write_tsv(tmp_path / 'mmb.tsv', [dict(ROWS[0], D=' ', answer='C')]))
    assert q.options == {'A': 'red', 'B': 'green', 'C': 'blue'} and 'D.' not in q.prompt
    assert read_option('blue', q.options) == ('C', 'text')
    assert read_option('purple', dict(q.options, D=' ')) == (None, 'unmatched')   # an option of no text read so


def test_circular_evaluation_rotates_the_options(tmp_path):
    questions = read_questions(write_tsv(tmp_path / 'mmb.tsv', ROWS[:1]), circular=True)
    assert [q.options for q in questions] == [{'A': 'red', 'B': 'green', 'C': 'blue'},
                                             {'A': 'green', 'B': 'blue', 'C': 'red'},
                                             {'A': 'blue', 'B': 'red', 'C': 'green'}]
    assert [q.references[0] for q in questions] == ['B', 'A', 'C'] and {q.group for q in questions} == {'0'}


def test_mmbench_bad_input_names_file_and_row(tmp_path):
    with pytest.raises(ValueError, match=r'bad.tsv: missing column\(s\) answer'):
        read_mmbench_tsv(write_tsv(tmp_path / 'bad.tsv', ROWS, columns=('index', 'question', 'A', 'B', 'image')))
    broken = [dict(ROWS[0], image='not base64 at all!!')]
    with pytest.raises(ValueError, match=r'img.tsv:2 \(index 0\): the image does not decode'):
        read_mmbench_tsv(write_tsv(tmp_path / 'img.tsv', broken))


def test_open_questions_take_the_last_gpt_turn_as_reference(tmp_path):
    Image.new('RGB', (4, 4)).save(tmp_path / 'a.png')
    lines = [{'id': 'q1', 'image': 'a.png', 'kind': 'colour', 'conversations': [
        {'from': 'human', 'value': '<image>\nWhat colour?'}, {'from': 'gpt', 'value': 'Black.'}]},
        {'id': 'q2', 'conversations': [{'from': 'human', 'value': 'Hi'}, {'from': 'gpt', 'value': 'Hello'},
                                       {'from': 'human', 'value': 'Name a colour.'}, {'from': 'gpt', 'value': 'Red'}]}]
    path = tmp_path / 'test.jsonl'
    path.write_text('\n'.join(json.dumps(x) for x in lines) + '\n')
    q1, q2 = read_open_questions(str(path))
    assert (q1.prompt, q1.references, q1.category, q1.images) == ('<image>\nWhat colour?', ['Black.'], 'colour',
                                                                  [str(tmp_path / 'a.png')])
    assert (q2.prompt, q2.references, q2.category, q2.images) == ('Name a colour.', ['Red'], 'all', [])
    path.write_text(json.dumps({'conversations': [{'from': 'human', 'value': 'x'}]}) + '\n')
    with pytest.raises(ValueError, match=r'test.jsonl:1: the last turn is \'human\', not "gpt"'):
        read_open_questions(str(path))


def test_repeated_ids_are_refused_naming_both_lines(tmp_path):
    """Six answers to one id were one question scored by the lowest: now the file, both lines and the id."""
    lines = [{'id': f'q{i % 2}' if i < 3 else f'q{i}', 'conversations': conv_()} for i in range(4)]
    path = tmp_path / 'test.jsonl'
    path.write_text('\n'.join(json.dumps(x) for x in lines) + '\n')
    with pytest.raises(QuestionsError, match=r"test.jsonl:3: id 'q0' is also the id of line 1; .*\[duplicate_id\]"):
        read_open_questions(str(path))
    rows = [ROWS[0], dict(ROWS[1], index=0)]
    for circular in (False, True):  # --circular makes the rotations itself: a row's index is its own
        with pytest.raises(QuestionsError, match=r"mmb.tsv:3: index '0' is also the index of line 2"):
            read_mmbench_tsv(write_tsv(tmp_path / 'mmb.tsv', rows), circular=circular)


def conv_(question='<image>\nWhat?', answer='x'):
    return [{'from': 'human', 'value': question}, {'from': 'gpt', 'value': answer}]


def test_images_are_checked_as_training_checks_them_all_problems_at_once(tmp_path):
    """Paths leaving --image-folder are refused with training's function and reason, and every image's
    header is read before any question is asked: all problems in one error, each with FILE:LINE."""
    folder = tmp_path / 'images'
    write_image(folder / 'ok.png')
    write_image(tmp_path / 'outside.png')
    (folder / 'corrupt.png').write_bytes(b'not an image at all')
    images = ['ok.png', '../outside.png', str(tmp_path / 'outside.png'), 'missing.png', 'corrupt.png',
              ['ok.png', 'ok.png']]
    path = tmp_path / 'test.jsonl'
    path.write_text('\n'.join(json.dumps({'id': i, 'image': im, 'conversations': conv_()})
                              for i, im in enumerate(images)) + '\n')
    with pytest.raises(QuestionsError) as err:
        read_open_questions(str(path), str(folder))
    reasons = [p.rsplit('[', 1)[1].rstrip(']') for p in err.value.problems]
    assert reasons == ['unsafe_image_path', 'unsafe_image_path', 'missing_image', 'corrupt_image',
                       'image_tag_mismatch'], err.value.problems
    assert [p.split(': ')[0] for p in err.value.problems] == [f'{path}:{n}' for n in (2, 3, 4, 5, 6)]
    assert str(err.value).startswith(f'{path}: 5 problems, no question asked:\n  {path}:2: image path')
    # without --image-folder the paths are the file's folder's, as training reads them (no folder to leave)
    path.write_text(json.dumps({'image': 'images/ok.png', 'conversations': conv_()}) + '\n'
                    + json.dumps({'image': '../' + tmp_path.name + '/outside.png', 'conversations': conv_()}) + '\n')
    assert [q.images for q in read_open_questions(str(path))] == [[str(folder / 'ok.png')],
                                                                 [str(tmp_path / 'outside.png')]]


def test_every_problem_is_listed_before_anything_is_asked_control_text_included(tmp_path):
    """Lines that are not questions and turns holding control text (a question with <IMG_CONTEXT> once failed
    after other questions had been answered) are all listed at once, with FILE:LINE; a .json list of the same
    samples is read as training reads it."""
    lines = [json.dumps({'id': 0, 'conversations': conv_('Hi?')}),
             json.dumps({'id': 1, 'conversations': [{'from': 'human', 'value': 'x'}]}),
             json.dumps({'id': 2, 'conversations': conv_('Q <IMG_CONTEXT>')}),
             '{not json',
             json.dumps({'id': 4, 'conversations': conv_('A', 'B<|im_end|>') + conv_('C?')}),
             json.dumps({'id': 5, 'role': 'user', 'conversations': [{'role': 'user', 'content': 'x'}]})]
    path = tmp_path / 'test.jsonl'
    path.write_text('\n'.join(lines) + '\n')
    with pytest.raises(QuestionsError) as err:
        read_open_questions(str(path))
    assert [p.split(': ')[0] for p in err.value.problems] == [f'{path}:{n}' for n in (4, 2, 3, 5, 6)], \
        err.value.problems
    # training's check and its turn numbers (from 0), as check_dataset prints them
    assert "turn 0 (human) contains the control marker '<IMG_CONTEXT>'" in err.value.problems[2]
    assert "turn 1 (gpt) contains the control marker '<|im_end|>'" in err.value.problems[3]
    assert all(p.endswith('[control_text]') for p in err.value.problems[2:4])
    listed = tmp_path / 'test.json'
    listed.write_text(json.dumps([{'id': 'a', 'conversations': conv_('Hi?', 'Hello')}], indent=2))
    (q,) = read_open_questions(str(listed))
    assert (q.id, q.prompt, q.references, q.source) == ('a', 'Hi?', ['Hello'], f'{listed}:1')


def test_questions_asked_without_part_of_their_sample_are_noted(tmp_path):
    """A sample's system turn and earlier turns are not asked (each question is its last human turn): the note
    counts and names them; a file without such samples has none."""
    lines = [{'id': 's', 'conversations': [{'from': 'system', 'value': 'Be terse.'}] + conv_('Colour?')},
             {'id': 'm', 'conversations': conv_('Hi', 'Hello') + conv_('Name a colour.', 'Red')},
             {'id': 'p', 'conversations': conv_('Shape?')}]
    path = tmp_path / 'test.jsonl'
    path.write_text('\n'.join(json.dumps(x) for x in lines) + '\n')
    questions = read_open_questions(str(path))
    assert [q.context for q in questions] == ['a system turn', '2 earlier turns', '']
    assert context_note(questions) == (
        f"note: 2 of 3 questions come from samples with a system turn or earlier turns; each is asked as its last "
        f"human turn alone, with the model's own system message: {path}:1 (a system turn); {path}:2 (2 earlier "
        f"turns)")
    assert context_note(questions[2:]) is None


def test_turns_that_are_not_text_are_refused_as_training_refuses_them(tmp_path):
    """A null or list reference, an int question were scored against 'None' / "['x']": now every such line is
    named, FILE:LINE, with training's reason (its conversation check, as check_dataset's)."""
    lines = [conv_('Q?', None), conv_('Q?', ['x']), conv_(7, 'x'), conv_('Q?', '  '), conv_('Q?', 'fine')]
    path = tmp_path / 'test.jsonl'
    path.write_text('\n'.join(json.dumps({'id': i, 'conversations': c}) for i, c in enumerate(lines)) + '\n')
    with pytest.raises(QuestionsError) as err:
        read_open_questions(str(path))
    assert err.value.problems == [
        f'{path}:1: turn 1 (gpt) has a value of type NoneType, expected str [bad_conversation]',
        f'{path}:2: turn 1 (gpt) has a value of type list, expected str [bad_conversation]',
        f'{path}:3: turn 0 (human) has a value of type int, expected str [bad_conversation]',
        f'{path}:4: turn 1 (gpt) has an empty value [empty_conversation]'], err.value.problems


def test_tsv_problems_name_the_file_and_row(tmp_path):
    """A short row was a traceback; a header-only file 'missing' columns it has; a latin-1 file no file name; an
    empty image cell Pillow's '<_io.BytesIO object at 0x...>'. Now each names the file (and row, and numbers)."""
    path = write_tsv(tmp_path / 'short.tsv', ROWS)
    lines = open(path).read().splitlines()
    lines[1] = '\t'.join(lines[1].split('\t')[:1])  # the index alone
    (tmp_path / 'short.tsv').write_text('\n'.join(lines) + '\n')
    with pytest.raises(QuestionsError) as err:
        read_mmbench_tsv(path)
    assert err.value.problems[0] == f'{path}:2: 1 fields where the header has 10 (a tab missing, or one too many) ' \
                                    f'[bad_row]', err.value.problems
    with pytest.raises(ValueError, match=r'head.tsv: holds no rows \(only its header line\)'):
        read_mmbench_tsv(write_tsv(tmp_path / 'head.tsv', []))
    latin = tmp_path / 'latin.tsv'
    text = open(write_tsv(latin, [dict(ROWS[0], question='Café?')]), encoding='utf-8').read()
    latin.write_bytes(text.encode('latin-1'))
    offset = text.encode('latin-1').index(b'\xe9')
    with pytest.raises(ValueError, match=rf'latin.tsv:2: not UTF-8 \(byte 0xe9 at byte offset {offset}\); MMBench '
                                         rf'TSVs are UTF-8'):
        read_mmbench_tsv(str(latin))
    with pytest.raises(QuestionsError) as err:
        read_mmbench_tsv(write_tsv(tmp_path / 'noimg.tsv', [dict(ROWS[0], image=''), dict(ROWS[0], index=1,
                                                                                           image='QUJD' * 30)]))
    assert err.value.problems == [
        f'{tmp_path}/noimg.tsv:2 (index 0): no image: its image column is empty [missing_image]',
        f'{tmp_path}/noimg.tsv:3 (index 1): the image does not decode (cannot decode image its base64: cannot '
        f'identify image file of 90 bytes) [corrupt_image]'], err.value.problems
    assert 'image-folder' not in str(err.value)  # the jsonl's hint: no folder here


def test_a_limit_keeps_a_circular_questions_rotations_whole():
    """--limit 5 over rotations of 4 and 2 asked 1-0..1-3 and 2-0, and scored 2's one rotation as the whole
    question: the limit counts questions, each with all its rotations."""
    from xtuner_plugins.eval.questions import Question, first_questions
    qs = [Question(f'{g}-{r}', 'c', 'Q', [], ['A'], group=str(g)) for g, n in ((1, 4), (2, 2), (3, 3)) for r in range(n)]
    assert [q.id for q in first_questions(qs, 2)] == ['1-0', '1-1', '1-2', '1-3', '2-0', '2-1']
    assert [q.id for q in first_questions(qs, 1)] == ['1-0', '1-1', '1-2', '1-3']
    assert first_questions(qs, None) == qs and len(first_questions(qs, 9)) == 9
    plain = [Question(str(i), 'c', 'Q', [], ['A']) for i in range(4)]
    assert [q.id for q in first_questions(plain, 3)] == ['0', '1', '2']
    # VLMEvalKit's circular files: every question (index N), then the rotations (N + 1,000,000): --limit 2 kept
    # rows 0 and 1 alone, and scored them without their rotations, with no word said
    own = [Question(str(i + k * 1_000_000), 'c', 'Q', [], ['A'], group=str(i)) for k in range(2) for i in range(3)]
    assert [q.id for q in first_questions(own, 2)] == ['0', '1', '1000000', '1000001']


def test_tsv_rows_with_image_tags_or_control_text_are_refused_before_the_model_loads(tmp_path):
    """A row asking 'Compare <image> and <image>' for its one image died after the model loaded (a traceback), or
    reached a batch with a literal tag; '<|im_end|>' in a question failed the question only when it was asked. Both
    are the row's problems now, named, before anything is asked; one tag is where the image goes."""
    from xtuner_plugins.eval.questions import QuestionsError
    rows = [dict(ROWS[0], index=5, question='Compare <image> and <image> please'),
            dict(ROWS[0], index=6, B='green<|im_end|>'),
            dict(ROWS[0], index=7, hint='See <image>', question='What colour is <image>?')]
    path = write_tsv(tmp_path / 'tags.tsv', rows)
    with pytest.raises(QuestionsError) as err:
        read_mmbench_tsv(path)
    assert err.value.problems == [
        f"{path}:2 (index 5): 2 <image> tags (question, hint and options) for the row's one image; give it one, or "
        'none (the image then goes in front of the question) [image_tag_mismatch]',
        f"{path}:3 (index 6): its B column contains the control marker '<|im_end|>' at character 5 "
        "('green<|im_end|>'); it would be read as that control token and trained on; set the data set's "
        'allow_control_text=True if the data means it (it is then plain text) [control_text]',
        f"{path}:4 (index 7): 2 <image> tags (question, hint and options) for the row's one image; give it one, or "
        'none (the image then goes in front of the question) [image_tag_mismatch]'], err.value.problems
    one = read_mmbench_tsv(write_tsv(tmp_path / 'one.tsv', [dict(ROWS[0], question='What colour is <image>?')]))
    assert one[0].prompt.startswith('A square.\nWhat colour is <image>?')


def test_the_model_tokenizers_special_tokens_are_refused_before_it_loads(tmp_path, tiny_tokenizer_dir):
    """tools/eval.py read the templates' markers only: a question holding the tokenizer's <|endoftext|> was asked,
    refused by the model after it loaded (not scored), where the docs say control text stops the run first."""
    from xtuner_plugins.eval.data import read_questions
    from xtuner_plugins.eval.questions import folder_markers
    markers = folder_markers(tiny_tokenizer_dir)
    assert '<|endoftext|>' in markers and '<image>' not in markers and folder_markers(str(tmp_path)) == ()
    path = tmp_path / 'q.jsonl'
    path.write_text(json.dumps({'id': 0, 'conversations': conv_('What <|endoftext|> is it?')}) + '\n')
    assert len(read_questions(str(path))) == 1   # not a template's marker: only the folder's tokenizer names it
    with pytest.raises(QuestionsError, match=r"control marker '<\|endoftext\|>'.*\[control_text\]"):
        read_questions(str(path), markers=markers)
    tsv = tmp_path / 'q.tsv'
    write_tsv(tsv, [dict(ROWS[0], question='What <|endoftext|> is it?')])
    with pytest.raises(ValueError, match=r"control marker '<\|endoftext\|>'"):
        read_questions(str(tsv), markers=markers)


def test_a_file_holding_its_own_rotations_scores_them_as_one_question(tmp_path):
    """VLMEvalKit's circular MMBench TSVs (MMBench_DEV_EN.tsv: 4329 rows, 1164 questions) hold each question's
    rotations as rows of index N + k * 1,000,000: every row was a question of its own (accuracy over 4329), and
    --circular rotated each again. Now a question's rows are one circular group, rotated no further."""
    from xtuner_plugins.eval.mmbench import rotations_note
    from xtuner_plugins.eval.evaluate import Report, Result
    rows = [dict(ROWS[0], index=0, A='red', B='green', C='blue', answer='B'),
            dict(ROWS[0], index=1000000, A='green', B='blue', C='red', answer='A', image='0'),
            dict(ROWS[0], index=2000000, A='blue', B='red', C='green', answer='C', image='0'),
            dict(ROWS[1], index=1)]
    path = write_tsv(tmp_path / 'circular.tsv', rows)
    for circular in (False, True):
        questions = read_mmbench_tsv(path, circular=circular)
        assert [(q.id, q.group, q.references[0]) for q in questions] == [
            ('0', '0', 'B'), ('1000000', '0', 'A'), ('2000000', '0', 'C'), ('1', '1', 'A')]
    assert rotations_note(questions).startswith('the data holds its own rotations of 1 questions (4 rows; ')
    assert rotations_note(read_mmbench_tsv(write_tsv(tmp_path / 'plain.tsv', ROWS), circular=True)) == ''

    def scored(rights):
        return Report([Result(q.id, q.category, q.prompt, q.references[0], 'x', float(right), group=q.group)
                       for q, right in zip(questions, rights)], []).summary()
    assert scored([1, 1, 1, 1]) == dict(n=2, accuracy=1.0) and scored([1, 0, 1, 1]) == dict(n=2, accuracy=0.5)


def test_every_letter_column_is_an_option_and_an_empty_index_is_a_bad_row(tmp_path):
    """Options J and K of a TSV never reached the prompt ('ABCDEFGHI'), an answer K was 'not one of its options';
    a row of empty index was its own rotations' group of one each (each rotation a question)."""
    columns = ('index', 'question', *'ABCDEFGHIJK', 'answer', 'image')
    row = dict(index=0, question='Which?', answer='K', image=ROWS[0]['image'], **{c: f'opt {c}' for c in 'ABCDEFGHIJK'})
    (q,) = read_mmbench_tsv(write_tsv(tmp_path / 'many.tsv', [row], columns))
    assert list(q.options) == list('ABCDEFGHIJK') and q.references == ['K'] and 'K. opt K\n' in q.prompt
    with pytest.raises(QuestionsError, match=r"empty.tsv:2 \(index \): its index is empty: give every row its own "
                                             r"\[bad_row\]"):
        read_mmbench_tsv(write_tsv(tmp_path / 'empty.tsv', [dict(ROWS[0], index='')]), circular=True)


def test_a_tsv_that_is_no_regular_file_is_refused_without_reading_it(tmp_path):
    """--data x.tsv as a FIFO waited for a writer for ever; linked to /dev/zero, it was read until memory ran out."""
    import os
    import signal
    os.mkfifo(tmp_path / 'x.tsv')
    os.symlink('/dev/zero', tmp_path / 'z.tsv')
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail('the FIFO was opened and waited for'))
    signal.alarm(20)
    try:
        with pytest.raises(ValueError, match=r'x.tsv'):
            read_mmbench_tsv(str(tmp_path / 'x.tsv'))
        with pytest.raises(ValueError, match=r'z.tsv'):
            read_mmbench_tsv(str(tmp_path / 'z.tsv'))
    finally:
        signal.alarm(0)


def test_a_row_of_one_option_is_refused(tmp_path):
    """Always right under --mc likelihood (and blind): it raised the accuracy and the blind score alike."""
    with pytest.raises(QuestionsError, match=r"one.tsv:2 \(index 0\): one option \(A\): a question needs two or more "
                                             r"\[bad_row\]"):
        read_mmbench_tsv(write_tsv(tmp_path / 'one.tsv', [dict(ROWS[0], A='red', B='', C='', answer='A')]))


def test_a_data_file_that_holds_no_questions_is_named_for_what_it_is(tmp_path):
    """A PNG given as --data read as 'UTF-16 text', an InternVL meta file as 'not valid JSON (the top level is not a
    list)', a folder as 'not found', and a .txt was read as a .json list."""
    png = tmp_path / 'cat.png'
    Image.new('RGB', (8, 6)).save(png)
    for name in ('q.json', 'q.jsonl', 'q.tsv'):
        (tmp_path / name).write_bytes(png.read_bytes())
        with pytest.raises(ValueError, match=rf'data file .*{name} is a PNG image, not JSON text'):
            read_questions(str(tmp_path / name))
    meta = tmp_path / 'meta.json'
    meta.write_text(json.dumps({'coco': {'root': 'images', 'annotation': 'coco.jsonl', 'repeat_time': 1}}))
    with pytest.raises(ValueError, match=r'meta.json is an InternVL meta file .* give one of its "annotation" files'):
        read_questions(str(meta))
    sample = {'conversations': [{'from': 'human', 'value': 'Q?'}, {'from': 'gpt', 'value': 'A.'}]}
    lines = json.dumps(sample) + '\n' + json.dumps(sample) + '\n'
    for text, says in ((lines, r'holds more than one JSON value \(a second starts at line 2'),
                       (json.dumps(sample), 'holds one sample, not a list')):   # both were 'an InternVL meta file'
        meta.write_text(text)
        with pytest.raises(ValueError, match=rf'meta.json: {says}') as err:
            read_questions(str(meta))
        assert 'InternVL meta file (an object' not in str(err.value)
    (tmp_path / 'questions').mkdir()
    with pytest.raises(ValueError, match=r'questions is a folder, not a data file'):
        read_questions(str(tmp_path / 'questions'))
    (tmp_path / 'q.txt').write_text(json.dumps([{'conversations': []}]))
    with pytest.raises(ValueError, match=r'q.txt: unknown data format'):
        read_questions(str(tmp_path / 'q.txt'))


def test_a_quote_left_open_is_named_as_one(tmp_path):
    """A question starting with a quote that does not close swallowed the rows after it: '3 fields where the header
    has 10 (a tab missing, or one too many)' named neither the quote nor the lines it ran over."""
    path = write_tsv(tmp_path / 'q.tsv', [dict(ROWS[0], question='"Big or small?'), ROWS[1]])
    with pytest.raises(QuestionsError, match=r'q.tsv:2: \d+ fields where the header has 10 \(a field opened with a '
                                             r'quote \("\) runs over 2 lines: .*\[bad_row\]'):
        read_mmbench_tsv(path)


def test_an_answer_whose_text_another_option_has_is_refused(tmp_path):
    """Options B and C both 'green' with B the answer: --mc likelihood tied them and took the first letter, a text
    answer was read as B; whichever is the answer, no model can tell them apart. Two wrong options alike are kept."""
    with pytest.raises(QuestionsError, match=r"same.tsv:2 \(index 0\): options C \(the answer\) and B have the same "
                                             r"text 'green': no answer can tell them apart \[bad_row\]"):
        read_mmbench_tsv(write_tsv(tmp_path / 'same.tsv', [dict(ROWS[0], C='green', answer='C')]))
    rows = read_mmbench_tsv(write_tsv(tmp_path / 'wrong.tsv', [dict(ROWS[0], A='blue', D='blue')]))
    assert rows[0].options == {'A': 'blue', 'B': 'green', 'C': 'blue', 'D': 'blue'}


def test_large_indices_are_rotations_only_of_a_question_in_the_file(tmp_path):
    """Indices 1000000, 2000000 and 3000000 of three questions were read as one question's rotations: one question
    scored (right only when all three were) and --circular rotated nothing. A rotation row whose question or
    options are not its question's is refused."""
    big = [dict(ROWS[0], index=i * 1000000, question=f'Q{i}') for i in (1, 2, 3)]
    questions = read_mmbench_tsv(write_tsv(tmp_path / 'big.tsv', big), circular=True)
    assert len(questions) == 9 and len({q.group for q in questions}) == 3
    odd = [dict(ROWS[0], index=0), dict(ROWS[0], index=1000000, question='Another?', image='0')]
    with pytest.raises(QuestionsError, match=r'big2.tsv:3 \(index 1000000\): read as a rotation of index 0 \(line '
                                             r'2: .*but its question or options differ .*\[bad_row\]'):
        read_mmbench_tsv(write_tsv(tmp_path / 'big2.tsv', odd))
