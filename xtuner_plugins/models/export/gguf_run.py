"""A llama.cpp tool (the converter, the quantiser) run as a process for the GGUF export (``gguf.py``), its failure
in words: its last lines, or one line where the disk it wrote to was full (its traceback and progress bar were the
export's last lines; llama.cpp's quantiser says only 'iostream error' there)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import List, Optional

#: what a converter's or quantiser's output says when the disk it writes to is full (numpy's ``tofile`` past a full
#: disk: 'OSError: 33536 requested and 20480 written', under a traceback and a progress bar)
DISK_FULL = re.compile(r'No space left on device|\[Errno 28\]|\b\d+ requested and \d+ written')


#: free bytes under which the disk a failed command wrote to is taken to be why it failed (llama.cpp's quantiser
#: says only 'failed to quantize: basic_ios::clear: iostream error' there)
FULL_BELOW = 1 << 20


def _free(folder: str) -> Optional[int]:
    try:
        return shutil.disk_usage(folder).free
    except OSError:   # (removed meanwhile)
        return None


def run(command: List[str], what: str, env: Optional[dict] = None, writes_to: Optional[str] = None) -> str:
    """``command``'s stderr; ``ValueError`` with its last lines when it fails, or in one line when its disk was
    full (its output says so, or ``writes_to``'s disk has under :data:`FULL_BELOW` free; what it wrote is in the
    staging folder its caller removes)."""
    # no stdin: transformers asks there, its question in the output captured here, whether to run a folder's
    # tokenizer code (an auto_map with a class it has not): an invisible prompt that waited 15 s, and a 'y' ran it
    done = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors='replace', env=env)
    if done.returncode:
        lines = done.stdout.strip().splitlines()
        full = next((line.strip() for line in reversed(lines) if DISK_FULL.search(line)), None)
        free = _free(writes_to) if full is None and writes_to else None
        if free is not None and free < FULL_BELOW:
            said = next((line for line in reversed(lines) if re.search('fail|error', line, re.I)), 'no word')
            full = f'{free:,} bytes free under {os.path.dirname(os.path.abspath(writes_to))}; it said: {said.strip()}'
        if full:
            raise ValueError(f'{what} failed: the disk it writes to is full ({full}); free space there, or give an '
                             'OUT_DIR on another disk')
        tail = '\n'.join(lines[-6:])
        raise ValueError(f'{what} failed (exit {done.returncode}):\n{tail}')
    return done.stdout
