"""Search service: a JSON API and a plain web page over one in-memory `Searcher`.

    GET  /api/search?q=...      text search          POST /api/search/audio   search by an uploaded file
    GET  /api/like/{clip_id}    more like this       GET  /api/clips/{clip_id} tags, windows, metadata
    GET  /api/audio/{clip_id}   the original file (byte ranges)              GET  /api/info   model, labels
    GET  /api/runs              every run: counts, time, commits             GET  /api/labels label counts
    GET  /metrics               Prometheus text      GET  /  and  /runs       the web pages (search, runs)

Every input is bounded (query length, k, upload size and type, clip_id format); a bad request gets a
4xx with `{"error": "..."}`, never a traceback. Audio is only ever read from the URI that the current
table records for a clip_id, never from a path a client sends.
"""

# No `from __future__ import annotations` here: FastAPI evaluates route signatures, and some refer to
# create_app's arguments.
import logging
import threading
import time
from pathlib import Path as FilePath
from typing import Annotated

from fastapi import Depends, FastAPI, File, Header, HTTPException, Path, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline import __version__
from pipeline.service.catalog import Catalog
from pipeline.service.runs import LabelCounts, Runs
from pipeline.audio.decode import DecodeError
from pipeline.service.media import AUDIO_TYPES, RangeNotSatisfiable, SourceFile, content_type, parse_range
from pipeline.service.metrics import Metrics, MetricsMiddleware
from pipeline.retrieval.search import Filters, Searcher, SearchError
from pipeline.service.service_models import ClipOut, ErrorOut, InfoOut, LabelsOut, RunsOut, SearchOut

log = logging.getLogger(__name__)

MAX_QUERY_CHARS = 1000
MAX_K = 100
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
CLIP_ID = r"^[0-9a-f]{20}$"
STATIC = FilePath(__file__).with_name("static")

ClipId = Annotated[str, Path(pattern=CLIP_ID, description="20 hex characters (from a search hit)")]
K = Annotated[int, Query(ge=1, le=MAX_K, description="number of hits")]
Segments = Annotated[bool, Query(description="hits are 10 s windows (start_s, end_s), not whole clips")]


def errors(*codes: int) -> dict:
    """OpenAPI entries for the error statuses a route can answer with."""
    return {code: {"model": ErrorOut} for code in codes}


def filters(label: Annotated[str | None, Query(max_length=200, description="AST label to filter on")] = None,
            min_score: Annotated[float, Query(ge=0, le=1, description="minimum score for `label`")] = 0.3,
            min_duration: Annotated[float | None, Query(ge=0, le=86_400, description="seconds")] = None,
            uri_prefix: Annotated[str | None, Query(max_length=MAX_QUERY_CHARS)] = None) -> Filters:
    """Search filters from query parameters (FastAPI dependency)."""
    return Filters(label=label or None, min_score=min_score, min_duration_s=min_duration,
                   uri_prefix=uri_prefix or None)


class _Engine:
    """The Searcher and the catalog; model calls are serialised (torch already uses every core, and the
    Searcher loads its encoders lazily), vector search runs concurrently."""

    def __init__(self, searcher: Searcher, catalog: Catalog):
        self.searcher, self.catalog = searcher, catalog
        self._lock = threading.Lock()

    def text(self, query: str, k: int, f: Filters, segments: bool) -> dict:
        started = time.perf_counter()
        with self._lock:
            vector = self.searcher.embed_text([query])[0]
        return self._hits(self.searcher.vector(vector, k, f, segments), started)

    def audio(self, data: bytes, k: int, f: Filters, segments: bool) -> dict:
        started = time.perf_counter()
        with self._lock:
            vector = self.searcher.embed_audio(data)
        return self._hits(self.searcher.vector(vector, k, f, segments), started)

    def like(self, clip_id: str, k: int, f: Filters, segments: bool) -> dict:
        started = time.perf_counter()
        if clip_id not in self.catalog:
            raise HTTPException(404, f"unknown clip_id {clip_id}")
        try:
            hits = self.searcher.like(clip_id, k, f, segments)
        except SearchError as e:
            if "unknown clip_id" not in str(e):
                raise
            raise HTTPException(404, f"clip {clip_id} is not in the search index (it failed to decode, "
                                     f"or is newer than the index)") from e
        return self._hits(hits, started)

    def _hits(self, hits, started: float) -> dict:
        return {"hits": [{**h.to_dict(), "labels": self.catalog.labels(h.clip_id)} for h in hits],
                "took_ms": round((time.perf_counter() - started) * 1000, 2), "stale_index": self.searcher.stale}


