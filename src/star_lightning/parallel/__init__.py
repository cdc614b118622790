"""Everything distributed: the layout of the ranks, the context-parallel group the math talks to, the strategies.

``torch.distributed`` is imported here and nowhere else. Model math depends only on the
:class:`~star_lightning.parallel.group.ContextGroup` protocol (:mod:`star_lightning.parallel.group`), which this
package implements over ``torch.distributed`` (:mod:`star_lightning.parallel.torch_group`) and for one host.
This file imports nothing, so the math can import the protocol without Lightning or ``torch.distributed``.
"""
