"""Typed parts and client-side tools: their schemas, and the rules a request's parts and tools
must follow (roles, counts, sizes), checked at the HTTP edge before anything is stored.

Parts are stored as the plain dicts of storage/models.py (Part). The settings that bound them
(MAX_PARTS, MAX_TOOLS, MAX_TOOL_SCHEMA_BYTES, MAX_INLINE_FILE_BYTES, MAX_MESSAGE_CHARS) are read
per request; the schemas carry only generous hard caps.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import urllib.parse
from typing import Annotated, Any, Literal

import idna
import jsonschema_rs
import orjson
from pydantic import Field

from conversational_core.errors import Unprocessable
from conversational_core.schemas import StrictModel
from conversational_core.settings import Settings
from conversational_core.storage.models import (
    FILE,
    REASONING,
    TEXT,
    TOOL_CALL,
    TOOL_RESULT,
    Part,
    Role,
    is_json_object,
)

HARD_MAX_TEXT = 10_000_000
HARD_MAX_ITEMS = 10_000
# OpenAI's rule for function names (Anthropic's is the same): what every provider accepts.
TOOL_NAME = r"^[A-Za-z0-9_-]{1,64}$"
# Ids of tool calls are the providers' (call_…, toolu_…) or a client's: printable, no spaces.
CALL_ID = r"^[A-Za-z0-9_.:-]{1,128}$"
URL_PATTERN = r"^(https://|data:)"  # (API.md: by https:// reference, or inline)
MIME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}$"


class TextPart(StrictModel):
    type: Literal["text"]
    text: str = Field(max_length=HARD_MAX_TEXT)


class ReasoningPart(StrictModel):
    """The model's visible thinking (assistant messages only; never part of `content`)."""

    type: Literal["reasoning"]
    text: str = Field(max_length=HARD_MAX_TEXT)
    provider_data: dict[str, Any] | None = Field(
        None,
        description="Opaque data of the provider that wrote it (e.g. a signature), sent back "
        "only to that provider.",
    )


class ToolCallPart(StrictModel):
    type: Literal["tool_call"]
    id: str = Field(pattern=CALL_ID)
    name: str = Field(pattern=TOOL_NAME)
    arguments: str = Field(max_length=HARD_MAX_TEXT, description="JSON text.")


class ToolResultPart(StrictModel):
    type: Literal["tool_result"]
    tool_call_id: str = Field(pattern=CALL_ID)
    output: str = Field(max_length=HARD_MAX_TEXT)
    is_error: bool = False


class FilePart(StrictModel):
    """A file by reference. Images are shown to models that accept them."""

    type: Literal["file"]
    url: str = Field(max_length=HARD_MAX_TEXT, pattern=URL_PATTERN)
    mime_type: str | None = Field(None, pattern=MIME_PATTERN)
    name: str | None = Field(None, max_length=255)


PartIn = Annotated[
    TextPart | ReasoningPart | ToolCallPart | ToolResultPart | FilePart,
    Field(discriminator="type"),
]


class ToolSpec(StrictModel):
    name: str = Field(pattern=TOOL_NAME)
    description: str = Field("", max_length=HARD_MAX_TEXT)
    parameters: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object", "properties": {}},
        description="A JSON Schema of the arguments (an object).",
    )


ToolChoice = Annotated[
    str,
    Field(
        pattern=TOOL_NAME,
        description="`auto` (the default when there are tools), `none`, `required`, or the "
        "name of one of the tools (that tool must be called).",
    ),
]


class ToolResultIn(StrictModel):
    tool_call_id: str = Field(pattern=CALL_ID)
    output: str = Field(max_length=HARD_MAX_TEXT)
    is_error: bool = False


class ToolResults(StrictModel):
    results: list[ToolResultIn] = Field(min_length=1, max_length=HARD_MAX_ITEMS)


# Which roles may hold which part types.
_ROLES_OF = {
    TEXT: None,  # any
    FILE: None,
    REASONING: {Role.ASSISTANT},
    TOOL_CALL: {Role.ASSISTANT},
    TOOL_RESULT: {Role.TOOL},
}


def invalid(loc: list[str | int], message: str, kind: str = "value_error") -> Unprocessable:
    # As for schema errors, every element of `loc` is a string (list indexes too).
    where = [str(p) for p in loc]
    return Unprocessable(
        "The request has invalid fields.", errors=[{"loc": where, "type": kind, "msg": message}]
    )


def _json_size(value: Any, loc: list[str | int]) -> int:
    """The size of `value` as JSON; 422 when JSON cannot hold it (an integer over 64 bits in
    free-form data such as a tool's schema: every store and provider would refuse it)."""
    try:
        return len(orjson.dumps(value))
    except orjson.JSONEncodeError:
        raise invalid(loc, "numbers must fit in 64 bits") from None


# data:[<media type>][;<parameter>…][;base64],<data> (RFC 2397)
_DATA_URL = re.compile(r"^data:([^;,]*)((?:;[^;,]*)*),", re.ASCII)


