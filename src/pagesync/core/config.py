"""pagesync.yaml: the pydantic models of the config contract, and loading them.

The keys here are a contract with users' files (see shared/DESIGN.md): extend, never rename.
Every model forbids unknown keys, so a typo is an error naming its key path rather than
a setting silently ignored.
"""

from __future__ import annotations

import json
import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from . import dialects, records
from .errors import ConfigError

DEFAULT_CONFIG = "pagesync.yaml"


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Retry(Model):
    """HTTP retries inside one page request (429, 5xx, timeouts, resets)."""

    attempts: int = Field(5, ge=1, description="Tries per request, the first included.")
    backoff: float = Field(0.5, ge=0, description="First backoff in seconds; doubles each try.")
    max_backoff: float = Field(30, ge=0, description="Cap on one backoff, and on Retry-After.")
    task_retries: int = Field(
        2, ge=0, description="Prefect retries of a page task after the HTTP tries are spent."
    )


#: The shortest lease: it is renewed every third of it, through the store's database.
MIN_LEASE_TTL = 2.0


class RateLimit(Model):
    per_second: float = Field(gt=0, description="Requests per second over all partitions.")


class BlockRef(Model):
    """A Prefect Secret block, e.g. `{block: secret/shop-token}`, read when a run starts."""

    block: str = Field(pattern=r"^secret/[a-z0-9-]+$")


Secret = SecretStr | BlockRef


class BearerAuth(Model):
    type: Literal["bearer"]
    token: Secret


class BasicAuth(Model):
    type: Literal["basic"]
    username: str
    password: Secret


class ApiKeyAuth(Model):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    type: Literal["api_key"]
    name: str = "X-API-Key"
    value: Secret
    location: Literal["header", "query"] = Field("header", alias="in")


class OAuth2ClientCredentials(Model):
    """RFC 6749 4.4: a token from `token_url`, refreshed before it expires and on a 401."""

    type: Literal["oauth2_client_credentials"]
    token_url: str
    client_id: str
    client_secret: Secret
    scope: str | None = None
    refresh_before: float = Field(60, ge=0, description="Seconds before expiry to refresh.")


Auth = Annotated[
    BearerAuth | BasicAuth | ApiKeyAuth | OAuth2ClientCredentials, Field(discriminator="type")
]


class Source(Model):
    base_url: str
    headers: dict[str, str] = Field(default_factory=dict)
    timeout: float = Field(30, gt=0)
    retry: Retry = Field(default_factory=Retry)
    rate_limit: RateLimit | None = None
    concurrency: int = Field(4, ge=1, description="Partitions of this source in flight at once.")
    lease_ttl: float = Field(
        300,
        ge=MIN_LEASE_TTL,
        description="Seconds a runner's hold on a partition lasts without renewal: how soon "
        "another runner takes over the partitions of a runner that died.",
    )
    auth: Auth | None = None
    follow_foreign_next: bool = Field(
        False,
        description="Follow next links to other hosts (without credentials) instead of failing.",
    )


Location = Literal["query", "header", "body"]


class Cursor(Model):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    field: str = Field(description="Dotted path of the cursor value in each record.")
    param: str | None = Field(None, description="Query parameter filtering on cursor >= value.")
    start: str | int | float | None = Field(None, description="Where the first sync starts.")
    location: Location = Field(
        "query", alias="in", description="Where param goes: query, header, or body (a dotted path)."
    )


class Match(Model):
    """A response to recognise by status code, and optionally by text in its body."""

    status: int = Field(ge=300, le=599)
    contains: str | None = Field(None, description="Text the body must contain to match.")

    def matches(self, status: int, text: str) -> bool:
        return status == self.status and (self.contains is None or self.contains in text)


class ResponseAction(Match):
    """dlt's response_actions: an answer that means "nothing here" for this request."""

    action: Literal["skip"] = Field(
        "skip", description="skip: the request has no records; the partition completes."
    )


class _Paginator(Model):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    stable_tokens: bool = Field(
        False, description="The paginator's tokens stay valid to resume from after a crash."
    )
    has_more: str | None = Field(
        None, description="Dotted path of a boolean in the body; false means the last page."
    )
    max_pages: int | None = Field(None, ge=1, description="Stop after this many pages.")
    end_of_data: list[Match] = Field(
        default_factory=list,
        description="Answers after the first page that mean there are no more pages.",
    )


class _Injected(_Paginator):
    """A paginator whose token is sent as a query parameter, a header or in the JSON body."""

    param: str = "cursor"
    location: Location = Field(
        "query", alias="in", description="Where the token goes: query, header, or body."
    )


