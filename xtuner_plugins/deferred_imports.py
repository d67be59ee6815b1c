"""DeepSpeed and bitsandbytes left out of a training process until something uses them.

MMEngine imports both whenever it is imported, to fill registries, though a run may use neither: bitsandbytes
(which pulls in ``torch._dynamo``) in ``mmengine/optim/optimizer/builder.py`` to register its optimizers under
their names, DeepSpeed in ``mmengine/_strategy/deepspeed.py`` (``try: import deepspeed``, used by
``DeepSpeedStrategy``); and ``xtuner_plugins.engine.runtime`` imports DeepSpeed on a CPU to turn off its
shared-memory op. Measured on a 2-rank run (benchmarks/RESULTS.md, "Data at scale"): ~160 MiB private a rank.

:func:`install` (``tools/train.py`` calls it before anything imports MMEngine) makes exactly those imports, made
from exactly those modules (:data:`DEFERRED_AT`), fail as if the package were not installed, which each of them
handles, and then undoes the difference the moment the run needs the package (:func:`load`):

* an optimizer name the registry (or a scope's child of it) does not know (``type='PagedAdamW8bit'``,
  ``'bnb_Adam'``): bitsandbytes is imported, its optimizers registered as MMEngine would have, and the name looked
  up again (DeepSpeed's optimizers are registered by ``DeepSpeedStrategy`` itself);
* a ``DeepSpeedStrategy`` being built: DeepSpeed is imported and set where MMEngine keeps it (its optimizers are
  registered by the strategy itself), and the CPU patch of ``engine/runtime.py`` applied;
* any other import of the packages (``transformers`` loading a 4-bit model, XTuner's ZeRO code, a config's
  ``import bitsandbytes``) is an ordinary import.

A run given ``--deepspeed`` imports DeepSpeed as before. ``XTUNER_PLUGINS_EAGER_IMPORTS=1`` turns all of this off.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import os
import sys
from typing import Dict, Optional, Sequence, Set

EAGER_ENV = 'XTUNER_PLUGINS_EAGER_IMPORTS'
#: module whose own ``import PACKAGE`` is deferred -> that package
DEFERRED_AT: Dict[str, str] = {
    'mmengine.optim.optimizer.builder': 'bitsandbytes',  # register_bitsandbytes_optimizers()
    'mmengine._strategy.deepspeed': 'deepspeed',  # try: import deepspeed (DeepSpeedStrategy's)
    'xtuner_plugins.engine.runtime': 'deepspeed',  # _patch_deepspeed_shm_comm (CPU only)
    'peft.helpers': 'bitsandbytes',  # try: import bitsandbytes as bnb (KappaTuneSelector's 4-bit weights)
}
_IMPORT_MACHINERY = ('importlib._bootstrap', 'importlib._bootstrap_external', 'importlib', __name__)


class _Refused(importlib.abc.Loader):
    def create_module(self, spec):
        raise ModuleNotFoundError(f'No module named {spec.name!r} (deferred by {__name__} until it is used)',
                                  name=spec.name)

    def exec_module(self, module):  # never reached
        pass


class _ThenFix(importlib.abc.Loader):
    """A site module's own loader, then :func:`_fix` on the module once it has run."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        _fix(module)

    def __getattr__(self, name):  # get_source, get_filename, ...: the real loader's
        return getattr(self.loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, deferrable: Set[str]):
        self.deferrable = set(deferrable)  # packages this process may defer
        self.deferred: Set[str] = set()  # packages a site was refused
        self.loaded: Set[str] = set()  # deferred packages imported since

    def find_spec(self, name, path=None, target=None):
        if name in self.deferrable and name not in self.loaded and DEFERRED_AT.get(_importer()) == name:
            self.deferred.add(name)
            return importlib.machinery.ModuleSpec(name, _Refused())
        if name in DEFERRED_AT or name in self.deferrable:  # its real spec, fixed up once the module ran
            return self._real_spec(name, path, target)
        return None

    def _real_spec(self, name, path, target):
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, 'find_spec'):
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    if spec.loader is not None and hasattr(spec.loader, 'exec_module'):
                        spec.loader = _ThenFix(spec.loader)
                    return spec
        return None