def _check_data_url(url: str, mime_type: str | None, loc: list[str | int]) -> None:
    """A `data:` URL a model can read: its form, its base64 (when it says so), and its media
    type the part's `mime_type` when both are given (a provider would get the two mixed)."""
    match = _DATA_URL.match(url)
    if match is None:
        raise invalid([*loc, "url"], "not a data: URL (data:<type>;base64,<data>)")
    media, params = match.group(1).strip().lower(), match.group(2).lower()
    if params.endswith(";base64"):
        try:
            base64.b64decode(url[match.end() :], validate=True)
        except binascii.Error:
            raise invalid([*loc, "url"], "the data: URL's base64 is not valid") from None
    if media and mime_type is not None and media != mime_type.lower():
        raise invalid([*loc, "mime_type"], "differs from the data: URL's media type")


# A host as DNS names it (letters, digits, hyphens, underscores, dots), or an IPv6 literal.
_HOST = re.compile(r"^(?:[a-z0-9_-]+(?:\.[a-z0-9_-]+)*\.?|\[[0-9a-f:.]+\])$", re.ASCII)
# Names that are this machine or a cloud's metadata service wherever they are resolved (the
# hosts files of Debian, Red Hat and Docker; GCP; AWS), beside `*.localhost` (RFC 6761).
_LOCAL_NAMES = frozenset(
    {
        "localhost",
        "localhost.localdomain",
        "localhost4",
        "localhost4.localdomain4",
        "localhost6",
        "localhost6.localdomain6",
        "ip6-localhost",
        "ip6-loopback",
        "metadata",
        "metadata.google.internal",
        "instance-data",
        "instance-data.ec2.internal",
    }
)
_IPV4_NUMBER = re.compile(r"^(?:0[xX][0-9a-fA-F]*|[0-9]+)$")  # (WHATWG: "ends in a number")
# IPv6 prefixes that carry an IPv4 address in their last 32 bits (NAT64, RFC 6052 and 8215;
# IPv4-compatible and IPv4-translated): the IPv4 address is what is reached.
_EMBEDDING = tuple(
    ipaddress.IPv6Network(n) for n in ("64:ff9b::/96", "64:ff9b:1::/48", "::/96", "::ffff:0:0:0/96")
)


