"""The LightningModule: any HF causal LM, one request per ``predict_step`` (Phase 1, then Phase 2 decoding)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import LightningModule
from transformers import PreTrainedModel

from star_lightning import startup
from star_lightning.anchor_text import anchor_query_ids
from star_lightning.attention.kernels import KernelChoice
from star_lightning.data.jsonl import TOKENS_FIELD, prediction_record
from star_lightning.engine.context import EncodedContext
from star_lightning.engine.request import GenerationResult, RequestStats, generate
from star_lightning.engine.settings import (
    AnchorSource,
    Attention,
    Backend,
    DecodeMode,
    GenerationSettings,
    PrefillMode,
    QueryPositions,
    RingLayout,
    Selection,
    settings_from_options,
)
from star_lightning.errors import ConfigurationError
from star_lightning.models import DTypeName, load_model, load_tokenizer, resolve_dtype, resolve_pretrained
from star_lightning.parallel.context import ContextInfo, single_host
from star_lightning.parallel.group import ContextGroup
from star_lightning.sampling import SamplingConfig
from star_lightning.tokens import request_tensors


class StarAttentionLM(LightningModule):
    """Long-context generation with Star Attention (or the ``ring`` / ``dense`` baselines).

    Args:
        pretrained: a local model folder, a GGUF file (dequantized to ``dtype``; the ``gguf`` extra) or a hub id;
            unset = the small model shipped with star_lightning.
        attention: ``star`` (blockwise Phase 1 + exact Phase 2), ``ring`` (exact ring attention) or ``dense``
            (the model's own attention in one process).
        block_size: context tokens per block (star).
        anchor_block_size: leading tokens of the first block that prefix every other block; unset = block_size.
        anchor: ``False`` switches the anchor block off (an ablation: blocks see only themselves).
        anchor_source: where a host gets the anchor's K/V (all exact, same predictions): ``broadcast`` (host 0 sends
            each layer's anchor K/V while it encodes the first block; the others never run the anchor's forward),
            ``host`` (each host computes it once and reuses it for its blocks), ``block`` (recomputed before every
            block, the reference implementation's way). With one host, ``broadcast`` is ``host``.
        ring_layout: chunks of the exact ring baseline (``--model.attention ring``): ``zigzag`` (host h holds chunks
            h and 2H-1-h: balanced causal work) or ``contiguous`` (host h holds chunk h). Same predictions.
        reuse_context: when a request's context is the one the previous request encoded (same tokens), skip Phase 1
            and answer over the kept KV (exact); ``false`` re-encodes every request (for comparison).
        anchor_query: star: the request's query follows the anchor in every block's prefix, so each block is encoded
            knowing what will be asked (APB's query-aware anchor); its K/V are never stored. A context encoded so
            depends on its query: it is reused only for the same query.
        anchor_query_positions: where the query sits in the prefix: ``after_anchor`` (positions a..a+q-1, right
            after the anchor) or ``phase2`` (the positions Phase 2 gives it, after the context).
        passing_tokens: star: at every layer of Phase 1 each host passes this many of its block's tokens, those the
            query in the anchor (else the anchor's last 32 tokens) attends to most, to the hosts after it, which
            attend to them at their true positions; 0 = Star as the paper defines it. Needs the anchor; with one
            host nothing is passed.
        passing_selection: ``shared`` (one choice of tokens for all heads) or ``per_head`` (each KV head its own).
        passing_pool_kernel: the choice scores are max-pooled over this many neighbouring positions (odd; 1 = none),
            so a chosen token's neighbours come with it.
        lookback_tokens: star: each block after the first is encoded after the anchor and the W context tokens just
            before it (recomputed in its forward, attending to the anchor and to each other, never stored): a wider
            local context, at the cost of W more rows a block; 0 = Star as the paper defines it. Not with
            passing_tokens.
        simulate_hosts: star: play the Phase 1 of this many hosts in this one process, host by host, exactly as that
            many real hosts compute it (anchor, passing tokens), then Phase 2 over all of their KV: what a layout of
            that many hosts predicts, measured on one device; 0 = one host per block of each request (the paper's
            layout, whatever the context's length); 1 = off. Needs context_parallel_size 1.
        max_new_tokens: tokens to generate at most per request; a request's own ``max_new_tokens`` field (which
            ``star-lightning generate`` writes, per task) lowers it for that request.
        temperature: 0 = greedy; otherwise sampling with this temperature.
        top_p: nucleus-sampling mass (with temperature > 0).
        seed: sampling seed (each request's generator is seeded with seed + request index).
        stop_strings: generation stops when the text ends with one of these (the stop string is cut off).
        dtype: weights and activations; auto = bfloat16 on GPU, float32 on CPU.
        backend: local attention kernel: auto (the fastest available), math (any device, float64 too), sdpa or
            cudnn (fused CUDA kernels for Phase 1), triton (split-KV CUDA kernel for decoding), flash_attn (if
            installed) or flex (FlexAttention for every call; auto takes it on CUDA for sliding-window and soft-capped
            layers).
        decode: Phase 2 decoding of star, ring and dense: auto (compile on one GPU, eager otherwise), eager (one
            forward per token), static (static shapes, no graph), graph (the static step captured as one CUDA graph
            and replayed per token) or compile (graph of the torch.compile'd step: the model's norms, rotary and
            activations fused).
        prefill: star's Phase 1 blocks on one GPU: auto (graph where it applies: one GPU holding every block, no
            anchor_query, no passing tokens, blocks of up to 8K tokens, a static rope; eager else), eager (one
            forward per block) or graph (each block's forward captured as a CUDA graph the second time its shape
            comes, then replayed; the last block padded to a full one).
        trust_remote_code: allow model code from the hub (off: only transformers' own architectures).
    """

    def __init__(
        self,
        *,
        pretrained: str | None = None,
        attention: Attention = "star",
        block_size: int = 4096,
        anchor_block_size: int | None = None,
        anchor: bool = True,
        anchor_source: AnchorSource = "broadcast",
        ring_layout: RingLayout = "zigzag",
        reuse_context: bool = True,
        anchor_query: bool = False,
        anchor_query_positions: QueryPositions = "after_anchor",
        passing_tokens: int = 0,
        passing_selection: Selection = "shared",
        passing_pool_kernel: int = 7,
        lookback_tokens: int = 0,
        simulate_hosts: int = 1,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop_strings: list[str] | None = None,
        dtype: DTypeName = "auto",
        backend: Backend = "auto",
        decode: DecodeMode = "auto",
        prefill: PrefillMode = "auto",
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        # Every check of the settings, once, with the line the command line prints (plan builds the same type).
        self.star_settings = settings_from_options(
            {key: value for key, value in locals().items() if key not in ("self", "__class__")}
        )
        self.sampling = SamplingConfig(temperature=temperature, top_p=top_p, seed=seed)
        self.save_hyperparameters()
        # A missing model folder is reported now, before any process group or weights.
        self.pretrained = None if pretrained is None else resolve_pretrained(pretrained)
        self.reuse_context = reuse_context
        self.max_new_tokens = max_new_tokens
        self.stop_strings = tuple(stop_strings or ())
        self.dtype_name = dtype
        self.trust_remote_code = trust_remote_code
        self.model: torch.nn.Module | None = None
        self.tokenizer: Any = None
        # One kernel choice per loaded model: what ``auto`` resolves to, and what it learns (a cuDNN refusal).
        self.kernels = KernelChoice(backend=backend)
        # This rank's group and devices, handed over by the strategy (configure_context); None: one host of its own.
        self._context: ContextInfo | None = None
        # The context the last request encoded on this host, kept for the next request that shares it.
        self.kept_context: EncodedContext | None = None
        self.last_stats: RequestStats | None = None
        # Told each phase's name as it starts (``star_lightning/phase1``, ...), e.g. by the progress display.
        self.phase_listeners: list[Callable[[str], None]] = []

    def resolved_pretrained(self) -> str:
        if self.pretrained is not None:
            return self.pretrained
        from star_lightning.assets import default_model_path

        return str(default_model_path())

    def configure_context(self, context: ContextInfo) -> None:
        """Called once by the context-parallel strategy when its groups exist: this rank's group, devices and place
        in the layout (the settings learn the group's size, checked as ``predict`` checked it)."""
        self._context = context
        layout = context.layout
        self.star_settings = self.star_settings.with_hosts(
            layout.context_parallel_size, layout.tensor_parallel_size, context.gpus_per_host
        )

    @property
    def context_info(self) -> ContextInfo:
        """What the strategy handed over, or (a plain Lightning strategy, no trainer) one host of its own."""
        return self._context if self._context is not None else single_host()

    def configure_model(self) -> None:
        """Load the weights once, straight onto this rank's device."""
        if self.model is not None:
            return
        source = self.resolved_pretrained()
        strategy = self._trainer.strategy if self._trainer is not None else None
        root = strategy.root_device if strategy is not None else torch.device("cpu")
        context = self.context_info
        self.model = load_model(
            source,
            dtype=resolve_dtype(self.dtype_name, root),
            devices=list(context.devices) or [root],
            attention=self.star_settings.attention,
            trust_remote_code=self.trust_remote_code,
            tensor_parallel=context.tensor_parallel_mesh,
        )
        if self.tokenizer is None:  # the preflight's, where it loaded one from the same source
            self.tokenizer = load_tokenizer(source, trust_remote_code=self.trust_remote_code)
        startup.mark("loaded")

    def context_group(self) -> ContextGroup:
        return self.context_info.group

    def generation_settings(self, request_index: int, request_max_new_tokens: int | None = None) -> GenerationSettings:
        eos = self.tokenizer.eos_token_id
        eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        generation_config = getattr(self.model, "generation_config", None)
        extra = getattr(generation_config, "eos_token_id", None)
        eos_ids |= frozenset([extra] if isinstance(extra, int) else (extra or []))
        sampling = SamplingConfig(self.sampling.temperature, self.sampling.top_p, self.sampling.seed + request_index)
        budget = self.max_new_tokens
        if request_max_new_tokens is not None:
            budget = min(budget, request_max_new_tokens)
        return GenerationSettings(max_new_tokens=budget, sampling=sampling, eos_token_ids=eos_ids)

    def _stop_check(self, token_ids: list[int]) -> bool:
        if not self.stop_strings:
            return False
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        return any(stop in text for stop in self.stop_strings)

    def _announce_phase(self, name: str) -> None:
        for listener in self.phase_listeners:
            listener(name)

    def decode_text(self, token_ids: list[int]) -> str:
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        for stop in self.stop_strings:
            cut = text.find(stop)
            if cut >= 0:
                text = text[:cut]
        return text

    def encode_request(self, request: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Context with the tokenizer's special tokens (BOS), query without: together they are the prompt.

        A context that already begins with the BOS text (a chat-template prompt, the reference implementation's
        prepared files) is not given a second BOS."""
        # The embedding's device: the module's own, or the first GPU of a host the layers are spread over (the
        # module is not moved there as a whole).
        embedding = self.model.get_input_embeddings() if isinstance(self.model, PreTrainedModel) else None
        weight = getattr(embedding, "weight", None)
        device = weight.device if isinstance(weight, torch.Tensor) else self.device
        # Tokenized by the data loader's worker (RequestDataModule.num_workers), else here.
        tokens = request.get(TOKENS_FIELD)
        context, query = request_tensors(self.tokenizer, request) if tokens is None else tokens  # [1, T], [1, Lq]
        if not context.numel():
            raise ConfigurationError(f"request {request.get('index')}: the context encodes to no tokens")
        if not query.numel():
            raise ConfigurationError(f"request {request.get('index')}: the query encodes to no tokens")
        return context.to(device, torch.long), query.to(device, torch.long)

    def run_request(self, request: dict[str, Any]) -> GenerationResult:
        if self.model is None:
            self.configure_model()
        model = self.model
        if model is None:
            raise RuntimeError("configure_model() did not load a model")
        context_ids, query_ids = self.encode_request(request)
        anchor_ids = anchor_query_ids(self.tokenizer, request, self.star_settings.anchor_query, query_ids.device)
        index = int(request.get("index", 0))
        group = self.context_group()
        try:
            result = generate(
                model,
                context_ids,
                query_ids,
                group,
                self.star_settings,
                self.generation_settings(index, request.get("max_new_tokens")),
                self._stop_check if self.stop_strings else None,
                self._announce_phase if self.phase_listeners else None,
                kernels=self.kernels,
                kept=self._take_kept_context(),
                anchor_query_ids=anchor_ids,
            )
        except ValueError as error:
            raise ConfigurationError(f"request {index}: {error}") from None
        if self.reuse_context:
            self.kept_context = result.context
        return result

    def _take_kept_context(self) -> EncodedContext | None:
        """The kept context, handed over as its only reference: one that does not answer the next request is freed
        before the next one is encoded (:func:`~star_lightning.engine.request.generate`)."""
        kept, self.kept_context = self.kept_context, None
        return kept

    def predict_step(self, batch: dict[str, Any], batch_idx: int = 0) -> dict[str, Any] | None:
        """One request (``batch`` is a request dict); the prediction record on the query host, None elsewhere."""
        startup.mark("first_request")
        result = self.run_request(batch)
        self.last_stats = result.stats
        if not self.context_info.writes_predictions:
            return None
        return prediction_record(batch, self.decode_text(result.token_ids))
