"""One request on one host, a file per phase (see docs/architecture.md).

:mod:`.settings` (the one settings type), :mod:`.forward` (one forward, model facts), :mod:`.prefill` (Phase 1),
:mod:`.decode` and :mod:`.static_decoder` (Phase 2), :mod:`.context` (the encoded context and its key),
:mod:`.encode` (this host, or H hosts played in turn), :mod:`.request` (answer, generate), :mod:`.simulate` (the
benchmark's played layouts). Nothing here imports the module, the callbacks, the preflight, ``plan`` or ``bench``.
Empty on purpose: importing :mod:`.settings` must not import torch.
"""
