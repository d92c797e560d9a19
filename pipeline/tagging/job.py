"""The tagging job: list -> featurize (CPU tasks) -> AST actors -> CLAP actors -> aggregate + write (tasks).

`build_dataset` is the Ray Data chain; `run_tag_job` lists inputs into a feed while one execution of the
chain runs over it, collects the part files the workers wrote (and finishes the few files split across
their batches), commits complete files in shards as it streams, and writes the summary.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import re
import secrets
import time
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import ray
from ray.data.exceptions import ExecutionTimeoutError

import pipeline
from pipeline.tagging.aggregate import ZeroShot
from pipeline.store import delta, faults
from pipeline.store.settings import check_settings
from pipeline.store.lease import Lease
from pipeline.store.ledger import committed_identity, not_transient
from pipeline.checkpoints import DEFAULT_AST, DEFAULT_CLAP, DEFAULT_PROMPT, describe, label_names, loading, model_config
from pipeline.models.device import resolve_precision
from pipeline.audio.resample_device import DEVICE_RESAMPLER
from pipeline.models.embedder import ClapEmbedder, EmbedderConfig
from pipeline.audio.features_ast import AstFbankConfig
from pipeline.audio.features_clap import ClapMelConfig
from pipeline.tagging.feed import FeedSource, FileFeed, Listing, Watchdog
from pipeline.tagging.featurize import FEATURES_ON, Featurize, FeaturizeConfig, task_memory_bytes
from pipeline.tagging.resources import PlacementError, ResourcePlan, node_shapes, plan_resources
from pipeline.tagging.keyset import KeySet, split_digests
from pipeline.tagging.skip import DoneSet
from pipeline.tagging.sources import FILE_SCHEMA, InputError, ListingConfig, iter_inputs
from pipeline.tagging.progress import Progress
from pipeline.tagging.summary import RunSummary
from pipeline.models.tagger import AstTagger, TaggerConfig
from pipeline.audio.windows import WindowConfig
from pipeline.tagging.sink import Collector, SinkConfig, WriteResults
from pipeline.store.writer import OutputError, check_writable
from schemas import SCHEMA_VERSION, clips_schema, segments_schema

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TagJobConfig:
    """Everything a tagging run needs; sizes in windows unless named otherwise."""

    input: str
    output: str
    ast_model: str = DEFAULT_AST
    clap_model: str = DEFAULT_CLAP
    top_k: int = 5
    batch_size: int | None = None  # windows per model actor call; None: 32 on CPU, 256 on GPU (resources.py)
    micro_batch: int | None = None  # windows per forward pass (fixed shape: batch-independent results);
                                    # None: 1 on CPU, 128 on GPU (resources.py)
    hop_s: float = 10.0
    num_gpus: str | float = "auto"
    precision: str = "auto"  # "fp32", "bf16", or "auto": bf16 when the model actors get GPUs, else fp32
    ast_actors: int | None = None
    clap_actors: int | None = None
    windows_per_block: int = 16
    features_on: str = "cpu"      # "cpu": featurize tasks; "gpu": the model actors, on their device
    long_file_s: float = 1200.0   # featurize tasks reserve memory for files this long; longer ones run
                                  # afterwards in a lane that reserves it for DecodeConfig.max_duration_s
    rows_per_file: int = 20_000
    shard_files: int = 100_000    # files per commit, committed while the run's one execution streams
    flush_every_s: float = 60.0   # commit complete files at least this often: bounds what a kill loses
    stall_timeout_s: float = 600.0  # fail (not wait) when the Ray Data execution makes no progress this long
    max_error_rate: float | None = None  # fraction of processed files; more errors fail the run (exit 1)
    zero_shot_labels: tuple[str, ...] = ()
    zero_shot_prompt: str = DEFAULT_PROMPT
    replace_settings: bool = False  # settings differ from the table's: rebuild it and swap it in at the end
    run_id: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).strftime(
        "%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3))

    def __post_init__(self):
        if not RUN_ID.match(self.run_id):  # it names directories under OUTPUT
            raise ValueError(f"run id {self.run_id!r} must match {RUN_ID.pattern}")
        if self.features_on not in FEATURES_ON:
            raise ValueError(f"features_on must be one of {FEATURES_ON}, got {self.features_on!r}")


RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")


@dataclass(frozen=True)
class ModelStages:
    """Configs derived from the checkpoints: feature settings and model actor settings."""

    featurize: FeaturizeConfig
    tagger: TaggerConfig
    embedder: EmbedderConfig


def model_stages(cfg: TagJobConfig, plan: ResourcePlan, table_precision: str | None = None) -> ModelStages:
    """The stages' configs; `auto` precision takes the table's (`table_precision`) when there is one, so
    the cluster's shape on the night of a run (a GPU node not up yet) never changes the settings."""
    with loading("AST", cfg.ast_model):
        ast_fb = AstFbankConfig.from_pretrained(cfg.ast_model)
    with loading("CLAP", cfg.clap_model):
        clap_mel = ClapMelConfig.from_pretrained(cfg.clap_model)
    featurize = FeaturizeConfig(windows=WindowConfig(hop_s=cfg.hop_s), ast=ast_fb, clap=clap_mel,
                                windows_per_block=cfg.windows_per_block, features_on=cfg.features_on)
    on_actors = cfg.features_on == "gpu"
    micro_batch = cfg.micro_batch or plan.micro_batch
    precision = (table_precision if cfg.precision == "auto" and table_precision else
                 resolve_precision(cfg.precision, plan.gpus_per_actor > 0))
    windows = featurize.windows
    tagger = TaggerConfig(cfg.ast_model, ast_fb.max_length, ast_fb.num_mel_bins, micro_batch,
                          plan.ast_threads, precision, ast_fb if on_actors else None, windows.ast_window_s)
    embedder = EmbedderConfig(cfg.clap_model, (clap_mel.channels, clap_mel.num_frames, clap_mel.num_mel_bins),
                              micro_batch, plan.clap_threads, precision, clap_mel if on_actors else None,
                              windows.clap_window_s)
    return ModelStages(featurize, tagger, embedder)


