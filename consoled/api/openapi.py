"""The management listener's OpenAPI 3.1 document, written by hand (``GET /openapi.json``).

Every route of ``consoled.api.ROUTES`` is here, with /, /healthz, /metrics and
this document; tests/test_api.py checks that, and runs schemathesis against
the live listener with it.
"""

from __future__ import annotations

import copy
from typing import Any

_NULLABLE_INT = {"type": ["integer", "null"]}
_NULLABLE_STR = {"type": ["string", "null"]}
_ISO = {"type": "string", "description": "UTC, ISO 8601 (2026-12-03T10:00:00Z)"}

_FAULT_NAMES = {
    400: "badRequest",
    401: "unauthorized",
    404: "itemNotFound",
    405: "badMethod",
    409: "conflictingRequest",
    413: "overLimit",
    503: "serviceUnavailable",
}


def _fault_schema() -> dict[str, Any]:
    inner = {
        "type": "object",
        "required": ["code", "message"],
        "properties": {"code": {"type": "integer"}, "message": {"type": "string"}},
    }
    return {
        "type": "object",
        "description": "nova's error body: one key naming the fault, e.g. "
        '{"badRequest": {"code": 400, "message": "Invalid input for field/attribute length: …"}}',
        "minProperties": 1,
        "maxProperties": 1,
        "additionalProperties": inner,
    }


def _fault(code: int, what: str) -> dict[str, Any]:
    return {
        "description": f"{what} ({_FAULT_NAMES[code]})",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Fault"}}},
    }


def _faults(*codes: int) -> dict[str, Any]:
    words = {
        400: "bad input, naming the field",
        401: "no known X-Auth-Token",
        404: "not found",
        405: "method not allowed",
        409: "conflict",
        413: "request body too large",
        503: "unavailable",
    }
    return {str(code): _fault(code, words[code]) for code in (401, 405, *codes)}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _body(schema: dict[str, Any], example: Any) -> dict[str, Any]:
    return {
        "required": True,
        "content": {"application/json": {"schema": schema, "example": example}},
    }


def _path_param(name: str, description: str, schema: dict[str, Any] | None = None) -> dict:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": schema or {"type": "string"},
    }


def _query(name: str, description: str, max_length: int) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": {"type": "string", "maxLength": max_length, "pattern": "^[^\\x00]*$"},
    }


_SERVER = _path_param("server_id", "the instance's UUID (nova's server id)")
_TOKEN = _path_param("console_token", "a console token (never logged)")
_SESSION = _path_param("session_id", "a session's id (consoled-manage session list)")
_FILTERS = [
    _query("instance_uuid", "only this instance's", 36),
    _query("host", "only this compute host's", 255),
]
_VERSION_HEADER = {
    "name": "OpenStack-API-Version",
    "in": "header",
    "required": False,
    "description": "compute microversion, e.g. 'compute 2.99' (tls_port from 2.99)",
    "schema": {"type": "string"},
}

_SCHEMAS: dict[str, Any] = {
    "Fault": _fault_schema(),
    "Version": {
        "type": "object",
        "required": ["id", "status", "version", "min_version"],
        "properties": {
            "id": {"type": "string"},
            "status": {"type": "string"},
            "version": {"type": "string"},
            "min_version": {"type": "string"},
            "updated": {"type": "string"},
            "links": {"type": "array", "items": {"type": "object"}},
        },
    },
    "Console": {
        "type": "object",
        "required": ["instance_uuid", "host", "port", "internal_access_path"],
        "properties": {
            "instance_uuid": {"type": "string"},
            "host": {"type": "string"},
            "port": {"type": "integer"},
            "internal_access_path": _NULLABLE_STR,
            "tls_port": _NULLABLE_INT,
        },
    },
    "Connection": {
        "type": "object",
        "description": "a token row without its token; only the first 8 hex of its hash",
        "required": [
            "instance_uuid",
            "console_type",
            "host",
            "port",
            "tls_port",
            "internal_access_path",
            "expires",
            "token_hash_prefix",
        ],
        "properties": {
            "instance_uuid": {"type": "string"},
            "console_type": {"type": "string"},
            "host": {"type": "string"},
            "port": {"type": "integer"},
            "tls_port": _NULLABLE_INT,
            "internal_access_path": _NULLABLE_STR,
            "expires": _ISO,
            "token_hash_prefix": {"type": "string", "maxLength": 8},
        },
    },
    "Session": {
        "type": "object",
        "required": [
            "id",
            "instance_uuid",
            "console_type",
            "host",
            "port",
            "token_hash_prefix",
            "door",
            "client_address",
            "mode",
            "proxy",
            "started_at",
            "touched_at",
            "bytes_to_client",
            "bytes_to_server",
            "kick_requested",
        ],
        "properties": {
            "id": {"type": "integer"},
            "instance_uuid": {"type": "string"},
            "console_type": {"type": "string"},
            "host": {"type": "string"},
            "port": {"type": "integer"},
            "token_hash_prefix": {"type": "string", "maxLength": 8},
            "door": {"type": "string"},
            "client_address": {"type": "string"},
            "mode": {"type": "string", "description": "writer or spectator"},
            "proxy": {"type": "string", "description": "the proxy holding the session"},
            "started_at": _ISO,
            "touched_at": _ISO,
            "bytes_to_client": {"type": "integer"},
            "bytes_to_server": {"type": "integer"},
            "kick_requested": {"type": "boolean"},
        },
    },
}

