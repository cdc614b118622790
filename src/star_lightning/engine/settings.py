"""The one settings type of a request (:class:`StarSettings`), validated once, and the choices' literals.

Every command builds it the same way (:func:`settings_from_options`, from ``--model.*`` and the strategy's layout):
``predict`` (the module, the checks before weights load), ``plan`` and the benchmarks, so a setting one of them
refuses every one of them refuses, with the same one line (torchtitan's ``ParallelDims``: one dataclass, checked in
``__post_init__``, passed everywhere). No torch here: the command line checks settings before importing it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, get_args

from star_lightning.errors import ConfigurationError
from star_lightning.options import shown

if TYPE_CHECKING:
    from star_lightning.attention.passing import PassingSettings
    from star_lightning.sampling import SamplingConfig

Attention = Literal["star", "ring", "dense"]
AnchorSource = Literal["broadcast", "host", "block"]
RingLayout = Literal["zigzag", "contiguous"]
QueryPositions = Literal["after_anchor", "phase2"]
Selection = Literal["shared", "per_head"]
DecodeMode = Literal["auto", "eager", "static", "graph", "compile"]
PrefillMode = Literal["auto", "eager", "graph"]
Backend = Literal["auto", "math", "triton", "sdpa", "cudnn", "flash_attn", "flex"]

ATTENTIONS: tuple[str, ...] = get_args(Attention)
ANCHOR_SOURCES: tuple[str, ...] = get_args(AnchorSource)
RING_LAYOUTS: tuple[str, ...] = get_args(RingLayout)
QUERY_POSITIONS: tuple[str, ...] = get_args(QueryPositions)
SELECTIONS: tuple[str, ...] = get_args(Selection)
DECODE_MODES: tuple[str, ...] = get_args(DecodeMode)
PREFILL_MODES: tuple[str, ...] = get_args(PrefillMode)
BACKENDS: tuple[str, ...] = get_args(Backend)


def check_block_sizes(block_size: int, anchor_block_size: int | None) -> None:
    """Reject sizes that cannot form a plan, naming the option and the fix."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ConfigurationError(
            f"block_size must be a positive number of tokens, got {block_size!r}; set --model.block_size N"
        )
    if anchor_block_size is None:
        return
    if isinstance(anchor_block_size, bool) or not isinstance(anchor_block_size, int) or anchor_block_size <= 0:
        raise ConfigurationError(
            f"anchor_block_size must be a positive number of tokens, got {anchor_block_size!r}; set "
            "--model.anchor_block_size to 1..block_size, or leave it unset for anchor = block_size "
            "(to switch the anchor off, use --model.anchor false)"
        )
    if anchor_block_size > block_size:
        raise ConfigurationError(
            f"anchor_block_size ({anchor_block_size}) is larger than block_size ({block_size}): the anchor is a "
            "prefix of the first block; set --model.anchor_block_size to at most the block size"
        )


def _bad(option: str, value: object, accepted: str) -> ConfigurationError:
    from star_lightning.options import bad_value

    return bad_value(option, value, accepted)