@dataclass(frozen=True)
class Lane:
    """Files up to `max_s` seconds long, featurized by tasks that reserve `memory` bytes each."""

    max_s: float | None   # None: up to DecodeConfig.max_duration_s
    memory: int


def lanes(cfg: TagJobConfig, featurize: FeaturizeConfig) -> tuple[Lane, Lane]:
    """The short-file lane every file starts in, and the long-file lane for those it hands back. Both
    reservations are capped at 0.9x the largest node's Ray memory, so their tasks always get placed
    (long files one or a few at a time) instead of waiting forever."""
    largest = max((n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    short, long = (task_memory_bytes(featurize, s) for s in (cfg.long_file_s, featurize.decode.max_duration_s))
    if largest and short > 0.9 * largest:
        log.warning("the largest node offers Ray %.2f GB of memory, less than a featurize task may hold for a "
                    "%g s file (%.2f GB): lower --long-file-s or use bigger nodes", largest / 1e9,
                    cfg.long_file_s, short / 1e9)
    cap = int(0.9 * largest) if largest else max(short, long)
    return Lane(cfg.long_file_s, min(short, cap)), Lane(None, min(long, cap))


def build_dataset(source: pa.Table | ray.actor.ActorHandle, stages: ModelStages, plan: ResourcePlan,
                  batch_size: int, lane: Lane | None = None, sink: SinkConfig | None = None,
                  sink_batch: int = 256) -> ray.data.Dataset:
    """The pipeline as one Ray Data chain over input files, a table of them or a `FileFeed` the listing
    fills while the chain runs: window rows with model outputs, or with `sink`, one SINK_SCHEMA row per
    batch of `sink_batch` windows the workers aggregated and wrote."""
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1))) if ray.is_initialized() else 1
    memory = {"memory": lane.memory} if lane else {}
    featurize = Featurize(stages.featurize, lane.max_s if lane else None)
    if isinstance(source, pa.Table):
        # Files per featurize task: each task costs Ray scheduling, a fresh unpickled stage and a memory
        # poll thread; ~8 tasks per CPU still balances the tail. At most 16 (tasks stream their blocks).
        per_block = max(1, min(16, math.ceil(len(source) / (8 * cpus))))
        blocks = [source.slice(i, per_block) for i in range(0, len(source), per_block)]
        # tasks, spread over the nodes (Ray Data's default scheduling strategy)
        dataset = ray.data.from_arrow(blocks).map_batches(featurize, batch_format="pyarrow", batch_size=None,
                                                          num_cpus=1, **memory)
    else:
        # a featurize task per CPU the model actors leave, each taking files from the feed all run long
        dataset = ray.data.read_datasource(FeedSource(source, featurize, featurize_tasks(plan, cpus), FEED_TAKE),
                                           num_cpus=1, override_num_blocks=1, **memory)
        # a featurize task's window blocks leave it one by one (Ray Data would gather them to 128 MiB)
        dataset.context.target_max_block_size = int(0.7 * stages.featurize.block_bytes)
    # model actors stay on this node while it lives (a plan whose fractional shares fit only together), else
    # go anywhere: a node-id label selector with a fallback (what NodeAffinitySchedulingStrategy(soft=True)
    # did; remote args passed as **kwargs are removed in Ray 2.64)
    pinned = {"label_selector": {NODE_ID_LABEL: plan.node},
              "fallback_strategy": [{"label_selector": {NODE_ID_LABEL: f"!{plan.node}"}}]} if plan.node else {}
    dataset = (
        dataset
        # The model actors' own runtime env (MODEL_ENV) also keeps Ray from fusing the featurize tasks
        # into them (it fuses when remote args match), which would decode in the few model actors
        .map_batches(AstTagger, fn_constructor_args=(stages.tagger,), batch_format="pyarrow",
                     batch_size=batch_size, num_cpus=plan.ast_cpus, num_gpus=plan.gpus_per_actor,
                     compute=ray.data.ActorPoolStrategy(size=plan.ast_actors), runtime_env=MODEL_ENV, **pinned)
        .map_batches(ClapEmbedder, fn_constructor_args=(stages.embedder,), batch_format="pyarrow",
                     batch_size=batch_size, num_cpus=plan.clap_cpus, num_gpus=plan.gpus_per_actor,
                     compute=ray.data.ActorPoolStrategy(size=plan.clap_actors), runtime_env=MODEL_ENV, **pinned)
    )
    if sink is None:
        return dataset
    # Long-lived sink actors (aggregate ~7 KB per window, write two zstd Parquet parts), asking for no CPU:
    # the featurize tasks hold every CPU the model actors leave. Not tasks: with every CPU's worker busy,
    # each sink task found no idle worker, and Ray stops a surplus worker after 1 s idle, so sink tasks
    # further apart than that each started a worker process (~2.5 s of CPU: 3-7 ms a clip in
    # benchmarks.cpu_cost, where a run is 800 clips). The pool grows from one with the queue.
    return dataset.map_batches(WriteResults, fn_constructor_args=(sink,), batch_format="pyarrow",
                               batch_size=sink_batch, num_cpus=0,
                               compute=ray.data.ActorPoolStrategy(min_size=1, max_size=sink_actors(cpus)))