class NextUrlPaginator(_Paginator):
    type: Literal["next_url"]
    path: str = "next_url"


class CursorPaginator(_Injected):
    type: Literal["cursor"]
    path: str


class HeaderCursorPaginator(_Injected):
    type: Literal["header_cursor"]
    header: str = Field("X-Next-Cursor", description="Response header holding the next token.")


class LastRecordPaginator(_Injected):
    """Stripe's starting_after: the next page starts after the last record's value."""

    type: Literal["last_record"]
    field: str = Field("id", description="Dotted path in the last record of the token.")
    param: str = "starting_after"


class GraphQLPaginator(_Paginator):
    """A GraphQL connection: `after: $cursor` from pageInfo.endCursor, hasNextPage the stop."""

    type: Literal["graphql"]
    query: str = Field(description="The query document; it declares the cursor variable.")
    variables: dict[str, Any] = Field(default_factory=dict)
    connection: str = Field(description="Dotted path of the connection, e.g. data.issues.")
    cursor_variable: str = "cursor"


class LinkHeaderPaginator(_Paginator):
    type: Literal["link_header"]
    rel: str = "next"


class OffsetPaginator(_Paginator):
    type: Literal["offset"]
    limit: int = Field(100, ge=1)
    limit_param: str = "limit"
    offset_param: str = "offset"
    total: str | None = Field(None, description="Dotted path of the total count; stop at it.")
    max_offset: int | None = Field(
        None, ge=0, description="The API's largest accepted offset; past it is an error."
    )


class PageNumberPaginator(_Paginator):
    type: Literal["page_number"]
    param: str = "page"
    start: int = 1
    size: int | None = Field(None, ge=1, description="Page size; a shorter page is the last.")
    size_param: str | None = None
    total: str | None = Field(None, description="Dotted path of the total count; stop at it.")
    # Django REST Framework answers the page after the last with 404 "Invalid page.".
    end_of_data: list[Match] = Field(
        default_factory=lambda: [Match(status=404, contains="Invalid page")],
        description="Answers after the first page that mean there are no more pages.",
    )


class SinglePagePaginator(_Paginator):
    type: Literal["single"]


Paginator = Annotated[
    NextUrlPaginator
    | CursorPaginator
    | HeaderCursorPaginator
    | LastRecordPaginator
    | GraphQLPaginator
    | LinkHeaderPaginator
    | OffsetPaginator
    | PageNumberPaginator
    | SinglePagePaginator,
    Field(discriminator="type"),
]


class DatetimePartitions(Model):
    type: Literal["datetime"]
    start: datetime
    end: datetime | None = Field(None, description="Default: now.")
    step: timedelta = Field(timedelta(days=1), description="ISO 8601 duration, e.g. P1D, PT6H.")
    start_param: str | None = None
    end_param: str | None = None
    format: str = "%Y-%m-%dT%H:%M:%SZ"

    @field_validator("start", "end")
    @classmethod
    def _utc(cls, v: datetime | None) -> datetime | None:
        if v is not None and v.tzinfo is None:
            v = v.replace(tzinfo=UTC)
        return v

    @field_validator("step")
    @classmethod
    def _positive(cls, v: timedelta) -> timedelta:
        if v <= timedelta(0):
            raise ValueError("step must be a positive duration such as P1D or PT1H")
        return v


class ListPartitions(Model):
    type: Literal["list"]
    values: list[str | int] = Field(min_length=1)
    param: str | None = Field(None, description="Query parameter; or use {value} in path.")


class ParentPartitions(Model):
    type: Literal["parent"]
    stream: str
    key: str = "id"


Partitions = Annotated[
    DatetimePartitions | ListPartitions | ParentPartitions, Field(discriminator="type")
]


class Checkpoint(Model):
    every_pages: int | None = Field(1, ge=1)
    every_records: int | None = Field(None, ge=1)
    every_seconds: float | None = Field(None, gt=0)


class Nested(Model):
    """How nested values land in SQL: as JSON columns (the default), flattened, or split off."""

    flatten: bool = Field(
        False, description="Nested objects as parent__child columns instead of one JSON column."
    )
    child_tables: list[str] = Field(
        default_factory=list,
        description="Fields holding lists that go into a table <stream>__<field> of their own, "
        "keyed by the record's primary key (_parent_<key>) and the item's position (_index).",
    )


class Schedule(Model):
    cron: str | None = None
    interval: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one(self) -> Schedule:
        if (self.cron is None) == (self.interval is None):
            raise ValueError("give exactly one of cron or interval")
        return self