_finder: Optional[_Finder] = None


def _importer() -> str:
    """The module whose code is importing (the first frame outside Python's import machinery)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_globals.get('__name__') in _IMPORT_MACHINERY:
        frame = frame.f_back
    return frame.f_globals.get('__name__', '') if frame is not None else ''


def used_packages(argv: Sequence[str]) -> Set[str]:
    """The deferrable packages a training command line certainly uses: DeepSpeed with ``--deepspeed``."""
    return {'deepspeed'} if any(a == '--deepspeed' or a.startswith('--deepspeed=') for a in argv) else set()


def install(argv: Sequence[str] = ()) -> bool:
    """Defer the packages of :data:`DEFERRED_AT` that ``argv`` (a training command line) does not use; True
    when installed (not with ``XTUNER_PLUGINS_EAGER_IMPORTS=1``, nor when a site module was already imported)."""
    global _finder
    if os.environ.get(EAGER_ENV, '') == '1' or _finder is not None:
        return _finder is not None
    if any(site in sys.modules for site in DEFERRED_AT):
        return False  # too late to defer: they are imported already
    _finder = _Finder(set(DEFERRED_AT.values()) - used_packages(argv))
    sys.meta_path.insert(0, _finder)
    return True


def deferred() -> Set[str]:
    """The packages refused to a site module and not loaded since."""
    return set(_finder.deferred - _finder.loaded) if _finder else set()


def load(name: str) -> None:
    """Import the deferred package ``name``; the import puts it back where it was refused (:func:`_fix`)."""
    if name in deferred():
        importlib.import_module(name)


def _restore(name: str, package) -> None:
    """``package`` (``name``, just imported) where the site modules that were refused it would have it."""
    if _finder is None or name not in _finder.deferred or name in _finder.loaded:
        return
    _finder.loaded.add(name)
    where = {'deepspeed': ('mmengine._strategy.deepspeed', 'deepspeed'), 'bitsandbytes': ('peft.helpers', 'bnb')}
    site = sys.modules.get(where[name][0])   # the module-level name a refused `import` left None
    if site is not None and getattr(site, where[name][1], None) is None:
        setattr(site, where[name][1], package)
    if name == 'deepspeed':
        runtime = sys.modules.get('xtuner_plugins.engine.runtime')
        if runtime is not None:
            runtime.apply_cpu_patches()  # the DeepSpeed one, skipped while DeepSpeed was deferred
    if name == 'bitsandbytes':
        builder = sys.modules.get('mmengine.optim.optimizer.builder')
        if builder is not None:
            builder.BITSANDBYTES_OPTIMIZERS.extend(builder.register_bitsandbytes_optimizers())


def _fix(module) -> None:
    """After a deferred package was imported: :func:`_restore`. After a site module was: hooks where it would use
    a deferred package, which load it first."""
    name = module.__name__
    if name in DEFERRED_AT.values():
        _restore(name, module)
    elif name == 'mmengine.optim.optimizer.builder':
        # on the class: a config's default_scope builds through its own child registry of OPTIMIZERS, which
        # reads its parents' tables directly, past any hook on the root registry's instance
        from mmengine.registry import OPTIMIZERS, Registry
        if not getattr(Registry.get, '_deferred_hook', False):
            lookup = Registry.get

            def get(self, key):
                found = lookup(self, key)
                if found is None and 'bitsandbytes' in deferred() and _under(self, OPTIMIZERS):
                    load('bitsandbytes')   # one of its optimizers, perhaps
                    found = lookup(self, key)
                return found
            get._deferred_hook = True
            Registry.get = get
    elif name == 'mmengine._strategy.deepspeed':
        init = module.DeepSpeedStrategy.__init__

        def __init__(self, *args, **kwargs):
            load('deepspeed')
            init(self, *args, **kwargs)
        module.DeepSpeedStrategy.__init__ = __init__


def _under(registry, root) -> bool:
    """Whether ``registry`` is ``root`` or one of its descendants (a scope's child registry)."""
    while registry is not None and registry is not root:
        registry = registry.parent
    return registry is root