def sink_actors(cpus: int) -> int:
    """Most sink actors a run grows to: one aggregates and writes ~5,900 one-window files per CPU-second in
    256-window batches (`benchmarks/results/part_files.json`, the sink call; 8 H100s take ~8,800 windows/s),
    so one per 64 CPUs, at least one."""
    return max(1, math.ceil(cpus / 64))


FEED_TAKE = 16   # files a featurize task takes from the feed at a time


def featurize_tasks(plan: ResourcePlan, cpus: int) -> int:
    """Featurize tasks of a run with a feed: the CPUs the model actors leave, at least one."""
    actors = plan.ast_actors * plan.ast_cpus + plan.clap_actors * plan.clap_cpus
    return max(1, math.floor(cpus - actors + 1e-9))


NODE_ID_LABEL = "ray.io/node-id"  # Ray's default label on every node

# OpenMP threads of idle model actors sleep instead of spinning: with spinning, a tiny model at 2 threads
# on a busy 2-core machine burnt 235 ms of CPU per window instead of 11 (BENCHMARKS.md, CPU cost).
MODEL_ENV = {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}


def run_metadata(cfg: TagJobConfig, stages: ModelStages, plan: ResourcePlan) -> tuple[dict, delta.Settings]:
    """What produced the output (models, feature settings, versions), and the settings: all that decides
    the results, hashed (a rerun with another hash reprocesses every file, or is refused). The micro-batch
    and the device are not settings: results are batch-independent, and fp32 on a GPU matches fp32 on CPU,
    within the parity bounds (a few ulps); they are recorded in `compute`."""
    features = {"featurize": _jsonable(asdict(stages.featurize))}
    if stages.featurize.features_on == "gpu":  # the actors resample (the workers' soxr settings do not apply)
        features["resample_on_actors"] = DEVICE_RESAMPLER
    with loading("AST", cfg.ast_model):
        ast = describe(cfg.ast_model).to_dict()
    with loading("CLAP", cfg.clap_model):
        clap = describe(cfg.clap_model).to_dict()
    models = {"ast": ast, "clap": clap}
    values = {"features": features, "models": models, "top_k": cfg.top_k, "schema": SCHEMA_VERSION,
              "precision": stages.tagger.precision,
              "zero_shot": [list(cfg.zero_shot_labels), cfg.zero_shot_prompt] if cfg.zero_shot_labels else None}
    settings = delta.Settings(hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16], values)
    compute = {"precision": stages.tagger.precision, "device": "gpu" if plan.gpus_per_actor > 0 else "cpu",
               "micro_batch": stages.tagger.micro_batch}
    metadata = {"pipeline_version": pipeline.__version__, "schema_version": SCHEMA_VERSION, "run_id": cfg.run_id,
                "models": models, "features": features, "compute": compute, "settings_hash": settings.hash,
                "top_k": cfg.top_k, "zero_shot": values["zero_shot"]}
    return metadata, settings


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return sorted(value) if isinstance(value, (set, frozenset)) else [_jsonable(v) for v in value]
    return value


