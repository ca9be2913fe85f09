"""A deterministic engine simulation around vLLM's real ``Scheduler``.

The scheduler, its KV cache manager (prefix cache, preemption, chunked
prefill, WAITING_FOR_REMOTE_KVS, load-failure recovery) and the scheduler
half of our connector are the real ones. The model runner is fake but makes
the same connector calls in the same order as vLLM's
``KVConnectorModelRunnerMixin``, on one worker-role connector per TP rank,
and its outputs go through vLLM's own ``KVOutputAggregator``.

The fake forward writes, for every token it computes, a value that is a
function of the token prefix (and of rank, layer, element and "model epoch")
into that token's slot of its engine block. So every KV value says which
prefix it belongs to and the simulation can check, exactly:

* **the core check**: every KV position the engine treats as computed
  (``< num_computed_tokens``, read through the request's block table) holds
  its own prefix's value when the forward reads it. The forward is modelled
  layer by layer as in a real transformer: a layer's new KV is written before
  that layer's attention reads the context, and a wrong context read at
  layer ``l`` poisons the KV the request writes at later layers and the token
  it samples. The one excusable wrong read is vLLM's own recovery path: a
  request whose output vLLM discards this step because a connector reported
  the block invalid (its ``num_computed_tokens`` is rolled back);
* every token vLLM appends is the one a correct engine samples;
* every L1 slot the connector would serve as a hit holds its key's bytes on
  every rank; every value in L2 decodes and holds its key's bytes for that
  rank (checked once per value, when it appears);
* when no request is left, the connector holds no pins, pending L2 fills or
  per-request trackers, no load job is queued, and vLLM's block pool is free.

Loads run on a :class:`~tests.sim.fakes.ManualExecutor` per rank, so a slow
load finishes a chosen number of steps later; L2 writes are flushed after
every worker call, so lookups do not depend on thread timing. Everything
random comes from one seed, printed in every failure.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import os
import random
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from vllm import SamplingParams
from vllm.config import (
    CacheConfig,
    DeviceConfig,
    KVTransferConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.distributed.kv_transfer.kv_connector.utils import KVOutputAggregator
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus
from vllm.v1.structured_output import StructuredOutputManager

from tests.sim import fakes
from tests.unit.held_executor import HeldJobs
from vllm_aibrix.core.keys import PrefixHasher
from vllm_aibrix.core.l2 import codec
from vllm_aibrix.core.l2.memory import MemoryBackend
from vllm_aibrix.vllm.connector import AIBrixOffloadingConnector

MASK64 = (1 << 64) - 1
VOCAB = 50_000
FIRST_TOKEN = 10  # token ids below this are never generated (room for specials)
_sim_ids = itertools.count()


class SimViolation(AssertionError):
    """An invariant of the cache was broken. The message starts with the seed."""


def _mix(x: int) -> int:
    """splitmix64 finalizer: a fixed, well-spread 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def chain(prev: int, token: int) -> int:
    """Running hash of a token prefix: ``H_p = chain(H_{p-1}, t_p)``."""
    return _mix(prev ^ ((token * 0xD6E8FEB86659FD93) & MASK64))


ROOT_HASH = _mix(0xA1B2C3)


# ------------------------------------------------------------------ configs
@dataclass
class SimConfig:
    """One simulated engine. Defaults give preemption, chunking and a tiny L1."""

    tp: int = 1
    ingestion: str = "ALL"
    load_async: bool = True
    l2: bool = True
    seed: int = 0
    block_size: int = 16
    num_layers: int = 2
    num_kv_heads: int = 1
    head_size: int = 2
    num_gpu_blocks: int = 24
    max_num_batched_tokens: int = 64
    max_num_seqs: int = 6
    max_model_len: int = 1024
    l1_slots: int = 12
    # L2 capacity in values (each value is one rank's shard of one block);
    # None = unbounded. Small values make L2 evict, shard by shard.
    l2_capacity_values: int | None = None
    policy: str = "S3FIFO"
    prefix_aware: bool = True
    # vLLM 0.32 with kv_load_failure_policy=recompute keeps the blocks of a
    # failed *sync* load (and the blocks computed over them in that step) in
    # its prefix cache, counting on the request to recompute them before
    # anyone reads them; a preemption in between serves them as hits (see
    # test_scenarios.py). The connector evicts them itself (through the block
    # pool vLLM binds to it), so the default runs stock vLLM; True emulates a
    # vLLM that does it on its own.
    vllm_evicts_invalid_blocks: bool = False
    # vLLM 0.32: when an async load fails with nothing usable, the request
    # frees its blocks but (a) stays at the head of the queue of requests
    # holding KV, which is scheduled first and stops at the first request that
    # does not fit, and (b) stays in the in-flight-prefill set, so its own
    # reservation (the blocks of its whole sequence) counts against its
    # re-admission. Either could stall the engine for good while the connector
    # promised the same hit again (test_scenarios.py); it no longer does, so the
    # default runs stock vLLM. True emulates a vLLM that treats such a request
    # as a new one.
    vllm_forgets_failed_async_loads: bool = False
    # Load deadline in engine steps (the workers see a clock that advances one
    # second per step); None = no deadline ever expires.
    load_deadline_steps: int | None = None
    # Background L2 lookups (l2_lookup_async): None = synchronous; otherwise
    # each lookup is answered 0..N steps after it was asked (seeded), and a
    # request stops waiting for its answer after lookup_wait_steps.
    lookup_delay_steps: int | None = None
    lookup_wait_steps: int = 3
    extra: dict[str, Any] = field(default_factory=dict)  # connector config overrides

    @property
    def elems_per_token(self) -> int:
        """KV elements of one token in one layer on one rank."""
        return self.num_kv_heads * 2 * self.head_size

    @property
    def page_bytes(self) -> int:
        return self.block_size * self.elems_per_token * 4  # float32

    @property
    def slot_bytes(self) -> int:
        return self.page_bytes * self.num_layers

    def layer_names(self) -> list[str]:
        assert self.num_layers <= 10, "names must sort in layer order"
        return [f"model.layers.{i}.self_attn.attn" for i in range(self.num_layers)]

    def describe(self) -> str:
        return (
            f"seed={self.seed} tp={self.tp} ingestion={self.ingestion} "
            f"load_async={self.load_async} l2={self.l2} l1_slots={self.l1_slots} "
            f"gpu_blocks={self.num_gpu_blocks} policy={self.policy} "
            f"lookup_delay={self.lookup_delay_steps}"
        )


@cache
def _model_dir() -> str:
    """A config-only tiny Llama (no weights: nothing here runs a model).

    A fixed path, so keys (which cover the model name) are the same in every run.
    """
    d = Path(tempfile.gettempdir()) / "aibrix-sim-model-v1"
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f"config.json.{os.getpid()}"
    tmp.write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_attention_heads": 2,
                "num_hidden_layers": 2,
                "num_key_value_heads": 2,
                "head_dim": 32,
                "vocab_size": VOCAB,
                "max_position_embeddings": 4096,
                "rms_norm_eps": 1e-6,
                "torch_dtype": "float32",
                "bos_token_id": 1,
                "eos_token_id": 2,
            },
            sort_keys=True,
        )
    )
    os.replace(tmp, d / "config.json")
    return str(d)


