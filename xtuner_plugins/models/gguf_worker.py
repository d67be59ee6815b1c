"""llama.cpp's side of a GGUF folder, run by ``.venv-gguf``'s Python (``make gguf``), never imported by the package:
it needs only llama-cpp-python and the standard library (the main venv's torch and transformers stay out of it).

Three commands::

    python gguf_worker.py quantize IN.gguf OUT.gguf q8_0|q4_k_m   # llama.cpp's quantiser (llama_model_quantize)
    python gguf_worker.py check MODEL.gguf MMPROJ.gguf            # llama.cpp loads both (exit 1 and its log if not)
    python gguf_worker.py serve MODEL.gguf MMPROJ.gguf [f32]      # answers requests, one JSON object a line

``serve`` reads one request a line on stdin, ``{"messages": [...], "max_tokens": N}`` (OpenAI-style messages, images
as ``data:`` URLs), answers through ``MTMDChatHandler`` (the GGUF's own chat template, mtmd's tiling), greedily, and
writes ``{"piece": TEXT}`` lines as the answer streams, then ``{"answer": TEXT, "tokens": [ID, ...]}`` (or
``{"error": TEXT}``, or ``{"too_long": [PROMPT_TOKENS, N_CTX]}``). It writes
``{"ready": {...}}`` once the model is loaded. Generation stops at the end token, at ``max_tokens``, or after
``BLANK_RUN`` whitespace-only pieces in a row (an untrained model's endless newlines, as ``prompt.py``'s
``blank_run_stop`` does for the other formats).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import sys

BLANK_RUN = 32
QUANT_TYPES = {'q8_0': 'LLAMA_FTYPE_MOSTLY_Q8_0', 'q4_k_m': 'LLAMA_FTYPE_MOSTLY_Q4_K_M'}


def threads() -> int:
    """One thread per core, or ``OMP_NUM_THREADS`` where set (the test workers set one each)."""
    try:
        return max(1, int(os.environ.get('OMP_NUM_THREADS', '')))
    except ValueError:
        return os.cpu_count() or 1


def quantize(src: str, dst: str, kind: str) -> int:
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[kind])
    params.nthread = threads()
    status = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if status != 0:
        print(f'llama_model_quantize returned {status}', file=sys.stderr)
    return 1 if status else 0


def check(model: str, mmproj: str) -> int:
    """Load the pair as ``serve`` does (memory-mapped: the weights' shapes, not their bytes); llama.cpp's log says
    what it refused."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import MTMDChatHandler
    try:
        llm = Llama(model_path=model, n_ctx=64, n_threads=1, n_gpu_layers=0, verbose=True)
        MTMDChatHandler(clip_model_path=mmproj, verbose=True, use_gpu=False)._init_mtmd_context(llm)
    except Exception as exc:  # noqa: BLE001 -- llama.cpp's own words are in its log above
        print(f'{type(exc).__name__}: {exc}', file=sys.stderr)
        return 1
    return 0


def send(obj) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + '\n')
    sys.stdout.flush()


class TooLong(ValueError):
    """The prompt and the tokens to generate do not fit the context."""


class AnswerText:
    """An answer's text from its tokens' bytes, as transformers decodes them: a SentencePiece vocabulary's byte
    tokens (``<0xE4>``; llama.cpp's ``BYTE`` attribute) in a row are one run, its text where the run is UTF-8 and
    one ``'\ufffd'`` per token where it is not (tokenizers' ``ByteFallback``: ``'\x1b\x80$'`` is three); any other
    token's bytes are decoded as they come, an invalid UTF-8 sequence replaced (a byte-level BPE vocabulary's)."""

    def __init__(self):
        import codecs
        self.decoder, self.run, self.count = codecs.getincrementaldecoder('utf-8')(errors='replace'), bytearray(), 0

    def add(self, data: bytes, byte_token: bool) -> str:
        """The text that ``data`` (one token's bytes) completes; a byte token's waits for the end of its run, which a
        token of no text (a special token, left out as transformers leaves it out) does not end."""
        if not data:
            return ''
        if byte_token:
            self.run += data
            self.count += 1
            return ''
        return self._flush() + self.decoder.decode(data)

    def end(self) -> str:
        return self._flush() + self.decoder.decode(b'', final=True)

    def _flush(self) -> str:
        run, count, self.run, self.count = bytes(self.run), self.count, bytearray(), 0
        try:
            return run.decode('utf-8')
        except UnicodeDecodeError:
            return '\ufffd' * count