def run_tag_job(cfg: TagJobConfig) -> dict:
    """Run one tagging pass; returns the summary dict (also logged and saved under OUTPUT/_runs/).

    Holds OUTPUT's lease for the whole run (a second run is refused at once), finishes a shard an earlier
    run left half-committed, then skips files already tagged with the same models and settings (same
    clip_id, size, modified time and etag in the current table) and processes the rest in one Ray Data
    execution, committing completed files every `shard_files` files or `flush_every_s` seconds as it
    streams (a settings change with `replace_settings`: into staging tables, swapped in at the end).
    """
    check_writable(cfg.output)
    with Lease(cfg.output, cfg.run_id, purpose="tag") as lease:   # before any work: a second run stops here
        faults.point("lease-acquired")
        if not ray.is_initialized():
            ray.init()
        summary = RunSummary(cfg.run_id, cfg.max_error_rate)
        plan = plan_resources(node_shapes(), cfg.num_gpus, cfg.ast_actors, cfg.clap_actors, cfg.features_on)
        delta.recover(cfg.output)
        clips = delta.open_table(cfg.output, "clips")
        table = delta.table_settings_values(clips) if clips is not None else None
        stages = model_stages(cfg, plan, (table or {}).get("precision"))
        metadata, settings = run_metadata(cfg, stages, plan)
        _warn_untrained(metadata)
        replace = check_settings(cfg.output, table, delta.table_settings(clips) if clips else None, settings,
                                 cfg.replace_settings)
        target = cfg.output
        if replace:   # shards go to staging tables, swapped in when the run ends
            target = delta.staging(cfg.output, settings.hash, clips.version())
            delta.recover(target)
            if delta.open_table(target, "clips") is not None:
                log.info("resuming the replacement an earlier run staged in %s/clips/%s", cfg.output, target.directory)
        skip = SkipCheck.build(target, settings.hash)
        commits = Commits(cfg, settings, skip, lease, target)
        _tag(cfg, stages, plan, metadata, summary, Progress(summary), skip, commits)
        commits.finish()
        if not commits.shards:
            log.info("nothing new to process: all %d listed files are unchanged since a committed run", summary.files_seen)
        summary.finish()
        summary.log()
        try:
            log.info("summary written to %s", summary.save(cfg.output))
        except OSError as e:  # the run is committed; a missing summary file must not fail it
            log.warning("run committed, but its summary could not be saved under OUTPUT/_runs: %s", e)
        faults.point("summary-saved")
    return summary.to_dict()