def create_app(output: str, searcher: Searcher | None = None, exact: bool = False, clap_model: str | None = None,
               max_upload_bytes: int = MAX_UPLOAD_BYTES, preload: bool = True) -> FastAPI:
    """The app for the tagging output `output` (local path or URI) with its index under OUTPUT/_index.

    `preload` loads the CLAP text tower and the IVF-PQ now rather than on the first query (the audio
    tower still loads on the first upload; float16 vector shards on the first query that needs them)."""
    searcher = searcher or Searcher(output, exact=exact, clap_model=clap_model)
    engine = _Engine(searcher, Catalog(output, searcher.info["settings_hash"]))
    if preload:
        searcher.embed_text(["warm-up"])
        searcher.warm()
    runs, label_counts = Runs(output), LabelCounts(output)
    metrics = Metrics()
    max_body = max_upload_bytes + 64 * 1024  # the file plus multipart framing
    app = FastAPI(title="Audio search", version=__version__, description=__doc__)
    app.add_middleware(ContentLengthLimit, max_bytes=max_body)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    _error_handlers(app)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/runs", include_in_schema=False)
    def runs_page() -> FileResponse:
        return FileResponse(STATIC / "runs.html", media_type="text/html")

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/api/info", response_model=InfoOut)
    def info() -> dict:
        i = searcher.info
        return {"model": i["model"], "labels": searcher.labels, "rows": i["rows"], "live": i["live"],
                "versions": i["versions"], "stale_index": searcher.stale,
                "limits": {"max_query_chars": MAX_QUERY_CHARS, "max_k": MAX_K, "max_upload_bytes": max_upload_bytes}}

    @app.get("/api/search", response_model=SearchOut, responses=errors(400, 422))
    def search_text(q: Annotated[str, Query(min_length=1, max_length=MAX_QUERY_CHARS, description="text query")],
                    f: Annotated[Filters, Depends(filters)], k: K = 10, segments: Segments = False) -> dict:
        if not q.strip():
            raise HTTPException(400, "the query is blank")
        return engine.text(q.strip(), k, f, segments)

    @app.post("/api/search/audio", response_model=SearchOut, max_body_size=max_body,
              responses=errors(400, 413, 415, 422))
    def search_audio(file: Annotated[UploadFile, File(description=f"an audio file, at most {max_upload_bytes} bytes")],
                     f: Annotated[Filters, Depends(filters)], k: K = 10, segments: Segments = False) -> dict:
        return engine.audio(_read_upload(file, max_upload_bytes), k, f, segments)

    @app.get("/api/like/{clip_id}", response_model=SearchOut, responses=errors(400, 404, 422))
    def like(clip_id: ClipId, f: Annotated[Filters, Depends(filters)], k: K = 10, segments: Segments = False) -> dict:
        return engine.like(clip_id, k, f, segments)

    @app.get("/api/clips/{clip_id}", response_model=ClipOut, responses=errors(404, 422))
    def clip(clip_id: ClipId) -> dict:
        details = engine.catalog.details(clip_id)
        if details is None:
            raise HTTPException(404, f"unknown clip_id {clip_id}")
        return details

    @app.get("/api/audio/{clip_id}", response_class=StreamingResponse,
             responses={200: {"content": {"audio/*": {}}, "description": "the whole file"},
                        206: {"content": {"audio/*": {}}, "description": "the requested byte range"},
                        **errors(404, 416, 422, 502)})
    def audio(request: Request, clip_id: ClipId,
              range_: Annotated[str | None, Header(alias="Range")] = None) -> Response:
        """The clip's original file, read from its storage; only clips with status ok (the indexed ones)."""
        return _audio_response(engine.catalog, clip_id, range_, head=request.method == "HEAD")

    @app.get("/api/runs", response_model=RunsOut)
    def list_runs() -> dict:
        """Every run, newest first (at most 500): its summary's counts and its commits to the clips table."""
        return runs()

    @app.get("/api/labels", response_model=LabelsOut)
    def label_distribution() -> dict:
        """Clips per AST label (among each clip's top-k labels) in the current clips table, most first."""
        return label_counts()

    app.add_api_route("/api/audio/{clip_id}", audio, methods=["HEAD"], include_in_schema=False)
    log.info("search service over %s: %s clips indexed, model %s", output, searcher.info["live"].get("clips"),
             searcher.model.get("source"))
    return app