def _whatwg_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address a URL's host is, read as browsers, Node and other WHATWG URL parsers
    read it (parts in decimal, octal with a leading 0, or hex with 0x, even an empty one; fewer
    than four parts; e.g. `127.1`, `2130706433`, `0x7f.0x.0x.1`), or None for a name. ValueError
    for a host that such a parser refuses (a name ending in a number that is no address)."""
    parts = host.split(".")
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()
    if not _IPV4_NUMBER.match(parts[-1]):
        return None
    if len(parts) > 4:
        raise ValueError(host)
    numbers = []
    for part in parts:
        if part[:2] in ("0x", "0X"):
            numbers.append(int(part[2:] or "0", 16))
        elif len(part) > 1 and part[0] == "0":
            numbers.append(int(part[1:], 8))
        else:
            numbers.append(int(part, 10))  # (ValueError for an empty part or a letter)
    *first, last = numbers
    if any(n > 255 for n in first) or last >= 256 ** (5 - len(numbers)):
        raise ValueError(host)
    return ipaddress.IPv4Address(last + sum(n << (8 * (3 - i)) for i, n in enumerate(first)))


def _public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if not address.is_global or address.is_multicast or address.is_reserved:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        if address.is_site_local:
            return False
        embedded = [address.ipv4_mapped, address.sixtofour, *(address.teredo or ())]
        embedded += [
            ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
            for network in _EMBEDDING
            if address in network
        ]
        return all(v4 is None or _public(v4) for v4 in embedded)
    return True


def _check_https_url(url: str, loc: list[str | int]) -> None:
    """A file by reference is fetched by the AI provider (a self-hosted vLLM, TGI or llama.cpp
    server fetches image URLs from inside its own network): a URL that names a loopback,
    private, link-local (cloud metadata, 169.254.169.254) or otherwise non-public address
    would let a user make that server read it. So the host must be a DNS name other than
    this machine's or a metadata service's, or a public IP address, in whatever form a URL
    parser reads it (WHATWG's IPv4 forms, fullwidth digits, an IPv4 address inside an IPv6
    one); and the URL carries no credentials (they would be sent on to the provider and kept in
    the history). A name is not resolved here (what it resolves to when fetched is the
    fetcher's to check)."""
    loc = [*loc, "url"]
    if any(c <= " " or c in "\\\x7f" for c in url):
        raise invalid(loc, "a URL has no spaces, control characters or backslashes")
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # (brackets that hold no IPv6 address, a name NFKC would change)
        raise invalid(loc, "the URL is not valid") from None
    if "@" in parts.netloc:
        raise invalid(loc, "a file URL may not carry credentials (user:password@)")
    host = parts.hostname or ""  # (lowercased, IPv6 without its brackets)
    if not host.isascii():  # as WHATWG parsers map it (UTS #46: fullwidth digits and dots too)
        try:
            host = idna.encode(host, uts46=True).decode("ascii")
        except idna.IDNAError:
            raise invalid(loc, "the URL's host is not a valid name") from None
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number in range
    except ValueError:
        raise invalid(loc, "the URL's port is not valid") from None
    literal = f"[{host}]" if ":" in host else host
    if not host or not _HOST.match(literal):
        raise invalid(loc, "the URL names no valid host")
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    try:
        address = ipaddress.IPv6Address(host) if ":" in host else _whatwg_ipv4(host)
    except ValueError:
        raise invalid(loc, "the URL's host is not a valid address") from None
    name = host.rstrip(".")
    local = name in _LOCAL_NAMES or name.endswith(".localhost")
    if local or (address is not None and not _public(address)):
        raise invalid(
            loc,
            "a file URL must name a public host: not localhost or a metadata service, nor a "
            "loopback, private, link-local, multicast or reserved address",
        )


def check_parts(settings: Settings, role: Role, parts: list[Part], field: str = "parts") -> None:
    """Roles, counts and sizes of a message's parts (already validated by their schema)."""
    _json_size(parts, ["body", field])
    if len(parts) > settings.MAX_PARTS:
        raise invalid(["body", field], f"at most {settings.MAX_PARTS} parts", "too_long")
    chars = 0
    call_ids: set[str] = set()
    for i, part in enumerate(parts):
        kind = part["type"]
        roles = _ROLES_OF[kind]
        if roles is not None and role not in roles:
            raise invalid(["body", field, i], f"a '{kind}' part cannot be in a '{role}' message")
        if kind == FILE:
            url = part["url"]
            if url.startswith("data:") and len(url) > settings.MAX_INLINE_FILE_BYTES:
                raise invalid(
                    ["body", field, i, "url"],
                    f"a data: URL may have at most {settings.MAX_INLINE_FILE_BYTES} bytes; "
                    "give larger files by https:// URL",
                    "too_long",
                )
            if url.startswith("data:"):
                _check_data_url(url, part.get("mime_type"), ["body", field, i])
            else:
                _check_https_url(url, ["body", field, i])
            continue
        if kind == TOOL_CALL:
            if part["id"] in call_ids:
                raise invalid(["body", field, i, "id"], "tool call ids must be unique")
            call_ids.add(part["id"])
            if not is_json_object(part["arguments"] or "{}"):
                raise invalid(["body", field, i, "arguments"], "must be a JSON object as text")
            chars += len(part["arguments"])
        elif kind == TOOL_RESULT:
            chars += len(part["output"])
        else:
            if not part["text"]:  # (as `content`: a text is never empty)
                raise invalid(["body", field, i, "text"], "must not be empty", "string_too_short")
            chars += len(part["text"])
    if chars > settings.MAX_MESSAGE_CHARS:
        raise invalid(
            ["body", field],
            f"at most {settings.MAX_MESSAGE_CHARS} characters in all",
            "string_too_long",
        )


def check_tools(
    settings: Settings, tools: list[dict[str, Any]] | None, tool_choice: str | None
) -> None:
    """Counts and sizes of declared tools; a named tool_choice must name one of them."""
    tools = tools or []
    if len(tools) > settings.MAX_TOOLS:
        raise invalid(["body", "tools"], f"at most {settings.MAX_TOOLS} tools", "too_long")
    names: set[str] = set()
    for i, tool in enumerate(tools):
        if tool["name"] in names:
            raise invalid(["body", "tools", i, "name"], "tool names must be unique")
        names.add(tool["name"])
        if _json_size(tool, ["body", "tools", i]) > settings.MAX_TOOL_SCHEMA_BYTES:
            raise invalid(
                ["body", "tools", i],
                f"a tool may have at most {settings.MAX_TOOL_SCHEMA_BYTES} bytes of JSON",
                "too_long",
            )
        if tool["parameters"].get("type", "object") != "object":
            raise invalid(["body", "tools", i, "parameters"], "must be a JSON Schema object")
        try:
            # Against the meta-schema of JSON Schema 2020-12 (bundled: nothing is fetched),
            # as the providers check it: a schema they would refuse fails here, not each reply.
            jsonschema_rs.meta.validate(tool["parameters"])
        except jsonschema_rs.ValidationError as exc:
            where = ["body", "tools", i, "parameters", *exc.instance_path]
            raise invalid(where, "must be a valid JSON Schema") from None
    if tool_choice not in (None, "auto", "none", "required") and tool_choice not in names:
        raise invalid(["body", "tool_choice"], "must be auto, none, required or a declared tool")
    if tool_choice == "required" and not names:
        raise invalid(["body", "tool_choice"], "`required` needs tools to call")