class Commits:
    """A run's shard commits: each `commit` adds completed files' parts to both Delta tables of `target`
    as its next shard (delta.commit_shard), replacing the rows they reprocess. `target` is OUTPUT, or for
    a settings change the staging tables (delta.Staging), which `finish` swaps in as one shard that
    replaces OUTPUT's tables: readers never see a partial table, and a killed replacement resumes."""

    def __init__(self, cfg: TagJobConfig, settings: delta.Settings, skip: "SkipCheck", lease: Lease, target: str):
        self.cfg, self.settings, self.skip, self.lease, self.target = cfg, settings, skip, lease, target
        self.seq = delta.shard_seq(delta.open_table(target, "clips"))
        self.schemas = table_schemas(cfg)
        self.shards = 0
        self.last = time.monotonic()

    @property
    def parts_dir(self) -> str:
        """Where the parts go under each table's root: "" (the run's folder), or the staging tables'."""
        return self.target.directory if isinstance(self.target, delta.Staging) else ""

    def due(self, ready: int) -> bool:
        """`ready` completed files are enough for a shard, or have waited `flush_every_s`."""
        return ready >= self.cfg.shard_files or (ready > 0 and time.monotonic() - self.last >= self.cfg.flush_every_s)

    def commit(self, parts: dict[str, list[str]], clip_ids: pa.Array) -> None:
        self.last = time.monotonic()
        if not len(clip_ids):
            return
        faults.point("parts-written")
        self.shards += 1
        self.lease.check()
        self.seq += 1
        delta.commit_shard(self.target, self.seq, self.cfg.run_id, self.settings, parts, self.schemas,
                           self.skip.replaced(clip_ids), fault=faults.point)

    def finish(self) -> None:
        """Swap a replacement's staging tables in (also one that an earlier, killed run staged whole)."""
        if isinstance(self.target, delta.Staging) and delta.open_table(self.target, "clips") is not None:
            self.lease.check()
            delta.swap_in(self.cfg.output, self.target, self.cfg.run_id, self.settings, self.schemas,
                          fault=lambda step: faults.point(f"swap-{step}"))


def _new_files(chunks, skip: "SkipCheck", summary: RunSummary):
    """Tables of the new or changed files among listing chunks, as they arrive."""
    for chunk in chunks:
        todo = skip.new_or_changed(chunk)
        summary.files_seen += len(chunk)
        summary.skipped_unchanged += len(chunk) - len(todo)
        if len(todo):
            yield todo