@dataclass(frozen=True)
class StarSettings:
    """How one request is encoded and decoded, and the hosts of its group: the ``--model.*`` options a request
    uses, plus the layout the strategy gives it (``hosts``, ``tensor_parallel_size``, ``gpus_per_host``).
    ``dense`` is the model's attention in one process."""

    attention: Attention = "star"
    block_size: int = 4096
    anchor_block_size: int | None = None
    use_anchor: bool = True
    anchor_source: AnchorSource = "broadcast"
    """Where hosts get the anchor's K/V (:mod:`star_lightning.attention.anchor`): ``broadcast`` from host 0,
    ``host`` (each host computes it once), ``block`` (recomputed before every block). With one host, ``broadcast``
    and ``host`` are the same (host 0 takes it from its own first block)."""
    ring_layout: RingLayout = "zigzag"
    anchor_query: bool = False
    """Star: the request's query follows the anchor in every block's prefix (each block is encoded knowing what will
    be asked); its K/V are never stored, and a context encoded this way answers only the same query."""
    anchor_query_positions: QueryPositions = "after_anchor"
    passing_tokens: int = 0
    """Star: tokens each host passes per layer to the hosts after it (:mod:`star_lightning.attention.passing`)."""
    passing_selection: Selection = "shared"
    passing_pool_kernel: int = 7
    lookback_tokens: int = 0
    """Star: each non-first block's forward also recomputes the W context tokens just before the block (those after
    the anchor), attending to the anchor prefix and to them: a wider local context, never stored (issue 29's
    ``wider`` cell; :func:`star_lightning.engine.prefill.block_forward`). 0 = Star as the paper defines it."""
    simulated_hosts: int = 1
    """Star: play the Phase 1 of this many hosts in this one process, host by host (exact), then Phase 2 over all of
    their KV (:mod:`star_lightning.engine.encode`); 0 = as many hosts as the context makes blocks; 1 = this process
    is one host of its group."""
    backend: Backend = "auto"
    decode: DecodeMode = "auto"
    r"""Phase 2 decoding, star, ring and dense alike: ``eager`` (one forward per token over the growing cache),
    ``static`` (static shapes: the preallocated cache with a device-side valid length), ``graph`` (``static`` captured
    once as a CUDA graph and replayed per token: no Python or launch overhead), ``compile`` (``graph`` of the
    ``torch.compile``\ d step: the model's norms, rotary and activations fused); ``auto`` is ``compile`` on one GPU,
    ``eager`` else."""
    prefill: PrefillMode = "auto"
    """Star's Phase 1 blocks on one host: ``eager`` (one forward per block), ``graph`` (each block's forward captured
    as a CUDA graph the second time its shape comes and replayed from then on, the last block padded to a full one:
    :mod:`star_lightning.engine.prefill_graph`); ``auto`` is ``graph`` where it applies (one GPU holding every block, no
    query in the anchor, no passing tokens, a static rope) for blocks of up to 8K tokens, ``eager`` else."""
    max_new_tokens: int = 32
    """The module's budget of generated tokens (a request's own budget may lower it: :class:`GenerationSettings`)."""
    stop_strings: tuple[str, ...] = ()
    hosts: int = 1
    """Hosts of the request's context-parallel group (the strategy's ``context_parallel_size``)."""
    tensor_parallel_size: int = 1
    gpus_per_host: int = 1

    def __post_init__(self) -> None:
        self._check_choices()
        check_block_sizes(self.block_size, self.anchor_block_size)
        self._check_star_options()
        from star_lightning.attention.kernels import validate_backend

        validate_backend(self.backend)
        if self.max_new_tokens <= 0:
            raise ConfigurationError(f"--model.max_new_tokens must be positive, got {self.max_new_tokens}")
        if not all(self.stop_strings):  # an empty one matches at once: every prediction would be empty
            raise _bad("model.stop_strings", list(self.stop_strings), "non-empty strings, e.g. '[\"###\"]'")
        self._check_hosts()

    def _check_choices(self) -> None:
        if self.attention not in ATTENTIONS:
            raise ConfigurationError(f"--model.attention must be star, ring or dense, got {self.attention!r}")
        if self.anchor_source not in ANCHOR_SOURCES:
            raise ConfigurationError(
                f"anchor_source must be broadcast, host or block, got {self.anchor_source!r}; set --model.anchor_source"
            )
        if self.ring_layout not in RING_LAYOUTS:
            raise ConfigurationError(
                f"ring_layout must be zigzag or contiguous, got {self.ring_layout!r}; set --model.ring_layout"
            )
        for option, value, choices in (
            ("anchor_query_positions", self.anchor_query_positions, QUERY_POSITIONS),
            ("passing_selection", self.passing_selection, SELECTIONS),
            ("decode", self.decode, DECODE_MODES),
            ("prefill", self.prefill, PREFILL_MODES),
        ):
            if value not in choices:
                raise _bad(f"model.{option}", value, f"one of {', '.join(choices)}")

    def _check_star_options(self) -> None:
        """Star's query-aware options where they are out of range or would silently do nothing."""
        passing, pool, simulate = self.passing_tokens, self.passing_pool_kernel, self.simulated_hosts
        if isinstance(passing, bool) or not isinstance(passing, int) or passing < 0:
            raise _bad("model.passing_tokens", passing, "0 (off) or a positive number of tokens")
        if passing > self.block_size:
            raise _bad(
                "model.passing_tokens", passing,
                f"at most a block's tokens (--model.block_size {self.block_size}): a host passes only its own block's",
            )  # fmt: skip
        if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1 or pool % 2 == 0:
            raise _bad("model.passing_pool_kernel", pool, "an odd number of positions (1 = no pooling)")
        if isinstance(simulate, bool) or not isinstance(simulate, int) or simulate < 0:
            raise _bad("model.simulate_hosts", simulate, "1 (off), more hosts, or 0 (one host per block)")
        lookback = self.lookback_tokens
        if isinstance(lookback, bool) or not isinstance(lookback, int) or lookback < 0:
            raise _bad("model.lookback_tokens", lookback, "0 (off) or a positive number of tokens")
        used = [name for name, on in (("anchor_query true", self.anchor_query), (f"passing_tokens {passing}",
                passing > 0), (f"lookback_tokens {lookback}", lookback > 0),
                (f"simulate_hosts {simulate}", simulate != 1)) if on]  # fmt: skip
        if self.attention != "star" and used:
            raise ConfigurationError(
                f"--model.{used[0]} applies to star attention only, but --model.attention is {self.attention} (exact "
                f"attention has no anchor or blocks); drop it or use --model.attention star"
            )
        if not self.use_anchor and (self.anchor_query or passing):
            raise ConfigurationError(
                f"--model.{used[0]} needs the anchor (the query joins the anchor's prefix; passing tokens are chosen "
                "by it), but --model.anchor is false; drop it or set --model.anchor true"
            )
        if lookback and passing:
            raise ConfigurationError(
                f"--model.lookback_tokens {lookback} and --model.passing_tokens {passing} both widen what a block "
                "sees, and are not combined: drop one of them"
            )
        self._check_options_that_do_nothing()

    def _check_options_that_do_nothing(self) -> None:
        """Options given a value that nothing reads, refused rather than ignored: the user thinks they matter."""
        passing = self.attention == "star" and self.passing_tokens > 0
        for option, value, default in (
            ("passing_selection", self.passing_selection, "shared"),
            ("passing_pool_kernel", self.passing_pool_kernel, 7),
        ):
            if not passing and value != default:
                raise ConfigurationError(
                    f"--model.{option} {shown(value)} chooses the tokens that pass between hosts, but none pass (it "
                    "needs --model.attention star and --model.passing_tokens N > 0); set --model.passing_tokens, or "
                    f"drop --model.{option}"
                )
        anchored = self.attention == "star" and self.anchor_query
        if not anchored and self.anchor_query_positions != "after_anchor":
            raise ConfigurationError(
                f"--model.anchor_query_positions {shown(self.anchor_query_positions)} places the query in every "
                "block's prefix, but there is none (it needs --model.attention star and --model.anchor_query true); "
                "set --model.anchor_query true, or drop --model.anchor_query_positions"
            )

    def _check_hosts(self) -> None:
        """The layout the strategy gives a request: checked here, so ``plan`` and ``predict`` refuse alike."""
        if isinstance(self.hosts, bool) or not isinstance(self.hosts, int) or self.hosts < 1:
            raise ConfigurationError(f"the number of hosts must be positive, got {self.hosts}")
        t, g = self.tensor_parallel_size, self.gpus_per_host
        if t < 1 or g < 1:
            raise ConfigurationError(
                f"tensor_parallel_size ({t}) and gpus_per_host ({g}) must be positive numbers of GPUs; set "
                "--trainer.strategy.tensor_parallel_size / --trainer.strategy.gpus_per_host to 1 or more"
            )
        if self.prefill == "graph" and self.prefill_graph_blocker() is not None:
            raise ConfigurationError(
                f"--model.prefill graph replays star's Phase 1 blocks on one GPU holding them all, but "
                f"{self.prefill_graph_blocker()}; drop --model.prefill (auto captures where it applies)"
            )
        if self.simulated_hosts != 1 and self.hosts != 1:
            raise ConfigurationError(
                f"--model.simulate_hosts {self.simulated_hosts} plays every host in one process, but the "
                f"context-parallel group has {self.hosts} hosts; set --trainer.strategy.context_parallel_size 1 (the "
                "devices then split the requests) or drop --model.simulate_hosts"
            )
        if self.attention == "dense" and self.hosts != 1:
            raise ConfigurationError(
                f"dense attention runs each request in one process, but the context-parallel group has {self.hosts} "
                "hosts; set --trainer.strategy.context_parallel_size 1 (the devices then split the requests) or use "
                "--model.attention star/ring"
            )

    def prefill_graph_blocker(self) -> str | None:
        """Why star's Phase 1 blocks cannot be replayed as CUDA graphs with these settings (None: they can, on a GPU):
        a graph replays fixed buffers, which a block reads only where its host holds every block and the anchor is its
        own first rows."""
        reasons = (
            (self.attention != "star", f"--model.attention is {self.attention} (one forward, no blocks)"),
            (self.hosts != 1, f"the context-parallel group has {self.hosts} hosts (the anchor comes from host 0)"),
            (self.simulated_hosts != 1, f"--model.simulate_hosts {self.simulated_hosts} plays several hosts"),
            (self.anchor_query, "--model.anchor_query true puts each request's query in the anchor"),
            (self.passing_tokens > 0, "--model.passing_tokens exchanges tokens between hosts"),
            (self.tensor_parallel_size * self.gpus_per_host > 1, "the model is spread over several GPUs"),
        )
        return next((reason for blocked, reason in reasons if blocked), None)

    def with_hosts(self, hosts: int, tensor_parallel_size: int = 1, gpus_per_host: int = 1) -> StarSettings:
        """The same settings on a group of ``hosts`` hosts (validated: dense and played hosts need one)."""
        if (hosts, tensor_parallel_size, gpus_per_host) == (self.hosts, self.tensor_parallel_size, self.gpus_per_host):
            return self
        return replace(self, hosts=hosts, tensor_parallel_size=tensor_parallel_size, gpus_per_host=gpus_per_host)

    @property
    def passing(self) -> PassingSettings:
        from star_lightning.attention.passing import PassingSettings

        return PassingSettings(self.passing_tokens, self.passing_selection, self.passing_pool_kernel)

    def shapes_kv(self) -> tuple[object, ...]:
        """Every setting that shapes a context's KV (a kept context is reused only where they all agree)."""
        star = self.attention == "star"
        return (
            self.attention, self.block_size, self.anchor_block_size, self.use_anchor, self.ring_layout,
            star and self.anchor_query, self.anchor_query_positions if star and self.anchor_query else None,
            self.passing if star and self.passing_tokens else None, self.simulated_hosts if star else 1,
            self.lookback_tokens if star else 0,
        )  # fmt: skip