class Stream(Model):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    source: str
    path: str = Field("", description="Request path (may be omitted by a Python stream class).")
    class_: str | None = Field(
        None, alias="class", description="A Python stream: package.module:ClassName."
    )
    model: str | None = Field(
        None, description="A pydantic model (package.module:Name) records are validated with."
    )
    params: dict[str, str | int | float | bool] = Field(default_factory=dict)
    method: Literal["GET", "POST"] = "GET"
    body: dict[str, Any] | None = Field(
        None, description="JSON body template (a mapping, or a JSON string); implies POST."
    )
    response_actions: list[ResponseAction] = Field(default_factory=list)
    records: str | None = Field(None, description="Dotted path to the record list; none = body.")
    primary_key: list[str] = Field(
        default_factory=list, description="Required when write_disposition is merge."
    )
    write_disposition: Literal["merge", "append", "replace"] = Field(
        "merge",
        description="merge: upsert by primary key. append: insert every record of every run "
        "(no primary key needed), each once per run, resumes included. replace: every run is "
        "a full refresh into a staging table that replaces the table when all partitions "
        "are complete.",
    )
    cursor: Cursor | None = None
    paginator: Paginator = Field(default_factory=lambda: SinglePagePaginator(type="single"))
    partitions: Partitions | None = None
    checkpoint: Checkpoint = Field(default_factory=Checkpoint)
    schedule: Schedule | None = None
    fan_out: Literal["threads", "deployment"] = Field(
        "threads",
        description="threads: partitions run in threads of the stream's flow run. deployment: "
        "in child flow runs of the partition deployment, on any worker of its work pool.",
    )
    fan_out_batch: int = Field(
        2, ge=1, le=100, description="fan_out deployment: partitions per child flow run."
    )
    nested: Nested = Field(default_factory=Nested)

    @field_validator("body", mode="before")
    @classmethod
    def _json_body(cls, v: Any) -> Any:
        if isinstance(v, str):
            try:
                v = json.loads(v)
            except json.JSONDecodeError as e:
                raise ValueError(f"not valid JSON ({e.msg} at character {e.pos})") from None
            if not isinstance(v, dict):
                raise ValueError(f"must be a JSON object, got {type(v).__name__}")
        return v

    @model_validator(mode="after")
    def _path_or_class(self) -> Stream:
        if not self.path and not self.class_:
            raise ValueError("give path (or class, for a Python stream)")
        return self

    @model_validator(mode="after")
    def _keyed_unless_appended(self) -> Stream:
        if self.write_disposition == "merge" and not self.primary_key:
            raise ValueError("primary_key: give the fields that identify a record (or "
                             "write_disposition: append, to insert every record)")  # fmt: skip
        if not self.primary_key and self.nested.child_tables:
            raise ValueError("nested.child_tables: needs a primary_key to key the items by")
        return self

    @model_validator(mode="after")
    def _children_are_not_keys(self) -> Stream:
        keys = sorted(set(self.nested.child_tables) & set(self.primary_key))
        if keys:
            raise ValueError(f"nested.child_tables: {keys[0]!r} is part of the primary key")
        return self


