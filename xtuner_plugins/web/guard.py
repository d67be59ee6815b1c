"""What the web demo checks of a request before anything of it is kept, and what it lets go of after.

Any HTTP client reaches the page's handlers (gradio's ``api_visibility='private'`` only hides them from its client
libraries), so a request is checked as sent, not as the page's widgets would make it:

* :func:`settings_problem`: a slider's value that is no finite number. gradio's range check lets NaN through
  (``NaN < min`` is false); ``int(nan)`` then ended the request in a ``ValueError`` traceback in the server's log,
  ``top_p=nan`` was taken as it was.
* :func:`question_problem`: a question over :data:`MAX_QUESTION_CHARS`, or text the model would refuse anyway (a
  lone surrogate, a template's markers). The page shows each question in the chat as soon as it is sent, and gives
  a refused one back to the text box: gradio keeps both in the session's state, so a 100 MB question held 300 MB
  a request for as long as gradio kept the session, and a lone surrogate (valid JSON: ``"\\ud800"``) broke the
  answer's event stream (``orjson``: ``str is not valid UTF-8``) with a 77-line traceback in the log. Both are
  refused before the first thing is shown.
* :func:`forget_finished_events`: gradio 6.17's queue keeps every event it ran in ``event_ids_to_events``, with its
  request and inputs (it drops one only when it is cancelled while still waiting): 215 kB a plain ``/chat`` call,
  200 MB a call with a 100 MB question, for as long as the server runs. :func:`start_forgetting` drops those no
  session waits on, every minute.
"""

from __future__ import annotations

import math
import threading
from typing import Mapping, Optional

from xtuner_plugins.data.errors import SampleError

#: the longest question the page and ``/chat`` take, in characters (past the context of any LLM served here)
MAX_QUESTION_CHARS = 256_000
#: browser sessions whose state (a conversation, its images' bytes) gradio keeps at once; the oldest goes first
SESSION_CAPACITY = 1000
#: a session's conversation is let go this long after its last turn (gradio's cache keeps uploads a day too)
CONVERSATION_TTL_S = 86400
#: how often finished events are let go
FORGET_EVERY_S = 60.0


def settings_problem(settings: Mapping[str, object]) -> Optional[str]:
    """The first of ``{label: value}`` that is not a finite number, named; or None."""
    for label, value in settings.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f'{label} must be a finite number, got {value!r:.40}'
    return None


def question_problem(question: str) -> Optional[str]:
    """Why ``question`` is refused before anything of it is kept (see the module docstring), or None."""
    if len(question) > MAX_QUESTION_CHARS:
        return (f'the question is {len(question):,} characters; the page takes up to {MAX_QUESTION_CHARS:,} (more '
                'than any model here reads)')
    from xtuner_plugins.models.prompt import check_question
    try:
        check_question(question)   # the model's check without its tokenizer: the model checks again, with it
    except SampleError as err:
        return str(err)
    return None


def forget_finished_events(queue) -> int:
    """Drop from gradio's ``queue.event_ids_to_events`` each event that no session waits on and that is neither
    waiting nor running; returns how many. Read from another thread than the server's: a set changed while it is
    read is left for the next time."""
    try:
        keep = set()
        for ids in list(queue.pending_event_ids_session.values()):
            keep.update(ids)
        for event_queue in list(queue.event_queue_per_concurrency_id.values()):
            keep.update(event._id for event in list(event_queue.queue))
        for job in list(queue.active_jobs):
            keep.update(event._id for event in (job or ()))
    except RuntimeError:   # changed size during iteration
        return 0
    done = [event_id for event_id in list(queue.event_ids_to_events) if event_id not in keep]
    for event_id in done:
        queue.event_ids_to_events.pop(event_id, None)
    return len(done)


def start_forgetting(app, every: float = FORGET_EVERY_S) -> threading.Event:
    """Run :func:`forget_finished_events` on ``app``'s queue every ``every`` seconds in a daemon thread, until the
    queue is closed (``app.close()``) or the returned event is set."""
    stop = threading.Event()

    def run():
        while not stop.wait(every):
            queue = getattr(app, '_queue', None)
            if queue is not None and getattr(queue, 'stopped', False):
                return
            if queue is not None:
                forget_finished_events(queue)

    threading.Thread(target=run, name='web-demo-forget-events', daemon=True).start()
    return stop
