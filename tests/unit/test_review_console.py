"""The review console's HTTP surface without a broker: guards, views and security headers."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestClient, TestServer

from stream_guard.review.console import CSRF_HEADER, ReviewConsole
from stream_guard.settings import Settings
from tests.unit.test_review import escalation, reviewed

JSON = {"Content-Type": "application/json", CSRF_HEADER: "1"}


@pytest.fixture
async def client():
    console = ReviewConsole(Settings())
    console.apply(console.topics.escalations, escalation("u1").to_bytes())
    console.apply(console.topics.review, reviewed("u1").to_bytes())
    console.apply(console.topics.review, b"{not json")  # counted and skipped, never fatal
    app = console.web_app()
    app.on_startup.clear()  # no broker here: the topics were applied by hand above
    app.on_cleanup.clear()
    async with TestClient(TestServer(app)) as c:
        c.console = console
        yield c


async def test_page_and_api_answer_with_a_strict_content_security_policy(client):
    page = await client.get("/")
    assert page.status == 200 and "review" in await page.text()
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    script = await client.get("/static/console.js")
    assert script.status == 200 and script.content_type == "text/javascript"
    assert (await client.get("/static/secrets.txt")).status == 404


async def test_queue_and_item_views(client):
    queue = await (await client.get("/api/queue")).json()
    assert [i["upload_id"] for i in queue["items"]] == ["u1"]
    item = await (await client.get("/api/items/u1")).json()
    assert item["rationale"] == "could be a threat"
    assert item["images"] == ["/api/items/u1/images/0"]
    assert (await client.get("/api/items/nope")).status == 404
    assert (await client.get("/api/items/u1/images/5")).status == 404


@pytest.mark.parametrize(
    "headers, body, status, message",
    [
        (
            {"Content-Type": "application/json"},
            {"decision": "allow", "reviewer": "a"},
            403,
            "header",
        ),
        (JSON, {"decision": "allow"}, 401, "reviewer identity"),
        (JSON, {"decision": "block", "categories": ["S99"], "reviewer": "a"}, 422, "categories"),
        (JSON, {"decision": "block", "categories": [], "reviewer": "a"}, 422, "category"),
        (JSON, {"decision": "escalate", "reviewer": "a"}, 422, "allow"),
        (JSON, {"decision": "allow", "reviewer": "a", "note": 5}, 400, "note"),
        (JSON, ["allow"], 400, "JSON object"),
    ],
)
async def test_bad_decisions_are_refused_with_a_reason_and_settle_nothing(
    client, headers, body, status, message
):
    answer = await client.post("/api/items/u1/decision", json=body, headers=headers)
    assert answer.status == status
    assert message in (await answer.json())["error"]
    assert client.console.queue.item("u1") is not None


async def test_deciding_an_unknown_or_settled_upload_is_refused(client):
    body = {"decision": "allow", "reviewer": "a"}
    assert (await client.post("/api/items/u9/decision", json=body, headers=JSON)).status == 404
    client.console.queue.settle("u1", "d-1")
    assert (await client.post("/api/items/u1/decision", json=body, headers=JSON)).status == 409


async def test_behind_a_proxy_a_self_reported_reviewer_name_is_refused():
    settings = Settings().model_copy(
        update={"review": Settings().review.model_copy(update={"require_reviewer_header": True})}
    )
    console = ReviewConsole(settings)
    console.apply(console.topics.escalations, escalation("u1").to_bytes())
    console.apply(console.topics.review, reviewed("u1").to_bytes())
    app = console.web_app()
    app.on_startup.clear()
    app.on_cleanup.clear()
    async with TestClient(TestServer(app)) as c:
        body = {"decision": "allow", "reviewer": "mallory"}
        answer = await c.post("/api/items/u1/decision", json=body, headers=JSON)
        assert answer.status == 401
        assert console.queue.item("u1") is not None, "nothing settled"