def connector_extra_config(cfg: SimConfig, l2: dict[str, Any] | None = None) -> dict[str, Any]:
    extra: dict[str, Any] = {
        # An exact multiple of the slot size: l1_slots slots per rank.
        "l1_cache_capacity_gb": cfg.l1_slots * cfg.slot_bytes / (1 << 30),
        "l1_cache_eviction_policy": cfg.policy,
        "l1_prefix_aware_eviction": cfg.prefix_aware,
        "l2_cache_backend": "NONE",
        "l2_cache_ingestion_type": cfg.ingestion,
        "load_async": cfg.load_async,
        # Nothing may depend on wall-clock time: huge L2 timeouts; load
        # deadlines count engine steps (see StepClock).
        "l2_cache_op_timeout_ms": 600_000,
        "load_deadline_s": float(cfg.load_deadline_steps or 1e9),
        # Background L2 lookups run on a ManualExecutor the simulation steps
        # (lookup_delay_steps), against the step clock; off = synchronous.
        "l2_lookup_async": cfg.lookup_delay_steps is not None,
        "l2_lookup_max_wait_ms": 1000 * cfg.lookup_wait_steps,
        "metrics_enabled": False,
    }
    extra.update(l2 or {})
    extra.update(cfg.extra)
    return extra


def build_vllm_config(cfg: SimConfig, l2: dict[str, Any] | None = None) -> VllmConfig:
    model_config = ModelConfig(
        model=_model_dir(),
        dtype="float32",
        seed=0,
        skip_tokenizer_init=True,
        max_model_len=cfg.max_model_len,
    )
    scheduler_config = SchedulerConfig(
        max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        max_model_len=cfg.max_model_len,
        enable_chunked_prefill=True,
        is_encoder_decoder=False,
    )
    cache_config = CacheConfig(block_size=cfg.block_size, enable_prefix_caching=True)
    kv_transfer_config = KVTransferConfig(
        kv_connector="AIBrixOffloadingConnector",
        kv_connector_module_path="vllm_aibrix.vllm.connector",
        kv_role="kv_both",
        kv_load_failure_policy="recompute",
        kv_connector_extra_config=connector_extra_config(cfg, l2),
    )
    return VllmConfig(
        model_config=model_config,
        scheduler_config=scheduler_config,
        cache_config=cache_config,
        parallel_config=ParallelConfig(tensor_parallel_size=cfg.tp),
        kv_transfer_config=kv_transfer_config,
        device_config=DeviceConfig("cpu"),
    )


def build_kv_cache_config(cfg: SimConfig) -> KVCacheConfig:
    return KVCacheConfig(
        num_blocks=cfg.num_gpu_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[
            KVCacheGroupSpec(
                cfg.layer_names(),
                FullAttentionSpec(
                    block_size=cfg.block_size,
                    num_kv_heads=cfg.num_kv_heads,
                    head_size=cfg.head_size,
                    dtype=torch.float32,
                ),
            )
        ],
    )


# ------------------------------------------------------------------- faults
class SimFaults(fakes.LoadFaults):
    """Load faults drawn from the simulation's RNG, or scripted by a test.

    Scripted entries (``fail_once``/``drop_once``) are consumed first, in
    order, by the first load on the named rank; then, if the rates are
    non-zero, faults are random.
    """

    def __init__(self, rng: random.Random, fail_rate: float = 0.0, drop_rate: float = 0.0):
        self.rng = rng
        self.fail_rate = fail_rate
        self.drop_rate = drop_rate
        self.corrupt_rate = 0.0
        self._fail_script: list[tuple[int | None, int]] = []
        self._drop_script: list[tuple[int | None, int]] = []
        self.log: list[str] = []

    def fail_once(self, rank: int | None, ok_blocks: int) -> None:
        """The next load on ``rank`` (None = any) succeeds for ``ok_blocks`` blocks only."""
        self._fail_script.append((rank, ok_blocks))

    def drop_once(self, rank: int | None, index: int) -> None:
        """The next load on ``rank`` with L2 blocks finds its ``index``-th L2 key gone."""
        self._drop_script.append((rank, index))

    @staticmethod
    def _take(script: list[tuple[int | None, int]], rank: int) -> int | None:
        for i, (r, v) in enumerate(script):
            if r is None or r == rank:
                del script[i]
                return v
        return None

    def loaded_limit(self, rank: int, req_id: str, planned: int) -> int:
        v = self._take(self._fail_script, rank)
        if v is None and planned > 0 and self.fail_rate and self.rng.random() < self.fail_rate:
            v = self.rng.randrange(planned)
        if v is None or v >= planned:
            return planned
        self.log.append(f"rank {rank}: load of {req_id} stops after {v}/{planned} blocks")
        return v

    def l2_keys_to_drop(self, rank: int, l2_keys: Sequence[bytes]) -> list[bytes]:
        if not l2_keys:
            return []
        v = self._take(self._drop_script, rank)
        if v is None and self.drop_rate and self.rng.random() < self.drop_rate:
            v = self.rng.randrange(len(l2_keys))
        if v is None:
            return []
        v = min(v, len(l2_keys) - 1)
        self.log.append(f"rank {rank}: L2 key #{v} of a {len(l2_keys)}-block fetch vanishes")
        return [l2_keys[v]]

    def corrupt(self, rank: int, req_id: str) -> bool:
        return bool(self.corrupt_rate) and self.rng.random() < self.corrupt_rate


# ------------------------------------------------------------ load timing
class LoadTiming:
    """When each queued async load job runs: ``delay`` steps later, at a phase.

    Phases of a step: 0 before the step's connector calls, 1 right after
    ``start_load_kv`` and the forward, 2 after ``wait_for_save`` (just
    before ``get_finished``). A job submitted in phase 1 of step t with
    delay 0 runs in phase 1 or 2 of step t.
    """

    def __init__(self, rng: random.Random, max_delay: int = 3) -> None:
        self.rng = rng
        self.max_delay = max_delay
        # Loads that wait until released: req id -> ranks (None = every rank).
        self.held: dict[str, set[int] | None] = {}

    def due(self, job: Any) -> tuple[int, int]:
        d = job.due
        if d is None:
            delay = self.rng.randint(0, self.max_delay) if self.max_delay else 0
            phase = self.rng.randint(1, 2)
            d = job.due = (job.submitted_step + delay, phase)
        return d

    def hold(self, req_id: str, ranks: set[int] | None = None) -> None:
        self.held[req_id] = ranks

    def release(self, req_id: str) -> None:
        self.held.pop(req_id, None)

    def ready(self, job: Any, step: int, phase: int, rank: int) -> bool:
        if job.tag in self.held:
            ranks = self.held[job.tag]
            if ranks is None or rank in ranks:
                return False
        at_step, at_phase = self.due(job)
        return (step, phase) >= (at_step, at_phase)


