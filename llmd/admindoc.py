"""The admin routes in ``/openapi.json``: status, usage, on-demand models' load/unload, and the
JSON routes the admin page reads (admin.py). Every one needs an admin key."""

from __future__ import annotations

from .apidoc import REQUEST_ID_PARAM, Schema, error_response, get, nullable, ok, post

_MODEL_ROUTES = (
    ("load", "Start a cold on-demand model; waits until it serves unless `?wait=0` (admin key)", (404, 409, 503)),
    ("unload", "Stop an on-demand model once its requests are done (admin key)", (404, 409)),
)


def _page_paths(admin_errors: Schema, ok_json: Schema) -> dict[str, Schema]:
    """The JSON routes the admin page reads (admin.py); its files and event stream are not API."""
    rows = {
        "type": "object",
        "required": ["month", "rows"],
        "properties": {"month": {"type": "string"}, "rows": {"type": "array"}},
    }
    daily = get(
        "adminUsageDaily",
        "Tokens per day, key, tier and model of a month (admin key)",
        {
            "200": {
                **ok("The month's rows.", rows),
                "content": {"application/json": {"schema": rows}, "text/csv": {"schema": {"type": "string"}}},
            },
            "400": error_response(400, "`month` is not YYYY-MM, or `format` is not json or csv."),
            "503": error_response(503, "The usage ledger cannot be read."),
            **admin_errors,
        },
        parameters=[{"name": n, "in": "query", "schema": {"type": "string"}} for n in ("month", "key", "model", "tier")]
        + [{"name": "format", "in": "query", "schema": {"enum": ["json", "csv"]}}],
    )
    new_key = {
        "type": "object",
        "required": ["id"],
        "properties": {"id": {"type": "string"}, "tier": {"type": ["string", "null"]}},
    }
    return {
        "/admin/usage/daily": daily,
        "/admin/keys": get(
            "adminKeys",
            "Configured keys, never a secret or hash (admin key)",
            {"200": ok("The keys and tier names.", ok_json), **admin_errors},
        ),
        "/admin/keys/new": {
            "post": {
                "summary": "A new secret and the YAML to add it; llmd stores nothing (admin key)",
                "operationId": "adminKeysNew",
                "parameters": [REQUEST_ID_PARAM],
                "requestBody": {"required": True, "content": {"application/json": {"schema": new_key}}},
                "responses": {
                    "200": ok("id, secret, sha256 and yaml.", ok_json),
                    "400": error_response(400, "Not a JSON object, a bad or taken id, an unknown tier."),
                    **admin_errors,
                },
            }
        },
    }


def paths(ok_json: Schema) -> dict[str, Schema]:
    admin_errors = {
        "401": error_response(401),
        "403": error_response(403, "The key is not an admin key (`admin_required`)."),
        "500": error_response(500),
    }
    return {
        "/admin/status": get(
            "adminStatus",
            "Replicas, queues and ledger state (admin key)",
            {"200": ok("Status.", ok_json), **admin_errors},
        ),
        **{
            f"/admin/models/{{model}}/{verb}": post(
                f"admin{verb.capitalize()}",
                text,
                {
                    "200": ok(
                        "The model's state after it.",
                        {
                            "type": "object",
                            "required": ["model", "state"],
                            "properties": {"model": {"type": "string"}, "state": {"type": "string"}},
                        },
                    ),
                    **{str(c): error_response(c) for c in codes},
                    **admin_errors,
                },
                parameters=[
                    {"name": "model", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
                ],
            )
            for verb, text, codes in _MODEL_ROUTES
        },
        "/admin/usage": get(
            "adminUsage",
            "Usage report by key and model (admin key)",
            {
                "200": ok(
                    "Rows of the month's rollup.",
                    {
                        "type": "object",
                        "required": ["month", "rows"],
                        "properties": {"month": nullable({"type": "string"}), "rows": {"type": "array"}},
                    },
                ),
                "400": error_response(400, "`month` is not YYYY-MM."),
                "503": {
                    **error_response(503, "The usage ledger cannot be read."),
                    "headers": {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}},
                },
                **admin_errors,
            },
            parameters=[
                {"name": "month", "in": "query", "schema": {"type": "string", "pattern": r"^\d{4}-\d{2}$"}},
                {"name": "key", "in": "query", "schema": {"type": "string"}},
                {"name": "model", "in": "query", "schema": {"type": "string"}},
            ],
        ),
        **_page_paths(admin_errors, ok_json),
    }