_KEY = [{"X-Auth-Token": []}]


def _paths() -> dict[str, Any]:
    return {
        "/": {
            "get": {
                "summary": "Versions",
                "security": [],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["versions"],
                            "properties": {"versions": {"type": "array", "items": _ref("Version")}},
                        },
                        "the versions answered",
                    )
                },
            }
        },
        "/healthz": {
            "get": {
                "summary": "Health, for a load balancer",
                "security": [],
                "responses": {
                    code: _json(
                        {
                            "type": "object",
                            "required": ["status", "store", "doors"],
                            "properties": {
                                "status": {"enum": ["ok", "failing"]},
                                "store": {"enum": ["ok", "unreachable"]},
                                "doors": {
                                    "type": "object",
                                    "additionalProperties": {
                                        "enum": ["listening", "not listening"]
                                    },
                                },
                            },
                        },
                        what,
                    )
                    for code, what in (
                        ("200", "store reachable, every door listening"),
                        ("503", "the store or a door is not"),
                    )
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (docs/metrics.md)",
                "security": [],
                "responses": {
                    "200": {
                        "description": "Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "security": [],
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1")},
            }
        },
        "/v2.1": {
            "get": {
                "summary": "Version discovery (no key, as nova)",
                "security": [],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["version"],
                            "properties": {"version": _ref("Version")},
                        },
                        "this version",
                    )
                },
            }
        },
        "/v2.1/servers/{server_id}/remote-consoles": {
            "parameters": [_SERVER],
            "post": {
                "summary": "A new console token and its URL (nova's remote-consoles)",
                "requestBody": _body(
                    {
                        "type": "object",
                        "required": ["remote_console"],
                        "properties": {
                            "remote_console": {
                                "type": "object",
                                "required": ["protocol", "type"],
                                "properties": {
                                    "protocol": {"enum": ["vnc", "spice", "serial", "mks"]},
                                    "type": {
                                        "enum": [
                                            "novnc",
                                            "xvpvnc",
                                            "spice-html5",
                                            "serial",
                                            "webmks",
                                        ]
                                    },
                                },
                            }
                        },
                    },
                    {"remote_console": {"protocol": "vnc", "type": "novnc"}},
                ),
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["remote_console"],
                            "properties": {
                                "remote_console": {
                                    "type": "object",
                                    "required": ["protocol", "type", "url"],
                                    "properties": {
                                        "protocol": {"type": "string"},
                                        "type": {"type": "string"},
                                        "url": {"type": "string"},
                                    },
                                }
                            },
                        },
                        "the console's URL, holding a new token",
                    ),
                    **_faults(400, 404, 409, 413, 503),
                },
            },
        },
        "/v2.1/servers/{server_id}/action": {
            "parameters": [_SERVER],
            "post": {
                "summary": "os-getConsoleOutput: the last lines of the serial console log",
                "requestBody": _body(
                    {
                        "type": "object",
                        "required": ["os-getConsoleOutput"],
                        "properties": {
                            "os-getConsoleOutput": {
                                "type": ["object", "null"],
                                "properties": {
                                    "length": {
                                        "description": "lines from the end; all when absent,"
                                        " null or -1 (nova's -1)",
                                        "oneOf": [
                                            {"type": "integer", "minimum": -1},
                                            {"type": "string", "pattern": "^(-1|[0-9]{1,18})$"},
                                            {"type": "null"},
                                        ],
                                    }
                                },
                            }
                        },
                    },
                    {"os-getConsoleOutput": {"length": 50}},
                ),
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["output"],
                            "properties": {"output": {"type": "string"}},
                        },
                        "the log's last lines (at most 100 KiB read)",
                    ),
                    **_faults(400, 404, 413, 503),
                },
            },
        },
        "/v2.1/servers/{server_id}/os-consoled-tokens": {
            "parameters": [_SERVER],
            "delete": {
                "summary": "Delete every token of the instance"
                " (nova's clean_console_auths_for_instance)",
                "responses": {
                    "204": {"description": "deleted (also when there were none)"},
                    **_faults(503),
                },
            },
        },
        "/v2.1/os-console-auth-tokens/{console_token}": {
            "parameters": [_TOKEN],
            "get": {
                "summary": "Where a token leads (nova's look-up, as other proxies use it)",
                "parameters": [_VERSION_HEADER],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["console"],
                            "properties": {"console": _ref("Console")},
                        },
                        "the token's console; tls_port from microversion 2.99",
                    ),
                    **_faults(404),
                },
            },
        },
        "/v2.1/os-console-auth-tokens/{console_token}/action": {
            "parameters": [_TOKEN],
            "post": {
                "summary": "touch: a valid token now expires its console type's ttl from now",
                "requestBody": _body(
                    {
                        "type": "object",
                        "required": ["touch"],
                        "properties": {"touch": {"type": ["object", "null"]}},
                    },
                    {"touch": {}},
                ),
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["console"],
                            "properties": {
                                "console": {
                                    "allOf": [
                                        _ref("Connection"),
                                        {"required": ["expires"]},
                                    ]
                                }
                            },
                        },
                        "the token's row (no token) and its new expiry",
                    ),
                    **_faults(400, 404, 413, 503),
                },
            },
        },
        "/v2.1/os-consoled-sessions": {
            "get": {
                "summary": "Live sessions, by instance and/or host",
                "parameters": _FILTERS,
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["sessions"],
                            "properties": {"sessions": {"type": "array", "items": _ref("Session")}},
                        },
                        "live sessions, oldest first",
                    ),
                    **_faults(400, 503),
                },
            },
        },
        "/v2.1/os-consoled-sessions/{session_id}/action": {
            "parameters": [_SESSION],
            "post": {
                "summary": "kick or takeover: the proxy holding the session acts within one"
                " touch period",
                "requestBody": _body(
                    {
                        "type": "object",
                        "minProperties": 1,
                        "maxProperties": 1,
                        "properties": {
                            action: {
                                "type": ["object", "null"],
                                "properties": {"reason": {"type": ["string", "null"]}},
                            }
                            for action in ("kick", "takeover")
                        },
                        "additionalProperties": False,
                    },
                    {"kick": {"reason": "maintenance"}},
                ),
                "responses": {
                    "202": {"description": "asked of the proxy holding the session"},
                    **_faults(400, 404, 413, 503),
                },
            },
        },
        "/v2.1/os-consoled-connections": {
            "get": {
                "summary": "Connection details of unexpired tokens, by instance or host",
                "parameters": _FILTERS,
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["connections"],
                            "properties": {
                                "connections": {"type": "array", "items": _ref("Connection")}
                            },
                        },
                        "one per unexpired token, soonest to expire first",
                    ),
                    **_faults(400, 503),
                },
            },
        },
    }


def _secured(paths: dict[str, Any]) -> dict[str, Any]:
    for item in paths.values():
        for method, operation in item.items():
            if method != "parameters" and "security" not in operation:
                operation["security"] = _KEY
    return paths


_DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "consoled management API",
        "version": "2.99",
        "description": "nova's console API shapes under /v2.1, and consoled's own"
        " os-consoled-* calls (docs/api.md).  Errors are nova's fault bodies.",
    },
    "paths": _secured(_paths()),
    "components": {
        "schemas": _SCHEMAS,
        "securitySchemes": {
            "X-Auth-Token": {"type": "apiKey", "in": "header", "name": "X-Auth-Token"}
        },
    },
}


def document() -> dict[str, Any]:
    """A copy of the document (callers may change theirs)."""
    return copy.deepcopy(_DOCUMENT)