def serve(output: str, host: str = "127.0.0.1", port: int = 8000, **app_options) -> None:
    """Run the app with uvicorn until interrupted; logs go through the root logger."""
    import uvicorn

    uvicorn.run(create_app(output, **app_options), host=host, port=port, log_config=None)


class ContentLengthLimit:
    """ASGI middleware: a request declaring a body over `max_bytes` gets a JSON 413 before any of it is
    read. (Bodies without a Content-Length are cut off by the upload route's own `max_body_size`.)"""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            declared = dict(scope["headers"]).get(b"content-length", b"")
            if declared.isdigit() and int(declared) > self.max_bytes:
                response = JSONResponse({"error": f"the request body is larger than {self.max_bytes} bytes"},
                                        status_code=413, headers={"Connection": "close"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _read_upload(file: UploadFile, max_bytes: int) -> bytes:
    """The uploaded bytes, if it looks like audio (content type or extension) and fits in `max_bytes`."""
    kind = (file.content_type or "").split(";")[0].strip().lower()
    ext = FilePath(file.filename or "").suffix.lower()
    if not (kind.startswith("audio/") or ext in AUDIO_TYPES):
        raise HTTPException(415, f"expected an audio file (an audio/* content type or an audio file extension "
                                 f"such as .wav, .flac, .mp3), got {kind or 'no content type'} {ext}".strip())
    data = file.file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise HTTPException(413, f"the upload is larger than {max_bytes} bytes")
    if not data:
        raise HTTPException(400, "the upload is empty")
    return data


def _audio_response(catalog: Catalog, clip_id: str, range_header: str | None, head: bool) -> Response:
    """200 with the whole file or 206 with one byte range, streamed from storage in chunks."""
    uri = catalog.playable_uri(clip_id)
    if uri is None:
        raise HTTPException(404, f"unknown clip_id {clip_id}" if clip_id not in catalog
                            else f"clip {clip_id} has no playable audio (its row has status error)")
    source = _open_source(uri, clip_id)
    try:
        byte_range = parse_range(range_header, source.size)
    except RangeNotSatisfiable as e:
        raise HTTPException(416, str(e), headers={"Content-Range": f"bytes */{source.size}"}) from e
    headers = {"Accept-Ranges": "bytes", "X-Content-Type-Options": "nosniff",
               "Content-Length": str(source.size if byte_range is None else byte_range.length)}
    if byte_range is not None:
        headers["Content-Range"] = f"bytes {byte_range.start}-{byte_range.end}/{source.size}"
    status = 200 if byte_range is None else 206
    if head:
        return Response(status_code=status, media_type=content_type(uri), headers=headers)
    return StreamingResponse(source.read(byte_range), status_code=status, media_type=content_type(uri),
                             headers=headers)


def _open_source(uri: str, clip_id: str) -> SourceFile:
    try:
        return SourceFile(uri)
    except (FileNotFoundError, IsADirectoryError) as e:
        raise HTTPException(404, f"the file of clip {clip_id} is no longer in storage") from e
    except Exception as e:  # the storage layer's own errors (permissions, network, throttling)
        log.warning("cannot open %s: %s: %s", uri, type(e).__name__, e)
        raise HTTPException(502, f"cannot read the file of clip {clip_id} from storage ({type(e).__name__})") from e


def _error_handlers(app: FastAPI) -> None:
    """Every error is `{"error": message}` with a 4xx/5xx status; tracebacks stay in the server log."""

    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return error(422, f"invalid request: {problems}")

    @app.exception_handler(SearchError)
    async def search_error(request: Request, exc: SearchError) -> JSONResponse:
        return error(400, str(exc))

    @app.exception_handler(DecodeError)
    async def decode_error(request: Request, exc: DecodeError) -> JSONResponse:
        return error(400, f"cannot decode the upload: {exc.reason}")

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after this response is sent, so the server logs the traceback.
        return error(500, "internal error (see the server log)")
