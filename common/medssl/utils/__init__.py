"""medssl.utils: the bottom layer, helpers every other medssl package may use; it imports no other medssl package.

* :mod:`medssl.utils.io` — atomic file writes, file hashes, JSON-safe values;
* :mod:`medssl.utils.dist` — process-group set-up, rank / world size, collectives, per-rank module state;
* :mod:`medssl.utils.tensors` — MetaTensor → plain tensor, a module without its DDP / DataParallel wrapper;
* :mod:`medssl.utils.imports` — an object from its dotted path.

Import the sub-modules themselves (``from medssl.utils.io import atomic_write``): this package imports none of them,
so a light tool pays only for what it uses.
"""