def _tag(cfg: TagJobConfig, stages: ModelStages, plan: ResourcePlan, metadata: dict, summary: RunSummary,
         progress: Progress, skip: "SkipCheck", commits: Commits) -> None:
    """List the input into a feed while one Ray Data execution featurizes, tags and writes the files it
    holds, and commit what is complete as it streams; then the files too long for the short-file lane,
    in a second execution.

    The workers aggregate and write the windows of every file that is whole in a batch (pipeline/tagging/sink.py);
    the driver only collects their part lists and summary counts, and aggregates the rare files whose
    windows were split across batches, writing their clip rows itself."""
    schemas = table_schemas(cfg)
    sink = SinkConfig(cfg.output, cfg.run_id, tuple(label_names(cfg.ast_model)), cfg.top_k, schemas["segments"],
                      schemas["clips"], json.dumps(metadata, sort_keys=True), _zero_shot(cfg), commits.parts_dir)
    collector = Collector(sink, summary, cfg.rows_per_file)
    short, long = lanes(cfg, stages.featurize)
    log.info("featurize tasks reserve %.2f GB for files up to %g s; longer files run afterwards, "
             "reserving %.2f GB each", short.memory / 1e9, short.max_s, long.memory / 1e9)
    batch_size = cfg.batch_size or plan.batch_size
    # on the driver's node: a run survives losing any other node, and its feed must too
    here = {"label_selector": {NODE_ID_LABEL: ray.get_runtime_context().get_node_id()}}
    feed = FileFeed.options(**here).remote(FEED_QUEUE)
    try:
        listing = Listing(feed, _new_files(iter_inputs(ListingConfig(cfg.input)), skip, summary))
        listing.start()
        listing.first.wait()
        passes = [(short, feed)] if listing.fed else []   # nothing new: no execution, no actors started
        while passes:
            lane, source = passes.pop(0)
            progress.started()
            dataset = build_dataset(source, stages, plan, batch_size, lane, sink, min(cfg.rows_per_file, 8 * batch_size))
            for batch in _stream(dataset, cfg.stall_timeout_s, plan, listing if source is feed else None):
                for row in range(len(batch)):   # a row per sink batch of 256 to 2,048 windows
                    left = collector.add(batch.slice(row, 1))
                    if source is feed:   # acknowledged before the next row (~1 ms)
                        ray.get(feed.done.remote(left))
                    if commits.due(collector.ready):
                        commits.commit(*collector.take())
                        progress.tick(force=True)
                progress.tick()
            progress.listing_done = True
            lost = ray.get(feed.lost.remote()) if source is feed else None
            if lost is not None:   # taken by featurize tasks on a node that was lost: processed again
                log.warning("%d files were in flight on a lost node: processing them again", len(lost))
                collector.forget(lost.column("clip_id").to_pylist())
                passes.append((short, lost))
            if collector.handed_back:
                files = _files(pa.concat_tables(collector.handed_back))
                collector.handed_back = []
                log.info("%d files are longer than %g s: featurizing them in the long-file lane", len(files), short.max_s)
                passes.append((long, files))
        commits.commit(*collector.finish())
        fed = listing.result()   # the listing's error, if it failed (the files it fed are committed)
        if not summary.files_seen:
            raise InputError(f"input {cfg.input} lists no audio files: nothing to tag (check the path, the "
                             "extensions, or the manifest)")
        if collector.clip_rows != fed:
            raise RuntimeError(f"wrote {collector.clip_rows} clip rows for {fed} input files")
    finally:   # the feed ends with the run, not with the driver (a Ray session may run many)
        ray.kill(feed)


FEED_QUEUE = 100_000   # listed files waiting in the feed (~200 B each)