# ``--model.*`` option -> StarSettings field, where the names differ.
_RENAMED = {"anchor": "use_anchor", "simulate_hosts": "simulated_hosts"}
_FIELDS = (
    "attention", "block_size", "anchor_block_size", "anchor", "anchor_source", "ring_layout", "anchor_query",
    "anchor_query_positions", "passing_tokens", "passing_selection", "passing_pool_kernel", "lookback_tokens",
    "simulate_hosts",
    "backend", "decode", "prefill", "max_new_tokens",
)  # fmt: skip


def settings_from_options(
    options: Mapping[str, Any] | Any, *, hosts: int = 1, tensor_parallel_size: int = 1, gpus_per_host: int = 1
) -> StarSettings:
    """The settings of ``--model.*`` (the module's arguments, a mapping or a namespace) on a layout; the one way
    ``predict``, ``plan`` and the benchmarks build them. Options left out take the module's defaults."""
    get = options.get if isinstance(options, Mapping) else (lambda name, default: getattr(options, name, default))
    defaults = StarSettings()
    values: dict[str, Any] = {}
    for option in _FIELDS:
        name = _RENAMED.get(option, option)
        values[name] = get(option, getattr(defaults, name))
    values["stop_strings"] = tuple(get("stop_strings", None) or ())
    return StarSettings(**values, hosts=hosts, tensor_parallel_size=tensor_parallel_size, gpus_per_host=gpus_per_host)


@dataclass(frozen=True)
class GenerationSettings:
    """One request's decoding: its budget (the module's, lowered by the request's own), sampling and EOS ids."""

    max_new_tokens: int = 32
    sampling: SamplingConfig = field(default_factory=lambda: _sampling())
    eos_token_ids: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise ValueError(
                f"max_new_tokens must be positive, got {self.max_new_tokens}; set --model.max_new_tokens N"
            )


def _sampling() -> SamplingConfig:
    from star_lightning.sampling import SamplingConfig

    return SamplingConfig()