# ----------------------------------------------------------------- requests
@dataclass
class ReqState:
    """What the simulation knows about one request."""

    req: Request
    epoch: int
    prompt_len: int
    hashes: list[int] = field(default_factory=list)  # H_p for every known token
    bases: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    hasher: PrefixHasher | None = None
    known_connector_keys: int = 0
    verified_outputs: int = 0
    forward_tokens: int = 0  # tokens this engine computed for it (all steps)
    aborted: bool = False

    @property
    def req_id(self) -> str:
        return self.req.request_id


@dataclass
class Finding:
    """A wrong KV value the forward read (excused later only by vLLM's recovery)."""

    req_id: str
    pos: int
    layer: int
    rank: int
    block_id: int
    actual: float
    expected: float
    num_computed: int


# --------------------------------------------------------------- simulation
class Sim:
    """One engine: vLLM's scheduler, our connector, a fake model runner."""

    def __init__(self, cfg: SimConfig, *, l2_name: str | None = None) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.fault_rng = random.Random(cfg.seed ^ 0xFA17)
        self.timing_rng = random.Random(cfg.seed ^ 0x71E)
        self.faults = SimFaults(self.fault_rng)
        self.timing = LoadTiming(self.timing_rng)
        # When background stores run: a few of the oldest at each phase.
        self.store_rng = random.Random(cfg.seed ^ 0x570)
        self.step_no = 0
        self.epoch = 0
        self.M = cfg.tp * cfg.num_layers * cfg.elems_per_token
        self.base_mod = (1 << 24) // self.M  # value = base*M + sub < 2**24: exact in float32
        assert self.base_mod >= 1 << 16, "too many KV elements per token for exact values"
        self.history: list[str] = []
        self.requests: dict[str, ReqState] = {}
        self.live: dict[str, ReqState] = {}
        # cache key -> (H_p of its B tokens, epochs in which a request produced it)
        self.keymap: dict[bytes, tuple[tuple[int, ...], set[int]]] = {}
        self._base_owner: dict[tuple[int, int], tuple[str, int]] = {}
        self.block_writer: dict[int, str] = {}
        self._l2_seen: dict[bytes, bytes] = {}
        self._next_req = 0
        self.counts: dict[str, int] = {
            "steps": 0,
            "forward_tokens": 0,
            "loads": 0,
            "load_blocks": 0,
            "load_blocks_l2": 0,
            "preemptions": 0,
            "aborts": 0,
            "excused_reads": 0,
            "idle_checks": 0,
        }
        self.l2_backend: MemoryBackend | None = None
        l2_extra: dict[str, Any] = {}
        l2_ctx: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        self._own_l2: str | None = None
        if cfg.l2:
            cap = None
            if cfg.l2_capacity_values is not None:
                cap = cfg.l2_capacity_values * (codec.HEADER_SIZE + cfg.slot_bytes)
            if l2_name is None:  # a store of its own; else shared with other engines
                l2_name = self._own_l2 = f"aibrix-sim-{next(_sim_ids)}"
            l2_extra, self.l2_backend, l2_ctx = fakes.shared_memory_l2(l2_name, cap)
        init_none_hash(sha256)
        self._block_hasher = get_request_block_hasher(cfg.block_size, sha256)
        self.kv_cache_config = build_kv_cache_config(cfg)
        self.vllm_config = build_vllm_config(cfg, l2_extra)
        self.vllm_config.cache_config.num_gpu_blocks = cfg.num_gpu_blocks
        self.executors: list[fakes.ManualExecutor] = []
        self.store_jobs: list[HeldJobs] = []  # per rank
        self.workers: list[AIBrixOffloadingConnector] = []
        self.kv: list[list[np.ndarray]] = []  # [rank][layer] numpy views of the KV tensors
        self._tensors: list[dict[str, torch.Tensor]] = []
        self._clock = cfg.load_deadline_steps is not None or cfg.lookup_delay_steps is not None
        if self._clock:
            fakes.StepClock.acquire()
        with l2_ctx:
            self._build_halves()
        self.lookups: fakes.ManualExecutor | None = None
        self._lookup_rng = random.Random(cfg.seed ^ 0x10C)
        if cfg.lookup_delay_steps is not None and cfg.l2:
            self.lookups = fakes.ManualExecutor()
            fakes.install_lookup_executor(
                self.sched_conn, self.lookups, lambda: fakes.StepClock.now
            )
        if cfg.vllm_evicts_invalid_blocks:
            self._patch_invalid_block_eviction()
        # engine block -> offsets the forward rewrote since it was reported invalid
        self.invalid_unfilled: dict[int, set[int]] = {}
        self._scrubbed: set[int] = set()
        self.load_log: list[tuple[int, fakes.LoadPlan]] = []
        self.slot_writer: dict[int, tuple[str, int, int]] = {}  # slot -> (req, step, block)
        self.ns_digest = fakes.namespace_digest(self.sched_conn)
        assert all(fakes.namespace_digest(w) == self.ns_digest for w in self.workers)
        self.aggregator = KVOutputAggregator(cfg.tp)
        self._forward_context = object()

    def _build_halves(self) -> None:
        """vLLM's scheduler (it builds our scheduler half) and one worker half per rank."""
        cfg = self.cfg
        self.scheduler = Scheduler(
            vllm_config=self.vllm_config,
            kv_cache_config=self.kv_cache_config,
            structured_output_manager=StructuredOutputManager(self.vllm_config),
            block_size=cfg.block_size,
            log_stats=True,
        )
        conn = self.scheduler.connector
        assert isinstance(conn, AIBrixOffloadingConnector)
        self.sched_conn: AIBrixOffloadingConnector = conn
        for rank in range(cfg.tp):
            with mock.patch(
                "vllm.distributed.parallel_state.get_tensor_model_parallel_rank",
                return_value=rank,
            ):
                w = AIBrixOffloadingConnector(
                    self.vllm_config, KVConnectorRole.WORKER, self.kv_cache_config
                )
            tensors = {
                name: torch.full(
                    (cfg.num_gpu_blocks, cfg.num_kv_heads, cfg.block_size, 2 * cfg.head_size),
                    float("nan"),
                    dtype=torch.float32,
                )
                for name in cfg.layer_names()
            }
            w.register_kv_caches(tensors)
            ex = fakes.ManualExecutor(rank)
            fakes.install_executor(w, ex)
            jobs = HeldJobs()
            fakes.install_store_jobs(w, jobs)
            self.store_jobs.append(jobs)
            fakes.install_faults(w, self.faults)
            self.workers.append(w)
            self.executors.append(ex)
            self._tensors.append(tensors)
            self.kv.append([tensors[n].numpy() for n in cfg.layer_names()])

    def _patch_invalid_block_eviction(self) -> None:
        sched = self.scheduler
        orig = sched._update_requests_with_invalid_blocks
        B = self.cfg.block_size

        def update(
            requests: Any,
            invalid_block_ids: set[int],
            num_scheduled_tokens: dict[str, int],
            evict_blocks: bool = True,
        ) -> tuple[set[str], int, set[int]]:
            requests = list(requests)
            ids, n, to_evict = orig(requests, invalid_block_ids, num_scheduled_tokens, evict_blocks)
            if evict_blocks and ids:
                doomed = set(invalid_block_ids)
                for req in requests:
                    if req.request_id in ids:
                        blocks = sched.kv_cache_manager.get_block_ids(req.request_id)[0]
                        doomed.update(blocks[req.num_computed_tokens // B :])
                sched.kv_cache_manager.evict_blocks(doomed)
            return ids, n, to_evict

        sched._update_requests_with_invalid_blocks = update  # type: ignore[method-assign]

    # ------------------------------------------------------------ messages
    def fail(self, what: str) -> None:
        tail = "\n  ".join(self.history[-12:])
        faults = "\n  ".join(self.faults.log[-6:])
        raise SimViolation(
            f"[{self.cfg.describe()} step={self.step_no} epoch={self.epoch}] {what}\n"
            f"recent events:\n  {tail}\nrecent faults:\n  {faults or '(none)'}"
        )

    def note(self, event: str) -> None:
        self.history.append(f"step {self.step_no}: {event}")
        if len(self.history) > 200:
            del self.history[:100]

    # ------------------------------------------------------------- values
    def base(self, h: int, epoch: int | None = None) -> int:
        e = self.epoch if epoch is None else epoch
        return _mix(h ^ (e * 0x632BE59BD9B4E019 & MASK64)) % self.base_mod

    def sub(self, rank: int, layer: int) -> int:
        return (rank * self.cfg.num_layers + layer) * self.cfg.elems_per_token

    def expected_rows(self, bases: np.ndarray, rank: int, layer: int) -> np.ndarray:
        """[n, E] float32 KV rows of tokens with these bases."""
        E = self.cfg.elems_per_token
        v = bases[:, None] * self.M + self.sub(rank, layer) + np.arange(E)[None, :]
        return v.astype(np.float32)

    def sample(self, h_last: int, poisoned: bool) -> int:
        t = FIRST_TOKEN + _mix(h_last ^ 0x5A3B1E ^ self.epoch) % (VOCAB - FIRST_TOKEN)
        if poisoned:  # the token a model with a wrong context would emit
            t = FIRST_TOKEN + (t - FIRST_TOKEN + 1) % (VOCAB - FIRST_TOKEN)
        return t

    def describe_stored(self, got: float, want: float) -> str:
        """What a wrong L1/L2 value is, with the likely cause when it is recognisable."""
        text = f"it holds {self.describe_value(got)}, expected {self.describe_value(want)}"
        if got < 0 and -got - 1 == want:
            text += (
                " -- the right prefix, but computed by a forward that read wrong KV: "
                "the connector stored KV of a step whose output vLLM discarded"
            )
        return text

    def describe_value(self, v: float) -> str:
        if math.isnan(v):
            return "never-written memory"
        if v < 0:
            return f"KV computed from a wrong context ({self.describe_value(-v - 1)})"
        iv = int(v)
        base, sub = divmod(iv, self.M)
        owner = self._base_owner.get((self.epoch, base))
        where = f"req {owner[0]} pos {owner[1]}" if owner else "no known prefix"
        for e in range(self.epoch):
            old = self._base_owner.get((e, base))
            if old:
                where += f"; epoch {e}: req {old[0]} pos {old[1]}"
        E = self.cfg.elems_per_token
        rl, elem = divmod(sub, E)
        rank, layer = divmod(rl, self.cfg.num_layers)
        return f"value {iv} = {where} (rank {rank} layer {layer} elem {elem})"

    # ------------------------------------------------------------ requests
    def _extend(self, st: ReqState) -> None:
        """Bring the prefix hashes, bases and key map up to the request's tokens."""
        toks = st.req.all_token_ids
        n0 = len(st.hashes)
        if len(toks) == n0:
            return
        h = st.hashes[-1] if st.hashes else ROOT_HASH
        new = []
        for t in toks[n0:]:
            h = chain(h, int(t))
            new.append(h)
        st.hashes.extend(new)
        nb = np.array([self.base(x, st.epoch) for x in new], dtype=np.int64)
        for i, b in enumerate(nb.tolist()):
            self._base_owner.setdefault((st.epoch, b), (st.req_id, n0 + i))
        st.bases = np.concatenate([st.bases, nb])
        B = self.cfg.block_size
        if st.hasher is None:
            st.hasher = PrefixHasher(self.ns_digest, B)
        done = len(st.hasher.keys)
        keys = st.hasher.update(list(toks))
        for i in range(done, len(keys)):
            self._learn_key(keys[i], st, i)

    def _learn_key(self, key: bytes, st: ReqState, i: int) -> None:
        B = self.cfg.block_size
        ent = self.keymap.get(key)
        if ent is None:
            self.keymap[key] = (tuple(st.hashes[i * B : (i + 1) * B]), {st.epoch})
        else:
            ent[1].add(st.epoch)

    def _learn_connector_keys(self) -> None:
        """Keys the scheduler half uses for live requests (they may carry an epoch salt)."""
        for st in self.live.values():
            keys = fakes.request_keys(self.sched_conn, st.req_id)
            known = st.known_connector_keys
            for i in range(known, min(len(keys), len(st.hashes) // self.cfg.block_size)):
                self._learn_key(keys[i], st, i)
                known = i + 1
            st.known_connector_keys = known

    def add_request(self, prompt: Sequence[int], max_tokens: int, req_id: str | None = None) -> str:
        if req_id is None:
            req_id = f"r{self._next_req}"
            self._next_req += 1
        sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
        req = Request(
            request_id=req_id,
            prompt_token_ids=[int(t) for t in prompt],
            sampling_params=sp,
            pooling_params=None,
            block_hasher=self._block_hasher,
        )
        st = ReqState(req=req, epoch=self.epoch, prompt_len=len(prompt))
        self._extend(st)
        self.requests[req_id] = st
        self.live[req_id] = st
        self.scheduler.add_request(req)
        self.note(f"add {req_id} prompt={len(prompt)} max_tokens={max_tokens}")
        return req_id

    def abort(self, req_id: str) -> None:
        st = self.live.get(req_id)
        if st is None or st.req.is_finished():
            return
        status = st.req.status
        self.scheduler.finish_requests(req_id, RequestStatus.FINISHED_ABORTED)
        st.aborted = True
        self.counts["aborts"] += 1
        self.note(f"abort {req_id} (was {status.name})")

    def loads_of(self, req_id: str) -> list[fakes.LoadPlan]:
        return [p for _, p in self.load_log if p.req_id == req_id]

    def waiting_for_load(self) -> list[str]:
        return [
            rid
            for rid, st in self.live.items()
            if st.req.status == RequestStatus.WAITING_FOR_REMOTE_KVS
        ]

    def is_idle(self) -> bool:
        return not self.scheduler.requests and not self.scheduler.has_requests()

    # --------------------------------------------------------------- resets
    def reset_prefix_cache(self, *, running: bool = False) -> bool:
        """vLLM's prefix-cache reset (preempting everything if ``running``)."""
        if running and (
            self.scheduler.kv_holding_waiting
            or any(
                r.status
                not in (RequestStatus.RUNNING, RequestStatus.WAITING, RequestStatus.PREEMPTED)
                for r in self.scheduler.requests.values()
            )
        ):
            # vLLM raises while a request outside the running queue holds blocks
            # (waiting for a load, or finished with its load still in flight).
            return False
        ok = self.scheduler.reset_prefix_cache(reset_running_requests=running)
        self.note(f"reset_prefix_cache(running={running}) -> {ok}")
        return bool(ok)

    def reset_connector(self) -> bool:
        ok = self.scheduler.reset_connector_cache()
        self.note(f"reset_connector_cache -> {ok}")
        return bool(ok)

    def new_epoch(self) -> None:
        """Model weights change (as after an RL weight update): reset every cache.

        From now on every prefix has new KV; anything cached before must not
        be served. Only at idle: a running request cannot change models.
        """
        if not self.is_idle():
            self.fail("new_epoch needs an idle engine")
        ok = self.scheduler.reset_prefix_cache(reset_connector=True)
        if not ok:
            self.fail("reset_prefix_cache(reset_connector=True) failed on an idle engine")
        self.epoch += 1
        self.note(f"new epoch {self.epoch}: prefix cache and connector reset")

    # ----------------------------------------------------------------- step
    def _run_jobs(self, phase: int) -> None:
        fakes.StepClock.now = float(self.step_no)
        for ex in self.executors:
            ex.step = self.step_no
            rank = ex.rank

            def pick(job: Any, rank: int = rank) -> bool:
                return self.timing.ready(job, self.step_no, phase, rank)

            ex.run(pick)
        ran = 0
        for jobs in self.store_jobs:
            if jobs.queue:
                ran += jobs.run(self.store_rng.randint(0, len(jobs.queue)))
        if ran:
            self._flush()  # their L2 writes, so lookups do not depend on thread timing

    def _answer_lookups(self) -> None:
        """Answer the background L2 lookups whose (seeded) delay has passed."""
        fakes.StepClock.now = float(self.step_no)
        if self.lookups is None:
            return
        most = self.cfg.lookup_delay_steps or 0

        def pick(job: Any) -> bool:
            if job.due is None:
                job.due = job.submitted_step + self._lookup_rng.randint(0, most)
            return bool(self.step_no >= job.due)

        self.lookups.step = self.step_no
        self.lookups.run(pick)

    def _flush(self) -> None:
        for w in self.workers:
            fakes.flush_l2(w)

    def step(self, *, abort_during: Callable[[SchedulerOutput], list[str]] | None = None) -> bool:
        """One engine step. Returns False (and does nothing) when idle."""
        if not self.scheduler.has_requests():
            return False
        self.step_no += 1
        self.counts["steps"] += 1
        for ex in self.executors:
            ex.step = self.step_no
        before = {rid: st.req.num_preemptions for rid, st in self.live.items()}
        self._answer_lookups()
        so = self.scheduler.schedule()
        if self.cfg.vllm_forgets_failed_async_loads:
            self._forget_failed_async_loads()
        preempted = [r for r, n in before.items() if self.live[r].req.num_preemptions > n]
        if preempted:
            self.counts["preemptions"] += len(preempted)
            self.note(f"preempted {preempted}")
        for st in self.live.values():
            self._extend(st)
        self._learn_connector_keys()
        meta = so.kv_connector_metadata
        assert meta is not None
        plans = fakes.load_plans(meta)
        self.load_log.extend((self.step_no, p) for p in plans)
        for p in plans:
            self.counts["loads"] += 1
            self.counts["load_blocks"] += len(p.block_ids)
            self.counts["load_blocks_l2"] += sum(p.from_l2)
            kind = "async" if p.is_async else "sync"
            placed = len(p.block_ids) - p.unplaced
            for i, (b, l2) in enumerate(zip(p.block_ids, p.from_l2, strict=True)):
                self._scrubbed.discard(b)
                self.invalid_unfilled.pop(b, None)
                src = "no slot" if i >= placed else ("from L2" if l2 else "from L1")
                self.block_writer[b] = f"{kind} load of {p.req_id} at step {self.step_no} ({src})"
            self.note(
                f"{kind} load {p.req_id}: {len(p.block_ids)} blocks "
                f"({sum(p.from_l2)} from L2, {p.unplaced} without a slot) into "
                f"{list(p.block_ids)}"
            )

        for rid, slots, blocks in fakes.store_plans(meta):
            for slot, b in zip(slots, blocks, strict=True):
                self.slot_writer[slot] = (rid, self.step_no, b)
        self._run_jobs(0)
        for w in self.workers:
            w.bind_connector_metadata(meta)
            w.handle_preemptions(meta)
        # Blocks vLLM freed while scheduling are first overwritten by this
        # step's forward (the model runner calls handle_preemptions before).
        self._scrub_free_blocks()
        if so.has_sync_kv_loads:
            for w in self.workers:
                w.start_load_kv(self._forward_context)  # type: ignore[arg-type]
            self._flush()
        findings, sampled = self._forward(so)
        if not so.has_sync_kv_loads:
            for w in self.workers:
                w.start_load_kv(self._forward_context)  # type: ignore[arg-type]
            self._flush()
        self._run_jobs(1)
        for w in self.workers:
            w.wait_for_save()
        self._flush()
        self._run_jobs(2)

        outputs: list[ModelRunnerOutput | None] = []
        req_ids = list(so.num_scheduled_tokens)
        for w in self.workers:
            res = w.get_transfer_results(so.finished_req_ids)
            kvo = KVConnectorOutput(
                finished_sending=res.finished_sending or None,
                finished_recving=res.finished_recving or None,
                failed_recving=set(res.failed_recving or ()),
                invalid_block_ids=w.get_block_ids_with_load_errors(),
                kv_connector_stats=w.get_kv_connector_stats(),
                kv_cache_events=w.get_kv_connector_kv_cache_events(),
                kv_connector_worker_meta=w.build_connector_worker_meta(),
            )
            w.clear_connector_metadata()
            if so.total_num_scheduled_tokens == 0:
                out = copy.copy(ModelRunnerOutput.with_kv_conn_output_only(kvo))
            else:
                out = ModelRunnerOutput(
                    req_ids=req_ids,
                    req_id_to_index={r: i for i, r in enumerate(req_ids)},
                    sampled_token_ids=[list(sampled.get(r, [])) for r in req_ids],
                    kv_connector_output=kvo,
                )
            outputs.append(out)
            if kvo.invalid_block_ids or kvo.finished_recving:
                self.note(
                    f"rank {fakes.worker_rank(w)}: finished_recving="
                    f"{sorted(kvo.finished_recving or ())} invalid={sorted(kvo.invalid_block_ids)}"
                )
        mro = self.aggregator.aggregate(outputs, 0)
        assert mro is not None
        if mro.kv_connector_output is not None:
            for b in mro.kv_connector_output.invalid_block_ids:
                self.invalid_unfilled[b] = set()
                self.block_writer[b] = self.block_writer.get(b, "?") + ", reported failed"
        # Aborts that arrive while the model runs (EngineCore processes them
        # right before update_from_output).
        aborted_now: set[str] = set()
        if abort_during is not None:
            for rid in abort_during(so):
                self.abort(rid)
                aborted_now.add(rid)
        self.scheduler.update_from_output(so, mro)
        reported = (
            set(mro.kv_connector_output.invalid_block_ids) if mro.kv_connector_output else set()
        )
        self._after_step(so, findings, aborted_now, reported)
        return True

    def _forget_failed_async_loads(self) -> None:
        sched = self.scheduler
        gone = [
            r
            for r in sched.kv_holding_waiting
            if r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
            and not Scheduler._holds_kv_blocks(r)
        ]
        for r in reversed(gone):
            sched.kv_holding_waiting.remove_request(r)
            sched.waiting.prepend_request(r)
        for r in list(sched._inflight_prefills):
            if r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED) and not any(
                sched.kv_cache_manager.get_block_ids(r.request_id)[0]
            ):
                sched._inflight_prefills.discard(r)

    def _scrub_free_blocks(self) -> None:
        """Fill engine blocks that are free and not in vLLM's prefix cache with NaN.

        Freed memory holds whatever it held; scrubbing it means a load that
        forgets to write a block can never pass because the block happened to
        hold the right KV from an earlier use.
        """
        for blk in self.scheduler.kv_cache_manager.block_pool.blocks:
            b = blk.block_id
            if blk.is_null or blk.ref_cnt or blk.block_hash is not None or b in self._scrubbed:
                continue
            for rank in range(self.cfg.tp):
                for layer in range(self.cfg.num_layers):
                    self.kv[rank][layer][b] = np.nan
            self._scrubbed.add(b)
            self.block_writer[b] = f"scrubbed (free) at step {self.step_no}"

    def _blocks(self, req_id: str) -> list[int]:
        return list(self.scheduler.kv_cache_manager.get_block_ids(req_id)[0])

    def _forward(self, so: SchedulerOutput) -> tuple[list[Finding], dict[str, list[int]]]:
        """The fake model: per layer, write new KV, then read-check the context."""
        cfg = self.cfg
        B = cfg.block_size
        E = cfg.elems_per_token
        batch: list[tuple[ReqState, int, int, np.ndarray]] = []
        nc_of: dict[str, int] = {}
        for new in so.scheduled_new_reqs:
            nc_of[new.req_id] = new.num_computed_tokens
        cached = so.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            nc_of[rid] = cached.num_computed_tokens[i]
        for rid, s in so.num_scheduled_tokens.items():
            st = self.requests[rid]
            self._extend(st)
            nc = nc_of[rid]
            blocks = np.asarray(self._blocks(rid), dtype=np.int64)
            if nc + s > len(blocks) * B:
                self.fail(f"{rid}: {nc}+{s} tokens scheduled but only {len(blocks)} blocks")
            if nc + s > len(st.hashes):
                self.fail(f"{rid}: computes {nc + s} tokens but only {len(st.hashes)} are known")
            batch.append((st, nc, s, blocks))
        poisoned: dict[str, bool] = {st.req_id: False for st, *_ in batch}
        findings: dict[str, Finding] = {}
        for layer in range(cfg.num_layers):
            # 1) every request writes this layer's KV of the tokens it computes
            for st, nc, s, blocks in batch:
                pos = np.arange(nc, nc + s)
                blk = blocks[pos // B]
                off = pos % B
                for rank in range(cfg.tp):
                    rows = self.expected_rows(st.bases[nc : nc + s], rank, layer)
                    if poisoned[st.req_id]:
                        rows = -(rows + 1)
                    self.kv[rank][layer][blk, :, off, :] = rows.reshape(
                        s, cfg.num_kv_heads, 2 * cfg.head_size
                    )
            # 2) attention reads every context position at this layer
            bad_now: list[str] = []
            for st, nc, _s, blocks in batch:
                if nc == 0:
                    continue
                pos = np.arange(nc)
                blk = blocks[pos // B]
                off = pos % B
                for rank in range(cfg.tp):
                    got = self.kv[rank][layer][blk, :, off, :].reshape(nc, E)
                    want = self.expected_rows(st.bases[:nc], rank, layer)
                    wrong = np.nonzero(~np.all(got == want, axis=1))[0]
                    if wrong.size:
                        p = int(wrong[0])
                        f = findings.get(st.req_id)
                        if f is None or (p, layer) < (f.pos, f.layer):
                            findings[st.req_id] = Finding(
                                st.req_id,
                                p,
                                layer,
                                rank,
                                int(blk[p]),
                                float(got[p, 0]),
                                float(want[p, 0]),
                                nc,
                            )
                        bad_now.append(st.req_id)
            for rid in bad_now:
                poisoned[rid] = True
        sampled: dict[str, list[int]] = {}
        for st, nc, s, blocks in batch:
            st.forward_tokens += s
            self.counts["forward_tokens"] += s
            pos = np.arange(nc, nc + s)
            written: list[int] = blocks[pos // B].tolist()
            offsets: list[int] = (pos % B).tolist()
            for blk_id, in_block in zip(written, offsets, strict=True):
                if blk_id in self.invalid_unfilled:
                    self.invalid_unfilled[blk_id].add(in_block)
                    if len(self.invalid_unfilled[blk_id]) == B:
                        del self.invalid_unfilled[blk_id]
            tag = " POISONED" if poisoned[st.req_id] else ""
            for blk_id in sorted(set(written)):
                self._scrubbed.discard(blk_id)
                self.block_writer[blk_id] = f"forward of {st.req_id} at step {self.step_no}{tag}"
            if nc + s >= st.req.num_tokens:
                sampled[st.req_id] = [self.sample(st.hashes[nc + s - 1], poisoned[st.req_id])]
        return list(findings.values()), sampled

    # --------------------------------------------------------------- checks
    def _after_step(
        self,
        so: SchedulerOutput,
        findings: list[Finding],
        aborted_now: set[str],
        reported_invalid: set[int],
    ) -> None:
        for f in findings:
            st = self.requests[f.req_id]
            req = st.req
            s = so.num_scheduled_tokens[f.req_id]
            # vLLM drops a step's output when a connector reported a block of
            # the request invalid (it rolls num_computed_tokens back), and when
            # the request was aborted while the step ran; the latter excuses
            # only a block the connector did report.
            discarded = (
                not req.is_finished() and req.num_computed_tokens < f.num_computed + s
            ) or (f.req_id in aborted_now and f.block_id in reported_invalid)
            if discarded:
                # vLLM dropped this step's output: a connector reported the
                # block invalid and the request recomputes it.
                self.counts["excused_reads"] += 1
                self.note(
                    f"{f.req_id}: wrong KV at pos {f.pos} read in a step vLLM discarded "
                    f"(num_computed -> {req.num_computed_tokens})"
                )
                continue
            B = self.cfg.block_size
            who = "CORE"
            if f.block_id in self.invalid_unfilled:
                who = (
                    "CORE (vLLM: a block reported invalid and not recomputed since was "
                    "served from vLLM's prefix cache)"
                )
            self.fail(
                f"{who}: {f.req_id} read wrong KV at token {f.pos} (block #{f.pos // B} = "
                f"engine block {f.block_id}, slot {f.pos % B}, layer {f.layer}, rank {f.rank}) "
                f"with num_computed_tokens={f.num_computed}: it holds "
                f"{self.describe_value(f.actual)}, expected {self.describe_value(f.expected)}; "
                f"block last written by: {self.block_writer.get(f.block_id, '?')}"
            )
        self._check_tokens()
        self._learn_connector_keys()
        self._check_l1()
        self._check_l2()
        for rid in [r for r, st in self.live.items() if st.req.is_finished()]:
            if rid not in self.scheduler.requests:
                del self.live[rid]
        if self.is_idle():
            self.check_idle()

    def _check_tokens(self) -> None:
        for st in self.live.values():
            req = st.req
            outs = req.output_token_ids
            if len(outs) == st.verified_outputs:
                continue
            self._extend(st)
            for i in range(st.verified_outputs, len(outs)):
                pos = st.prompt_len + i  # position of this output token
                want = self.sample(st.hashes[pos - 1], False)
                if outs[i] != want:
                    self.fail(
                        f"TOKENS: {st.req_id} output #{i} is {outs[i]}, a correct engine "
                        f"emits {want}: it was computed from wrong KV"
                    )
            st.verified_outputs = len(outs)

    def _slot_rows(self, raw: torch.Tensor) -> np.ndarray:
        """Slot bytes -> [layers, B, E] float32 (CPU layout, heads folded into E)."""
        cfg = self.cfg
        arr = (
            raw.numpy()
            .view(np.float32)
            .reshape(cfg.num_layers, cfg.num_kv_heads, cfg.block_size, 2 * cfg.head_size)
        )
        return arr.transpose(0, 2, 1, 3).reshape(
            cfg.num_layers, cfg.block_size, cfg.elems_per_token
        )

    def _block_mismatch(
        self, key: bytes, rank: int, rows: np.ndarray
    ) -> tuple[int, int, float, float] | None:
        """None if ``rows`` are the key's KV on ``rank`` (in an epoch that produced
        the key), else (layer, token, got, want) of the first difference."""
        hs, epochs = self.keymap[key]
        first: tuple[int, int, float, float] | None = None
        for epoch in sorted(epochs, reverse=True):
            bases = np.array([self.base(h, epoch) for h in hs], dtype=np.int64)
            bad_at: tuple[int, int, float, float] | None = None
            for layer in range(self.cfg.num_layers):
                want = self.expected_rows(bases, rank, layer)
                bad = np.nonzero(~np.all(rows[layer] == want, axis=1))[0]
                if bad.size:
                    j = int(bad[0])
                    bad_at = (layer, j, float(rows[layer][j, 0]), float(want[j, 0]))
                    break
            if bad_at is None:
                return None
            first = first or bad_at
        return first

    def _check_l1(self) -> None:
        # A slot a background store has yet to write holds old bytes; the
        # worker waits for the store before anything reads the slot, which
        # the forward's and L2's checks verify.
        pending = [fakes.pending_store_slots(w) for w in self.workers]
        for key, slot in fakes.l1_valid_entries(self.sched_conn):
            if key not in self.keymap:
                self.fail(f"L1: slot {slot} holds key {key.hex()} that no request's tokens give")
            for w, busy in zip(self.workers, pending, strict=True):
                if slot in busy:
                    continue
                rank = fakes.worker_rank(w)
                bad = self._block_mismatch(key, rank, self._slot_rows(fakes.slot_view(w, slot)))
                if bad is not None:
                    layer, j, got, want = bad
                    self.fail(
                        f"L1: slot {slot} is served as key {key.hex()[:12]}, but on rank {rank} "
                        f"layer {layer} token {j} {self.describe_stored(got, want)}; "
                        f"{self._slot_history(slot)}"
                    )

    def _slot_history(self, slot: int) -> str:
        w = self.slot_writer.get(slot)
        if w is None:
            return "no store wrote this slot (it was filled by a load from L2)"
        rid, step, b = w
        return (
            f"the slot was last stored by {rid} at step {step} from engine block {b}, "
            f"last written by: {self.block_writer.get(b, '?')}"
        )

    def _check_l2(self) -> None:
        if self.l2_backend is None:
            return
        seen = self._l2_seen
        dst = torch.empty(self.cfg.slot_bytes, dtype=torch.uint8)
        present = set()
        for skey, value in fakes.l2_items(self.l2_backend):
            present.add(skey)
            if seen.get(skey) is value:
                continue
            seen[skey] = value
            key, rank = skey[:16], int.from_bytes(skey[16:18], "little")
            status = codec.decode_into(value, self.ns_digest, skey, dst)
            if status is not codec.DecodeStatus.OK:
                self.fail(f"L2: value of {skey.hex()} does not decode: {status.value}")
            if key not in self.keymap:
                self.fail(f"L2: key {key.hex()} that no request's tokens give")
            bad = self._block_mismatch(key, rank, self._slot_rows(dst))
            if bad is not None:
                layer, j, got, want = bad
                self.fail(
                    f"L2: the value written for key {key.hex()[:12]} rank {rank} is wrong: at "
                    f"layer {layer} token {j} {self.describe_stored(got, want)}"
                )
        for skey in list(seen):
            if skey not in present:
                del seen[skey]

    def check_idle(self) -> None:
        """No request left: nothing may be pinned, pending, tracked or queued."""
        self.counts["idle_checks"] += 1
        self._deliver_abandoned_loads()
        ps = fakes.pool_state(self.sched_conn)
        held = ("slots_pinned", "pending_keys", "loads", "trackers")
        leaks = {k: ps[k] for k in held if ps.get(k)}
        if leaks:
            self.fail(f"IDLE: the connector still holds {leaks} with no request left ({ps})")
        tracked = [fakes.inflight_loads(w) for w in self.workers]
        if any(tracked):
            self.fail(f"IDLE: workers still track async loads per rank: {tracked}")
        # Loads abandoned at their deadline may still be running; let them end
        # (they must not write anything: later checks would see it).
        fakes.StepClock.now = float(self.step_no)
        for ex in self.executors:
            ex.run()
        for jobs in self.store_jobs:
            jobs.run()
        self._flush()
        self._check_l1()  # what those late jobs wrote must not touch a servable slot
        self._check_l2()
        bp = self.scheduler.kv_cache_manager.block_pool
        free = bp.get_num_free_blocks()
        if free != bp.num_gpu_blocks - 1:
            self.fail(f"IDLE: vLLM block pool has {free} free of {bp.num_gpu_blocks - 1}")

    def _deliver_abandoned_loads(self) -> None:
        """Let loads abandoned at their deadline end and report, as the next step would.

        Their slots stay reserved until their threads stop; at idle vLLM runs
        no step that would carry the report, so the simulation hands it over.
        """
        if not any(fakes.abandoned_loads(w) for w in self.workers):
            return
        for ex in self.executors:
            ex.run()
        metas = []
        for w in self.workers:
            w.get_finished(set())
            metas.append(w.build_connector_worker_meta())
        agg = None
        for m in metas:
            if m is not None:
                agg = m if agg is None else agg.aggregate(m)
        if agg is not None:
            self.sched_conn.update_connector_output(KVConnectorOutput(kv_connector_worker_meta=agg))

    # ------------------------------------------------------------- helpers
    def run_until_idle(self, max_steps: int = 500) -> int:
        n = 0
        while self.step():
            n += 1
            if n > max_steps:
                stuck = {rid: st.req.status.name for rid, st in self.live.items()}
                self.fail(f"LIVENESS: not idle after {max_steps} steps; left: {stuck}")
        if not self.is_idle():
            self.fail("step() stopped but the scheduler still holds requests")
        self.check_idle()
        return n

    def shutdown(self) -> None:
        for w in self.workers:
            w.shutdown()
        self.sched_conn.shutdown()
        if self._own_l2 is not None:
            fakes.drop_shared_memory_l2(self._own_l2)
        if self._clock:
            self._clock = False
            fakes.StepClock.release()


def random_tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(FIRST_TOKEN, VOCAB) for _ in range(n)]


# ----------------------------------------------------------------- workload
@dataclass
class Workload:
    """Rates of a random workload; every draw comes from the simulation's seed."""

    steps: int = 300
    arrival_rate: float = 0.4  # chance per step that requests arrive
    max_live: int = 9
    num_prefixes: int = 5
    repeat_rate: float = 0.25  # a new prompt repeats an earlier one exactly
    fresh_rate: float = 0.15  # a new prompt shares nothing
    max_tail: int = 40
    max_tokens: tuple[int, int] = (1, 6)
    abort_rate: float = 0.03
    abort_during_rate: float = 0.01
    reset_rate: float = 0.01  # per step: one of the three resets
    drain_every: int = 100  # stop arrivals until idle, check, maybe new epoch
    epoch_rate: float = 0.3  # at a drain: weights change (full reset)
    fail_rate: float = 0.08  # a load on a rank stops partway
    drop_rate: float = 0.05  # an L2 key vanishes right before a rank fetches it
    max_load_delay: int = 3
    drain_deadline: int = 300  # steps a drain may take before it counts as a hang


def run_workload(sim: Sim, wl: Workload) -> None:
    """Drive ``sim`` with a random workload, then drain it to idle."""
    rng = sim.rng
    B = sim.cfg.block_size
    sim.faults.fail_rate = wl.fail_rate
    sim.faults.drop_rate = wl.drop_rate
    sim.timing.max_delay = wl.max_load_delay
    prefixes = [
        random_tokens(rng, rng.randint(1, 5) * B + rng.choice([0, 0, rng.randrange(1, B)]))
        for _ in range(wl.num_prefixes)
    ]
    prompts: list[list[int]] = []
    limit = sim.cfg.max_model_len - wl.max_tokens[1]
    max_prompt = (sim.cfg.num_gpu_blocks - 2) * B - wl.max_tokens[1]

    def new_prompt() -> list[int]:
        r = rng.random()
        if prompts and r < wl.repeat_rate:
            p = list(rng.choice(prompts))
        elif r < wl.repeat_rate + wl.fresh_rate:
            p = random_tokens(rng, rng.randint(1, 4 * B))
        else:
            p = list(rng.choice(prefixes)) + random_tokens(rng, rng.randint(0, wl.max_tail))
            if prompts and rng.random() < 0.3:  # extend an earlier prompt (multi-turn)
                p = list(rng.choice(prompts)) + random_tokens(rng, rng.randint(1, wl.max_tail))
        p = p[: min(limit, max_prompt)] or random_tokens(rng, 1)
        prompts.append(p)
        return p

    def abort_during(so: SchedulerOutput) -> list[str]:
        if rng.random() < wl.abort_during_rate and so.num_scheduled_tokens:
            return [rng.choice(sorted(so.num_scheduled_tokens))]
        return []

    draining = False
    drain_started = 0
    done = 0
    while done < wl.steps or not sim.is_idle():
        if not draining and (
            done >= wl.steps or (done and wl.drain_every and done % wl.drain_every == 0)
        ):
            draining, drain_started = True, done
        if draining and done - drain_started > wl.drain_deadline:
            stuck = {rid: st.req.status.name for rid, st in sim.live.items()}
            sim.fail(
                f"LIVENESS: still not idle {wl.drain_deadline} steps after arrivals "
                f"stopped; left: {stuck}"
            )
        if draining and sim.is_idle():
            sim.check_idle()
            if done >= wl.steps:
                break
            if rng.random() < wl.epoch_rate:
                sim.new_epoch()
            draining = False
        if not draining and len(sim.live) < wl.max_live and rng.random() < wl.arrival_rate:
            for _ in range(rng.choice([1, 1, 1, 2, 3])):
                sim.add_request(new_prompt(), rng.randint(*wl.max_tokens))
        # No aborts while draining: a request that never finishes must show as a hang.
        if not draining and sim.live and rng.random() < wl.abort_rate:
            waiting = sim.waiting_for_load()
            pool = waiting if waiting and rng.random() < 0.5 else sorted(sim.live)
            sim.abort(rng.choice(pool))
        if rng.random() < wl.reset_rate:
            kind = rng.randrange(3)
            if kind == 0:
                sim.reset_prefix_cache()
            elif kind == 1:
                sim.reset_prefix_cache(running=True)
            else:
                sim.reset_connector()
        sim.step(abort_during=None if draining else abort_during)  # idle: time passes
        done += 1
    sim.run_until_idle()
