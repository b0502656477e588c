"""One declaration per operation: the FastAPI signature that documents it also serves it, fast.

FastAPI's own request handling (route matching through included routers, dependency solving,
a model per parameter, a task and closures per request) measured as a third of the cost of the
hottest routes. This service needs none of it: authentication is a middleware, every endpoint
takes the request, its path and header parameters, at most one query model and at most one
JSON body model, and returns a Response. So :class:`Operation`, a FastAPI `APIRoute`, keeps
what FastAPI builds from the signature for the OpenAPI document and serves requests with a plan
made from the same signature once, at start-up:

- path, query and header parameters are each validated as one model (one pydantic pass);
- the body is parsed and validated from its bytes in one pass (`model_validate_json`);
- errors are FastAPI's own `RequestValidationError`, located in `path`, `query`, `header` or
  `body`, so they leave as the same 400/422 problems (see errors.py);
- the endpoint's Response is written straight to the connection (streams are run as such).

Routes are added to the app flat (see :func:`install`), so that a request is matched by one
pass over plain routes, and a 405 names every method of the path in `Allow`.

The OpenAPI side: each operation gets an explicit id, the `Problem` responses of every status it
can answer (see :func:`problem_responses`), and its success schema from `response_model`.
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.asyncexitstack import AsyncExitStackMiddleware
from fastapi.routing import APIRoute
from fastapi.telemetry._asgi import ExceptionTelemetryMiddleware
from pydantic import BaseModel, ValidationError, create_model
from starlette._utils import get_route_path
from starlette.convertors import StringConvertor
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

from conversational_core.errors import BadRequest

Endpoint = Callable[..., Awaitable[Response]]
_CACHED_QUERIES = 512  # per operation, each at most _CACHED_QUERY_BYTES: 128 kB at most
_CACHED_QUERY_BYTES = 256


def _model_of(fields: Sequence[Any], name: str) -> type[BaseModel] | None:
    """One model validating a group of parameters (keyed by their aliases), or the model a
    single parameter is declared as (`Annotated[SomeQuery, Query()]`)."""
    if not fields:
        return None
    if len(fields) == 1:
        annotation = fields[0].field_info.annotation
        if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
            return annotation
    return create_model(  # type: ignore[call-overload,no-any-return]
        name, **{f.name: (f.field_info.annotation, f.field_info) for f in fields}
    )


def _patterns(fields: Sequence[Any]) -> list[tuple[str, re.Pattern[str]]] | None:
    """Path parameters that are plain strings with a pattern (every id here) are checked with
    the compiled pattern: a model pass costs a microsecond more, on every request."""
    checks = []
    for field in fields:
        info = field.field_info
        constraints = [getattr(m, "pattern", None) for m in info.metadata]
        if info.annotation is not str or len(constraints) != 1 or constraints[0] is None:
            return None
        checks.append((str(field.alias), re.compile(constraints[0])))
    return checks


_IMMUTABLE = (str, int, float, bool, type(None))


def _immutable(annotation: Any) -> bool:
    """Whether every value of a field is immutable (str, int, float, bool, None, a literal
    of them, or a union of those)."""
    if annotation in _IMMUTABLE:
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return all(isinstance(value, _IMMUTABLE) for value in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return all(_immutable(arg) for arg in typing.get_args(annotation))
    return False


def _invalid(exc: ValidationError, where: str) -> RequestValidationError:
    return RequestValidationError([{**e, "loc": (where, *e["loc"])} for e in exc.errors()])


class Operation(APIRoute):
    """An APIRoute served by a plan made from its endpoint's signature (module docstring)."""

    def __init__(self, path: str, endpoint: Endpoint, **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        dependant = self.dependant
        unsupported = [
            what
            for what, present in (
                ("dependencies", dependant.dependencies),
                ("cookies", dependant.cookie_params),
                ("several bodies", len(dependant.body_params) > 1),
            )
            if present
        ]
        if unsupported:
            raise TypeError(f"{endpoint.__name__}: Operation does not serve {unsupported}")
        self._call = endpoint
        self._request_name = dependant.request_param_name
        self._path_patterns = _patterns(dependant.path_params)
        self._path = (
            None
            if self._path_patterns is not None
            else _model_of(dependant.path_params, f"{endpoint.__name__}Path")
        )
        self._query = _model_of(dependant.query_params, f"{endpoint.__name__}Query")
        self._headers = _model_of(dependant.header_params, f"{endpoint.__name__}Headers")
        # The argument a single model parameter is passed as (else its fields are spread).
        self._query_name = self._single_model_name(dependant.query_params)
        # Validated queries by their raw bytes: clients repeat a handful (`limit=50`), and
        # parsing one costs ~15 us (Starlette's QueryParams, then the model), a twentieth of a
        # page read. Only models an endpoint cannot change are shared (frozen, or spread
        # into immutable values); cleared when full, so unique queries cost what they did.
        query = self._query
        shareable = (
            query is not None
            and all(_immutable(f.annotation) for f in query.model_fields.values())
            and (self._query_name is None or bool(query.model_config.get("frozen")))
        )
        self._query_cache: dict[bytes, BaseModel] | None = {} if shareable else None
        self._header_aliases = [f.alias for f in dependant.header_params]
        self._body: type[BaseModel] | None = None
        self._body_name: str | None = None
        self._body_optional = False  # `body: Model | None = None`: an empty body is None
        if dependant.body_params:
            body = dependant.body_params[0]
            annotation = body.field_info.annotation
            options = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(options) == 1 and len(typing.get_args(annotation)) == 2:
                annotation, self._body_optional = options[0], True
            if not (inspect.isclass(annotation) and issubclass(annotation, BaseModel)):
                raise TypeError(f"{endpoint.__name__}: the body must be one pydantic model")
            self._body, self._body_name = annotation, body.name
        self.methods: set[str] = self.methods or {"GET"}
        self.allow = sorted(self.methods)  # every method of the path (set by install)
        self.app = self._serve
        self._plain = all(isinstance(c, StringConvertor) for c in self.param_convertors.values())

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        """Starlette's and FastAPI's match, for a route whose parameters are plain strings
        (every one here): ~0.5 us a route tried instead of ~1.5 (no convertor per
        parameter, no lookup of an included router's context: routes are installed flat), and
        a request tries every route before its own."""
        if not self._plain:
            return super().matches(scope)
        if scope["type"] != "http":
            return Match.NONE, {}
        found = self.path_regex.match(
            get_route_path(scope) if scope.get("root_path") else scope["path"]
        )
        if found is None:
            return Match.NONE, {}
        params = found.groupdict()
        outer = scope.get("path_params")
        if outer:
            params = {**outer, **params}
        child = {"endpoint": self.endpoint, "path_params": params, "route": self}
        return (Match.FULL if scope["method"] in self.methods else Match.PARTIAL), child

    @staticmethod
    def _single_model_name(fields: Sequence[Any]) -> str | None:
        if len(fields) == 1:
            annotation = fields[0].field_info.annotation
            if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
                return str(fields[0].name)
        return None

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] not in self.methods:
            raise HTTPException(405, headers={"Allow": ", ".join(self.allow)})
        await self._serve(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        arguments = await self._arguments(request)
        response = await self._call(**arguments)
        body = getattr(response, "body", None)  # streams (SSE) have none: they run themselves
        if body is None or response.background is not None:
            await response(scope, receive, send)
            return
        await send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": response.raw_headers,
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _arguments(self, request: Request) -> dict[str, Any]:
        arguments: dict[str, Any] = {}
        if self._request_name is not None:
            arguments[self._request_name] = request
        if self._path_patterns is not None:
            values = request.path_params
            for name, pattern in self._path_patterns:
                value = values[name]
                if pattern.fullmatch(value) is None:
                    raise RequestValidationError(
                        [
                            {
                                "loc": ("path", name),
                                "type": "string_pattern_mismatch",
                                "msg": f"String should match pattern '{pattern.pattern}'",
                            }
                        ]
                    )
                arguments[name] = value
        elif self._path is not None:
            try:
                path = self._path.model_validate(request.path_params)
            except ValidationError as exc:
                raise _invalid(exc, "path") from None
            arguments.update(path.__dict__)  # (iterating a model costs 3 µs; its dict, none)
        if self._query is not None:
            raw_query: bytes = request.scope["query_string"]
            cache = self._query_cache
            query = cache.get(raw_query) if cache is not None else None
            if query is None:
                try:
                    query = self._query.model_validate(dict(request.query_params))
                except ValidationError as exc:
                    raise _invalid(exc, "query") from None
                if cache is not None and len(raw_query) <= _CACHED_QUERY_BYTES:
                    if len(cache) >= _CACHED_QUERIES:
                        cache.clear()
                    cache[raw_query] = query
            if self._query_name is not None:
                arguments[self._query_name] = query
            else:
                arguments.update(query.__dict__)
        if self._headers is not None:
            headers = request.headers
            raw = {alias: headers[alias] for alias in self._header_aliases if alias in headers}
            try:
                arguments.update(self._headers.model_validate(raw).__dict__)
            except ValidationError as exc:
                raise _invalid(exc, "header") from None
        if self._body is not None:
            assert self._body_name is not None
            arguments[self._body_name] = await self._parse_body(
                request, self._body, self._body_optional
            )
        return arguments

    @staticmethod
    async def _parse_body(
        request: Request, model: type[BaseModel], optional: bool
    ) -> BaseModel | None:
        try:
            raw = await request.body()
        except ClientDisconnect:  # gone mid-upload: nothing to answer, nothing to report
            raise BadRequest("The request body could not be read.") from None
        if not raw or (optional and raw.strip() == b"null"):
            if optional:
                return None
            raise RequestValidationError(
                [{"loc": ("body",), "type": "missing", "msg": "Field required"}]
            )
        try:
            # Strict: a JSON value of another type than the field's is a 422 (`"10"` for an
            # integer, `1` or `"yes"` for a boolean), as the document's schemas say; JSON's own
            # forms are still read (ISO timestamps, enum values, an integer for a number).
            return model.model_validate_json(raw, strict=True)
        except ValidationError as exc:
            raise _invalid(exc, "body") from None


def _without_unused_layers(app: FastAPI) -> None:
    """FastAPI wraps every request in two layers that no Operation uses: its exception
    telemetry (off here: see app.py) and an AsyncExitStack in the scope for the files of its
    own request handler (which Operations replace). Each costs a coroutine and its context on
    every request, ~2% of a page read together. They are left out of the stack while every
    FastAPI route of the app is an Operation (a route served by FastAPI's handler needs the
    stack: it would be kept)."""
    build = app.build_middleware_stack

    def build_without() -> ASGIApp:
        top = build()
        handled_by_fastapi = any(
            isinstance(route, APIRoute) and not isinstance(route, Operation)
            for route in app.router.routes
        )
        unused: tuple[type, ...] = (ExceptionTelemetryMiddleware,)
        if not handled_by_fastapi:
            unused += (AsyncExitStackMiddleware,)
        layer: Any = top
        while hasattr(layer, "app"):  # (down to the router's own `app`, a method)
            inner: Any = layer.app
            if isinstance(inner, unused):
                layer.app = typing.cast(Any, inner).app
            else:
                layer = inner
        return top

    app.build_middleware_stack = build_without  # type: ignore[method-assign]


def install(app: FastAPI, routes: Sequence[BaseRoute]) -> None:
    """Add `routes` to the app flat, in order (the hottest first) and before FastAPI's own (its
    documentation's: they are tried first otherwise), and let each Operation's 405 name every
    method its path answers."""
    methods: dict[str, set[str]] = {}
    for route in routes:
        if isinstance(route, APIRoute):
            methods.setdefault(route.path, set()).update(route.methods or ())
    for route in routes:
        if isinstance(route, Operation):
            route.allow = sorted(methods[route.path])
    app.router.routes[:0] = routes
    _without_unused_layers(app)