def answer(llm, request: dict) -> str:
    """One greedy answer, streamed as ``piece`` lines. ``MTMDChatHandler`` renders the chat template and evaluates the
    prompt (text and image chunks); the decoding is this function's (it stands in for the ``create_completion`` the
    handler calls): the argmax token until an end-of-generation token, ``max_tokens`` or a blank run, decoded as
    transformers decodes (the bytes of the tokens, special tokens left out, :class:`AnswerText`)."""
    import llama_cpp
    max_tokens, tokens, vocab = int(request['max_tokens']), [], llm._model.vocab

    def complete(prompt, **_):
        if len(prompt) + max_tokens > llm.n_ctx():
            raise TooLong(f'exceeds n_ctx: {len(prompt)} > {llm.n_ctx()}')
        text, pieces, blank = AnswerText(), [], 0
        for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                break
            tokens.append(token)
            data = llm.detokenize([token])
            piece = text.add(data, bool(llama_cpp.llama_vocab_get_attr(vocab, token) & llama_cpp.LLAMA_TOKEN_ATTR_BYTE))
            if piece:
                pieces.append(piece)
                send({'piece': piece})
            blank = blank + 1 if not data.decode('utf-8', errors='replace').strip() else 0
            if len(tokens) >= max_tokens or blank >= BLANK_RUN:
                break
        last = text.end()
        if last:
            pieces.append(last)
            send({'piece': last})
        return {'id': 'gguf', 'object': 'text_completion', 'created': 0, 'model': '',
                'choices': [{'text': ''.join(pieces), 'index': 0, 'logprobs': None, 'finish_reason': 'stop'}],
                'usage': {'prompt_tokens': len(prompt), 'completion_tokens': len(tokens),
                          'total_tokens': len(prompt) + len(tokens)}}

    llm.create_completion = complete
    try:
        reply = llm.create_chat_completion(messages=request['messages'], max_tokens=max_tokens)
    finally:
        del llm.create_completion
    return reply['choices'][0]['message']['content'], tokens


def control_tokens(llm) -> list:
    """The text of each control token of the model's vocabulary (``<|endoftext|>``, ``<|im_start|>``, ...): the
    chat handler tokenizes the rendered prompt with special tokens parsed, so a question holding one of these texts
    would be read as that token."""
    import llama_cpp
    vocab = llm._model.vocab
    control = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
    return [llama_cpp.llama_vocab_get_text(vocab, i).decode('utf-8', errors='replace')
            for i in range(llama_cpp.llama_vocab_n_tokens(vocab)) if llama_cpp.llama_vocab_get_attr(vocab, i) & control]


def serve(model: str, mmproj: str, exact: bool = False) -> int:
    """``exact``: an F32 export, whose KV cache is kept in F32 too (llama.cpp's default: F16)."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import MTMDChatHandler
    handler = MTMDChatHandler(clip_model_path=mmproj, verbose=False, use_gpu=False)
    llm = Llama(model_path=model, chat_handler=handler, n_ctx=0, n_threads=threads(), n_threads_batch=threads(),
                n_gpu_layers=0, verbose=False, seed=0, **(dict(type_k=0, type_v=0) if exact else {}))
    send({'ready': {'n_ctx': llm.n_ctx(), 'template': bool(llm.metadata.get('tokenizer.chat_template')),
                    'kv_cache': 'f32' if exact else 'f16', 'control': control_tokens(llm)}})
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            text, tokens = answer(llm, json.loads(line))
            send({'answer': text, 'tokens': tokens})
        except Exception as exc:  # one request's failure (a prompt over the context, ...) ends that request only
            over = re.search(r'exceeds n_ctx: (\d+) > (\d+)', str(exc))
            send({'too_long': [int(over.group(1)), int(over.group(2))]} if over else
                 {'error': f'{type(exc).__name__}: {exc}'})
    return 0


def main(argv) -> int:
    if len(argv) == 4 and argv[0] == 'quantize' and argv[3] in QUANT_TYPES:
        return quantize(argv[1], argv[2], argv[3])
    if len(argv) == 3 and argv[0] == 'check':
        return check(argv[1], argv[2])
    if len(argv) in (3, 4) and argv[0] == 'serve' and argv[3:] in ([], ['f32']):
        return serve(argv[1], argv[2], exact=argv[3:] == ['f32'])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