def _stream(dataset: ray.data.Dataset, stall_timeout_s: float, plan: ResourcePlan, listing: Listing | None = None):
    """The dataset's output batches; a stall (no progress for `stall_timeout_s`, e.g. an actor or task
    that can never be scheduled) fails the job with the plan and the free resources. Over a feed, waiting
    for the listing is not a stall: a watchdog that knows the listing replaces Ray Data's guard."""
    dataset.context.execution_no_progress_timeout_s = stall_timeout_s if listing is None else -1
    dataset.context.raise_original_map_exception = True  # an OutputError from the workers' sink reaches us as one
    watchdog = Watchdog(stall_timeout_s if listing is not None else -1, listing.activity if listing else None)
    watchdog.start()
    try:
        for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            watchdog.alive()
            yield batch
    except (ExecutionTimeoutError, KeyboardInterrupt) as e:
        if isinstance(e, KeyboardInterrupt) and not watchdog.stalled:
            raise
        free = {k: round(v, 2) for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
        raise PlacementError(f"the job made no progress for {stall_timeout_s:g} s and was stopped rather than "
                             f"left waiting. Resource plan: {plan}. Nodes: {_describe_nodes()}. Free now: "
                             f"{free}. Ray Data said: {str(e) or 'nothing (over the feed the watchdog stopped it)'}") from e
    except Exception as e:
        cause = _output_error(e)
        if cause is None:
            raise
        raise cause from e  # the workers' sink could not write OUTPUT (disk full, permissions): say so
    finally:
        watchdog.stop()


def _output_error(e: BaseException | None) -> OutputError | None:
    """The OutputError behind a Ray task error (Ray wraps a worker's exception), if there is one."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OutputError):
            return e
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    return None


def _describe_nodes() -> str:
    return "; ".join(f"{n['node_id'][:12]} CPU {n.get('CPU', 0):g} GPU {n.get('GPU', 0):g}" for n in node_shapes())


def _files(handed_back: pa.Table) -> pa.Table:
    """FILE_SCHEMA rows of the files a lane handed back as too long for it."""
    files = handed_back.select([n for n in FILE_SCHEMA.names if n != "listing_error"])
    return files.append_column("listing_error", pa.nulls(len(files), pa.string()))


def _zero_shot(cfg: TagJobConfig) -> ZeroShot | None:
    if not cfg.zero_shot_labels:
        return None
    from pipeline.retrieval.encoders import TextEncoder

    encoder = TextEncoder(cfg.clap_model)
    texts = [cfg.zero_shot_prompt.format(label=label) for label in cfg.zero_shot_labels]
    return ZeroShot(tuple(cfg.zero_shot_labels), encoder(texts), encoder.logit_scale)


def table_schemas(cfg: TagJobConfig) -> dict[str, pa.Schema]:
    """The clips and segments schemas for these checkpoints' label count and embedding widths."""
    dims = (len(label_names(cfg.ast_model)), _hidden(cfg.ast_model), _projection(cfg.clap_model))
    return {"segments": segments_schema(*dims), "clips": clips_schema(*dims)}


def _concat(*tables: pa.Table | None) -> pa.Table | None:
    present = [t for t in tables if t is not None]
    return pa.concat_tables(present) if present else None


class SkipCheck:
    """What a run may skip and what its commits replace, read once from the current table (streamed in
    record batches; the lease keeps it from changing under the run but through the run's own commits):
    the identities of done files (DoneSet, 16 B each) and the clip_ids with a row in the table (16 B each)."""

    def __init__(self, done: DoneSet, current: KeySet):
        self.done, self.current = done, current

    @classmethod
    def build(cls, output: str, settings_hash: str | None) -> "SkipCheck":
        """From the current table if it has `settings_hash`; empty for None (a replacement redoes all)."""
        done, current = DoneSet(), KeySet()
        for batch in committed_identity(output, settings_hash) if settings_hash else ():
            current.add(*_id_hashes(batch.column("clip_id")))
            done.add(not_transient(pa.Table.from_batches([batch])))
        return cls(done, current)

    def new_or_changed(self, listed: pa.Table) -> pa.Table:
        return self.done.new_or_changed(listed) if len(self.done) and len(listed) else listed

    def replaced(self, clip_ids: pa.Array | pa.ChunkedArray) -> pa.Array:
        """Those of `clip_ids` that have a row in the current table."""
        ids = pa.chunked_array([clip_ids], pa.string()).combine_chunks()
        if not len(ids) or not len(self.current):
            return ids.slice(0, 0)
        return ids.filter(pa.array(self.current.contains(*_id_hashes(ids))))


def _id_hashes(clip_ids) -> tuple:
    """128-bit hashes of clip_id strings, as KeySet takes them."""
    values = clip_ids.cast(pa.binary()).to_pylist()
    return split_digests(b"".join(hashlib.blake2b(v, digest_size=16).digest() for v in values))


def _new_or_changed(listed: pa.Table, done: pa.Table | None) -> pa.Table:
    """Listed files whose (clip_id, size, modified, etag) is not among the done ones: an anti-join on
    128-bit hashes of the identity (skip.DoneSet, no Python object per done row); a null matches a null."""
    if done is None or not len(listed):
        return listed
    return DoneSet(done).new_or_changed(listed)


def _warn_untrained(metadata: dict) -> None:
    for name in ("ast", "clap"):
        if metadata["models"][name]["untrained"]:
            log.warning("%s checkpoint %s is UNTRAINED (random weights): its outputs carry no meaning",
                        name.upper(), metadata["models"][name]["source"])


def _hidden(source: str) -> int:
    return model_config(source).hidden_size


def _projection(source: str) -> int:
    return model_config(source).projection_dim