class Config(Model):
    state: str = "sqlite:///pagesync.db"
    destination: str | None = Field(None, description="Default: the state database.")
    sources: dict[str, Source]
    streams: dict[str, Stream]
    #: Where the file was read from; relative paths in it resolve against its folder.
    path: Path | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _references(self) -> Config:
        for name, stream in self.streams.items():
            if stream.source not in self.sources:
                known = ", ".join(sorted(self.sources)) or "none"
                raise ValueError(
                    f"streams.{name}.source: unknown source {stream.source!r} (known: {known})"
                )
            p = stream.partitions
            if isinstance(p, ParentPartitions) and p.stream not in self.streams:
                raise ValueError(f"streams.{name}.partitions.stream: unknown stream {p.stream!r}")
        return self

    @model_validator(mode="after")
    def _table_names_fit(self) -> Config:
        """MySQL/MariaDB refuse names over 64 characters: a stream whose tables would have
        one is refused here, before any page is read."""
        dialect = self.destination_url.split(":", 1)[0].split("+", 1)[0]
        for name, stream in self.streams.items():
            replaces = stream.write_disposition == "replace"
            tables = records.table_names(name, stream.nested.child_tables, replaces=replaces)
            hint = " or nested.child_tables" if stream.nested.child_tables else ""
            for table in tables:
                if why := dialects.too_long(dialect, table):
                    raise ValueError(f"streams.{name}: its table {why} (shorten the name{hint})")
        return self

    @property
    def destination_url(self) -> str:
        return self.destination or self.state

    def extend(
        self,
        *,
        sources: dict[str, Source | dict[str, Any]] | None = None,
        streams: dict[str, Stream | dict[str, Any]] | None = None,
    ) -> Config:
        """This config with more sources and streams (models or plain dicts), validated."""
        data = self.model_dump(by_alias=True, exclude={"path"})
        for key, extra in (("sources", sources), ("streams", streams)):
            for name, value in (extra or {}).items():
                data[key][name] = (
                    value.model_dump(by_alias=True) if isinstance(value, BaseModel) else value
                )
        try:
            config = Config.model_validate(data)
        except ValidationError as e:
            raise ConfigError(_format_errors(e, data), file=str(self.path or "<code>")) from None
        return config.model_copy(update={"path": self.path})

    def stream(self, name: str) -> Stream:
        try:
            return self.streams[name]
        except KeyError:
            known = ", ".join(sorted(self.streams)) or "none"
            raise ConfigError(
                f"unknown stream {name!r} (streams: {known})", file=str(self.path or "")
            ) from None


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: Any, *, file: str, key: str = "") -> Any:
    """Replace ${VAR} (or ${VAR:-default}) in every string, so secrets stay out of the file."""
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            raise ConfigError(f"environment variable {name} is not set", file=file, key=key)

        return _ENV.sub(sub, value)
    if isinstance(value, dict):
        return {
            k: expand_env(v, file=file, key=f"{key}.{k}" if key else str(k))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [expand_env(v, file=file, key=f"{key}[{i}]") for i, v in enumerate(value)]
    return value


def resolve_sqlite(url: str, folder: Path) -> str:
    """Make a relative SQLite or DuckDB file path absolute against the config file's folder."""
    for scheme in ("sqlite", "duckdb"):
        prefix = f"{scheme}:///"
        if url.startswith(prefix) and not url.startswith(f"{scheme}:////"):
            rest = url[len(prefix) :]
            if rest and rest != ":memory:" and not rest.startswith("file:"):
                return prefix + str((folder / rest).resolve())
    return url


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """-c, else $PAGESYNC_CONFIG, else ./pagesync.yaml."""
    return Path(explicit or os.environ.get("PAGESYNC_CONFIG") or DEFAULT_CONFIG)


def _user_path(loc: tuple[Any, ...], data: Any) -> str:
    """The error's key path as the user wrote it: pydantic adds the tag of a tagged union
    (`paginator.offset.limit`), a key that is not in the file."""
    parts: list[str] = []
    for step in loc:
        if str(step).startswith("function-"):
            continue
        if isinstance(data, dict) and step not in data and data.get("type") == step:
            continue
        parts.append(str(step))
        if isinstance(data, dict):
            data = data.get(step)
        elif isinstance(data, list) and isinstance(step, int) and step < len(data):
            data = data[step]
        else:
            data = None
    return ".".join(parts)


def _format_errors(err: ValidationError, data: Any) -> str:
    lines = []
    for e in err.errors():
        loc = _user_path(e["loc"], data)
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(lines)


def parse_config(data: Any, *, file: str = "<config>", folder: Path | None = None) -> Config:
    """Validate a mapping (already read from YAML) into a Config."""
    if not isinstance(data, dict):
        raise ConfigError("the file must be a YAML mapping with sources and streams", file=file)
    data = expand_env(data, file=file)
    folder = folder or Path.cwd()
    data.setdefault("state", Config.model_fields["state"].default)
    for key in ("state", "destination"):
        if isinstance(data.get(key), str):
            data[key] = resolve_sqlite(data[key], folder)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, data), file=file) from None


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read, expand and validate a config file; every failure is a ConfigError."""
    p = config_path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(
            "config file not found (give -c FILE or set PAGESYNC_CONFIG)", file=str(p)
        ) from None
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}", file=str(p)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{where}invalid YAML: {getattr(e, 'problem', e)}", file=str(p)) from None
    config = parse_config(data, file=str(p), folder=p.resolve().parent)
    return config.model_copy(update={"path": p.resolve()})


def json_schema() -> dict[str, Any]:
    """The JSON Schema of pagesync.yaml, from the models (so it cannot drift from them)."""
    schema = Config.model_json_schema(by_alias=True, mode="validation")
    schema["properties"].pop("path", None)
    schema["title"] = "pagesync.yaml"
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
