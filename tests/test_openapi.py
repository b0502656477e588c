"""The OpenAPI document is the truth: schemathesis (every conformance check) finds nothing, and a
client generated from it by openapi-python-client works for successes and for errors."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import orjson
import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig

from conversational_core.settings import Settings
from conversational_core.storage.factory import Backend
from conversational_core.storage.redis.store import RedisStore
from tests.conftest import make_settings
from tests.fixtures.app import auth
from tests.fixtures.replies import ask, wait_end
from tests.fixtures.server import Service, start_service

# Valid requests may still be answered these, which schemathesis's default list leaves out: a
# cursor or a message id (after/before) the service did not issue (400: unknown opaque values,
# never a schema violation), a message id in a body or `leaf` that is not a message of the
# conversation (422, as the contract says), a Last-Event-ID of the event id's form that the
# conversation cannot have (later than its newest event, or of the other store's form: 422
# before any stream starts, README), and an ETag in If-Match that is stale (412, by RFC 9110);
# tools and tool results that JSON Schema cannot check (a tool_choice naming no declared tool,
# a result for no call of the message, the size settings: 422). (Which cases hypothesis
# generates depends on the service's timing too: the seed alone does not fix them.)
_ALSO_VALID = {
    "createConversation": ["422"],
    "submitToolResults": ["422"],
    "listMessages": ["400", "422"],
    "listConversations": ["400"],
    "listSiblings": ["400"],
    "createMessage": ["422"],
    "forkConversation": ["422"],
    "updateConversation": ["412", "422"],
    "updateMessage": ["412"],
}
_POSITIVE = ["2xx", "401", "403", "404", "409", "429"]
_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    data = tmp_path_factory.mktemp("openapi") / "data"
    env = {
        "REDIS_URL": "",
        "DATA_DIR": str(data),
        "RATE_LIMIT": "off",
        "AI_RATE_LIMIT": "off",
        # Cases without a token are many: their 401s must not turn into 429s.
        "ANONYMOUS_RATE_LIMIT": "off",
        "DEV_PROVIDER_DELAY_MS": "0",
        # Event streams stay open: a second each is enough to check what they send.
        "SSE_MAX_CONNECTION_SECONDS": "1",
    }
    with start_service(env) as running:
        yield running


def _headers() -> dict[str, str]:
    return auth(make_settings(), "alice")


@pytest.fixture(scope="module")
def api_schema(service: Service) -> Any:
    config = SchemathesisConfig.from_dict(
        {
            "seed": 20261130,
            "headers": _headers(),
            "generation": {"mode": "all", "max-examples": 25},
            "checks": {"positive_data_acceptance": {"expected-statuses": _POSITIVE}},
            "operations": [
                *(
                    {
                        "include-operation-id": operation,
                        "checks": {
                            "positive_data_acceptance": {"expected-statuses": [*_POSITIVE, *extra]}
                        },
                    }
                    for operation, extra in _ALSO_VALID.items()
                ),
                {
                    "include-operation-id": "streamEvents",
                    "max-stream-events": 5,
                    "generation": {"max-examples": 10},
                    "checks": {
                        "positive_data_acceptance": {"expected-statuses": [*_POSITIVE, "422"]}
                    },
                },
            ],
        }
    )
    _SERVICE_URL[:] = [service.url]
    return schemathesis.openapi.from_url(f"{service.url}/openapi.json", config=config)


schema = schemathesis.pytest.from_fixture("api_schema")


_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_SERVICE_URL: list[str] = []  # set by api_schema


@schemathesis.hook
def map_path_parameters(
    context: Any, path_parameters: dict[str, Any] | None
) -> dict[str, Any] | None:
    """Three cases in four name objects that exist (a fresh conversation of alice's, with a
    user message and its reply), so that successes are checked too; the fourth keeps its
    random ids (404s). Ids that break the schema are kept: those cases test rejection."""
    if not path_parameters:
        return path_parameters
    cid = path_parameters.get("conversation_id")
    # zlib.crc32, not hash(): the same ids map the same way in every run (hash() of a str
    # changes with each process).
    if not (isinstance(cid, str) and _ID.fullmatch(cid)) or zlib.crc32(cid.encode()) % 4 == 0:
        return path_parameters
    mid = path_parameters.get("message_id")
    if mid is not None and not (isinstance(mid, str) and _ID.fullmatch(mid)):
        return path_parameters
    # Hypothesis replays a case to shrink it and wants the same data each time: these writes
    # must not fail where the service is merely slow (a loaded CI machine), so they get time.
    with httpx.Client(base_url=_SERVICE_URL[0], headers=_headers(), timeout=60) as http:
        created = http.post("/conversations", json={"title": "schemathesis"})
        assert created.status_code == 201, created.text
        real = created.json()["id"]
        asked = http.post(f"/conversations/{real}/messages", json={"content": "hello"})
        assert asked.status_code == 201, asked.text
    mapped = {**path_parameters, "conversation_id": real}
    if mid is not None:
        which = "reply_message_id" if zlib.crc32(mid.encode()) % 2 else "id"
        mapped["message_id"] = asked.json()[which]
    return mapped


@schemathesis.hook
def map_headers(context: Any, headers: dict[str, Any] | None) -> dict[str, Any] | None:
    """A valid Idempotency-Key made unique: generated keys repeat ("0"), and reusing a key with
    another body is rightly a 422 (IETF's Idempotency-Key draft); invalid keys are kept."""
    key = (headers or {}).get("Idempotency-Key")
    if isinstance(key, str) and _KEY.fullmatch(key):
        assert headers is not None
        headers["Idempotency-Key"] = key[:200] + "-" + uuid.uuid4().hex
    return headers


# Every operation is a subtest of this one test: about 40 s alone, more on a loaded CI machine,
# against the suite's 60 s per test (the SSE cases alone hold a stream open a second each).
@pytest.mark.timeout(300)
@schema.parametrize()
def test_every_operation_conforms(case: Any) -> None:
    case.call_and_validate(headers=_headers())


# --- A client generated from the document ----------------------------------------------------


@pytest.fixture(scope="module")
def generated_client(service: Service, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """openapi-python-client's package for /openapi.json, imported."""
    out = tmp_path_factory.mktemp("client")
    document = out / "openapi.json"
    document.write_bytes(httpx.get(f"{service.url}/openapi.json").content)
    generated = subprocess.run(
        [
            sys.executable,
            "-m",
            "openapi_python_client",
            "generate",
            "--path",
            str(document),
            "--output-path",
            str(out / "generated"),
            "--meta",
            "none",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert generated.returncode == 0, generated.stdout + generated.stderr
    sys.path.insert(0, str(out / "generated" / ".."))
    try:
        yield importlib.import_module("generated")
    finally:
        sys.path.remove(str(out / "generated" / ".."))
        for name in [m for m in sys.modules if m == "generated" or m.startswith("generated.")]:
            del sys.modules[name]


def test_generated_client_parses_successes_and_problems(
    service: Service, generated_client: Any, tmp_path: Path
) -> None:
    client_module = importlib.import_module("generated.client")
    models = importlib.import_module("generated.models")

    def api(module: str) -> Any:
        return importlib.import_module(f"generated.api.{module}")

    conversations = SimpleNamespace(
        create_conversation=api("conversations.create_conversation"),
        get_conversation=api("conversations.get_conversation"),
        update_conversation=api("conversations.update_conversation"),
        list_conversations=api("conversations.list_conversations"),
    )
    messages = SimpleNamespace(
        create_message=api("messages.create_message"),
        list_messages=api("messages.list_messages"),
        cancel_reply=api("messages.cancel_reply"),
    )
    token = _headers()["Authorization"].removeprefix("Bearer ")
    with (
        client_module.AuthenticatedClient(base_url=service.url, token=token) as alice,
        client_module.Client(base_url=service.url) as nobody,
        client_module.AuthenticatedClient(
            base_url=service.url,
            token=auth(make_settings(), "bob")["Authorization"].removeprefix("Bearer "),
        ) as bob,
    ):
        _use_generated_client(alice, nobody, bob, models, conversations, messages)


def _use_generated_client(
    alice: Any, nobody: Any, bob: Any, models: Any, conversations: Any, messages: Any
) -> None:

    created = conversations.create_conversation.sync_detailed(
        client=alice, body=models.ConversationCreate(title="generated")
    )
    assert created.status_code == 201
    conversation = created.parsed
    assert isinstance(conversation, models.ConversationOut)
    assert conversation.title == "generated"
    cid = conversation.id
    etag = created.headers["etag"]

    posted = messages.create_message.sync_detailed(
        cid, client=alice, body=models.MessageCreate(content="hi", respond=False)
    )
    assert posted.status_code == 201 and isinstance(posted.parsed, models.MessageOut)
    page = messages.list_messages.sync_detailed(cid, client=alice)
    assert [m.content for m in page.parsed.items] == ["hi"]

    def problem(response: Any, status: int) -> Any:
        assert response.status_code == status, response.content
        parsed = response.parsed
        assert isinstance(parsed, models.Problem), parsed
        assert parsed.status == status and parsed.detail and parsed.title
        return parsed

    problem(conversations.get_conversation.sync_detailed(cid, client=nobody), 401)
    problem(conversations.get_conversation.sync_detailed(cid, client=bob), 404)
    conversations.update_conversation.sync_detailed(
        cid, client=alice, body=models.ConversationUpdate(title="new"), if_match=etag
    )
    problem(
        conversations.update_conversation.sync_detailed(
            cid, client=alice, body=models.ConversationUpdate(title="newer"), if_match=etag
        ),
        412,
    )
    assistant = messages.create_message.sync_detailed(
        cid, client=alice, body=models.MessageCreate(content="a", role=models.Role.ASSISTANT)
    )
    problem(assistant, 403)
    user = posted.parsed
    problem(messages.cancel_reply.sync_detailed(cid, user.id, client=alice), 409)
    invalid = problem(conversations.list_conversations.sync_detailed(client=alice, limit=1000), 422)
    assert invalid.errors[0].loc == ["query", "limit"]


def test_the_document_names_operations_and_their_problems() -> None:
    from conversational_core.app import create_app

    document = create_app(make_settings()).openapi()
    operations = {
        operation["operationId"]: (path, method, operation)
        for path, methods in document["paths"].items()
        for method, operation in methods.items()
    }
    assert set(operations) == {
        "createConversation",
        "listConversations",
        "getConversation",
        "updateConversation",
        "deleteConversation",
        "createMessage",
        "listMessages",
        "getMessage",
        "updateMessage",
        "deleteMessage",
        "cancelReply",
        "regenerateReply",
        "submitToolResults",
        "listSiblings",
        "forkConversation",
        "streamEvents",
        "getHealth",
        "getReadiness",
        "getLiveness",
    }
    for operation_id, (path, method, operation) in operations.items():
        problems = {
            status: response
            for status, response in operation["responses"].items()
            if status >= "400" and "application/problem+json" in response.get("content", {})
        }
        if path.startswith("/health"):
            assert "security" not in operation
            continue
        assert operation["security"] == [{"bearerAuth": []}], operation_id
        assert {"401", "403", "422", "429", "503"} <= set(problems), operation_id
        if "{conversation_id}" in path:
            assert "404" in problems, operation_id
        if "requestBody" in operation or method in ("post", "put", "patch"):
            assert {"413", "415"} <= set(problems), operation_id
    assert "412" in operations["updateConversation"][2]["responses"]
    assert "409" in operations["cancelReply"][2]["responses"]
    assert "409" in operations["regenerateReply"][2]["responses"]  # not an assistant message
    assert "409" in operations["createMessage"][2]["responses"]  # on_busy=reject
    assert "HTTPValidationError" not in document["components"]["schemas"]
    # The configured limits, not the hard caps of the models.
    schemas = document["components"]["schemas"]
    settings = make_settings()
    assert schemas["MessageCreate"]["properties"]["parts"]["maxItems"] == settings.MAX_PARTS
    assert schemas["ToolResults"]["properties"]["results"]["maxItems"] == settings.MAX_PARTS
    for name in ("MessageCreate", "ConversationCreate", "ConversationUpdate"):
        tools = schemas[name]["properties"]["tools"]
        arrays = [b for b in [tools, *tools.get("anyOf", [])] if b.get("type") == "array"]
        assert [b["maxItems"] for b in arrays] == [settings.MAX_TOOLS], name
    # Every field of a new conversation is optional, and so is its body.
    create = operations["createConversation"][2]
    assert create["requestBody"].get("required") is not True
    assert document["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"


_EVENT_SCHEMAS = {
    "message.delta": "DeltaEvent",
    "message.deleted": "MessageDeletedEvent",
    "conversation.updated": "ConversationEvent",
    "conversation.deleted": "ConversationDeletedEvent",
}


async def test_every_event_matches_its_schema_in_the_document(
    api: httpx.AsyncClient, backend: Backend, settings: Settings
) -> None:
    """The `data` of each event a conversation's stream carries, as sent, against the schema
    the document gives it (a validating or generated client reads them so)."""
    import jsonschema_rs

    from conversational_core.app import create_app

    components = create_app(settings).openapi()["components"]
    cid = (await api.post("/conversations", json={})).json()["id"]
    first = await ask(api, cid, "hello")
    await wait_end(api, cid, first)
    assert (await api.put(f"/conversations/{cid}", json={"title": "Events"})).status_code == 200
    user = (await api.get(f"/conversations/{cid}/messages/{first}")).json()["parent_id"]
    assert (await api.delete(f"/conversations/{cid}/messages/{user}")).status_code == 204
    seen = await backend.store.read_events(cid, None, 1000)
    assert (await api.delete(f"/conversations/{cid}")).status_code == 204
    seen += await backend.store.read_events(cid, seen[-1].id, 1000)
    kinds = {event.type for event in seen}
    assert kinds >= {"message.created", "message.delta", "message.completed", "message.deleted"}
    assert "conversation.updated" in kinds
    # (The embedded store forgets a deleted conversation's log once its clients have the event.)
    assert ("conversation.deleted" in kinds) is isinstance(backend.store, RedisStore)
    for event in seen:
        name = _EVENT_SCHEMAS.get(event.type, "MessageEvent")
        schema = {"$ref": f"#/components/schemas/{name}", "components": components}
        data = orjson.loads(event.data)
        errors = [e.message for e in jsonschema_rs.validator_for(schema).iter_errors(data)]
        assert not errors, (event.type, errors)


def test_the_documents_schemas_say_what_tools_read() -> None:
    """Bounds as JSON Schema keywords (not pydantic's `ge`/`le`, which every tool ignores),
    64-bit integer bounds as the integers they are (not 2**63 as a float), and fields an
    answer leaves out when unset neither nullable nor with a default (generators make those
    required, `T | null`)."""
    from conversational_core.app import create_app

    document = create_app(make_settings()).openapi()
    found: list[str] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("ge", "le", "gt", "lt") and not where.endswith("/properties"):
                    found.append(f"{where}/{key}")
                if key in ("minimum", "maximum") and isinstance(value, float):
                    found.append(f"{where}/{key}={value!r}")
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{where}/{i}")

    walk(document, "")
    assert not found, found
    schemas = document["components"]["schemas"]
    max_tokens = schemas["ConversationCreate"]["properties"]["max_tokens"]["anyOf"][0]
    assert (max_tokens["minimum"], max_tokens["maximum"]) == (1, 1_000_000)
    metadata = schemas["ConversationOut"]["properties"]["metadata"]
    assert metadata["additionalProperties"]["anyOf"][1]["maximum"] == 2**63 - 1
    for model, field in [("Problem", "errors"), ("DeltaEvent", "tool_call_id")]:
        prop = schemas[model]["properties"][field]
        assert "default" not in prop and "anyOf" not in prop, (model, prop)
        assert field not in schemas[model].get("required", [])
